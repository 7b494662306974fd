"""Pure: token counts with the shipped tokenizer, the window and budget strategies, where the summary goes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import config
from proxy.context import (
    CHUNK_CHARS,
    PART_TOKENS,
    PER_MESSAGE,
    PRIMING,
    SUMMARY_HEADER,
    TokenCounter,
    budget_for,
    fit,
    parse_budgets,
    summary_message,
    trim,
    turns,
    with_summary,
)
from proxy.errors import ConfigError
from proxy.rewrite import quote

COUNTER = TokenCounter()


def msg(role: str, content: Any = "", **extra: Any) -> dict[str, Any]:
    return {"role": role, "content": content, **extra}


def test_tokens_are_counted_by_the_tokenizer_not_by_characters() -> None:
    assert COUNTER.text("Hello, world!") == 4  # hello , world !
    same_length = ["a b c d e f g h i", "international law"]
    assert len(same_length[0]) == len(same_length[1])
    assert COUNTER.texts(same_length) == [9, 2]
    assert COUNTER.text("") == 0
    assert COUNTER.text("bad \udcff surrogate") > 0  # JSON can carry lone surrogates; they must not raise


def test_a_message_costs_its_texts_its_other_parts_and_the_framing() -> None:
    text = msg("user", "Hello, world!")
    parts = msg("user", [{"type": "text", "text": "Hello, world!"}, {"type": "image_url", "image_url": {"url": "x"}}])
    call = msg("assistant", None, tool_calls=[{"id": "c1", "type": "function",
                                               "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}])
    named = msg("user", "Hello, world!", name="alice")
    assert COUNTER.messages([text, parts, named]) == [PER_MESSAGE + 4, PER_MESSAGE + 4 + PART_TOKENS,
                                                      PER_MESSAGE + 5]
    assert COUNTER.messages([call])[0] == PER_MESSAGE + COUNTER.text("weather") + COUNTER.text('{"city": "Paris"}')
    assert COUNTER.total([text]) == PRIMING + PER_MESSAGE + 4
    assert COUNTER.messages(["not a message"]) == [PER_MESSAGE]


def test_turns_start_at_user_messages_and_keep_tool_results_with_their_call() -> None:
    messages = [msg("system"), msg("assistant", "hi"), msg("user"), msg("assistant", tool_calls=[{}]),
                msg("tool", tool_call_id="c"), msg("assistant"), msg("developer"), msg("user")]
    assert turns(messages) == [[1], [2, 3, 4, 5], [7]]


def conversation(n: int) -> list[dict[str, Any]]:
    out = [msg("system", "rules")]
    for i in range(n):
        out += [msg("user", f"question {i}"), msg("assistant", f"answer {i}")]
    return out


def test_window_keeps_the_newest_whole_turns_and_every_system_message() -> None:
    messages = [*conversation(3), msg("user", "now")]  # system, 3 turns of 2, the new question
    assert trim(messages, window=3) == [0, 5, 6, 7]  # the last turn and one more (2 + 1 <= 3)
    assert trim(messages, window=1) == [0, 7]
    assert trim(messages, window=100) == list(range(8))
    assert trim([msg("system"), msg("user")], window=0) == [0, 1]  # the last user turn always goes


def test_budget_drops_the_oldest_turns_first_never_the_system_message_nor_the_last_user_turn() -> None:
    messages = [*conversation(3), msg("user", "now")]
    tokens = COUNTER.messages(messages)
    everything = PRIMING + sum(tokens)
    assert trim(messages, tokens, budget=everything) == list(range(8))
    kept = trim(messages, tokens, budget=everything - 1)
    assert kept == [0, 3, 4, 5, 6, 7]  # the oldest turn went, whole
    assert trim(messages, tokens, budget=1) == [0, 7]  # over budget, but these two always go


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["system", "user", "assistant", "tool"]), max_size=30),
       st.lists(st.integers(1, 50), min_size=30, max_size=30), st.integers(0, 800),
       st.one_of(st.none(), st.integers(0, 12)))
def test_trim_properties(roles: list[str], costs: list[int], budget: int, window: int | None) -> None:
    messages = [msg(role, str(i)) for i, role in enumerate(roles)]
    tokens = costs[:len(messages)]
    kept = trim(messages, tokens, budget=budget, window=window)
    grouped = turns(messages)
    assert kept == sorted(set(kept))
    assert all(i in kept for i, m in enumerate(messages) if m["role"] == "system")
    if grouped:
        assert set(grouped[-1]) <= set(kept)
        dropped = [g for g in grouped if not set(g) & set(kept)]
        assert all(set(g) <= set(kept) or g in dropped for g in grouped)  # turns go whole
        assert dropped == grouped[:len(dropped)]  # and only the oldest
        floor = PRIMING + sum(tokens[i] for i, m in enumerate(messages) if m["role"] == "system") + sum(
            tokens[i] for i in grouped[-1])
        assert PRIMING + sum(tokens[i] for i in kept) <= max(budget, floor)
        if window is not None:
            assert sum(len(g) for g in grouped if set(g) <= set(kept)) <= max(window, len(grouped[-1]))


def test_the_summary_joins_a_message_the_client_sent_and_adds_none() -> None:
    messages = [msg("developer", "rules"), msg("system", "more"), msg("user", "hi")]
    out = with_summary(messages, "we talked")
    assert out[0] == {"role": "developer", "content": "rules\n\n" + SUMMARY_HEADER + "\"we talked\""}
    assert out[1:] == messages[1:]
    assert with_summary([msg("user", "hi")], "s") == [{"role": "user", "content": SUMMARY_HEADER + "\"s\"\n\nhi"}]
    assert with_summary([msg("assistant", "a")], "s") == [msg("assistant", "a")]  # nowhere to put it


def test_fit_puts_the_summary_in_where_turns_were_left_out_and_counts_it() -> None:
    messages = [*conversation(3), msg("user", "now")]
    tokens = COUNTER.messages(messages)
    everything = PRIMING + sum(tokens)
    summary = "the user asked three questions"
    summary_tokens = COUNTER.messages([summary_message(summary)])[0]
    assert fit(messages, tokens, budget=everything, summary=summary, summary_tokens=summary_tokens) == (messages, 0)
    sent, dropped = fit(messages, tokens, budget=everything - 1, summary=summary, summary_tokens=summary_tokens)
    assert sent[0]["content"] == messages[0]["content"] + "\n\n" + SUMMARY_HEADER + quote(summary)
    assert dropped >= 2
    assert COUNTER.total(sent) <= everything - 1
    always, none_dropped = fit(messages, tokens, summary=summary, summary_tokens=summary_tokens, always_summary=True)
    assert none_dropped == 0 and always == with_summary(messages, summary)
    assert fit(messages, None, window=1) == ([messages[0], messages[7]], 6)


def test_per_model_budgets() -> None:
    budgets = parse_budgets(" gpt-4o-mini=8000, gpt-4o*=100000 ,claude-*=0,*=4000")
    assert budgets == (("gpt-4o-mini", 8000), ("gpt-4o*", 100000), ("claude-*", 0), ("*", 4000))
    assert budget_for(budgets, "gpt-4o-mini") == 8000
    assert budget_for(budgets, "gpt-4o-2024-08-06") == 100000
    assert budget_for(budgets, "claude-3") is None
    assert budget_for(budgets, "llama") == 4000
    assert budget_for(budgets, None) == 4000
    assert budget_for(parse_budgets(""), "gpt-4o") is None
    for bad in ("gpt-4o", "=5", "gpt=many", "gpt=-1"):
        with pytest.raises(ValueError, match="model=tokens"):
            parse_budgets(bad)
    with pytest.raises(ConfigError, match="model=tokens"):
        config.load(environ={"HOME": "/h", "MEMORY_PROXY_CONTEXT_BUDGETS": "gpt-4o"})


@pytest.mark.parametrize(("env", "message"), [
    ({"MEMORY_PROXY_SESSION_HISTORY": "always"}, "off, store or prepend"),
    ({"MEMORY_PROXY_CONTEXT_WINDOW": "-1"}, "negative"),
    ({"MEMORY_PROXY_SESSION_MAX_MESSAGES": "10", "MEMORY_PROXY_SUMMARY_KEEP_MESSAGES": "10"}, "below"),
])
def test_session_settings_are_checked_at_start(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(environ={"HOME": "/h", **env})


ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool"])
WORDS = st.text(st.sampled_from("ab cd, é 世 !"), max_size=60)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(ROLES, WORDS), min_size=1, max_size=12), st.integers(0, 120))
def test_counting_that_stops_at_the_budget_trims_as_exact_counting_does(parts: list[tuple[str, str]],
                                                                         budget: int) -> None:
    messages = [msg(role, text) for role, text in parts]
    exact = COUNTER.messages(messages)
    capped = TokenCounter().messages(messages, budget)
    assert trim(messages, capped, budget=budget) == trim(messages, exact, budget=budget)
    assert all(c == e or c == budget + 1 for c, e in zip(capped, exact, strict=True))


def test_long_texts_are_counted_in_chunks_and_stop_past_the_cap() -> None:
    sentence = "The quick brown fox jumps over the lazy dog, again and again. "
    text = sentence * 2000  # ~124k characters: eight chunks
    assert len(text) > 4 * CHUNK_CHARS
    whole = len(COUNTER.tokenizer.encode(text, add_special_tokens=False).ids)
    assert TokenCounter().text(text) == whole  # chunks end at spaces: the sum is the whole count
    capped = TokenCounter().texts([text], cap=100)[0]
    assert 100 < capped < whole  # stopped after the first chunk

"""The memory loop end to end: a real proxy (real model, real SQLite), the official SDK, a fake upstream."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from proxy.config import Settings
from proxy.extract import INSTRUCTION
from tests.fakeupstream import FakeUpstream, Reply
from tests.injected import memories_sent

Upstream = tuple[FakeUpstream, str]


def block(*items: str) -> str:
    return "\n<memory>\n[" + ", ".join(items) + "]\n</memory>"


def ask(client: openai.OpenAI, user: str, text: str, **options: Any) -> Any:
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}],
                                          extra_headers={"X-Memory-User": user}, **options)


def memories(proxy: str, user: str, expect: int | None = None) -> list[str]:
    """The user's memories, once the writer has stored `expect` of them (writes land off the request path)."""
    deadline = time.monotonic() + 10
    while True:
        texts = [m["text"] for m in httpx.get(f"{proxy}/memories/{user}").json()["data"]]
        if expect is None or len(texts) >= expect or time.monotonic() > deadline:
            return texts
        time.sleep(0.02)


def sent_memories(fake: FakeUpstream) -> str:
    """The memories the upstream received in the last chat, or ''."""
    return memories_sent(fake.chats[-1].json()["messages"])


@pytest.fixture
def fake(upstream: Upstream) -> FakeUpstream:
    return upstream[0]


def test_turn_one_stores_the_fact_and_the_client_never_sees_the_block(client: openai.OpenAI, proxy: str,
                                                                       fake: FakeUpstream) -> None:
    fake.reply("Noted, no meat then!" + block('{"text": "User is vegetarian", "category": "fact"}'))
    answer = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "I'm vegetarian."}], extra_headers={"X-Memory-User": "alice"})
    assert answer.parse().choices[0].message.content == "Noted, no meat then!"
    assert answer.headers["x-memory-recalled"] == "0"
    assert memories(proxy, "alice", expect=1) == ["User is vegetarian"]
    sent = fake.chats[-1].json()["messages"]
    assert [m["role"] for m in sent] == ["user"]  # no message of ours: the instruction joins the user's
    assert sent[0]["content"] == INSTRUCTION + "\n\nI'm vegetarian."
    assert "x-memory-user" not in fake.chats[-1].headers


def test_a_new_conversation_carries_the_fact_and_other_users_see_none(client: openai.OpenAI, proxy: str,
                                                                       fake: FakeUpstream) -> None:
    fake.reply("Got it." + block('{"text": "User is vegetarian"}'))
    ask(client, "alice", "I'm vegetarian.")
    memories(proxy, "alice", expect=1)
    fake.reply("How about a mushroom risotto?")
    raw = client.chat.completions.with_raw_response.create(
        model="m", messages=[{"role": "user", "content": "Suggest a recipe for me"}],
        extra_headers={"X-Memory-User": "alice"})
    assert raw.headers["x-memory-recalled"] == "1"
    assert "User is vegetarian" in sent_memories(fake)
    fake.reply("A steak?")
    ask(client, "bob", "Suggest a recipe for me")
    assert sent_memories(fake) == ""


def test_user_field_names_the_user_too(client: openai.OpenAI, proxy: str, fake: FakeUpstream) -> None:
    fake.reply("Cool." + block('"User plays chess"'))
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "I play chess"}], user="carol")
    assert memories(proxy, "carol", expect=1) == ["User plays chess"]
    assert fake.chats[-1].json()["user"] == "carol"  # the body's own field is forwarded as it came


def test_a_replaced_fact_is_no_longer_recalled(client: openai.OpenAI, proxy: str, fake: FakeUpstream) -> None:
    fake.reply("Lisbon, lovely." + block('{"text": "User lives in Lisbon"}'))
    ask(client, "dan", "I live in Lisbon.")
    memories(proxy, "dan", expect=1)
    fake.reply("Porto is great." + block('{"text": "User lives in Porto", "replaces": "m1"}'))
    ask(client, "dan", "I just moved, where do I live now? Porto!")
    assert "User lives in Lisbon" in sent_memories(fake)
    deadline = time.monotonic() + 10
    while memories(proxy, "dan") != ["User lives in Porto"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert memories(proxy, "dan") == ["User lives in Porto"]
    fake.reply("In Porto.")
    ask(client, "dan", "Which city do I live in?")
    assert "Porto" in sent_memories(fake) and "Lisbon" not in sent_memories(fake)


def test_forget_removes_a_memory(client: openai.OpenAI, proxy: str, fake: FakeUpstream) -> None:
    fake.reply("Ok." + block('"User smokes"'))
    ask(client, "eve", "I smoke")
    memories(proxy, "eve", expect=1)
    fake.reply("Congratulations!" + block('{"forget": "m1"}'))
    ask(client, "eve", "I quit smoking, I no longer smoke")
    deadline = time.monotonic() + 10
    while memories(proxy, "eve") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert memories(proxy, "eve") == []


def stream_text(client: openai.OpenAI, user: str, text: str, **options: Any) -> Iterator[Any]:
    return iter(ask(client, user, text, stream=True, stream_options={"include_usage": True}, **options))


def test_stream_strips_the_block_and_stores_it(client: openai.OpenAI, proxy: str, fake: FakeUpstream) -> None:
    answer = "Sure, I will remember that you love hiking in the Alps."
    fake.reply(Reply(answer + block('{"text": "User loves hiking", "category": "preference"}'), chunk_size=1))
    chunks = list(stream_text(client, "fay", "I love hiking"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 12
    assert memories(proxy, "fay", expect=1) == ["User loves hiking"]


def test_unclosed_block_at_the_end_of_a_stream_leaks_nothing(client: openai.OpenAI, proxy: str,
                                                              fake: FakeUpstream) -> None:
    fake.reply(Reply('Fine.\n<memory>\n[{"text": "User is secretive"', chunk_size=2))
    chunks = list(stream_text(client, "gus", "hello"))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Fine."


def test_upstream_dropping_mid_stream_leaks_nothing(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.reply(Reply('Hi!\n<memory>\n[{"text": "User is Hal"}]\n</memory>', chunk_size=2, drop_after=6))
    seen = ""
    with pytest.raises(openai.APIError):
        for chunk in stream_text(client, "hal", "hello"):
            seen += "".join(c.delta.content or "" for c in chunk.choices)
    assert seen == "Hi!"


def test_n_choices_store_the_union_once(client: openai.OpenAI, proxy: str, fake: FakeUpstream) -> None:
    fake.reply(Reply(["A." + block('"User has a cat"', '"User is a pilot"'), "B." + block('"User has a cat"')]))
    completion = ask(client, "ivy", "I'm a pilot with a cat", n=2)
    assert [c.message.content for c in completion.choices] == ["A.", "B."]
    assert sorted(memories(proxy, "ivy", expect=2)) == ["User has a cat", "User is a pilot"]
    time.sleep(0.2)
    assert len(memories(proxy, "ivy")) == 2


def test_known_facts_are_not_stored_again(client: openai.OpenAI, proxy: str, fake: FakeUpstream) -> None:
    fake.reply("Ok." + block('"User likes tea"'))
    ask(client, "jon", "I like tea")
    first = httpx.get(f"{proxy}/memories/jon").json()["data"]
    assert len(first) == 1 or memories(proxy, "jon", expect=1)
    before = httpx.get(f"{proxy}/memories/jon").json()["data"][0]
    fake.reply("Tea it is." + block('"User likes tea."'))  # the model repeats what it was shown
    ask(client, "jon", "What drink do I like, tea?")
    assert "User likes tea" in sent_memories(fake)
    time.sleep(0.3)
    after = httpx.get(f"{proxy}/memories/jon").json()["data"]
    assert after == [before]  # neither added nor touched


def test_no_user_means_byte_identical_forwarding(proxy: str, fake: FakeUpstream) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    httpx.post(proxy + "/v1/chat/completions", content=body)
    assert fake.chats[-1].body == body


BAD_USER_HEADERS = {
    "too long": [b"x" * 257], "far too long": [b"y" * 1000],
    "not UTF-8 (Latin-1 y-diaeresis)": [b"h\xffx"], "not UTF-8 (a lone continuation byte)": [b"zo\x80"],
    "sent twice": [b"alice", b"bob"], "sent twice, the same": [b"alice", b"alice"],
}


@pytest.mark.parametrize("what", list(BAD_USER_HEADERS))
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_bad_user_headers_are_400(proxy: str, fake: FakeUpstream, what: str, path: str) -> None:
    """The user header is the proxy's own (a body `user` it cannot use is the upstream's: test_unreadable.py):
    one that names no user for sure is refused, never read as some user (the first of two, or a Latin-1 reading
    that `h\xc3\xbfx`, UTF-8 for the same letters, would also name)."""
    headers = [(b"X-Memory-User", value) for value in BAD_USER_HEADERS[what]]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "input": "hi"}
    response = httpx.post(proxy + path, headers=headers, json=body)
    error = response.json()["error"]
    assert response.status_code == 400 and error["code"] == "invalid_user" and error["param"] == "X-Memory-User"
    assert fake.chats == [] and httpx.get(proxy + "/users").json()["data"] == []


def test_memory_fault_answers_without_memory(upstream: Upstream, settings_for: Callable[..., Settings],
                                             start_proxy: Callable[..., str]) -> None:
    fake, url = upstream
    proxy = start_proxy(settings_for(url, recall_budget_ms=0.001))
    fake.reply("Still here.")
    response = httpx.post(proxy + "/v1/chat/completions", headers={"x-memory-user": "kim"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "Still here."
    assert response.headers["x-memory-error"] == "recall-timeout" and response.headers["x-memory-recalled"] == "0"


def test_upstream_errors_reach_the_client_unchanged(client: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.reply(Reply(status=429, headers={"retry-after": "3"}))
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, "lea", "hi")
    assert caught.value.response.headers["retry-after"] == "3"


def test_profile_memories_go_into_every_request_first(upstream: Upstream, settings_for: Callable[..., Settings],
                                                      start_proxy: Callable[..., str], fake: FakeUpstream) -> None:
    proxy = start_proxy(settings_for(upstream[1], min_similarity=0.3))  # a cut that keeps the cello out
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="sk-client", max_retries=0)
    created = httpx.post(f"{proxy}/memories/pia", json=[
        {"text": "User's name is Pia and she wants answers in German", "category": "profile"},
        {"text": "User plays the cello on Sundays"}, {"text": "User is allergic to peanuts", "category": "profile"}])
    assert created.status_code == 201
    fake.reply("Sunny.")
    ask(client, "pia", "Will it rain on Mars tomorrow?")
    lines = sent_memories(fake).splitlines()
    assert lines[2].startswith("Today is ")
    assert lines[3].startswith("[m1] (profile, noted ") and "allergic to peanuts" in lines[3]  # newest profile first
    assert lines[4].startswith("[m2] (profile, noted ") and "Pia" in lines[4]
    assert not any("cello" in line for line in lines)  # ranked memories still need to pass the cut
    client.close()


def test_a_user_without_memories_costs_no_embedding(upstream: Upstream, settings_for: Callable[..., Settings],
                                                    start_proxy: Callable[..., str]) -> None:
    from proxy.embed import OnnxEmbedder

    fake, url = upstream
    embedder = OnnxEmbedder(cache_size=0)
    proxy = start_proxy(settings_for(url), embedder=embedder)
    fake.reply("Sure.")
    with openai.OpenAI(base_url=proxy + "/v1", api_key="sk", max_retries=0) as sdk:
        ask(sdk, "newcomer", "What is a good recipe for tonight?")
        runs = embedder.model_runs
        ask(sdk, "newcomer", "And one for tomorrow?")
        assert embedder.model_runs == runs  # nothing recalled, nothing embedded
        assert httpx.post(f"{proxy}/memories/newcomer", json={"text": "User is vegan"}).status_code == 201
        runs = embedder.model_runs
        ask(sdk, "newcomer", "I am vegan, what can I cook tonight?")
        assert embedder.model_runs == runs + 1 and "User is vegan" in sent_memories(fake)

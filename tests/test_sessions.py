"""Conversation memory end to end: a real proxy (real model, real SQLite), the official SDK, a fake upstream that
also plays the summary model."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.config import Settings
from proxy.context import SUMMARY_HEADER, TokenCounter
from proxy.extract import INSTRUCTION
from tests.fakeupstream import FakeUpstream, Recorded, Reply
from tests.injected import client_text, memories_sent
from tests.pgserver import postgres_databases, postgres_location, postgres_server  # noqa: F401
from tests.servers import running

SUMMARY_MODEL = "cheap"
BLOCK = '\n<memory>\n["User is planning a trip"]\n</memory>'


class Upstream(FakeUpstream):
    """The fake upstream; calls to the summary model are answered here (numbered summaries), not from the script,
    so they never take a reply meant for the conversation."""

    def __init__(self) -> None:
        super().__init__()
        self.summary_status = 200

    @property
    def summaries(self) -> list[Recorded]:
        return [r for r in self.chats if r.json()["model"] == SUMMARY_MODEL]

    @property
    def talks(self) -> list[Recorded]:
        return [r for r in self.chats if r.json()["model"] != SUMMARY_MODEL]

    async def chat(self, request: Request) -> Response:
        if orjson.loads(await request.body()).get("model") != SUMMARY_MODEL:
            return await super().chat(request)
        await self.record(request)
        text = f"Summary v{len(self.summaries)}: the user asks numbered questions about topics."
        return JSONResponse({"object": "chat.completion", "model": SUMMARY_MODEL, "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]},
            status_code=self.summary_status)


@pytest.fixture
def fake() -> Iterator[tuple[Upstream, str]]:
    upstream = Upstream()
    with running(upstream.app) as url:
        yield upstream, url + "/v1"


@pytest.fixture
def start(fake: tuple[Upstream, str], settings_for: Callable[..., Settings],
          start_proxy: Callable[..., str]) -> Callable[..., str]:
    """Start a proxy in front of the fake with these settings; returns its base URL."""
    return lambda **overrides: start_proxy(settings_for(fake[1], **overrides))


def sdk(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy + "/v1", api_key="sk-client", max_retries=0)


def say(client: openai.OpenAI, text: str, *, user: str = "ann", session: str = "s1", **options: Any) -> Any:
    messages = options.pop("messages", [{"role": "user", "content": text}])
    return client.chat.completions.create(model="m", messages=messages, **options,
                                          extra_headers={"X-Memory-User": user, "X-Memory-Session": session})


def talk(recorded: Recorded) -> list[tuple[str, str]]:
    """The conversation the upstream received, as the client wrote it (the proxy's additions taken out)."""
    return [(m["role"], client_text(m["content"])) for m in recorded.json()["messages"]
            if m["role"] in ("user", "assistant")]


def stored(proxy: str, user: str, session: str, expect: int) -> dict[str, Any]:
    """The session once it holds `expect` messages (turns are stored off the request path)."""
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(f"{proxy}/sessions/{user}/{session}")
        if (response.status_code == 200 and len(response.json()["data"]) >= expect) or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return dict(response.json())
        time.sleep(0.02)


def searched(proxy: str, user: str, query: str, expect: int = 1) -> list[dict[str, Any]]:
    """Conversation chunks for the query, once at least `expect` are indexed (that too is off the request path)."""
    deadline = time.monotonic() + 10
    while True:
        data = httpx.get(f"{proxy}/memories/{user}/search", params={"q": query, "kind": "conversation"}).json()["data"]
        if len(data) >= expect or time.monotonic() > deadline:
            return list(data)
        time.sleep(0.05)


def test_a_client_sending_one_message_at_a_time_gets_the_whole_conversation(
        fake: tuple[Upstream, str], start: Callable[..., str]) -> None:
    upstream, _ = fake
    proxy = start(session_history="prepend")
    with sdk(proxy) as client:
        upstream.reply("Lisbon is lovely in May." + BLOCK)
        assert say(client, "I'm planning a trip to Lisbon.").choices[0].message.content == "Lisbon is lovely in May."
        upstream.reply(Reply("Try the pastéis de nata." + BLOCK, chunk_size=2))
        chunks = say(client, "What should I eat there?", stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Try the pastéis de nata."
        upstream.reply("You asked about food.")
        say(client, "", messages=[{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": "What did I just ask you?"}])
        sent = upstream.talks[-1].json()["messages"]
        assert sent[0]["role"] == "system" and sent[0]["content"].startswith("Be brief.")  # the instruction joins it
        assert talk(upstream.talks[-1]) == [
            ("user", "I'm planning a trip to Lisbon."), ("assistant", "Lisbon is lovely in May."),
            ("user", "What should I eat there?"), ("assistant", "Try the pastéis de nata."),
            ("user", "What did I just ask you?")]
        assert sent[1] == {"role": "user", "content": "I'm planning a trip to Lisbon."}  # history after the system
        assert [m["role"] for m in sent] == ["system", "user", "assistant", "user", "assistant", "user"]
        upstream.reply("Hello.")
        say(client, "Hi, new topic.", session="s2")
        assert talk(upstream.talks[-1]) == [("user", "Hi, new topic.")]
        upstream.reply("Hello, Bob.")
        say(client, "Hi.", user="bob")
        assert talk(upstream.talks[-1]) == [("user", "Hi.")]


def test_store_mode_keeps_the_turns_and_the_api_shows_them(fake: tuple[Upstream, str],
                                                           start: Callable[..., str]) -> None:
    upstream, _ = fake
    proxy = start(session_history="store")
    history: list[Any] = [{"role": "system", "content": "You are terse."}]
    with sdk(proxy) as client:
        for question, answer in [("Where is Porto?", "In Portugal."), ("How far from Lisbon?", "About 300 km.")]:
            upstream.reply(answer + BLOCK)
            history.append({"role": "user", "content": question})
            client.chat.completions.create(model="m", messages=history, user="bob", metadata={"session_id": "chat-7"})
            history.append({"role": "assistant", "content": answer})
    assert talk(upstream.talks[-1]) == [(m["role"], m["content"]) for m in history[1:-1]]  # nothing added
    assert upstream.talks[-1].json()["messages"][1:3] == history[1:3]  # earlier turns as they came
    session = stored(proxy, "bob", "chat-7", expect=4)
    assert [(m["seq"], m["role"], m["content"]) for m in session["data"]] == [
        (1, "user", "Where is Porto?"), (2, "assistant", "In Portugal."),
        (3, "user", "How far from Lisbon?"), (4, "assistant", "About 300 km.")]
    assert session["data"][0]["tokens"] == TokenCounter().messages([{"role": "user", "content": "Where is Porto?"}])[0]
    assert (session["id"], session["user"], session["messages"], session["summary"]) == ("chat-7", "bob", 4, "")
    listed = httpx.get(f"{proxy}/sessions/bob").json()
    assert [s["id"] for s in listed["data"]] == ["chat-7"] and listed["has_more"] is False
    assert httpx.get(f"{proxy}/sessions/bob/chat-8").status_code == 404
    assert httpx.get(f"{proxy}/sessions/bob/bad%7Fid").json()["error"]["code"] == "invalid_session"
    bad = httpx.post(f"{proxy}/v1/chat/completions", headers={"X-Memory-User": "bob", "X-Memory-Session": "a\tb"},
                     json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_session"  # our header: ours to refuse


def test_two_hundred_turns_stay_within_the_budget_with_the_summary_present(fake: tuple[Upstream, str],
                                                                           start: Callable[..., str]) -> None:
    upstream, _ = fake
    budget = 500
    proxy = start(session_history="prepend", context_budgets=f"m={budget},*=0", summary_model=SUMMARY_MODEL,
                  summary_keep_messages=8, session_max_messages=40)
    counter = TokenCounter()
    conversation: list[dict[str, str]] = []
    with sdk(proxy) as client:
        for i in range(200):
            answer = f"Answer {i}: topic {i} is a fine subject with a long history and many details."
            question = f"Question {i}: what can you tell me about topic {i} in two sentences?"
            upstream.reply(answer)
            say(client, question, user="long")
            conversation += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    sent = [recorded.json()["messages"] for recorded in upstream.talks]
    assert len(sent) == 200
    assert max(counter.total(messages) for messages in sent) <= budget
    assert counter.total(conversation) > 15 * budget  # what the whole conversation would cost
    last = sent[-1]
    # No system message of ours: the summary opens the first user message kept, the instruction the last one.
    assert [m["role"] for m in last[::2]] == ["user"] * len(last[::2]) and last[-1]["role"] == "user"
    assert last[-1]["content"].startswith(INSTRUCTION) and last[-1]["content"].endswith(
        "\n\nQuestion 199: what can you tell me about topic 199 in two sentences?")
    assert last[0]["content"].startswith(SUMMARY_HEADER + "\"Summary v")
    assert ("assistant", "Answer 198: topic 198 is a fine subject with a long history and many details.") in talk(
        upstream.talks[-1])  # the recent turns verbatim
    assert sum(1 for messages in sent if messages[0]["content"].startswith(SUMMARY_HEADER)) > 150
    calls = [r.json()["messages"][1]["content"] for r in upstream.summaries]
    assert len(calls) >= 10
    assert all(f"Summary v{n}:" in call for n, call in enumerate(calls[1:], start=1))  # the summary is extended
    session = stored(proxy, "long", "s1", expect=1)
    assert session["messages"] == 40 and session["summary"].startswith("Summary v")


def test_store_mode_puts_the_summary_where_a_budget_cut_the_turns(fake: tuple[Upstream, str],
                                                                  start: Callable[..., str]) -> None:
    upstream, _ = fake
    proxy = start(session_history="store", context_budgets="m=300", summary_model=SUMMARY_MODEL,
                  summary_keep_messages=2)
    history: list[Any] = []
    with sdk(proxy) as client:
        for n in range(8):
            upstream.reply(f"Answer {n} about the weather in town number {n}.")
            history.append({"role": "user", "content": f"Question {n}: how is the weather in town number {n}?"})
            say(client, "", messages=history)
            history.append({"role": "assistant", "content": f"Answer {n} about the weather in town number {n}."})
        deadline = time.monotonic() + 10
        while not stored(proxy, "ann", "s1", expect=16)["summary"] and time.monotonic() < deadline:
            time.sleep(0.02)
        upstream.reply("Sunny.")
        history.append({"role": "user", "content": "And tomorrow?"})
        say(client, "", messages=history)
    sent = upstream.talks[-1].json()["messages"]
    assert sent[0]["role"] == "user" and sent[0]["content"].startswith(SUMMARY_HEADER + "\"Summary v1")
    assert client_text(sent[-1]["content"]) == history[-1]["content"] and len(sent) < len(history)
    assert TokenCounter().total(sent) <= 300


def test_a_past_conversation_is_found_by_a_paraphrased_question(fake: tuple[Upstream, str],
                                                                start: Callable[..., str]) -> None:
    upstream, _ = fake
    proxy = start(session_history="store", recall_conversations=True)
    with sdk(proxy) as client:
        upstream.reply("The runner image lacks OpenSSL 3. Add `apt-get install -y libssl3` to the Dockerfile "
                       "before the build step, then rebuild the image.")
        say(client, "Our CI build fails with: error while loading shared libraries: libssl.so.3: cannot open "
                    "shared object file", session="ci")
        upstream.reply("A leek and potato soup: sweat the leeks in butter, add potatoes and stock, blend.")
        say(client, "What should I cook tonight? I have leeks and potatoes.", session="dinner")
        question = "How did we fix the missing SSL library error in the pipeline last month?"
        hits = searched(proxy, "ann", question, expect=2)
        assert hits[0]["session"] == "ci" and "libssl3" in hits[0]["text"] and hits[0]["score"] > hits[1]["score"]
        assert hits[0]["object"] == "conversation.chunk" and hits[0]["user"] == "ann"
        assert searched(proxy, "ann", "what was that soup recipe you gave me?")[0]["session"] == "dinner"
        assert httpx.get(f"{proxy}/memories/ann/search", params={"q": question}).json()["data"] == []  # facts only
        assert httpx.get(f"{proxy}/memories/ann/search", params={"q": question, "kind": "x"}).status_code == 400
        assert searched(proxy, "bob", question, expect=0) == []
        upstream.reply("Same as before: install libssl3.")
        say(client, question, session="new")
        sent = upstream.talks[-1].json()["messages"]
        memories = memories_sent(sent)
        assert memories.count("<memories>") == 1 and "libssl3" in memories and "leek" not in memories
        upstream.reply("Why did the chicken cross the road?")
        say(client, "Tell me a joke", session="new")
        assert not memories_sent(upstream.talks[-1].json()["messages"])


def test_erasing_a_user_removes_their_sessions_and_chunks(fake: tuple[Upstream, str],
                                                          start: Callable[..., str]) -> None:
    upstream, _ = fake
    proxy = start(session_history="store")
    with sdk(proxy) as client:
        for user, session in [("dan", "s1"), ("dan", "s2"), ("eve", "s1")]:
            upstream.reply("The capital of France is Paris.")
            say(client, "What is the capital of France?", user=user, session=session)
    for user in ("dan", "eve"):
        assert len(searched(proxy, user, "French capital city", expect=2 if user == "dan" else 1)) >= 1
    assert len(searched(proxy, "dan", "French capital city", expect=2)) == 2
    assert httpx.delete(f"{proxy}/sessions/dan/s1").json() == {"id": "s1", "object": "session.deleted", "deleted": True}
    assert httpx.delete(f"{proxy}/sessions/dan/s1").status_code == 404
    assert [hit["session"] for hit in searched(proxy, "dan", "French capital city")] == ["s2"]
    erased = httpx.delete(f"{proxy}/memories/dan").json()
    assert erased["sessions_deleted"] == 1
    assert httpx.get(f"{proxy}/sessions/dan").json()["data"] == []
    assert searched(proxy, "dan", "French capital city", expect=0) == []
    assert httpx.get(f"{proxy}/sessions/dan/s2").status_code == 404
    assert len(httpx.get(f"{proxy}/sessions/eve").json()["data"]) == 1
    assert len(searched(proxy, "eve", "French capital city")) == 1


def test_a_session_keeps_at_most_max_messages(fake: tuple[Upstream, str], start: Callable[..., str]) -> None:
    upstream, _ = fake
    proxy = start(session_history="prepend", session_max_messages=4, summary_keep_messages=2)
    with sdk(proxy) as client:
        for n in range(4):
            upstream.reply(f"a{n}")
            say(client, f"q{n}")
    assert talk(upstream.talks[-1]) == [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"),
                                        ("user", "q3")]
    session = stored(proxy, "ann", "s1", expect=4)
    assert [m["seq"] for m in session["data"]] == [5, 6, 7, 8] and session["first_seq"] == 5


def test_an_expired_session_is_forgotten(fake: tuple[Upstream, str], start: Callable[..., str]) -> None:
    upstream, _ = fake
    proxy = start(session_history="prepend", session_ttl_seconds=0.5)
    with sdk(proxy) as client:
        upstream.reply("Noted.")
        say(client, "My name is Ann.")
        stored(proxy, "ann", "s1", expect=2)
        time.sleep(0.6)
        assert httpx.get(f"{proxy}/sessions/ann/s1").status_code == 404
        upstream.reply("I don't know.")
        say(client, "What is my name?")
    assert talk(upstream.talks[-1]) == [("user", "What is my name?")]
    assert [m["content"] for m in stored(proxy, "ann", "s1", expect=2)["data"]] == ["What is my name?",
                                                                                    "I don't know."]


def test_a_failing_summary_model_never_breaks_the_chat(fake: tuple[Upstream, str], start: Callable[..., str]) -> None:
    upstream, _ = fake
    upstream.summary_status = 500
    proxy = start(session_history="prepend", summary_model=SUMMARY_MODEL, summary_keep_messages=2)
    with sdk(proxy) as client:
        for n in range(8):
            upstream.reply(f"a{n}")
            assert say(client, f"q{n}").choices[0].message.content == f"a{n}"
    assert stored(proxy, "ann", "s1", expect=16)["summary"] == ""
    deadline = time.monotonic() + 10
    while not upstream.summaries and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(upstream.summaries) == 1  # and then it pauses instead of calling on every turn
    assert upstream.summaries[0].headers["authorization"] == "Bearer sk-client"  # made as the client
    assert len(talk(upstream.talks[-1])) == 15  # no summary, so every turn is still sent


def test_a_token_budget_applies_to_requests_without_a_user(fake: tuple[Upstream, str],
                                                           start: Callable[..., str]) -> None:
    upstream, _ = fake
    proxy = start(context_budgets="m=80")
    messages = [{"role": "system", "content": "Be brief."}]
    for n in range(10):
        messages += [{"role": "user", "content": f"question number {n}"}, {"role": "assistant", "content": f"a{n}"}]
    messages.append({"role": "user", "content": "last question"})
    with sdk(proxy) as client:
        upstream.reply("ok")
        assert client.chat.completions.create(model="m", messages=messages).choices[0].message.content == "ok"
        sent = upstream.talks[-1].json()["messages"]
        assert sent[0] == messages[0] and sent[-1] == messages[-1] and sent == [messages[0], *messages[-len(sent) + 1:]]
        assert 2 < len(sent) < len(messages) and TokenCounter().total(sent) <= 80
        upstream.reply("ok")
        client.chat.completions.create(model="other", messages=messages)  # no budget for this model
        assert upstream.talks[-1].json()["messages"] == messages


def test_sessions_on_postgres(fake: tuple[Upstream, str], start: Callable[..., str],
                              request: pytest.FixtureRequest) -> None:
    upstream, _ = fake
    proxy = start(session_history="prepend", db=request.getfixturevalue("postgres_location"))
    with sdk(proxy) as client:
        for question, answer in [("I'm Ann.", "Hi Ann."), ("Who am I?", "You are Ann.")]:
            upstream.reply(answer)
            say(client, question)
    assert talk(upstream.talks[-1]) == [("user", "I'm Ann."), ("assistant", "Hi Ann."), ("user", "Who am I?")]
    assert len(searched(proxy, "ann", "what is my name", expect=2)) == 2
    assert httpx.delete(f"{proxy}/memories/ann").json()["sessions_deleted"] == 1
    assert httpx.get(f"{proxy}/sessions/ann").json()["data"] == []

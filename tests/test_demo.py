"""The demo upstream: what it reads and writes (pure), its wire shapes, and the loop it closes through a real proxy
(real model, real SQLite, the official SDK)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy import extract
from proxy.config import Settings
from proxy.demo import answer, extraction, shown_memories
from proxy.models import Hit, Memory
from proxy.plan import plan
from proxy.rewrite import rewrite

# Recall that misses its budget answers without memory, by design (tests/test_faults.py); these tests are about the
# loop, and a shared 2-core machine under load can take longer than the default 50 ms.
RECALL_BUDGET_MS = 10_000.0


def hit(alias_number: int, text: str, category: str = "fact") -> Hit:
    memory = Memory(id=f"{alias_number:020x}", user="u", text=text, category=category, source="inline",
                    created_at=0.0, updated_at=0.0)
    return Hit(memory, 0.5)


def through_proxy(text: str, *hits: Hit) -> list[dict[str, Any]]:
    """The messages the proxy sends upstream for one user message and these recalled memories."""
    request = {"model": "m", "messages": [{"role": "user", "content": text}]}
    body, _ = rewrite(request, hits, plan(request), instruction=extract.INSTRUCTION)
    messages: list[dict[str, Any]] = body["messages"]
    return messages


def block(reply: str) -> list[Any] | None:
    if "<memory>" not in reply:
        return None
    items: list[Any] = orjson.loads(reply.split("<memory>")[1].split("</memory>")[0])
    return items


@pytest.mark.parametrize(("said", "stored"), [
    ("I'm vegetarian", "User is vegetarian"),
    ("Hi! I am a vegan.", "User is vegan"),
    ("I\u2019m pescatarian these days", "User is pescatarian"),
    ("I live in Porto", "User lives in Porto"),
    ("i live in Porto now", "User lives in Porto"),
    ("I'm based in Lisbon, Portugal", "User lives in Lisbon"),
    ("We talked before. I just moved to Berlin!", "User lives in Berlin"),
    ("Big news: I moved to Lisbon", "User lives in Lisbon"),
    ("my name is Ana", "User's name is Ana"),
    ("Hello, I'm called Ana Silva.", "User's name is Ana Silva"),
    ("call me Bo", "User's name is Bo"),
    ("I'm allergic to peanuts", "User is allergic to peanuts"),
    ("I work at ACME", "User works at ACME"),
    ("I work as a nurse", "User works as a nurse"),
    ("My favourite colour is green", "User's favourite colour is green"),
    ("I really love hiking", "User likes hiking"),
])
def test_each_phrasing_becomes_one_memory(said: str, stored: str) -> None:
    category = ("preference" if stored.startswith(("User is ve", "User is pe", "User's fav", "User likes"))
                else "profile" if stored.startswith(("User's name", "User is allergic")) else "fact")
    assert block(answer(through_proxy(said))) == [{"text": stored, "category": category}]
    assert extract.parse(orjson.dumps(block(answer(through_proxy(said)))).decode())[0].text == stored


@pytest.mark.parametrize("said", ["What should I cook tonight?", "I like it", "I'd like a coffee",
                                  "Tell me about Porto", "my name is"])
def test_no_statement_no_block(said: str) -> None:
    assert block(answer(through_proxy(said))) is None


def test_several_statements_replaces_and_forget() -> None:
    messages = through_proxy("I moved to Lisbon and I love hiking. Please forget my name",
                             hit(1, "User lives in Porto"), hit(2, "User is vegetarian", "preference"),
                             hit(3, "User's name is Ana"))
    reply = answer(messages)
    assert block(reply) == [{"forget": "m3"}, {"text": "User lives in Lisbon", "category": "fact", "replaces": "m1"},
                            {"text": "User likes hiking", "category": "preference"}]
    assert "I remember: User lives in Porto; User is vegetarian; User's name is Ana." in reply  # recall shows
    parsed = extract.parse(reply.split("<memory>")[1].split("</memory>")[0])
    assert [type(op).__name__ for op in parsed] == ["Forget", "NewMemory", "NewMemory"]


def test_only_a_memory_about_the_same_thing_is_replaced() -> None:
    shown = (hit(1, "User is vegetarian", "preference"), hit(2, "User's favourite colour is green"),
             hit(3, "User likes tea"), hit(4, "User is allergic to nuts"))
    assert block(answer(through_proxy("I'm allergic to peanuts. I like coffee", *shown))) == [
        {"text": "User is allergic to peanuts", "category": "profile"},
        {"text": "User likes coffee", "category": "preference"}]  # many allergies and likes: none replaced
    assert block(answer(through_proxy("I'm vegan. My favourite food is soup. My favourite colour is red", *shown))) == [
        {"text": "User is vegan", "category": "preference", "replaces": "m1"},
        {"text": "User's favourite food is soup", "category": "preference"},
        {"text": "User's favourite colour is red", "category": "preference", "replaces": "m2"}]


def test_what_it_was_shown_is_not_stored_again() -> None:
    reply = answer(through_proxy("I'm vegetarian, what should I cook?", hit(1, "User is vegetarian", "preference")))
    assert block(reply) is None and "mushroom risotto" in reply


def test_without_the_instruction_it_writes_no_block() -> None:
    assert block(answer([{"role": "user", "content": "I'm vegetarian"}])) is None


def test_memories_and_instruction_are_read_wherever_they_are() -> None:
    """The proxy may move both (into the user's message, after it, in a developer message): the demo finds them
    by their tags, and never mistakes them for the user's own words."""
    memories = '<memories>\nAbout this user:\n[m1] (fact) "User lives in Porto"\n</memories>'
    user = {"role": "user", "content": f"{memories}\n\nI moved to Faro.\n\n{extract.INSTRUCTION}"}
    assert block(answer([user])) == [{"text": "User lives in Faro", "category": "fact", "replaces": "m1"}]
    parts = {"role": "user", "content": [{"type": "text", "text": "I'm vegan"},
                                         {"type": "text", "text": extract.INSTRUCTION}]}
    developer = {"role": "developer", "content": memories}
    reply = answer([parts, developer])
    assert block(reply) == [{"text": "User is vegan", "category": "preference"}] and "User lives in Porto" in reply
    # The instruction's own example ("User is vegetarian") is not a statement of the user's.
    assert block(answer([{"role": "system", "content": extract.INSTRUCTION},
                         {"role": "user", "content": "Hello"}])) is None
    assert [m.text for m in shown_memories([developer])] == ["User lives in Porto"]


def test_json_requests_get_the_operations_alone() -> None:
    transcript = {"role": "user", "content": "user: I'm allergic to peanuts\nassistant: Noted, I'm careful."}
    system = {"role": "system", "content": "Extract the memory operations as JSON."}
    ops = [{"text": "User is allergic to peanuts", "category": "profile"}]
    as_object = extraction({"messages": [system, transcript], "response_format": {"type": "json_object"}})
    assert as_object is not None and orjson.loads(as_object) == {"memories": ops}
    schema = {"type": "object", "properties": {"operations": {"type": "array"}}}
    keyed = extraction({"messages": [system, transcript],
                        "response_format": {"type": "json_schema", "json_schema": {"name": "ops", "schema": schema}}})
    assert keyed is not None and orjson.loads(keyed) == {"operations": ops}
    array = extraction({"messages": [transcript], "response_format": {
        "type": "json_schema", "json_schema": {"name": "ops", "schema": {"type": "array"}}}})
    assert array is not None and orjson.loads(array) == ops
    assert extraction({"messages": [transcript]}) is None
    assert extraction({"messages": [transcript], "response_format": {"type": "text"}}) is None


@pytest.fixture
def demo(demo_upstream: str) -> str:
    return demo_upstream


def test_wire_shapes_are_openai_s(demo: str) -> None:
    with openai.OpenAI(base_url=demo, api_key="unused", max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["demo"]
        done = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}], n=2)
        assert [c.index for c in done.choices] == [0, 1] and done.choices[0].finish_reason == "stop"
        assert done.usage is not None and done.usage.total_tokens > 0
        chunks = list(client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "Hi"}],
                                                     stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == done.choices[0].message.content
    raw = httpx.post(demo + "/chat/completions", json={"model": "demo", "stream": True,
                                                       "messages": [{"role": "user", "content": "Hi"}]})
    events = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert all("usage" not in orjson.loads(e[6:]) for e in events[:-1])  # only when asked for
    for bad, param in ((b"{", None), (b'{"messages": []}', "messages")):
        response = httpx.post(demo + "/chat/completions", content=bad)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert httpx.get(demo + "/embeddings").json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_a_fact_told_is_stored_and_recalled_in_a_new_conversation(
        demo: str, settings_for: Callable[..., Settings], start_proxy: Callable[..., str], stream: bool) -> None:
    proxy = start_proxy(settings_for(demo, recall_budget_ms=RECALL_BUDGET_MS))
    with openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0) as client:
        def say(text: str) -> str:
            messages: Any = [{"role": "user", "content": text}]
            headers = {"X-Memory-User": "ana"}
            if not stream:
                reply = client.chat.completions.create(model="demo", messages=messages, extra_headers=headers)
                return reply.choices[0].message.content or ""
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model="demo", messages=messages, extra_headers=headers, stream=True) if c.choices)

        first = say("Hi! I'm vegetarian.")
        assert first == "Noted: you're vegetarian."  # the block went to the proxy, not to the client
        deadline = time.monotonic() + 10
        while not (stored := httpx.get(f"{proxy}/memories/ana").json()["data"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [(m["text"], m["category"], m["source"]) for m in stored] == [
            ("User is vegetarian", "preference", "inline")]
        second = say("What should I cook tonight?")
    assert second == "How about a mushroom risotto tonight? I remember: User is vegetarian."


def test_responses_wire_shapes_are_openai_s(demo: str) -> None:
    with openai.OpenAI(base_url=demo, api_key="unused", max_retries=0) as client:
        done = client.responses.create(model="demo", instructions="Be brief.", input="Hi")
        assert done.status == "completed" and done.output_text and done.usage is not None
        assert client.responses.retrieve(done.id).output_text == done.output_text
        events = list(client.responses.create(model="demo", input=[{"role": "user", "content": "Hi"}], stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text == done.output_text
    for bad, param in ((b"{", None), (b'{"input": 3}', "input")):
        response = httpx.post(demo + "/responses", content=bad)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert httpx.get(demo + "/responses/resp_gone").json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_the_responses_api_stores_and_recalls_through_the_proxy(
        demo: str, settings_for: Callable[..., Settings], start_proxy: Callable[..., str], stream: bool) -> None:
    proxy = start_proxy(settings_for(demo, recall_budget_ms=RECALL_BUDGET_MS))
    with openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0) as client:
        def say(text: str) -> str:
            headers = {"X-Memory-User": "ana"}
            if not stream:  # a string input and no instructions: the proxy adds its text to the input
                return client.responses.create(model="demo", input=text, extra_headers=headers).output_text
            # the client's own instructions: the proxy's text goes there
            return "".join(e.delta for e in client.responses.create(
                model="demo", instructions="You are a cook.", input=[{"role": "user", "content": text}],
                extra_headers=headers, stream=True) if e.type == "response.output_text.delta")

        assert say("Hi! I'm vegetarian.") == "Noted: you're vegetarian."
        deadline = time.monotonic() + 10
        while not (stored := httpx.get(f"{proxy}/memories/ana").json()["data"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [(m["text"], m["source"]) for m in stored] == [("User is vegetarian", "inline")]
        second = say("What should I cook tonight?")
    assert second == "How about a mushroom risotto tonight? I remember: User is vegetarian."

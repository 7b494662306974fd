"""Memory on the Responses API end to end: a real proxy (real model, real SQLite), the official SDK's
`client.responses.create` (stream or not) and `client.responses.stream` helper, and a fake upstream that serves
OpenAI's event sequence cut at random byte boundaries (tests/fakeresponses.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest

from proxy.extract import INSTRUCTION
from tests.fakeresponses import Output
from tests.fakeupstream import TEMPLATE_ERRORS, FakeUpstream, Recorded, Reply
from tests.injected import MEMORIES, memories_sent
from tests.test_blocks import MARK
from tests.test_chat import memories
from tests.test_metrics import grew, scrape, settle
from tests.test_sessions import searched
from tests.test_transparent import remember

BLOCK = '\n\n<memory>[{"text": "User is vegetarian §", "category": "preference"}]</memory>'
ALICE = {"X-Memory-User": "alice"}
SCHEMA = {"format": {"type": "json_schema", "name": "dish", "strict": True, "schema": {
    "type": "object", "properties": {"dish": {"type": "string"}}, "required": ["dish"], "additionalProperties": False}}}
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}}, "required": ["city"], "additionalProperties": False}, "strict": True}
Serve = Callable[..., tuple[FakeUpstream, str, str]]


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="sk-client", max_retries=0)


def said(recorded: Recorded) -> str:
    """Everything the upstream was given to read: instructions and input texts."""
    body = recorded.json()
    given = body.get("input")
    texts = [given] if isinstance(given, str) else [
        part["text"] if isinstance(part, dict) else part for item in given or () if isinstance(item, dict)
        for part in (item["content"] if isinstance(item.get("content"), list) else [item.get("content") or ""])
        if not isinstance(part, dict) or "text" in part]
    return "\n\n".join([body.get("instructions") or "", *texts])


def memories_in(recorded: Recorded) -> str:
    return "\n".join(m.group() for m in MEMORIES.finditer(said(recorded)))


def events_text(events: list[Any]) -> str:
    return "".join(e.model_dump_json(warnings=False) for e in events)


# --- the memory loop --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_fact_learned_on_one_turn_is_recalled_in_a_new_conversation(serve: Serve, seed: int) -> None:
    fake, _, proxy = serve()
    with sdk(proxy + "/v1") as client:
        fake.reply(Reply(output=Output("Noted, no meat then!" + BLOCK), split_seed=seed))
        raw = client.responses.with_raw_response.create(model="gpt-x", input="I'm vegetarian.", extra_headers=ALICE)
        first = raw.parse()
        assert first.output_text == "Noted, no meat then!" and MARK not in raw.http_response.text
        assert raw.headers["x-memory-recalled"] == "0" and raw.headers["x-memory-extraction"] == "inline"
        sent = fake.responses[-1].json()
        assert sent["input"] == INSTRUCTION + "\n\nI'm vegetarian." and "instructions" not in sent
        assert "x-memory-user" not in fake.responses[-1].headers
        assert memories(proxy, "alice", expect=1) == ["User is vegetarian §"]

        fake.reply(Reply(output=Output("How about a mushroom risotto?"), split_seed=seed))
        raw = client.responses.with_raw_response.create(
            model="gpt-x", instructions="You are a chef.", extra_headers=ALICE,
            input=[{"role": "user", "content": [{"type": "input_text", "text": "Suggest a recipe for me"}]}])
        assert raw.parse().output_text == "How about a mushroom risotto?"
        assert raw.headers["x-memory-recalled"] == "1"
        sent = fake.responses[-1].json()
        assert sent["instructions"] == "You are a chef.\n\n" + INSTRUCTION  # the byte-stable instruction
        first_part, question = sent["input"][0]["content"]
        assert "User is vegetarian" in first_part["text"] and first_part["type"] == "input_text"
        assert question == {"type": "input_text", "text": "Suggest a recipe for me"}
        fake.reply("A steak?")
        client.responses.create(model="gpt-x", input="Suggest a recipe for me", user="bob")
        assert memories_in(fake.responses[-1]) == ""  # another user sees none of it


@pytest.mark.parametrize("seed", [4, 5, 6, 7])
def test_no_byte_of_a_block_reaches_a_streaming_client_in_any_event(serve: Serve, seed: int) -> None:
    fake, url, proxy = serve()
    answer = "Porto it is. " + BLOCK + "\n\nEnjoy the trip!"
    output = Output(deltas=[answer[i:i + 2] for i in range(0, len(answer), 2)], reasoning="Plan <memory> trip",
                    calls=[("get_weather", '{"city": "Porto"}')], citations=[(0, 5)], logprobs=True)
    with sdk(proxy + "/v1") as client, sdk(url) as direct:
        fake.reply(Reply(output=output, split_seed=seed))
        upstream_events = list(direct.responses.create(model="gpt-x", input="Plan my trip", stream=True))
        fake.reply(Reply(output=output, split_seed=seed))
        events = list(client.responses.create(model="gpt-x", input="I'm moving to Porto", stream=True,
                                              extra_headers=ALICE))
        assert MARK not in events_text(events) and "<memory>[" not in events_text(events)
        assert [(e.type, e.sequence_number) for e in events] == [(e.type, e.sequence_number) for e in upstream_events]
        visible = "Porto it is.\n\nEnjoy the trip!"
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == visible
        assert [e.text for e in events if e.type == "response.output_text.done"] == [visible]
        assert events[-1].type == "response.completed" and events[-1].response.output_text == visible
        for got, sent in zip(events, upstream_events, strict=True):  # reasoning, calls, usage: as they came
            if got.type.startswith(("response.reasoning", "response.function_call")):
                assert got.model_dump_json() == sent.model_dump_json().replace("resp_0001", "resp_0002")
        assert events[-1].response.usage == upstream_events[-1].response.usage

        fake.reply(Reply(output=output, split_seed=seed + 10))
        with client.responses.stream(model="gpt-x", input="I'm moving to Porto", extra_headers=ALICE,
                                     tools=[TOOL]) as stream:  # type: ignore[list-item]
            seen = [event for event in stream]
            final = stream.get_final_response()
        assert final.output_text == visible and MARK not in events_text(seen)
        snapshots = [e.snapshot for e in seen if e.type == "response.output_text.delta"]
        assert snapshots[-1] == visible and all(visible.startswith(s) for s in snapshots)
        assert [c.name for c in final.output if c.type == "function_call"] == ["get_weather"]
    assert memories(proxy, "alice", expect=1) == ["User is vegetarian §"]


def test_previous_response_id_chains_are_one_conversation(serve: Serve) -> None:
    fake, _, proxy = serve(session_history="store")
    with sdk(proxy + "/v1") as client:
        fake.reply(Reply(output=Output("Noted." + BLOCK), split_seed=8))
        first = client.responses.create(model="gpt-x", instructions="Be terse.", input="I'm vegetarian.",
                                        extra_headers=ALICE)
        fake.reply(Reply(output=Output("Try a dal."), split_seed=9))
        second = client.responses.create(model="gpt-x", instructions="Be terse.", input="Dinner idea?",
                                         previous_response_id=first.id, extra_headers=ALICE, stream=True)
        completed = next(e for e in second if e.type == "response.completed").response
        fake.reply(Reply(output=Output("Rice.")))
        third = client.responses.create(model="gpt-x", instructions="Be terse.", input="And a side?",
                                        previous_response_id=completed.id, extra_headers=ALICE)
        assert third.output_text == "Rice."
        # The upstream kept the chain; each turn's instructions carry the instruction once, never piled up.
        seen = fake.responses_api.seen[third.id]
        assert [m["role"] for m in seen] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
        assert seen[0]["content"] == "Be terse.\n\n" + INSTRUCTION
        assert fake.responses[-1].json()["input"].endswith("And a side?")
        # One session for the chain, named by its first response, holding every turn the client saw.
        session = wait_for_session(proxy, "alice", first.id, messages=6)
        assert [(m["role"], m["content"]) for m in session["data"]] == [
            ("user", "I'm vegetarian."), ("assistant", "Noted."), ("user", "Dinner idea?"),
            ("assistant", "Try a dal."), ("user", "And a side?"), ("assistant", "Rice.")]
        sessions = httpx.get(f"{proxy}/sessions/alice").json()["data"]
        assert [s["id"] for s in sessions] == [first.id]
        # An unknown previous response is the upstream's to refuse, and it says so as it would directly.
        with pytest.raises(openai.NotFoundError, match="Previous response with id 'resp_nope' not found"):
            client.responses.create(model="gpt-x", input="hi", previous_response_id="resp_nope", extra_headers=ALICE)


def test_a_chain_is_one_conversation_for_recall_of_past_conversations(serve: Serve) -> None:
    fake, _, proxy = serve(session_history="store", recall_conversations=True)
    with sdk(proxy + "/v1") as client:
        fake.reply("The runner image lacks OpenSSL 3: add `apt-get install -y libssl3` before the build step.")
        ci = client.responses.create(model="gpt-x", extra_headers=ALICE, input="Our CI build fails: libssl.so.3: "
                                     "cannot open shared object file")
        fake.reply("Rebuild the image after that.")
        client.responses.create(model="gpt-x", extra_headers=ALICE, input="Anything else?", previous_response_id=ci.id)
        question = "How did we fix the missing SSL library error in the pipeline?"
        hits = searched(proxy, "alice", question)
        assert hits and hits[0]["session"] == ci.id and "libssl3" in hits[0]["text"]
        fake.reply("Install libssl3, as before.")
        client.responses.create(model="gpt-x", extra_headers=ALICE, input=question)  # another conversation
        assert "libssl3" in memories_in(fake.responses[-1])
        last = fake.responses_api.stored[max(fake.responses_api.stored)]["id"]
        fake.reply("Yes.")
        client.responses.create(model="gpt-x", extra_headers=ALICE, input=question, previous_response_id=ci.id)
        assert memories_in(fake.responses[-1]) == ""  # its own conversation is not a past one
        wait_for_session(proxy, "alice", ci.id, messages=6)
        assert [s["id"] for s in httpx.get(f"{proxy}/sessions/alice").json()["data"]] == [ci.id, last]  # newest first


def wait_for_session(proxy: str, user: str, session: str, messages: int) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        response = httpx.get(f"{proxy}/sessions/{user}/{session}")
        if response.status_code == 200 and len(response.json()["data"]) >= messages:
            return dict(response.json())
        assert time.monotonic() < deadline, response.text
        time.sleep(0.05)


def test_a_stored_response_comes_back_without_its_block(serve: Serve) -> None:
    fake, _, proxy = serve()
    with sdk(proxy + "/v1") as client:
        fake.reply(Reply(output=Output("Noted." + BLOCK)))
        made = client.responses.create(model="gpt-x", input="I'm vegetarian.", extra_headers=ALICE)
        assert client.responses.retrieve(made.id).output_text == "Noted."
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve("resp_missing")


# --- transparent: what changes nothing ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_request_without_a_user_is_forwarded_unchanged(serve: Serve, stream: bool) -> None:
    fake, url, proxy = serve()
    remember(proxy, "alice", "User is vegetarian")
    body = orjson.dumps({"model": "gpt-x", "input": [{"role": "user", "content": "Hi"}], "stream": stream,
                         "store": False, "unknown_field": {"kept": True}}) + b"  "
    answers = []
    for base in (url, proxy + "/v1"):
        fake.reply(Reply(output=Output("Hi!" + BLOCK), split_seed=11))
        answers.append(httpx.post(base + "/responses", content=body, headers={"content-type": "application/json"}))
    direct, proxied = answers
    assert fake.responses[-1].body == fake.responses[-2].body == body  # the request's own bytes
    assert proxied.status_code == direct.status_code == 200
    assert proxied.content == direct.content.replace(b"resp_0001", b"resp_0002")  # the upstream's own bytes
    assert MARK.encode() in proxied.content and "x-memory-recalled" not in proxied.headers


NO_BLOCK: list[tuple[str, dict[str, Any], Output]] = [
    ("json_schema strict", {"text": SCHEMA}, Output('{"dish": "<memory>[1]</memory>"}')),
    ("forced tool", {"tools": [TOOL], "tool_choice": "required"}, Output(None, calls=[("get_weather", "{}")])),
    ("named tool", {"tools": [TOOL], "tool_choice": {"type": "function", "name": "get_weather"}},
     Output(None, calls=[("get_weather", '{"city": "Porto"}')])),
    ("background", {"background": True}, Output("Queued <memory>[1]</memory>")),
]


@pytest.mark.parametrize(("name", "options", "output"), NO_BLOCK, ids=[r[0] for r in NO_BLOCK])
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_that_cannot_hold_a_block_is_relayed_byte_for_byte_and_learned_in_the_background(
        serve: Serve, name: str, options: dict[str, Any], output: Output, stream: bool) -> None:
    fake, url, proxy = serve(extract_coalesce_seconds=0.0)
    remember(proxy, "alice", "User is vegetarian")
    body = {"model": "gpt-x", "input": "I live in Porto and I'm vegetarian", "stream": stream, **options}
    fake.reply(Reply(output=output, split_seed=12))
    direct = httpx.post(url + "/responses", json=body)
    fake.reply(Reply(output=output, split_seed=12))
    proxied = httpx.post(proxy + "/v1/responses", json=body, headers=ALICE)
    assert proxied.status_code == direct.status_code == 200
    assert proxied.content == direct.content.replace(b"resp_0001", b"resp_0002")  # the upstream's answer as is
    assert INSTRUCTION not in said(fake.responses[-1]) and "User is vegetarian" in memories_in(fake.responses[-1])
    assert proxied.headers["x-memory-extraction"] == "background" and proxied.headers["x-memory-recalled"] == "1"
    deadline = time.monotonic() + 10
    while not fake.extractions and time.monotonic() < deadline:
        time.sleep(0.02)
    [call] = fake.extractions
    assert "I live in Porto" in call.json()["messages"][0]["content"]


@pytest.mark.parametrize("template", ["qwen3", "no-system"])
def test_a_template_that_refuses_system_messages_gets_none_of_ours(serve: Serve, template: str) -> None:
    fake, url, proxy = serve(template)
    remember(proxy, "alice", "User is vegetarian")
    shapes: list[dict[str, Any]] = [{"input": "What should I cook?"},
                                    {"input": [{"role": "user", "content": "What should I cook?"}]}]
    if template == "qwen3":  # its own system message is fine when first
        shapes += [{"instructions": "Be terse.", "input": "What should I cook?"},
                   {"input": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Cook?"}]}]
    for shape in shapes:
        with sdk(url) as direct, sdk(proxy + "/v1") as client:
            fake.reply("Try a risotto.")
            assert direct.responses.create(model="qwen3", **shape).output_text == "Try a risotto."
            fake.reply("Try a risotto.")
            assert client.responses.create(model="qwen3", **shape, extra_headers=ALICE).output_text == "Try a risotto."
        sent = fake.responses[-1].json()
        assert ("instructions" in sent) == ("instructions" in shape)  # never an instructions field of ours
        assert "User is vegetarian" in memories_in(fake.responses[-1]) and INSTRUCTION in said(fake.responses[-1])
    with sdk(url) as direct, pytest.raises(openai.BadRequestError, match=TEMPLATE_ERRORS[template]):
        direct.responses.create(model="qwen3", instructions="a", input=[{"role": "system", "content": "b"},
                                                                          {"role": "user", "content": "c"}])


def test_headers_say_what_memory_did_and_upstream_errors_stay_the_upstreams(serve: Serve) -> None:
    fake, _, proxy = serve(recall_budget_ms=0.001)
    fake.reply("Hi")
    response = httpx.post(proxy + "/v1/responses", json={"model": "m", "input": "hi"}, headers=ALICE)
    assert response.status_code == 200 and response.headers["x-memory-error"] == "recall-timeout"
    fake.reply(Reply(status=429, headers={"retry-after": "7"}))
    response = httpx.post(proxy + "/v1/responses", json={"model": "m", "input": "hi"},
                          headers={**ALICE, "X-Memory-Extraction": "off"})
    assert response.status_code == 429 and response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert response.headers["x-memory-extraction"] == "off"
    bad = httpx.post(proxy + "/v1/responses", json={"model": "m", "input": 5}, headers=ALICE)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input"  # the upstream's to refuse
    assert bad.headers["x-memory-error"] == "request-unreadable"


def test_an_answer_past_the_bounds_is_relayed_unfiltered(serve: Serve) -> None:
    fake, _, proxy = serve(filter_max_bytes=4096)
    long = "x" * 5000 + BLOCK
    fake.reply(Reply(output=Output(deltas=[long[:10], long[10:]])))
    response = httpx.post(proxy + "/v1/responses", json={"model": "m", "input": "hi", "stream": True},
                          headers=ALICE)
    assert response.status_code == 200 and MARK in response.text  # one event over the cap: relayed as it came
    assert "response.completed" in response.text


def test_the_responses_api_is_counted_as_chats_are(serve: Serve) -> None:
    fake, _, proxy = serve()
    before = scrape(proxy)
    fake.reply(Reply(output=Output("Noted." + BLOCK)), "Hi!")
    made = httpx.post(proxy + "/v1/responses", json={"model": "m", "input": "I'm vegetarian."}, headers=ALICE).json()
    assert httpx.post(proxy + "/v1/responses", json={"model": "m", "input": "Hi", "stream": True}).status_code == 200
    assert httpx.get(f"{proxy}/v1/responses/{made['id']}").json()["output"][0]["content"][0]["text"] == "Noted."
    added = {"operation": "added", "extraction": "inline"}
    after = settle(proxy, lambda now: grew(before, now, "memory_proxy_memory_operations_total", **added) == 1)
    assert grew(before, after, "memory_proxy_memory_operations_total", **added) == 1
    for path, stream in (("memory", "false"), ("chat", "true"), ("passthrough", "false")):
        assert grew(before, after, "memory_proxy_added_latency_seconds_count", path=path, stream=stream) == 1, path
    created = {"route": "/v1/responses", "method": "POST", "status": "200"}
    assert grew(before, after, "memory_proxy_requests_total", **created) == 2


def test_azure_clients_get_memory_on_the_responses_api(serve: Serve) -> None:
    fake, _, proxy = serve()
    remember(proxy, "alice", "User is vegetarian")
    with openai.AzureOpenAI(azure_endpoint=proxy, api_key="azure-key", api_version="2025-04-01-preview",
                            max_retries=0) as client:
        fake.reply(Reply(output=Output("Risotto!" + BLOCK)))
        answer = client.responses.create(model="my-gpt", input="What do I cook?", extra_headers=ALICE)
    assert answer.output_text == "Risotto!"
    recorded = fake.responses[-1]
    assert recorded.path == "/openai/responses" and recorded.query == "api-version=2025-04-01-preview"
    assert "User is vegetarian" in memories_in(recorded) and recorded.headers["api-key"] == "azure-key"


def test_recall_searches_the_same_question_as_a_chat_with_the_message_before(serve: Serve) -> None:
    """The user's message before the question weighs in on the Responses API as in a chat: the same conversation
    injects the same memories through both."""
    fake, _, proxy = serve()
    facts = ["I am allergic to bee stings", "I keep a vegetarian diet", "My sister lives in Oslo",
             "I play the cello on Sundays", "My car is a blue Volvo", "I work as a pharmacist in Dublin",
             "My favourite film is Alien", "I run ten kilometres every Saturday", "My cat is called Miso",
             "I drink green tea in the morning", "My partner is called Ana", "I am learning Japanese",
             "I grew up in Lisbon", "My birthday is in March", "I collect old maps"]
    httpx.post(f"{proxy}/memories/alice", json=[{"text": text} for text in facts]).raise_for_status()
    conversation = [{"role": "user", "content": "What am I allergic to?"},
                    {"role": "assistant", "content": "Here is what I remember about that."},
                    {"role": "user", "content": "And what about my diet?"}]
    with sdk(proxy + "/v1") as client:
        fake.reply("Vegetarian.")
        client.chat.completions.create(model="gpt-x", messages=conversation, extra_headers=ALICE)  # type: ignore
        fake.reply(Reply(output=Output("Vegetarian.")))
        client.responses.create(model="gpt-x", input=conversation, extra_headers=ALICE)  # type: ignore
    chat_memories = memories_sent(fake.chats[-1].json()["messages"])
    assert "allergic to bee stings" in chat_memories  # the message before brought it in (the question alone: not)
    assert memories_in(fake.responses[-1]) == chat_memories

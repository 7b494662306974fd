"""Transparent for real: a request that works straight to the upstream works through the proxy, with memory on,
and the client gets the upstream's answer minus a real memory block, and minus nothing else.

Each test is an input that failed when the product was tried from outside. A real proxy (real model, real
SQLite), the official SDK where it applies, and a fake upstream that behaves as real servers do: chat templates
that refuse role layouts, SSE labelled as JSON, Azure's routes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from proxy.extract import INSTRUCTION
from tests.fakeupstream import TEMPLATE_ERRORS, FakeUpstream, Reply
from tests.injected import client_text, instruction_sent, memories_sent, text_of

SCHEMA = {"type": "json_schema", "json_schema": {"name": "domain", "strict": True, "schema": {
    "type": "object", "properties": {"elements": {"type": "array", "items": {"type": "string"}}},
    "required": ["elements"], "additionalProperties": False}}}
JSON_ANSWER = '{"elements": ["<domain>", "<name>", "<memory>", "<vcpu>"]}'
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Porto"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key="sk-client", max_retries=0)


def remember(proxy: str, user: str, *texts: str) -> None:
    response = httpx.post(f"{proxy}/memories/{user}", json=[{"text": text} for text in texts])
    assert response.status_code == 201


def chat(base: str, messages: list[Any], user: str | None = "alice", **options: Any) -> Any:
    """The completion, or for a stream the list of its chunks (read before the client closes)."""
    with sdk(base) as client:
        headers = {"X-Memory-User": user} if user else {}
        answer = client.chat.completions.create(model="qwen3", messages=messages, extra_headers=headers, **options)
        return list(answer) if options.get("stream") else answer


def text(answer: Any) -> str:
    if isinstance(answer, list):
        return "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
    return str(answer.choices[0].message.content)


# --- 1. role layouts the upstream refuses --------------------------------------------------------------------

LAYOUTS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Suggest a recipe for dinner"}],
    [{"role": "user", "content": "Suggest a recipe for dinner"}],
    [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Suggest a recipe for dinner"}],
    [{"role": "user", "content": [{"type": "text", "text": "Suggest a recipe for dinner"}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be nice."}]},
     {"role": "user", "content": "What should I cook?"},
     {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
]


@pytest.mark.parametrize("template", ["qwen3", "no-system"])
def test_a_template_that_refuses_system_messages_gets_none_of_ours(
        serve: Callable[..., tuple[FakeUpstream, str, str]], template: str) -> None:
    fake, url, proxy = serve(template)
    remember(proxy, "alice", "User is vegetarian", "User cooks on a gas stove")
    for messages in LAYOUTS:
        if template == "no-system" and any(m["role"] == "system" for m in messages):
            continue  # the client's own layout: refused directly too
        fake.reply("Try a risotto.")
        assert chat(url, messages, user=None).choices[0].message.content == "Try a risotto."  # directly
        fake.reply("Try a risotto.")
        assert chat(proxy + "/v1", messages).choices[0].message.content == "Try a risotto."  # through the proxy
        sent = fake.chats[-1].json()["messages"]
        assert [m["role"] for m in sent] == [m["role"] for m in messages]  # never a message of ours
        assert "User is vegetarian" in memories_sent(sent)  # recalled all the same
        assert [client_text(text_of(m)) for m in sent] == [client_text(text_of(m)) for m in messages]


def test_the_template_error_is_real(serve: Callable[..., tuple[FakeUpstream, str, str]]) -> None:
    """The fake refuses what Qwen3's template refuses: the layout the proxy used to send."""
    _, url, _ = serve("qwen3")
    with pytest.raises(openai.BadRequestError, match=TEMPLATE_ERRORS["qwen3"]):
        chat(url, [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}], user=None)


# --- 2. answers a block cannot be appended to or removed from ---------------------------------------------------

NO_BLOCK_REQUESTS: list[tuple[str, dict[str, Any], Reply]] = [
    ("json_schema strict", {"response_format": SCHEMA}, Reply(JSON_ANSWER)),
    ("json_object", {"response_format": {"type": "json_object"}}, Reply('{"memory": "<memory>[1]</memory>"}')),
    ("forced tool", {"tools": TOOLS, "tool_choice": "required"}, Reply("", tool_calls=[TOOL_CALL])),
    ("named tool", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     Reply("", tool_calls=[TOOL_CALL])),
]


@pytest.mark.parametrize(("name", "options", "reply"), NO_BLOCK_REQUESTS, ids=[r[0] for r in NO_BLOCK_REQUESTS])
@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_that_cannot_hold_a_block_is_relayed_byte_for_byte(
        serve: Callable[..., tuple[FakeUpstream, str, str]], name: str, options: dict[str, Any], reply: Reply,
        stream: bool) -> None:
    fake, url, proxy = serve()
    remember(proxy, "alice", "User is vegetarian")
    body = {"model": "m", "messages": [{"role": "user", "content": "List my VM's elements, I'm vegetarian"}],
            "stream": stream, **options}
    fake.reply(reply)
    direct = httpx.post(url + "/chat/completions", json=body)
    fake.reply(reply)
    proxied = httpx.post(proxy + "/v1/chat/completions", json=body, headers={"X-Memory-User": "alice"})
    assert proxied.status_code == direct.status_code == 200
    assert proxied.content == direct.content  # the upstream's answer, byte for byte
    sent = fake.chats[-1].json()
    assert not instruction_sent(sent["messages"])  # no room for a block: none asked for
    assert "User is vegetarian" in memories_sent(sent["messages"])  # memories still go in
    assert proxied.headers["x-memory-recalled"] == "1"


def test_a_strict_schema_answer_reaches_the_sdk_whole(serve: Callable[..., tuple[FakeUpstream, str, str]]) -> None:
    fake, _, proxy = serve()
    fake.reply(JSON_ANSWER)
    answer = chat(proxy + "/v1", [{"role": "user", "content": "List the elements"}], response_format=SCHEMA)
    assert answer.choices[0].message.content == JSON_ANSWER
    fake.reply(Reply(JSON_ANSWER, chunk_size=4))
    chunks = chat(proxy + "/v1", [{"role": "user", "content": "List the elements"}], response_format=SCHEMA,
                  stream=True)
    assert text(chunks) == JSON_ANSWER


# --- 3. text that only looks like a block -----------------------------------------------------------------------

LOOK_ALIKES = [
    "Here it is:\n```xml\n<domain type='kvm'>\n  <name>vm1</name>\n  <memory unit='KiB'>2097152</memory>\n"
    "  <memory>2097152</memory>\n</domain>\n```\nDone.",
    "Set it with the <memory> element of the domain; everything after the tag must stay visible.",
    "In inline code: the `<memory>` element, and `<memory>[1]</memory>` too.",
    'A JSON answer: {"tags": ["<memory>", "</memory>"]} and more.',
]


@pytest.mark.parametrize("answer", LOOK_ALIKES)
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7])
def test_text_that_only_looks_like_a_block_reaches_the_client_unchanged(
        serve: Callable[..., tuple[FakeUpstream, str, str]], answer: str, chunk_size: int | None) -> None:
    fake, _, proxy = serve()
    fake.reply(Reply(answer, chunk_size=chunk_size or 3))
    got = chat(proxy + "/v1", [{"role": "user", "content": "Show me"}], stream=chunk_size is not None)
    assert text(got) == answer


@pytest.mark.parametrize("stream", [False, True])
def test_a_closing_tag_inside_the_payload_does_not_end_the_block(
        serve: Callable[..., tuple[FakeUpstream, str, str]], stream: bool) -> None:
    fake, _, proxy = serve()
    fake.reply(Reply('Done. <memory>[{"text": "User writes XML with a </memory> closing tag"}]</memory>',
                     chunk_size=2))
    assert text(chat(proxy + "/v1", [{"role": "user", "content": "I write XML all day"}], stream=stream)) == "Done."
    stored = wait_for_memories(proxy, "alice", 1)
    assert stored == ["User writes XML with a </memory> closing tag"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_fenced_block_leaves_no_empty_fence(serve: Callable[..., tuple[FakeUpstream, str, str]],
                                              stream: bool) -> None:
    fake, _, proxy = serve()
    fake.reply(Reply('Sure, noted!\n\n```json\n<memory>[{"text": "User likes green tea"}]</memory>\n```',
                     chunk_size=3))
    assert text(chat(proxy + "/v1", [{"role": "user", "content": "I like green tea"}], stream=stream)) == "Sure, noted!"
    assert wait_for_memories(proxy, "alice", 1) == ["User likes green tea"]


def wait_for_memories(proxy: str, user: str, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        texts = [m["text"] for m in httpx.get(f"{proxy}/memories/{user}").json()["data"]]
        if len(texts) >= count or time.monotonic() > deadline:
            return texts
        time.sleep(0.02)


# --- 4. streams recognised by what they are ---------------------------------------------------------------------

def test_sse_labelled_as_json_is_streamed_and_filtered(serve: Callable[..., tuple[FakeUpstream, str, str]]) -> None:
    fake, _, proxy = serve()
    answer = "Noted, a vegetarian menu it is. " * 2
    fake.reply(Reply(answer + '<memory>[{"text": "User is vegetarian"}]</memory>', chunk_size=8, delay=0.1,
                     media_type="application/json"))
    received: list[tuple[float, str]] = []
    with sdk(proxy + "/v1") as client:
        for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "I'm veggie"}],
                                                    stream=True, extra_headers={"X-Memory-User": "alice"}):
            if chunk.choices and chunk.choices[0].delta.content:
                received.append((time.monotonic(), chunk.choices[0].delta.content))
    assert "".join(piece for _, piece in received) == answer.rstrip()
    assert received[0][0] < fake.sent_at[-1]  # the first words arrived while the upstream was still writing
    assert wait_for_memories(proxy, "alice", 1) == ["User is vegetarian"]


def test_json_labelled_as_sse_is_filtered_as_a_whole(serve: Callable[..., tuple[FakeUpstream, str, str]]) -> None:
    fake, _, proxy = serve()
    fake.reply(Reply('Noted.\n<memory>[{"text": "User is vegetarian"}]</memory>', media_type="text/event-stream"))
    response = httpx.post(proxy + "/v1/chat/completions", headers={"X-Memory-User": "alice"},
                          json={"model": "m", "messages": [{"role": "user", "content": "I'm veggie"}]})
    assert response.json()["choices"][0]["message"]["content"] == "Noted."


# --- 6. Azure-style clients ---------------------------------------------------------------------------------------

def test_azure_clients_get_memory_on_both_route_styles(serve: Callable[..., tuple[FakeUpstream, str, str]]) -> None:
    fake, _, proxy = serve()
    remember(proxy, "alice", "User is vegetarian")
    clients = [openai.AzureOpenAI(azure_endpoint=proxy, api_key="azure-key", api_version="2024-10-21",
                                  max_retries=0),
               openai.AzureOpenAI(base_url=proxy + "/v1", api_key="azure-key", api_version="2024-10-21",
                                  max_retries=0)]
    paths = ["/openai/deployments/my-gpt/chat/completions", "/v1/deployments/my-gpt/chat/completions"]
    for client, path in zip(clients, paths, strict=True):
        fake.reply('Risotto!\n<memory>[{"text": "User cooks risotto on Sundays"}]</memory>')
        with client:
            answer = client.chat.completions.create(model="my-gpt", extra_headers={"X-Memory-User": "alice"},
                                                    messages=[{"role": "user", "content": "What do I cook?"}])
        assert answer.choices[0].message.content == "Risotto!"
        recorded = fake.chats[-1]
        assert recorded.path == path and recorded.query == "api-version=2024-10-21"
        assert recorded.headers["api-key"] == "azure-key"
        assert "User is vegetarian" in memories_sent(recorded.json()["messages"])
    assert "User cooks risotto on Sundays" in wait_for_memories(proxy, "alice", 2)


# --- 7. header hygiene ---------------------------------------------------------------------------------------------

def test_every_response_carries_exactly_one_date(serve: Callable[..., tuple[FakeUpstream, str, str]]) -> None:
    fake, _, proxy = serve()
    fake.reply("Hi")
    chat_response = httpx.post(proxy + "/v1/chat/completions", headers={"X-Memory-User": "alice"},
                               json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    for response in (chat_response, httpx.get(proxy + "/v1/models"), httpx.get(proxy + "/healthz"),
                     httpx.get(proxy + "/memories/alice")):
        assert len(response.headers.get_list("date")) == 1, response.url
        assert len(response.headers.get_list("server")) <= 1


def test_an_instruction_is_sent_when_the_answer_can_hold_a_block(
        serve: Callable[..., tuple[FakeUpstream, str, str]]) -> None:
    fake, _, proxy = serve()
    fake.reply("Hi")
    chat(proxy + "/v1", [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}])
    sent = fake.chats[-1].json()["messages"]
    assert sent[0]["content"] == "S\n\n" + INSTRUCTION and sent[1] == {"role": "user", "content": "hi"}

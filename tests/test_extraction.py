"""Background extraction end to end: a real proxy (real model, real SQLite), the official SDK, and a fake upstream
that plays both the chat model and the extraction model."""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from starlette.applications import Starlette

from proxy.app import create_app
from proxy.config import Settings
from proxy.extract import INSTRUCTION, PLACEHOLDER
from proxy.extraction import refused_schema
from proxy.server import server_options
from tests.fakeupstream import SCHEMA_REFUSALS, FakeUpstream, Reply
from tests.injected import instruction_sent
from tests.servers import running

SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": False}}}


@dataclass
class Running:
    fake: FakeUpstream
    upstream: str  # the fake's base URL (…/v1)
    proxy: str
    app: Starlette  # to read the extractor's counts


@pytest.fixture
def serve(upstream: tuple[FakeUpstream, str], settings_for: Callable[..., Settings]
          ) -> Iterator[Callable[..., Running]]:
    """Start a proxy in front of the fake with these settings."""
    fake, url = upstream
    with contextlib.ExitStack() as stack:
        def start(**settings: Any) -> Running:
            resolved = settings_for(url, **{"extract_coalesce_seconds": 0.05, **settings})
            app = create_app(resolved)
            return Running(fake, url, stack.enter_context(running(app, **server_options(resolved))), app)
        yield start


def ops(*items: dict[str, Any]) -> Reply:
    return Reply(json.dumps({"memories": list(items)}))


def fact(text: str, category: str = "fact", replaces: str | None = None) -> dict[str, Any]:
    return {"text": text, "category": category, "replaces": replaces}


def memories(proxy: str, user: str, expect: int | None = None, history: bool = False) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        found = httpx.get(f"{proxy}/memories/{user}", params={"include_history": history}).json()["data"]
        if expect is None or len(found) >= expect or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def wait_until(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def post(proxy: str, body: dict[str, Any], user: str = "alice", **headers: str) -> httpx.Response:
    headers = {"X-Memory-User": user, "Authorization": "Bearer sk-test", **headers}
    return httpx.post(proxy + "/v1/chat/completions", json=body, headers=headers, timeout=30)


def body(text: str = "I just moved to Porto.", **options: Any) -> dict[str, Any]:
    return {"model": "small-model", "messages": [{"role": "user", "content": text}], **options}


@pytest.mark.parametrize("stream", [False, True])
def test_background_mode_relays_the_answer_byte_for_byte_and_learns_the_fact(
        serve: Callable[..., Running], stream: bool) -> None:
    run = serve(extraction="background")
    fake, proxy, app = run.fake, run.proxy, run.app
    answer = "Porto is lovely! <memory> tags are just text here."
    fake.reply(answer)
    direct = httpx.post(run.upstream + "/chat/completions", json=body(stream=stream))
    fake.extraction_replies.append(ops(fact("User lives in Porto")))
    fake.reply(answer)
    proxied = post(proxy, body(stream=stream))
    assert proxied.content == direct.content  # untouched, a look-alike tag and all
    assert proxied.headers["x-memory-extraction"] == "background"
    assert not instruction_sent(fake.chats[-1].json()["messages"])
    stored = memories(proxy, "alice", expect=1)
    assert [(m["text"], m["source"]) for m in stored] == [("User lives in Porto", "background")]
    [call] = fake.extractions
    prompt = call.json()["messages"][0]["content"]
    assert "User: I just moved to Porto." in prompt and "Assistant: Porto is lovely!" in prompt
    assert call.json()["response_format"]["json_schema"]["name"] == "memory_operations"
    assert call.json()["model"] == "small-model"
    assert call.headers["authorization"] == "Bearer sk-test"  # the client's own credentials
    assert app.state.extractor.stats.prompt_tokens == 321


def test_a_failing_or_slow_extraction_model_never_touches_a_chat(
        serve: Callable[..., Running]) -> None:
    run = serve(extraction="background", extract_retries=1, extract_timeout=1.0)
    fake, proxy, app = run.fake, run.proxy, run.app
    fake.extraction_replies.extend([Reply(status=500), Reply(status=503)])
    fake.reply("Noted.")
    assert post(proxy, body()).json()["choices"][0]["message"]["content"] == "Noted."
    wait_until(lambda: app.state.extractor.stats.failed == 1)  # so that the next turn is not coalesced with it
    slow = Reply('{"memories": [{"text": "User has a dog"}]}', delay=5)  # slower than extract_timeout
    fake.extraction_replies.extend([slow, slow])
    fake.reply("Sure.")
    start = time.monotonic()
    assert post(proxy, body("I have a dog.")).json()["choices"][0]["message"]["content"] == "Sure."
    assert time.monotonic() - start < 4  # the chat never waited for the extraction
    wait_until(lambda: app.state.extractor.stats.failed == 2)
    stats = app.state.extractor.stats
    assert stats.failed == 2 and stats.retried == 2 and memories(proxy, "alice") == []


def test_quick_turns_of_a_user_coalesce_into_one_call(serve: Callable[..., Running]
                                                      ) -> None:
    run = serve(extraction="background", extract_coalesce_seconds=4.0)  # wide: a loaded runner is slow
    fake, proxy = run.fake, run.proxy
    fake.extraction_replies.append(ops(fact("User has two cats"), fact("User is a nurse")))
    for text in ("I have two cats.", "I work as a nurse.", "What should I cook?"):
        fake.reply("Ok.")
        post(proxy, body(text))
    fake.reply("Hi Bob.")
    post(proxy, body("I'm Bob."), user="bob")
    assert sorted(m["text"] for m in memories(proxy, "alice", expect=2)) == ["User has two cats", "User is a nurse"]
    deadline = time.monotonic() + 10
    while len(fake.extractions) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    calls = [c.json()["messages"][0]["content"] for c in fake.extractions]
    alice = [c for c in calls if "two cats" in c]
    assert len(alice) == 1 and "Turn 3" in alice[0] and "I work as a nurse." in alice[0]
    assert all("I'm Bob." not in c for c in alice) and len(calls) == 2  # bob's turn went to a call of its own


def test_auto_learns_in_the_background_where_a_block_cannot_go(
        serve: Callable[..., Running]) -> None:
    run = serve(background_models="tiny-*, *-135m")
    fake, proxy = run.fake, run.proxy
    cases = [(body(response_format=SCHEMA), "background"), (body(model="tiny-llama"), "background"),
             (body(model="smollm2-135m"), "background"), (body(), "inline")]
    for request, mode in cases:
        fake.reply('{"city": "Porto"}')
        response = post(proxy, request)
        assert response.headers["x-memory-extraction"] == mode, request
        assert instruction_sent(fake.chats[-1].json()["messages"]) == (mode == "inline")
    def turns() -> int:  # quick turns of one user may share a call
        return sum(c.json()["messages"][0]["content"].count("\nUser: ") for c in fake.extractions)
    wait_until(lambda: turns() >= 3)
    assert turns() == 3


@pytest.mark.parametrize(("setting", "asked", "plain", "strict"), [
    ("inline", "off", "off", "off"),
    ("inline", "background", "inline", "off"),  # cannot raise what the operator allows
    ("off", "background", "off", "off"),
    ("off", "inline", "off", "off"),
    ("background", "inline", "background", "background"),
    ("auto", "background", "background", "background"),
    ("auto", "inline", "inline", "off"),
    ("auto", "off", "off", "off"),
])
def test_the_header_may_only_lower_what_the_operator_allows(
        serve: Callable[..., Running], setting: str, asked: str, plain: str,
        strict: str) -> None:
    run = serve(extraction=setting)
    fake, proxy = run.fake, run.proxy
    for request, expected in ((body(), plain), (body(response_format=SCHEMA), strict)):
        fake.reply('{"city": "Porto"}')
        response = post(proxy, request, **{"X-Memory-Extraction": asked})
        assert response.status_code == 200 and response.headers["x-memory-extraction"] == expected
        assert instruction_sent(fake.chats[-1].json()["messages"]) == (expected == "inline")
    bad = post(proxy, body(), **{"X-Memory-Extraction": "always"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Memory-Extraction"


@pytest.mark.parametrize("server", ["400", "llama-cpp-python"])
def test_a_rate_limited_call_is_retried_and_a_refused_schema_is_asked_again_without(
        serve: Callable[..., Running], server: str) -> None:
    run = serve(extraction="background")
    fake, proxy, app = run.fake, run.proxy, run.app
    fake.refuse_schema = server
    fake.extraction_replies.extend([Reply(status=429, headers={"retry-after": "0.2"}),
                                    Reply('Sure! {"memories": [{"text": "User plays the cello", "category": '
                                          '"preference", "replaces": null}]}')])
    fake.reply("Lovely.")
    post(proxy, body("I play the cello."))
    assert [m["text"] for m in memories(proxy, "alice", expect=1)] == ["User plays the cello"]
    calls = [c.json() for c in fake.extractions]
    assert "response_format" in calls[0] and all("response_format" not in c for c in calls[1:])
    assert app.state.extractor.stats.retried == 1


@pytest.mark.parametrize("reasoning", [False, True])
def test_the_extraction_answer_is_bounded_whatever_the_model_calls_the_bound(
        serve: Callable[..., Running], reasoning: bool) -> None:
    run = serve(extraction="background", extract_max_tokens=300)
    run.fake.reasoning = reasoning
    run.fake.extraction_replies.append(Reply('{"memories": [{"text": "User plays the oboe"}]}'))
    run.fake.reply("Lovely.")
    post(run.proxy, body("I play the oboe."))
    assert [m["text"] for m in memories(run.proxy, "alice", expect=1)] == ["User plays the oboe"]
    calls = [c.json() for c in run.fake.extractions]
    assert calls[-1].get("max_completion_tokens" if reasoning else "max_tokens") == 300
    assert len(calls) == (2 if reasoning else 1)  # a refused max_tokens is asked once more, with the other name
    assert run.app.state.extractor.completion_field == ({"small-model"} if reasoning else set())  # remembered


@pytest.mark.parametrize(("status", "data", "refused"), [
    (400, None, True),
    (500, {"error": SCHEMA_REFUSALS["llama-cpp-python"][1]}, True),
    (422, {"detail": [{"loc": ["body", "response_format", "type"], "msg": "Input should be 'text'"}]}, True),
    (500, {"error": {"message": "CUDA out of memory", "type": "server_error"}}, False),
    (503, None, False),
    (429, {"error": {"message": "slow down: response_format calls are rate limited"}}, False),
    (200, {"choices": []}, False),
])
def test_a_refused_schema_is_told_from_a_failure_worth_retrying(status: int, data: Any, refused: bool) -> None:
    assert refused_schema(status, data) is refused


def test_replaces_and_forget_resolve_short_ids_as_inline_does(
        serve: Callable[..., Running]) -> None:
    run = serve(extraction="background")
    fake, proxy = run.fake, run.proxy
    httpx.post(f"{proxy}/memories/alice", json=[{"text": "User lives in Lisbon"}, {"text": "User smokes"}])
    fake.reply("Congratulations on both!")
    post(proxy, body("I moved from Lisbon to Porto and I quit smoking."))
    deadline = time.monotonic() + 10
    while not fake.extractions and time.monotonic() < deadline:
        time.sleep(0.02)
    # The fake cannot reply before it sees the ids: the first call answers nothing, so ask again.
    prompt = fake.extractions[0].json()["messages"][0]["content"]
    lisbon = re.search(r'\[(m\d)\] \(fact, [^)]*\) "User lives in Lisbon"', prompt)
    smokes = re.search(r'\[(m\d)\] \(fact, [^)]*\) "User smokes"', prompt)
    assert lisbon and smokes
    fake.extraction_replies.append(ops(fact("User lives in Porto", replaces=lisbon.group(1)),
                                       {"forget": smokes.group(1)}, fact("User lives in Lisbon")))
    fake.reply("Noted.")
    post(proxy, body("I moved from Lisbon to Porto and I quit smoking."))
    deadline = time.monotonic() + 10
    while [m["text"] for m in memories(proxy, "alice")] != ["User lives in Porto"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [m["text"] for m in memories(proxy, "alice")] == ["User lives in Porto"]  # shown facts not stored again
    history = {m["text"]: m for m in memories(proxy, "alice", history=True)}
    assert history["User lives in Lisbon"]["superseded_by"] == history["User lives in Porto"]["id"]


def test_the_instructions_placeholder_is_never_stored(serve: Callable[..., Running]
                                                      ) -> None:
    run = serve(extraction="inline")
    fake, proxy = run.fake, run.proxy
    fake.reply(f'Hi!\n<memory>[{{"text": "{PLACEHOLDER}", "category": "fact"}}, {{"text": "User is Ann"}}]</memory>')
    assert post(proxy, body("Hi, I'm Ann")).json()["choices"][0]["message"]["content"] == "Hi!"
    assert [m["text"] for m in memories(proxy, "alice", expect=1)] == ["User is Ann"]
    assert PLACEHOLDER in INSTRUCTION


def test_the_sdk_sees_which_mode_served_it(serve: Callable[..., Running]) -> None:
    run = serve()
    fake, proxy = run.fake, run.proxy
    fake.reply("Hi.")
    with openai.OpenAI(base_url=proxy + "/v1", api_key="sk-test", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Memory-User": "alice"})
    assert raw.headers["x-memory-extraction"] == "inline"

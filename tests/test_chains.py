"""Which session a Responses API turn is recorded in."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from starlette.requests import Request

from proxy.chains import Chains, name
from proxy.errors import BadRequest


def request(**headers: str) -> Request:
    raw = [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return Request({"type": "http", "method": "POST", "path": "/v1/responses", "headers": raw})


@pytest.mark.parametrize(("headers", "body", "expected"), [
    ({"X_Memory_Session": "trip"}, {"previous_response_id": "resp_2", "metadata": {"session_id": "m"}}, "trip"),
    ({}, {"metadata": {"session_id": "m"}, "conversation": "conv_1", "previous_response_id": "resp_2"}, "m"),
    ({}, {"conversation": {"id": "conv_1"}, "previous_response_id": "resp_2"}, "conv_1"),
    ({}, {"conversation": "conv_1"}, "conv_1"),
    ({}, {"previous_response_id": "resp_2"}, "resp_1"),  # the chain's first response
    ({}, {"previous_response_id": "resp_9"}, "resp_9"),  # made elsewhere: named by it
    ({}, {"input": "hi"}, ""),  # a new chain: named by its own response once known
])
def test_the_session_of_a_turn(headers: dict[str, str], body: dict[str, Any], expected: str) -> None:
    chains = Chains()
    chains.link("resp_1", "resp_1")
    chains.link("resp_2", "resp_1")
    assert name(request(**headers), body, chains) == expected


def test_only_our_header_is_refused_the_apis_fields_never() -> None:
    """The API's fields are the upstream's to judge: one that cannot name a session names none, or its digest."""
    digest = "sha256:" + hashlib.sha256(b"a\nb").hexdigest()
    for body, expected in (({"previous_response_id": 5}, ""), ({"conversation": {"id": ""}}, ""),
                           ({"previous_response_id": ""}, ""), ({"previous_response_id": "a\nb"}, digest),
                           ({"conversation": "a\nb", "previous_response_id": "resp_2"}, digest),
                           ({"metadata": {"session_id": 7}, "conversation": "c"}, "c")):
        assert name(request(), body, Chains()) == expected, body
    with pytest.raises(BadRequest):
        name(request(X_Memory_Session="a\tb"), {}, Chains())


def test_the_map_is_bounded_and_keeps_what_is_used() -> None:
    chains = Chains(capacity=3)
    for n in range(3):
        chains.link(f"resp_{n}", "s")
    assert chains.session("resp_0") == "s"  # used: kept
    chains.link("resp_3", "s")
    assert len(chains) == 3
    assert chains.session("resp_1") == "resp_1"  # the least recently used went first
    assert chains.session("resp_0") == chains.session("resp_3") == "s"

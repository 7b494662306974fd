"""JSON read from the upstream and written back: the tokens the upstream wrote survive a rewrite."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.jsontext import INEXACT, dumps, dumps_like, loads


@pytest.mark.parametrize("text", [
    '{"created":18446744073709551616}', '{"t":1E2}', '{"x":0.1000000000000000055511151231257827}', '[-0]',
    '[0.10]', '{"logprob":-Infinity}', '[NaN,Infinity]', '[1e-7,0.0000001]', '[-9223372036854775809]',
    '{"a":[1,2.5,true,null,"s"]}',
])
def test_number_tokens_come_back_as_written(text: str) -> None:
    value = loads(text)
    assert dumps_like(text, value, value) == text.encode()


def test_lone_surrogates_are_read_and_written_as_escapes() -> None:
    value = loads('{"c":"Hi \\ud83d","d":"\\ude00!","pair":"\\ud83d\\ude00"}')
    assert value == {"c": "Hi \ud83d", "d": "\ude00!", "pair": "😀"}
    written = dumps({**value, "c": value["c"] + " more"})
    assert written == '{"c":"Hi \\ud83d more","d":"\\ude00!","pair":"😀"}'.encode()
    assert json.loads(written) == {**value, "c": "Hi \ud83d more"}


def test_what_neither_reader_takes_is_a_value_error() -> None:
    for bad in ("{", "[1,]", b"\xff", "data: x"):
        with pytest.raises(ValueError):
            loads(bad)


def test_a_surrogate_in_a_key_is_escaped_too() -> None:
    text = r'{"x\udc00": 1, "a": {"\ud800k": ["\ud83d", 1E2]}, "\ud83d\ude00": "ok"}'
    assert dumps(loads(text)) == '{"x\\udc00":1,"a":{"\\ud800k":["\\ud83d",1E2]},"😀":"ok"}'.encode()
    assert json.loads(dumps(loads(text))) == json.loads(text)


def test_nesting_past_what_a_reader_takes_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="nested"):
        loads("[" * 5000 + "]" * 5000)


tokens = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: f"{f:.{abs(hash(f)) % 20}e}"),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e20, max_value=1e20).map(
        lambda f: f"{f:.{abs(hash(f)) % 25}f}"),
    st.decimals(allow_nan=False, allow_infinity=False, places=12).map(str),
).filter(lambda t: t.lower() not in ("inf", "-inf", "nan") and _is_json_number(t))


def _is_json_number(token: str) -> bool:
    try:
        json.loads(token)
    except ValueError:
        return False
    return not token.startswith(("+", "."))


@settings(max_examples=3000, deadline=None)
@given(st.lists(tokens, min_size=1, max_size=5))
def test_any_number_token_survives_a_rewrite(numbers: list[str]) -> None:
    text = '{"n":[' + ",".join(numbers) + '],"s":"x"}'
    value = loads(text)
    written = dumps_like(text, value, {**value, "s": "changed"})
    assert written == ('{"n":[' + ",".join(numbers) + '],"s":"changed"}').encode()


@settings(max_examples=3000, deadline=None)
@given(tokens)
def test_orjson_is_used_only_where_it_writes_the_token_back(token: str) -> None:
    # Where the check finds nothing, orjson is trusted to write the token back exactly as it came:
    if INEXACT.search(":" + token) is None and INEXACT.search("[" + token + ",") is None:
        assert orjson.dumps(orjson.loads(token)) == token.encode()


def test_a_float_is_still_a_number_to_whoever_reads_the_output() -> None:
    assert math.isinf(json.loads(dumps(loads('{"l":-Infinity}')))["l"])


def test_only_what_was_changed_is_written_anew() -> None:
    text = '{"created":18446744073709551616,"choices":[{"index":0,"delta":{"content":"Hi <m"},"x":1E2}],"t":1.50}'
    value = loads(text)
    choice = value["choices"][0]
    new = {**value, "choices": [{**choice, "delta": {**choice["delta"], "content": "Hi"}}]}
    assert dumps_like(text, value, new) == text.replace("Hi <m", "Hi").encode()
    assert dumps_like(text.encode(), value, new) == text.replace("Hi <m", "Hi").encode()

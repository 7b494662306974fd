"""Pure: JSON read from the upstream and written back the way the upstream wrote it, as far as a change allows.

    loads(text)   the value: orjson's reading when writing it back with orjson gives the same tokens, else the
                  standard library's (which takes `NaN`, `-Infinity` and escaped lone surrogates, as Python's
                  json.dumps and some servers write them), every number token kept as written
    dumps(value)  UTF-8 JSON bytes (orjson), strings that hold lone surrogates written as `\\udXXX` escapes

An answer the filter does not change is relayed as its own bytes and never goes through here twice; an event or
body that must be rewritten keeps the upstream's number tokens (`18446744073709551616`, `1E2`, `-Infinity`)
through `orjson.Fragment`, which embeds raw JSON text in orjson's output. Both functions are linear in the text.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# Number tokens orjson may write differently from how they came: an exponent, 16+ digits (a point among them or
# not: past a double's precision, or past 64 bits), trailing zeros after a decimal point, `-0`, long runs of
# leading zeros (orjson switches to an exponent). A match inside a string only costs the slower, exact reading;
# tests/test_jsontext.py checks that every token this lets through comes back from orjson as written.
INEXACT = re.compile(r"[0-9][eE]|[0-9](?:\.?[0-9]){15}|\.[0-9]*[0-9]0(?![0-9])|-0(?![.0-9])|\.0{5}")
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
INT_RANGE = (-(2**63), 2**64)  # what orjson reads and writes as an integer


def loads(text: str | bytes) -> Any:
    """The JSON value of `text`. Raises ValueError (orjson.JSONDecodeError or json.JSONDecodeError, both
    subclasses; UnicodeDecodeError for bytes that are not UTF-8) when neither reader takes it."""
    probe = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    if INEXACT.search(probe) is None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
    return json.loads(text, parse_float=orjson.Fragment, parse_int=_int, parse_constant=orjson.Fragment)


def dumps(value: Any) -> bytes:
    """`value` as JSON bytes. Raises TypeError (orjson.JSONEncodeError) for what JSON cannot hold, a lone
    surrogate in an object key among them."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return orjson.dumps(_escaped(value))


def _int(token: str) -> Any:
    number = int(token)
    return number if INT_RANGE[0] <= number < INT_RANGE[1] and str(number) == token else orjson.Fragment(token)


def _escaped(value: Any) -> Any:
    """`value` with every string holding a lone surrogate replaced by its JSON text, the surrogate escaped
    (UTF-8 cannot carry it; the escape is what the upstream sent)."""
    if isinstance(value, str):
        if LONE_SURROGATE.search(value) is None:
            return value
        quoted = json.dumps(value, ensure_ascii=False)
        return orjson.Fragment(LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted))
    if isinstance(value, dict):
        return {key: _escaped(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    return value

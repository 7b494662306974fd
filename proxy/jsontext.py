"""Pure: JSON read from the upstream and written back the way the upstream wrote it, as far as a change allows.

    loads(text)                       the value: orjson's reading, or, where orjson refuses, the standard
                                      library's (`NaN`, `-Infinity` and escaped lone surrogates, as Python's
                                      json.dumps and some servers write them), number tokens kept as written
    dumps_like(text, original, new)   `new` (a changed copy of `original`, loads(text)) as JSON bytes; what it did
                                      not change is written with the tokens of `text` where orjson's would differ
    dumps(value)                      JSON bytes (orjson); strings holding lone surrogates as `\\udXXX` escapes

An answer the filter does not change is relayed as its own bytes and never goes through here; one that must be
rewritten keeps the upstream's number tokens (`18446744073709551616`, `1E2`, `-Infinity`) through
`orjson.Fragment`, which embeds raw JSON text in orjson's output. The exact reading is done only for a rewrite,
and only when the text holds a token orjson would write otherwise. All of it is linear in the text.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

# Number tokens orjson may write differently from how they came: an exponent, 16+ digits (a point among them or
# not: past a double's precision, or past 64 bits), trailing zeros after a decimal point, `-0`, long runs of
# leading zeros (orjson switches to an exponent). Only where a value starts (after `:`, `,` or `[`), so that prose
# costs one fast scan; a match inside a string only costs the slower, exact reading. tests/test_jsontext.py
# checks that every token this lets through comes back from orjson as written.
INEXACT = re.compile(r"[:,\[]\s*(?:-?[0-9][0-9.]*[eE]|-?[0-9](?:\.?[0-9]){15}|-?[0-9]+\.[0-9]*[0-9]0(?![0-9])"
                     r"|-0(?![.0-9])|-?[0-9]+\.0{5})")
LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")
INT_RANGE = (-(2**63), 2**64)  # what orjson reads and writes as an integer


def loads(text: str | bytes) -> Any:
    """The JSON value of `text`. Raises ValueError (orjson.JSONDecodeError or json.JSONDecodeError, both
    subclasses; UnicodeDecodeError for bytes that are not UTF-8) when neither reader takes it, JSON nested deeper
    than orjson's 1024 levels among it."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return exact(text)


def exact(text: str | bytes) -> Any:
    """The standard library's reading, every number orjson would not write back as it came an orjson.Fragment
    of its token (`-Infinity` and `NaN` too). Raises ValueError as loads() does."""
    try:
        return json.loads(text, parse_float=orjson.Fragment, parse_int=_int, parse_constant=orjson.Fragment)
    except RecursionError:  # the standard library recurses per level: past ~1000 it gives up this way
        raise ValueError("JSON nested too deeply to read") from None


def dumps_like(text: str | bytes, original: Any, new: Any) -> bytes:
    """`new` as JSON bytes; whatever in it is still `original`'s (the same object: the same place, unchanged) is
    written as `text` wrote it, when orjson would write a number token of `text` differently."""
    probe = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    if INEXACT.search(probe) is None:
        return dumps(new)
    return dumps(_graft(original, new, exact(text)))


def dumps(value: Any) -> bytes:
    """`value` as JSON bytes (lone surrogates, in strings and object keys alike, as `\\udXXX` escapes). Raises
    TypeError (orjson.JSONEncodeError) for what JSON cannot hold."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return orjson.dumps(_escaped(value))


def _graft(original: Any, new: Any, exact: Any) -> Any:
    """`new`, with every part that is still `original`'s taken from `exact` (the exact reading of the same text,
    so the same shape as `original`)."""
    if new is original:
        return exact
    if isinstance(new, dict) and isinstance(original, dict) and isinstance(exact, dict):
        return {key: _graft(original[key], value, exact[key]) if key in original and key in exact else value
                for key, value in new.items()}
    if isinstance(new, list) and isinstance(original, list) and isinstance(exact, list) \
            and len(new) == len(original) == len(exact):
        return [_graft(*trio) for trio in zip(original, new, exact, strict=True)]
    return new


def _int(token: str) -> Any:
    number = int(token)
    return number if INT_RANGE[0] <= number < INT_RANGE[1] and str(number) == token else orjson.Fragment(token)


def _escaped(value: Any) -> Any:
    """`value` with every string holding a lone surrogate replaced by its JSON text, the surrogate escaped
    (UTF-8 cannot carry it; the escape is what the upstream sent)."""
    if isinstance(value, str):
        return value if LONE_SURROGATE.search(value) is None else orjson.Fragment(_quoted(value))
    if isinstance(value, dict):
        items = {key: _escaped(item) for key, item in value.items()}
        if not any(isinstance(key, str) and LONE_SURROGATE.search(key) for key in items):
            return items
        # orjson takes only valid str keys: this object is written here, its values still by orjson
        return orjson.Fragment(b"{" + b",".join(_quoted(str(key)) + b":" + orjson.dumps(item)
                                               for key, item in items.items()) + b"}")
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    return value


def _quoted(text: str) -> bytes:
    """`text` as a JSON string in UTF-8, its lone surrogates as `\\udXXX` escapes."""
    quoted = json.dumps(text, ensure_ascii=False)
    return LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", quoted).encode()

"""JSON read the way the safetensors library reads its header, for every JSON file layerscope takes in.

Python's ``json`` accepts more than JSON: NaN and Infinity, duplicate keys (the last silently
wins), integers of any length (up to a ValueError at 4,300 digits), lone UTF-16 surrogate
escapes, and nesting until the interpreter's recursion limit.  :func:`strict_json` refuses all of
them with a LayerscopeError naming the file, so no bad input reaches the code as a traceback.
"""

from __future__ import annotations

import json
import math

from layerscope.errors import LayerscopeError

MAX_INT_DIGITS = 20  # a u64 has at most 20 digits; longer integers are rejected before int() sees them


class _Reject(Exception):
    """A fault found inside json.loads hooks; re-raised as LayerscopeError with the file name."""


def strict_json(raw: bytes, where: str, what: str = "content") -> object:
    """JSON as the safetensors library reads it, and no more: UTF-8, no duplicate keys, no NaN, no
    overlong integers, bounded nesting; every fault is a LayerscopeError naming ``where``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LayerscopeError(f"{where}: {what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_int=_parse_int,
                          parse_float=_parse_float, parse_constant=_reject_constant)
    except _Reject as exc:
        raise LayerscopeError(f"{where}: {what} {exc}") from None
    except json.JSONDecodeError as exc:
        raise LayerscopeError(f"{where}: {what} is invalid JSON ({decode_error_text(exc)})") from None
    except RecursionError:
        raise LayerscopeError(f"{where}: {what} JSON is nested too deeply") from None


def decode_error_text(exc: json.JSONDecodeError) -> str:
    """``Expecting value at line 3, column 7`` (or ``at character 14`` in one-line text).  Some of json's own
    messages already end in "at" (``Invalid control character at``): never "at at"."""
    message = exc.msg.removesuffix(" at")
    if "\n" in exc.doc:
        return f"{message} at line {exc.lineno}, column {exc.colno}"
    return f"{message} at character {exc.pos}"


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _Reject(f"repeats key {quote(key)}")
        seen[key] = value
    return seen


def _parse_int(text: str) -> int | float:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Reject(f"holds an integer of {len(text.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return -0.0 if text == "-0" else int(text)  # JSON's -0 is not an unsigned integer (as in serde_json)


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Reject(f"holds a number out of range ({text[:20]})")
    return value


def _reject_constant(name: str) -> float:
    raise _Reject(f"holds {name}, which is not JSON")


def quote(text: str) -> str:
    """A name for an error message: repr-quoted, lone surrogates and control characters escaped."""
    shown = text if len(text) <= 120 else text[:117] + "..."
    return repr(shown.encode("utf-8", "backslashreplace").decode("utf-8"))


def json_type(value: object) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"

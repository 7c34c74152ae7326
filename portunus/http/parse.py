"""Parsing what a request carries: ASCII integers, Content-Length, JSON bodies, query values.

Pure functions (no sockets), so every hostile input has a unit test. Everything a
caller got wrong is a ``PortunusError`` with a 4xx code that names the value.
"""

from __future__ import annotations

import json
import re

from ..errors import PortunusError

MAX_BODY = 1 << 20
MAX_JSON_DEPTH = 32
INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)
# [0-9], not \d: str.isdigit() and \d accept "²" and "٣", which int() then rejects or misreads
_ASCII_UINT = re.compile(r"[0-9]{1,19}")


def ascii_int(text, what: str, *, low: int = 0, high: int = INT64_MAX,
              code: str = "validation.out_of_range") -> int:
    """A decimal integer of ASCII digits only, within [low, high]."""
    if not isinstance(text, str) or not _ASCII_UINT.fullmatch(text):
        raise PortunusError(code, f"{what} must be an integer of ASCII digits, got {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise PortunusError(code, f"{what} must be {low}..{high}, got {text!r}")
    return value


def content_length(values: list[str]) -> int | None:
    """The one Content-Length of a request (its header values as sent), or None when absent."""
    if not values:
        return None
    if len(values) > 1:
        raise PortunusError("bad_request", f"several Content-Length headers: {', '.join(map(repr, values))}")
    raw = values[0].strip()
    if not _ASCII_UINT.fullmatch(raw):
        raise PortunusError("bad_request", f"bad Content-Length {values[0]!r}: it must be a decimal byte count")
    return int(raw)


def query_value(query: dict, name: str) -> str | None:
    """The last value of a query parameter (as ``parse_qs`` returns them), or None."""
    values = query.get(name)
    return values[-1] if values else None


def query_flag(query: dict, name: str) -> bool:
    return (query_value(query, name) or "false").lower() in ("1", "true", "yes")


def query_int(query: dict, name: str, default: int | None = None, *, low: int = 1, high: int = INT64_MAX,
              code: str = "validation.out_of_range") -> int | None:
    value = query_value(query, name)
    if value is None:
        return default
    return ascii_int(value, name, low=low, high=high, code=code)


def _reject_constant(name: str):
    raise PortunusError("bad_request", f"body is not valid JSON: {name} is not a JSON number")


def json_body(data: bytes):
    """Decode a request body; None for an empty one. Checks depth, strings and integer range."""
    if not data:
        return None
    try:
        value = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        raise PortunusError("bad_request", f"body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise PortunusError("bad_request", f"body is not valid JSON: {exc}") from None
    check_json_value(value)
    return value


def check_json_value(value) -> None:
    """Walk a decoded document without recursion: bounded depth, valid Unicode, 64-bit integers."""
    stack = [(value, "body", 0)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise PortunusError("bad_request", f"body nests deeper than {MAX_JSON_DEPTH} levels (at {where})")
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, bool) or item is None or isinstance(item, float):
            continue
        elif isinstance(item, int):
            if not INT64_MIN <= item <= INT64_MAX:
                raise PortunusError("validation.out_of_range", f"{where} is outside the 64-bit integer range")
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, f"a field name in {where}")
                stack.append((child, key if where == "body" else f"{where}.{key}", depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise PortunusError("validation.invalid_string",
                            f"{where} contains a lone surrogate ({ascii(bad)[1:-1]}); text must be valid Unicode",
                            field=where) from None

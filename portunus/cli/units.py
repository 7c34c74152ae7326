"""Human units for the rate-limit cap flags and the CAPS column (SPEC §7.1, issue 13).

The ``*_bps`` caps and the bandwidth bursts are BYTES (per second); ``bit`` is accepted and
converted. Decimal suffixes are powers of 1000, ``i`` suffixes powers of 1024:

    parse_bytes("10M") == 10_000_000     parse_bytes("2TiB") == 2 * 1024**4
    parse_bytes("1.5G") == 1_500_000_000  parse_bytes("100Mbit") == 12_500_000
    parse_count("1k") == 1000            (connections per second, concurrency, connection bursts)
    caps_text({"bandwidth_in_bps": 1_000_000, "bandwidth_out_bps": 512_000,
               "new_connections_per_sec": 100, "concurrent_connections": 1000}) == "↓1.0M ↑512K 100/s ≤1000"

A bad value raises ``PortunusError("validation.invalid_unit_value")`` (exit 2) naming it; a zero
parses to 0 so the one validator (``model.RateLimit``) refuses it with its own code.
"""

from __future__ import annotations

import re
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from ..errors import PortunusError

_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
# number, scale prefix, optional "i" (binary), unit: "", "B" (bytes), "bit"/"bits"; "/s" or "ps" allowed
_QUANTITY = re.compile(r"(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<prefix>[kKmMgGtTpP]?)(?P<binary>i?)"
                       r"(?P<unit>B|bits?|)(?P<per>/s|ps)?")
_MAX = (1 << 63) - 1
CODE = "validation.invalid_unit_value"

BYTE_CAPS = ("bandwidth_in_bps", "bandwidth_out_bps", "bandwidth_in_burst", "bandwidth_out_burst")
COUNT_CAPS = ("new_connections_per_sec", "concurrent_connections", "new_connections_burst")


def _bad(what: str, text, hint: str) -> PortunusError:
    return PortunusError(CODE, f"{what} must be {hint}, got {text!r}", value=str(text))


def _quantity(text, what: str, *, byte_units: bool) -> int:
    hint = ("a whole number of bytes, optionally with K, M, G, T (x1000), KiB, MiB, GiB, TiB (x1024) "
            "or bit, e.g. 10M, 512KiB, 100Mbit") if byte_units else "a whole number, optionally with K or M, e.g. 100, 2K"
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise _bad(what, text, hint)
    m = _QUANTITY.fullmatch(text.strip())
    if m is None or (not byte_units and (m["unit"] or m["binary"] or m["per"])):
        raise _bad(what, text, hint)
    if m["binary"] and not m["prefix"]:
        raise _bad(what, text, hint)
    try:
        value = Decimal(m["num"]) * (1024 if m["binary"] else 1000) ** _POWERS[m["prefix"].lower()]
    except InvalidOperation:
        raise _bad(what, text, hint) from None
    if m["unit"].startswith("bit"):
        value /= 8
    if value != value.to_integral_value():
        raise _bad(what, text, "a whole number" + (" of bytes" if byte_units else "") + f" ({value} is not)")
    if value > _MAX:
        raise _bad(what, text, f"at most {_MAX}")
    return int(value)


def parse_bytes(text, what: str = "value") -> int:
    """A byte count or byte rate (``10M``, ``512K``, ``1.5G``, ``2TiB``, ``100Mbit``, ``4096``)."""
    return _quantity(text, what, byte_units=True)


def parse_count(text, what: str = "value") -> int:
    """A count or count rate (``100``, ``2K``, ``1.5M``): no byte or bit units."""
    return _quantity(text, what, byte_units=False)


def caps_from_flags(values: dict) -> dict:
    """The ``rate_limit`` body from cap flag values (name -> text or None; None = not given)."""
    out = {}
    for name, text in values.items():
        if text is None:
            continue
        flag = "--" + name.replace("_", "-")
        if name in BYTE_CAPS:
            out[name] = parse_bytes(text, flag)
        elif name in COUNT_CAPS:
            out[name] = parse_count(text, flag)
        else:
            raise PortunusError("validation.unknown_field", f"{name!r} is not a rate-limit cap", field=name)
    return out


def format_quantity(n: int) -> str:
    """A short decimal form: ``999``, ``1.0K``, ``512K``, ``1.5G``, ``10G`` (two or three figures,
    half up; 999 500 is ``1.0M``, never ``1000K``)."""
    if n < 1000:
        return str(n)
    value = Decimal(n)
    for prefix in "KMGTPE":
        value /= 1000
        step = Decimal("0.1") if value < Decimal("9.95") else Decimal("1")
        short = value.quantize(step, rounding=ROUND_HALF_UP)
        if short < 1000 or prefix == "E":
            return f"{short}{prefix}"
    raise AssertionError("unreachable")


def caps_text(rate_limit: dict | None) -> str:
    """The CAPS column: ``↓`` bandwidth in, ``↑`` bandwidth out, ``N/s`` new connections,
    ``≤N`` concurrent connections; ``-`` when uncapped. Byte rates are short decimal forms,
    connection counts exact. Bursts are not shown."""
    if not rate_limit:
        return "-"
    parts = []
    for key, shown in (("bandwidth_in_bps", "↓{}"), ("bandwidth_out_bps", "↑{}"),
                       ("new_connections_per_sec", "{}/s"), ("concurrent_connections", "≤{}")):
        value = rate_limit.get(key)
        if value is not None:
            parts.append(shown.format(format_quantity(value) if key in BYTE_CAPS else value))
    return " ".join(parts) or "-"

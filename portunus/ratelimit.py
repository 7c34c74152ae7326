"""Rate limits (SPEC §2.9): the one validator of a ``rate_limit`` object and the burst range.

Split out of ``portunus.model``, which re-exports ``RateLimit`` and ``burst_bounds`` so rules
and every role keep importing them from the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PortunusError


def _bad(code: str, message: str, **fields) -> PortunusError:
    return PortunusError(code, message, **fields)


_RATE_FIELDS = ("bandwidth_in_bps", "bandwidth_out_bps", "new_connections_per_sec", "concurrent_connections")
_BURST_FOR = {"bandwidth_in_burst": "bandwidth_in_bps", "bandwidth_out_burst": "bandwidth_out_bps",
              "new_connections_burst": "new_connections_per_sec"}


CAP_MAX = (1 << 63) - 1


def burst_bounds(rate: int) -> tuple[int, int]:
    """The valid integer burst range for a rate: ``[max(1, ceil(rate/100)), rate*60]``."""
    return max(1, -(-rate // 100)), rate * 60


def _cap_value(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad("validation.rate_limit_invalid", f"rate_limit.{name} must be a positive integer, got {v!r:.40}")
    if v == 0:
        raise _bad("validation.rate_limit_cap_zero",
                   f"rate_limit.{name} must not be 0 (leave it out or null for no cap), got 0")
    if not 0 < v <= CAP_MAX:
        raise _bad("validation.rate_limit_invalid", f"rate_limit.{name} must be an integer 1..2^63-1, got {v!r:.40}")
    return v


@dataclass(frozen=True)
class RateLimit:
    bandwidth_in_bps: int | None = None
    bandwidth_out_bps: int | None = None
    new_connections_per_sec: int | None = None
    concurrent_connections: int | None = None
    bandwidth_in_burst: int | None = None
    bandwidth_out_burst: int | None = None
    new_connections_burst: int | None = None

    @property
    def has_bandwidth_cap(self) -> bool:
        return bool(self.bandwidth_in_bps or self.bandwidth_out_bps)

    @classmethod
    def from_dict(cls, d) -> "RateLimit | None":
        """The one validator of a ``rate_limit`` object (server, client and standalone).

        Absent/None is uncapped; ``{}`` or only nulls is ``…_no_caps_provided`` (the CLI's exit 3).
        """
        if d is None:
            return None
        if not isinstance(d, dict):
            raise _bad("validation.rate_limit_invalid", f"rate_limit must be an object, got {d!r:.60}")
        unknown = set(d) - set(_RATE_FIELDS) - set(_BURST_FOR)
        if unknown:
            raise _bad("validation.unknown_field", f"rate_limit has unknown field(s): {', '.join(sorted(unknown))}")
        values = {name: _cap_value(name, d.get(name)) for name in _RATE_FIELDS if d.get(name) is not None}
        for burst, rate_name in _BURST_FOR.items():
            v = d.get(burst)
            if v is None:
                continue
            rate = values.get(rate_name)
            if rate is None:
                raise _bad("validation.rate_limit_burst_without_rate",
                           f"rate_limit.{burst} needs {rate_name}, which is not set")
            if isinstance(v, bool) or not isinstance(v, int):
                raise _bad("validation.rate_limit_invalid",
                           f"rate_limit.{burst} must be a positive integer, got {v!r:.40}")
            lo, hi = burst_bounds(rate)
            if not lo <= v <= hi:
                raise _bad("validation.rate_limit_burst_range",
                           f"rate_limit.{burst} must be within [{lo}, {hi}] for {rate_name}={rate}, got {v}")
            values[burst] = v
        if not values:
            raise _bad("validation.rate_limit_no_caps_provided", "rate_limit names no caps")
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

"""Server-Sent Events for ``GET /v1/rules/{id}/stats/stream``: one snapshot per stats report tick."""

from __future__ import annotations

import json
import time

from ..errors import PortunusError

KEEPALIVE_SECS = 30.0
WAIT_SLICE_SECS = 1.0  # how often a quiet stream checks whether the server is stopping


def _event(snapshot: dict) -> bytes:
    return f"event: stats\ndata: {json.dumps(snapshot)}\n\n".encode()


def write_stats_stream(wfile, core, rule_id: str, first: dict, stopping, release=lambda: None) -> None:
    """Write ``first``, then a snapshot whenever a report lands, until the peer leaves or ``stopping()``.

    ``release()`` runs before each wait, so a long-lived stream holds no store connection while idle.
    """
    try:
        wfile.write(_event(first))
        tick = core.stats.tick
        last_write = time.monotonic()
        while not stopping():
            release()
            new_tick = core.stats.wait_tick(tick, WAIT_SLICE_SECS)
            if new_tick != tick:
                tick = new_tick
                wfile.write(_event(core.rule_stats(rule_id, per_port=True, per_target=True)))
                last_write = time.monotonic()
            elif time.monotonic() - last_write >= KEEPALIVE_SECS:
                wfile.write(b": keep-alive\n\n")
                last_write = time.monotonic()
    except (OSError, PortunusError):  # the peer left, or the rule was removed
        return

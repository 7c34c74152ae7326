"""A userspace pump asks its ticket "capped?" only after a cap changed (``CAP_EPOCH``), not per
read: a cap that arrives while a connection is live still binds that connection's next reads
(the owner envelope, and a hot update of the rule's own caps). Real sockets, in-process relay.

Functional, not a benchmark: uncapped loopback moves gigabytes per second; capped at 256 KiB/s the
bytes moved in 1.5 s stay within rate x time + burst (generous band).
"""

from __future__ import annotations

import socket
import time

import pytest

from conftest import free_port, wait_until
from harness import Blaster, CountingSink, LoopThread, tcp_rule
from test_relay_rate_limits import sink  # noqa: F401  (the counting-sink fixture)
from portunus.model import RateLimit

RATE = 256 * 1024


@pytest.fixture
def lt(monkeypatch):
    monkeypatch.setenv("PORTUNUS_DISABLE_SPLICE", "1")  # caps bind on the userspace path only
    x = LoopThread()
    yield x
    x.close()


def _flowing(listen: int, sink: CountingSink) -> tuple[socket.socket, Blaster]:
    """A live connection whose pumps have read (and so cached "uncapped") many times."""
    c = socket.create_connection(("127.0.0.1", listen), timeout=5)
    b = Blaster(c)
    wait_until(lambda: sink.total >= 8 << 20, timeout=20, what="8 MiB uncapped")
    return c, b


def _moved_in(sink: CountingSink, seconds: float) -> tuple[int, float]:
    before, t0 = sink.total, time.monotonic()
    time.sleep(seconds)
    return sink.total - before, time.monotonic() - t0


def test_an_owner_envelope_installed_on_a_live_connection_caps_its_next_reads(lt, sink):
    listen = free_port()
    lt.call(lt.runtime.activate, tcp_rule("late-owner", listen, sink.port, owner="bob"))
    c, b = _flowing(listen, sink)
    try:
        lt.call(lt.runtime.set_owner_cap, "bob", RateLimit.from_dict({"bandwidth_in_bps": RATE}))
        time.sleep(0.3)  # what was in flight (socket buffers) lands first
        moved, elapsed = _moved_in(sink, 1.5)
        assert moved <= RATE * elapsed + RATE + (4 << 20), (moved, elapsed)  # not gigabytes
        assert b.error is None  # parked, never closed
        lt.call(lt.runtime.set_owner_cap, "bob", None)  # the envelope goes: full speed again
        wait_until(lambda: sink.total >= 64 << 20, timeout=20, what="uncapped again")
    finally:
        b.stop()
        c.close()


def test_a_hot_update_that_adds_a_rule_cap_binds_the_live_connection(lt, sink):
    listen = free_port()
    lt.call(lt.runtime.activate, tcp_rule("late-rule", listen, sink.port))
    c, b = _flowing(listen, sink)
    try:
        lt.call(lt.runtime.apply, [tcp_rule("late-rule", listen, sink.port,
                                            rate_limit={"bandwidth_in_bps": RATE})])
        time.sleep(0.3)
        moved, elapsed = _moved_in(sink, 1.5)
        assert moved <= RATE * elapsed + RATE + (4 << 20), (moved, elapsed)
        assert b.error is None
        assert lt.snapshot("late-rule")["rate_limit"]["active"] == 1
    finally:
        b.stop()
        c.close()

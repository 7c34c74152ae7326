"""The resolver (SPEC §2.5) on a real Loop against a real DnsServer on 127.0.0.1.

Nothing on the network side is faked. Where a test must jump past a TTL, a
stale grace or a retry spacing, the loop's clock is moved forward (``Clock``):
it is ``time.monotonic()`` plus an offset, so timers keep working, and the
offset only moves between lookups (or, deliberately, to fire a query timeout
early). Waits are bounded ``run_until`` calls; no test asserts on timing.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from types import SimpleNamespace

import pytest

from dnsserver import DnsServer
from portunus.log import log
from portunus.loop import Loop
from portunus.relay import resolver as resolver_mod
from portunus.relay.dns import QTYPE_A, QTYPE_AAAA
from portunus.relay.resolver import Resolver

V4 = socket.AF_INET
V6 = socket.AF_INET6
WAIT = 5.0


class Clock:
    """The loop's time: real monotonic time plus a jump the test controls (or frozen)."""

    def __init__(self):
        self.offset = 0.0
        self.frozen: float | None = None

    def __call__(self) -> float:
        if self.frozen is not None:
            return self.frozen
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Recorder:
    """A resolve callback that remembers every (addrs, err) it was given."""

    def __init__(self):
        self.calls: list[tuple[list, str | None]] = []

    def __call__(self, addrs, err) -> None:
        self.calls.append((list(addrs), err))

    @property
    def done(self) -> bool:
        return bool(self.calls)


@pytest.fixture
def srv():
    server = DnsServer()
    yield server
    server.close()


@pytest.fixture
def env(tmp_path, srv):
    loop = Loop()
    clock = Clock()
    loop.time = clock
    hosts = tmp_path / "hosts"
    hosts.write_text("")
    r = Resolver(loop, servers=[srv.address], hosts_path=str(hosts))
    yield SimpleNamespace(loop=loop, clock=clock, r=r, srv=srv, hosts=hosts)
    r.close()
    loop.close()


@pytest.fixture
def events(monkeypatch):
    """The structured log events written while the test runs."""
    buf = io.StringIO()
    monkeypatch.setattr(log, "stream", buf)
    monkeypatch.setattr(log, "fmt", "json")
    monkeypatch.setattr(log, "level", 10)

    def read() -> list[dict]:
        return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]
    return read


def resolve(env, host: str, prefer_ipv6: bool = False, timeout: float = WAIT):
    """Resolve ``host`` and run the loop until the callback fires once; (addrs, err)."""
    rec = Recorder()
    env.r.resolve(host, prefer_ipv6, rec)
    assert env.loop.run_until(lambda: rec.done, timeout), f"no answer for {host!r} within {timeout}s"
    assert len(rec.calls) == 1, rec.calls
    return rec.calls[0]


def resolve_cached(env, host: str, prefer_ipv6: bool = False):
    """Resolve ``host`` expecting an answer at once, from the cache, with no lookup started."""
    before = env.r.lookups
    rec = Recorder()
    env.r.resolve(host, prefer_ipv6, rec)
    assert len(rec.calls) == 1, f"{host!r} was not answered at once (cache miss?)"
    assert env.r.lookups == before, f"{host!r} started a lookup"
    return rec.calls[0]


def a_count(srv, name: str) -> int:
    return srv.count(name, QTYPE_A)


def run_real(loop, predicate, seconds: float) -> bool:
    """run_until bounded by real time, for a loop whose clock may be frozen."""
    deadline = time.monotonic() + seconds
    loop.run_until(lambda: predicate() or time.monotonic() >= deadline, 1e9)
    return predicate()


def settle(loop, seconds: float = 0.15) -> None:
    """Let the loop (and the server thread) run a moment, e.g. to show nothing was sent."""
    deadline = time.monotonic() + seconds
    loop.run_until(lambda: time.monotonic() >= deadline, seconds + 1)


# ------------------------------------------------------------------ answers and ordering

def test_a_and_aaaa_returned_ipv4_first_by_default(env):
    env.srv.set("web.test", a=["10.0.0.1", "10.0.0.2"], aaaa=["fd00::1"], ttl=60)
    addrs, err = resolve(env, "web.test")
    assert err is None
    assert addrs == [(V4, "10.0.0.1"), (V4, "10.0.0.2"), (V6, "fd00::1")]
    assert env.srv.count("web.test", QTYPE_A) == 1
    assert env.srv.count("web.test", QTYPE_AAAA) == 1


def test_prefer_ipv6_puts_ipv6_first(env):
    env.srv.set("web.test", a=["10.0.0.1"], aaaa=["fd00::1", "fd00::2"], ttl=60)
    addrs, err = resolve(env, "web.test", prefer_ipv6=True)
    assert err is None
    assert addrs == [(V6, "fd00::1"), (V6, "fd00::2"), (V4, "10.0.0.1")]
    # the same cache entry serves both orders
    assert resolve_cached(env, "web.test", False) == ([(V4, "10.0.0.1"), (V6, "fd00::1"), (V6, "fd00::2")], None)
    assert resolve_cached(env, "web.test", True) == ([(V6, "fd00::1"), (V6, "fd00::2"), (V4, "10.0.0.1")], None)
    assert env.r.lookups == 1


def test_name_with_only_aaaa(env):
    env.srv.set("six.test", aaaa=["fd00::6"], ttl=60)
    assert resolve(env, "six.test") == ([(V6, "fd00::6")], None)
    assert resolve(env, "six.test", prefer_ipv6=True) == ([(V6, "fd00::6")], None)


def test_name_with_only_a(env):
    env.srv.set("four.test", a=["10.4.4.4"], ttl=60)
    assert resolve(env, "four.test", prefer_ipv6=True) == ([(V4, "10.4.4.4")], None)


def test_cname_chain_resolves_and_is_cached_for_the_shortest_ttl(env):
    env.srv.set("web.test", a=["10.0.0.9"], aaaa=["fd00::9"], ttl=300)
    env.srv.set("mid.test", cname="web.test", ttl=120)
    env.srv.set("alias.test", cname="mid.test", ttl=20)
    addrs, err = resolve(env, "alias.test")
    assert err is None
    assert addrs == [(V4, "10.0.0.9"), (V6, "fd00::9")]
    env.clock.advance(19)
    assert resolve_cached(env, "alias.test") == (addrs, None)
    env.clock.advance(2)
    before = a_count(env.srv, "alias.test")
    assert resolve(env, "alias.test") == (addrs, None)
    assert a_count(env.srv, "alias.test") == before + 1


def test_name_case_and_trailing_dot_share_one_entry(env):
    env.srv.set("web.test", a=["10.0.0.1"], ttl=60)
    assert resolve(env, "Web.TEST.") == ([(V4, "10.0.0.1")], None)
    assert resolve_cached(env, "web.test") == ([(V4, "10.0.0.1")], None)
    assert resolve_cached(env, "WEB.test") == ([(V4, "10.0.0.1")], None)
    assert env.r.lookups == 1


# ------------------------------------------------------------------ TTL

@pytest.mark.parametrize("ttl, cached_for", [(1, 5), (1000, 300), (60, 60)])
def test_ttl_is_honoured_and_clamped(env, ttl, cached_for):
    env.srv.set("ttl.test", a=["10.0.0.1"], aaaa=["fd00::1"], ttl=ttl)
    expected = [(V4, "10.0.0.1"), (V6, "fd00::1")]
    assert resolve(env, "ttl.test") == (expected, None)
    assert a_count(env.srv, "ttl.test") == 1

    env.clock.advance(cached_for - 1)  # still inside the (clamped) TTL
    assert resolve_cached(env, "ttl.test") == (expected, None)
    settle(env.loop)
    assert a_count(env.srv, "ttl.test") == 1

    env.clock.advance(2)  # now past it: a real query again
    assert resolve(env, "ttl.test") == (expected, None)
    assert a_count(env.srv, "ttl.test") == 2
    assert env.srv.count("ttl.test", QTYPE_AAAA) == 2
    assert env.r.lookups == 2


def test_refresh_after_expiry_picks_up_new_addresses(env):
    env.srv.set("move.test", a=["10.0.0.1"], ttl=10)
    assert resolve(env, "move.test") == ([(V4, "10.0.0.1")], None)
    env.srv.set("move.test", a=["10.0.0.2"], ttl=10)
    env.clock.advance(5)
    assert resolve_cached(env, "move.test") == ([(V4, "10.0.0.1")], None)
    env.clock.advance(6)
    assert resolve(env, "move.test") == ([(V4, "10.0.0.2")], None)


# ------------------------------------------------------------------ single-flight

def test_single_flight_100_concurrent_resolves_one_query(env):
    env.srv.set("busy.test", a=["10.0.0.1"], aaaa=["fd00::1"], ttl=60)
    env.srv.delay("busy.test", 0.3)
    recs = [Recorder() for _ in range(100)]
    for i, rec in enumerate(recs[:50]):
        env.r.resolve("busy.test", i % 2 == 1, rec)
    # the queries are out, the answer is not back yet: more callers join the same lookup
    assert env.loop.run_until(lambda: env.srv.count("busy.test") >= 2, WAIT)
    assert not any(rec.done for rec in recs)
    for i, rec in enumerate(recs[50:], start=50):
        env.r.resolve("busy.test", i % 2 == 1, rec)
    assert env.loop.run_until(lambda: all(rec.done for rec in recs), WAIT)
    settle(env.loop)

    assert env.srv.count("busy.test", QTYPE_A) == 1
    assert env.srv.count("busy.test", QTYPE_AAAA) == 1
    assert env.r.lookups == 1
    for i, rec in enumerate(recs):
        assert len(rec.calls) == 1
        if i % 2:
            assert rec.calls[0] == ([(V6, "fd00::1"), (V4, "10.0.0.1")], None)
        else:
            assert rec.calls[0] == ([(V4, "10.0.0.1"), (V6, "fd00::1")], None)


# ------------------------------------------------------------------ stale-while-error and retry spacing

def test_stale_while_error_grace_then_error_then_recovery(env, events):
    srv, name = env.srv, "flaky.test"
    old = [(V4, "10.0.0.1"), (V6, "fd00::1")]
    srv.set(name, a=["10.0.0.1"], aaaa=["fd00::1"], ttl=10)
    assert resolve(env, name) == (old, None)
    srv.fail(name)  # SERVFAIL from now on

    # t = expiry + 1: the refresh fails, the last good answer is served (and logged)
    env.clock.advance(11)
    assert resolve(env, name) == (old, None)
    assert a_count(srv, name) == 2
    stale = [e for e in events() if e["event"] == "dns.serving_stale"]
    assert stale and stale[-1]["host"] == name

    # inside the retry spacing: served from cache, nothing asked
    env.clock.advance(1)
    assert resolve_cached(env, name) == (old, None)

    # later in the grace: each refresh fails, the old addresses keep coming
    for t in (10, 20, 27):  # seconds after expiry
        env.clock.offset = 10 + t
        assert resolve(env, name) == (old, None)
    assert a_count(srv, name) == 5
    assert len([e for e in events() if e["event"] == "dns.serving_stale"]) == 4
    env.clock.offset = 10 + 29  # still in the grace, inside the retry spacing
    assert resolve_cached(env, name) == (old, None)

    # past the 30 s grace (and 4 s after the last try): an error, no addresses
    env.clock.offset = 10 + 31
    addrs, err = resolve(env, name)
    assert addrs == [] and err
    assert "servfail" in err.lower()
    assert a_count(srv, name) == 6

    # a failed name is retried at most every 3 s
    env.clock.advance(1)
    addrs, err = resolve_cached(env, name)
    assert addrs == [] and err
    env.clock.advance(1.5)
    addrs, err = resolve_cached(env, name)
    assert addrs == [] and err
    settle(env.loop)
    assert a_count(srv, name) == 6

    # recovery once the server answers again
    srv.set(name, a=["10.0.0.7"], ttl=60)
    env.clock.advance(1)  # 3.5 s after the last failure
    assert resolve(env, name) == ([(V4, "10.0.0.7")], None)
    assert a_count(srv, name) == 7
    assert resolve_cached(env, name) == ([(V4, "10.0.0.7")], None)


def test_failed_name_is_retried_at_most_every_3s(env):
    srv, name = env.srv, "broken.test"
    srv.fail(name)
    addrs, err = resolve(env, name)
    assert addrs == [] and err
    assert a_count(srv, name) == 1
    for step in (0.0, 1.0, 1.5):  # 0, 1, 2.5 s after the failure
        env.clock.advance(step)
        addrs, err2 = resolve_cached(env, name)
        assert addrs == [] and err2 == err
    settle(env.loop)
    assert a_count(srv, name) == 1
    env.clock.advance(1)  # 3.5 s after
    addrs, err = resolve(env, name)
    assert addrs == [] and err
    assert a_count(srv, name) == 2
    assert env.r.lookups == 2


# ------------------------------------------------------------------ errors

def test_nxdomain_is_an_error(env):
    env.srv.nxdomain("gone.test")
    addrs, err = resolve(env, "gone.test")
    assert addrs == []
    assert err
    # a name the server has never heard of is NXDOMAIN too
    addrs, err = resolve(env, "never-set.test")
    assert addrs == [] and err


@pytest.mark.parametrize("rcode, word", [(2, "servfail"), (5, "refused")])
def test_server_error_rcodes_are_errors(env, rcode, word):
    env.srv.fail("bad.test", rcode=rcode)
    addrs, err = resolve(env, "bad.test")
    assert addrs == []
    assert err and word in err.lower()


def test_dropped_queries_time_out_after_two_attempts(env):
    # real timers here: 2 s per attempt, 2 attempts against the single server
    env.srv.drop("void.test")
    addrs, err = resolve(env, "void.test", timeout=7.0)
    assert addrs == []
    assert err and "timed out" in err
    assert env.srv.count("void.test", QTYPE_A) == 2
    assert env.srv.count("void.test", QTYPE_AAAA) == 2
    assert env.r.lookups == 1


def closed_udp_port() -> tuple[str, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    addr = s.getsockname()
    s.close()
    return addr


def test_second_server_answers_when_first_port_is_closed(env):
    env.srv.set("web.test", a=["10.0.0.1"], aaaa=["fd00::1"], ttl=60)
    r = Resolver(env.loop, servers=[closed_udp_port(), env.srv.address], hosts_path=str(env.hosts))
    # the loop's clock stands still, so no query timeout can fire: the refusal itself
    # (ICMP port unreachable) must move the lookup on to the second server
    env.clock.frozen = env.clock()
    rec = Recorder()
    r.resolve("web.test", False, rec)
    assert run_real(env.loop, lambda: rec.done, 5.0), "a refused server was not skipped"
    assert rec.calls == [([(V4, "10.0.0.1"), (V6, "fd00::1")], None)]
    assert env.srv.count("web.test", QTYPE_A) == 1
    assert env.srv.count("web.test", QTYPE_AAAA) == 1


def test_only_server_refusing_fails_without_waiting_for_timeouts(env):
    r = Resolver(env.loop, servers=[closed_udp_port()], hosts_path=str(env.hosts))
    env.clock.frozen = env.clock()
    rec = Recorder()
    r.resolve("web.test", False, rec)
    assert run_real(env.loop, lambda: rec.done, 5.0)
    addrs, err = rec.calls[0]
    assert addrs == [] and err and "unreachable" in err
    assert len(rec.calls) == 1


def test_second_server_answers_when_first_drops(env):
    first = DnsServer()
    try:
        first.drop("web.test")
        env.srv.set("web.test", a=["10.0.0.1"], aaaa=["fd00::1"], ttl=60)
        r = Resolver(env.loop, servers=[first.address, env.srv.address], hosts_path=str(env.hosts))
        rec = Recorder()
        r.resolve("web.test", False, rec)
        assert env.loop.run_until(lambda: first.count("web.test") == 2, WAIT)
        assert not rec.done
        env.clock.advance(2.1)  # fire the 2 s query timeout now
        assert env.loop.run_until(lambda: rec.done, WAIT)
        assert rec.calls == [([(V4, "10.0.0.1"), (V6, "fd00::1")], None)]
        assert env.srv.count("web.test", QTYPE_A) == 1
        assert first.count("web.test", QTYPE_A) == 1
    finally:
        first.close()


# ------------------------------------------------------------------ in-flight cap

def test_in_flight_cap_fails_fast_when_64_lookups_hang(env):
    srv, r = env.srv, env.r
    srv.set("cached.test", a=["10.0.0.1"], ttl=300)
    assert resolve(env, "cached.test") == ([(V4, "10.0.0.1")], None)

    names = [f"hang{i}.test" for i in range(64)]
    recs = []
    for n in names:
        srv.drop(n)
        rec = Recorder()
        r.resolve(n, False, rec)
        recs.append(rec)
    assert r.lookups == 65
    assert env.loop.run_until(lambda: len(srv.queries) >= 2 + 128, WAIT)
    assert not any(rec.done for rec in recs)

    # the 65th distinct name fails at once, without a query
    srv.set("extra.test", a=["10.0.0.2"], ttl=60)
    extra = Recorder()
    r.resolve("extra.test", False, extra)
    assert len(extra.calls) == 1
    addrs, err = extra.calls[0]
    assert addrs == [] and err and "busy" in err
    assert r.lookups == 65
    # a cached name still answers, and a name already in flight just joins its lookup
    assert resolve_cached(env, "cached.test") == ([(V4, "10.0.0.1")], None)
    joiner = Recorder()
    r.resolve(names[0], False, joiner)
    assert not joiner.done and r.lookups == 65
    settle(env.loop)
    assert srv.count("extra.test") == 0

    # let every hung lookup time out (both attempts) by moving the clock; the slots come back
    env.clock.advance(2.1)
    assert env.loop.run_until(lambda: len(srv.queries) >= 2 + 256, WAIT)
    env.clock.advance(2.1)
    assert env.loop.run_until(lambda: all(rec.done for rec in recs) and joiner.done, WAIT)
    for rec in recs + [joiner]:
        assert len(rec.calls) == 1
        addrs, err = rec.calls[0]
        assert addrs == [] and err and "timed out" in err
    assert resolve(env, "extra.test") == ([(V4, "10.0.0.2")], None)


# ------------------------------------------------------------------ bounded cache

def test_cache_is_bounded_and_evicts_expired_then_closest_to_expiry(env, monkeypatch):
    monkeypatch.setattr(resolver_mod, "CACHE_MAX", 4)
    srv = env.srv
    ttls = {"a.test": 300, "b.test": 5, "c.test": 100, "d.test": 200}
    for i, (n, ttl) in enumerate(ttls.items()):
        srv.set(n, a=[f"10.0.0.{i + 1}"], ttl=ttl)
        resolve(env, n)
        assert env.r.cache_size() <= 4
    assert env.r.cache_size() == 4

    # 50 s on: b expired (and is past its stale grace); a, c, d are still fresh
    env.clock.advance(50)
    srv.set("e.test", a=["10.0.0.5"], ttl=250)
    resolve(env, "e.test")
    assert env.r.cache_size() == 4
    # the expired one went first
    for n in ("a.test", "c.test", "d.test", "e.test"):
        resolve_cached(env, n)

    # nothing expired now: the entry closest to expiry (c, at 100 s) goes
    srv.set("f.test", a=["10.0.0.6"], ttl=280)
    resolve(env, "f.test")
    assert env.r.cache_size() == 4
    for n in ("a.test", "d.test", "e.test", "f.test"):
        resolve_cached(env, n)

    # and the evicted names are really gone: resolving them asks the server again
    before = a_count(srv, "c.test")
    resolve(env, "c.test")
    assert a_count(srv, "c.test") == before + 1
    assert env.r.cache_size() == 4
    before = a_count(srv, "b.test")
    resolve(env, "b.test")
    assert a_count(srv, "b.test") == before + 1
    assert env.r.cache_size() == 4


def test_cache_prefers_evicting_expired_entries_in_grace_over_fresh_ones(env, monkeypatch):
    monkeypatch.setattr(resolver_mod, "CACHE_MAX", 3)
    srv = env.srv
    srv.set("short.test", a=["10.0.0.1"], ttl=10)
    srv.set("long1.test", a=["10.0.0.2"], ttl=200)
    srv.set("long2.test", a=["10.0.0.3"], ttl=100)
    for n in ("long1.test", "short.test", "long2.test"):
        resolve(env, n)
    env.clock.advance(15)  # short expired 5 s ago, still within its 30 s stale grace
    srv.set("new.test", a=["10.0.0.4"], ttl=60)
    resolve(env, "new.test")
    assert env.r.cache_size() == 3
    for n in ("long1.test", "long2.test", "new.test"):
        resolve_cached(env, n)


def test_cache_never_exceeds_its_bound_with_many_names(env, monkeypatch):
    monkeypatch.setattr(resolver_mod, "CACHE_MAX", 4)
    for i in range(12):
        n = f"n{i}.test"
        env.srv.set(n, a=[f"10.0.1.{i + 1}"], ttl=30 + i)
        assert resolve(env, n) == ([(V4, f"10.0.1.{i + 1}")], None)
        assert env.r.cache_size() <= 4
        env.clock.advance(1)
    # failures take cache slots too, but never past the bound
    for i in range(6):
        n = f"nx{i}.test"
        env.srv.nxdomain(n)
        addrs, err = resolve(env, n)
        assert addrs == [] and err
        assert env.r.cache_size() <= 4
    assert env.r.cache_size() == 4


# ------------------------------------------------------------------ hosts file and IP literals

def test_hosts_file_names_answer_without_dns(env):
    env.hosts.write_text(
        "# local names\n"
        "10.9.9.9   myhost.test  other.test   # trailing comment\n"
        "fd00::99   myhost.test\n"
    )
    assert resolve_cached(env, "myhost.test") == ([(V4, "10.9.9.9"), (V6, "fd00::99")], None)
    assert resolve_cached(env, "MyHost.Test.", prefer_ipv6=True) == ([(V6, "fd00::99"), (V4, "10.9.9.9")], None)
    assert resolve_cached(env, "other.test") == ([(V4, "10.9.9.9")], None)
    settle(env.loop)
    assert env.srv.queries == []
    assert env.r.lookups == 0
    assert env.r.cache_size() == 0


def test_hosts_file_changes_are_picked_up(env):
    env.hosts.write_text("10.9.9.9 myhost.test\n")
    assert resolve_cached(env, "myhost.test") == ([(V4, "10.9.9.9")], None)
    env.hosts.write_text("10.8.8.8 myhost.test\n")
    st = os.stat(env.hosts)
    os.utime(env.hosts, (st.st_atime, st.st_mtime + 10))
    env.clock.advance(6)
    assert resolve_cached(env, "myhost.test") == ([(V4, "10.8.8.8")], None)
    assert env.srv.queries == []


@pytest.mark.parametrize("literal, family", [("10.1.2.3", V4), ("127.0.0.1", V4), ("::1", V6), ("fd00::abcd", V6)])
def test_ip_literals_never_query(env, literal, family):
    assert resolve_cached(env, literal) == ([(family, literal)], None)
    assert resolve_cached(env, literal, prefer_ipv6=True) == ([(family, literal)], None)
    settle(env.loop)
    assert env.srv.queries == []
    assert env.r.lookups == 0
    assert env.r.cache_size() == 0


# ------------------------------------------------------------------ truncation

def test_truncated_answer_is_retried_over_tcp(env):
    env.srv.set("big.test", a=["10.0.0.1", "10.0.0.2"], aaaa=["fd00::1"], ttl=60)
    env.srv.truncate("big.test")
    addrs, err = resolve(env, "big.test")
    assert err is None
    assert addrs == [(V4, "10.0.0.1"), (V4, "10.0.0.2"), (V6, "fd00::1")]
    assert env.srv.count("big.test", transport="udp") >= 1
    assert env.srv.count("big.test", transport="tcp") >= 1
    assert env.srv.count("big.test", QTYPE_A, transport="tcp") == 1


def test_answer_too_big_for_udp_is_fetched_over_tcp(env):
    many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(60)]  # > 512 bytes over UDP
    env.srv.set("huge.test", a=many, ttl=60)
    addrs, err = resolve(env, "huge.test")
    assert err is None
    assert addrs == [(V4, a) for a in many]
    assert env.srv.count("huge.test", QTYPE_A, transport="tcp") == 1


# ------------------------------------------------------------------ the lookups counter

def test_lookups_counts_real_lookups_only(env):
    srv, r = env.srv, env.r
    env.hosts.write_text("10.9.9.9 local.test\n")
    srv.set("one.test", a=["10.0.0.1"], ttl=60)
    srv.set("two.test", a=["10.0.0.2"], ttl=60)
    assert r.lookups == 0
    resolve(env, "one.test")
    assert r.lookups == 1
    resolve_cached(env, "one.test")
    resolve_cached(env, "10.0.0.1")
    resolve_cached(env, "local.test")
    assert r.lookups == 1
    resolve(env, "two.test")
    assert r.lookups == 2
    env.clock.advance(61)
    resolve(env, "one.test")
    assert r.lookups == 3
    srv.fail("bad.test")
    resolve(env, "bad.test")
    resolve_cached(env, "bad.test")  # retry spacing: no new lookup
    assert r.lookups == 4


def test_close_abandons_lookups_in_flight_and_frees_their_sockets():
    from portunus.loop import Loop
    from portunus.relay.resolver import Resolver
    from dnsserver import DnsServer
    srv = DnsServer()
    srv.drop("hang.test")
    loop = Loop()
    try:
        r = Resolver(loop, [("127.0.0.1", srv.port)], hosts_path="/nonexistent")
        before = loop.watched_fds()
        r.resolve("hang.test", False, lambda a, e: None)
        assert loop.watched_fds() == before + 1  # the lookup's UDP socket
        r.close()
        assert loop.watched_fds() == before
    finally:
        loop.close()
        srv.close()

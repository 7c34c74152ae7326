"""SNI routing in-process (SPEC §2.8): real TLS sites with their own certificates behind one port."""

from __future__ import annotations

import socket

import pytest

from conftest import free_port
from peers import TcpEchoServer
from test_runtime import LoopThread, tcp_rule
from tlssites import TlsSite, ask, closed_without_answer, tls_ask, tls_connect


@pytest.fixture
def lt():
    x = LoopThread()
    yield x
    x.close()


@pytest.fixture
def sites(tmp_path):
    made = {
        "exact": TlsSite(tmp_path, "exact", ["a.example.com"], free_port()),
        "wild": TlsSite(tmp_path, "wild", ["*.example.com"], free_port()),
        "apex": TlsSite(tmp_path, "apex", ["example.com"], free_port()),
        "fallback": TlsSite(tmp_path, "fallback", ["a.b.example.com", "b.example.com", "other.test"], free_port()),
    }
    yield made
    for s in made.values():
        s.close()


def sni_rules(listen: int, sites, fallback: bool = True):
    rules = [tcp_rule("r-exact", listen, sites["exact"].port, sni_pattern="a.example.com"),
             tcp_rule("r-wild", listen, sites["wild"].port, sni_pattern="*.example.com"),
             tcp_rule("r-apex", listen, sites["apex"].port, sni_pattern="example.com")]
    if fallback:
        rules.append(tcp_rule("r-fallback", listen, sites["fallback"].port))
    return rules


def shared_fd(lt, listen):
    return lt.call(lambda: lt.runtime.ctx.shared_listeners[("0.0.0.0", listen)].sock.fileno())


def test_names_route_exact_over_wildcard_over_fallback_and_each_site_verifies(lt, sites):
    listen = free_port()
    statuses = lt.call(lt.runtime.apply, sni_rules(listen, sites))
    assert {s.state for s in statuses.values()} == {"active"}
    assert tls_ask(listen, "a.example.com", sites["exact"].cert) == b"exact:ping"
    assert tls_ask(listen, "b.example.com", sites["wild"].cert) == b"wild:ping"
    assert tls_ask(listen, "example.com", sites["apex"].cert) == b"apex:ping"
    assert tls_ask(listen, "a.b.example.com", sites["fallback"].cert) == b"fallback:ping"  # one label only
    assert tls_ask(listen, None, sites["fallback"].cert) == b"fallback:ping"  # no SNI
    snaps = {s["rule_id"]: s for s in lt.call(lt.runtime.snapshots)}
    assert snaps["r-exact"]["sni_routes"] == {"exact": 1, "wildcard": 0, "fallback": 0}
    assert snaps["r-wild"]["sni_routes"]["wildcard"] == 1
    assert snaps["r-fallback"]["sni_routes"]["fallback"] == 2 and snaps["r-fallback"]["sni_pattern"] is None
    listener = snaps["r-exact"]["sni_listener"]
    assert (listener["mode"], listener["routes_active"], listener["fallback"]) == ("sni", 3, True)
    assert listener["peek_duration_seconds"]["count"] == 5
    assert listener["peek_duration_seconds"]["buckets"][-1] == [3.0, 5]


def test_no_match_and_no_sni_without_fallback_are_closed_and_counted(lt, sites):
    listen = free_port()
    lt.call(lt.runtime.apply, sni_rules(listen, sites, fallback=False))
    for name in ("other.test", None):
        with pytest.raises((ConnectionError, OSError)):
            tls_ask(listen, name, sites["fallback"].cert)
    snap = lt.call(lt.runtime.snapshot, "r-exact")
    assert snap["sni_listener"]["misses"] == 2


def test_garbage_is_closed_never_sent_to_the_fallback(lt, sites):
    listen = free_port()
    lt.call(lt.runtime.apply, sni_rules(listen, sites))
    for junk in (b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"):
        c = socket.create_connection(("127.0.0.1", listen), timeout=5)
        c.sendall(junk)
        assert closed_without_answer(c)
        c.close()
    assert lt.call(lt.runtime.snapshot, "r-exact")["sni_listener"]["parse_failures"] == 2
    assert lt.call(lt.runtime.snapshot, "r-fallback")["sni_routes"]["fallback"] == 0


def test_siblings_come_and_go_without_a_rebind_or_a_dropped_connection(lt, sites):
    listen = free_port()
    rules = sni_rules(listen, sites)
    lt.call(lt.runtime.apply, rules)
    fd = shared_fd(lt, listen)
    live = tls_connect(listen, "a.example.com", sites["exact"].cert)
    assert ask(live, b"1") == b"exact:1"
    lt.call(lt.runtime.remove, "r-wild")
    assert tls_ask(listen, "b.example.com", sites["fallback"].cert) == b"fallback:ping"
    lt.call(lt.runtime.activate, tcp_rule("r-wild2", listen, sites["wild"].port, sni_pattern="*.example.com"))
    assert tls_ask(listen, "c.example.com", sites["wild"].cert) == b"wild:ping"
    assert shared_fd(lt, listen) == fd
    assert ask(live, b"2") == b"exact:2"
    live.close()


def test_the_fallback_keeps_the_port_as_a_plain_rule_when_the_last_sni_rule_goes(lt, sites):
    listen, echo_port = free_port(), free_port()
    echo = TcpEchoServer([echo_port])
    try:
        lt.call(lt.runtime.apply, [tcp_rule("sni", listen, sites["exact"].port, sni_pattern="a.example.com"),
                                   tcp_rule("plain", listen, echo_port)])
        fd = shared_fd(lt, listen)
        lt.call(lt.runtime.remove, "sni")
        c = socket.create_connection(("127.0.0.1", listen), timeout=5)
        c.sendall(b"not tls at all")  # plain now: nothing is read before forwarding
        assert c.recv(100) == b"not tls at all"
        c.close()
        assert shared_fd(lt, listen) == fd
        lt.call(lt.runtime.remove, "plain")
        assert lt.call(lambda: lt.runtime.ctx.shared_listeners) == {}
        socket.create_server(("0.0.0.0", listen)).close()  # unbound
    finally:
        echo.close()


def test_a_taken_pattern_fails_the_rule_and_binds_nothing_new(lt, sites):
    listen = free_port()
    lt.call(lt.runtime.apply, sni_rules(listen, sites))
    dup = lt.call(lt.runtime.activate, tcp_rule("dup", listen, sites["wild"].port, sni_pattern="a.example.com"))
    assert dup.state == "failed" and dup.code == "port_in_use" and "r-exact" in dup.reason
    fb = lt.call(lt.runtime.activate, tcp_rule("fb2", listen, sites["wild"].port))
    assert fb.state == "failed" and "fallback" in fb.reason
    assert tls_ask(listen, "a.example.com", sites["exact"].cert) == b"exact:ping"


def test_a_hello_sent_one_byte_at_a_time_is_routed(lt, sites):
    import ssl
    listen = free_port()
    lt.call(lt.runtime.apply, sni_rules(listen, sites))
    ctx = ssl.create_default_context(cafile=sites["exact"].cert)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="a.example.com")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    c = socket.create_connection(("127.0.0.1", listen), timeout=10)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(hello)):
        c.sendall(hello[i:i + 1])
    # the site answers the replayed hello with its ServerHello: the bytes reached it intact
    assert c.recv(1) == b"\x16"
    c.close()


def first_flight(server_name: str | None) -> bytes:
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    outgoing = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_the_routed_rule_keeps_failover_and_proxy_protocol_and_the_bytes_arrive_identical(lt):
    from portunus.model import Rule
    listen, dead, echo_port = free_port(), free_port(), free_port()
    echo = TcpEchoServer([echo_port])
    try:
        rule = Rule.from_dict({"rule_id": "pp", "listen_port": listen, "sni_pattern": "pp.example.com",
                               "targets": [{"host": "127.0.0.1", "port": dead, "priority": 1},
                                           {"host": "127.0.0.1", "port": echo_port, "priority": 2,
                                            "proxy_protocol": "v1"}]})
        assert lt.call(lt.runtime.activate, rule).state == "active"
        hello = first_flight("pp.example.com")
        c = socket.create_connection(("127.0.0.1", listen), timeout=10)
        # the hello split in three segments, then application bytes: all must arrive, in order, once
        for piece in (hello[:3], hello[3:200], hello[200:], b"after the hello"):
            c.sendall(piece)
        want_tail = hello + b"after the hello"
        got = b""
        while not got.endswith(want_tail):
            chunk = c.recv(65536)
            assert chunk, f"closed after {len(got)} bytes"
            got += chunk
        header, _, rest = got.partition(b"\r\n")
        assert header.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 ") and rest == want_tail
        c.close()
        snap = lt.call(lt.runtime.snapshot, "pp", False, True)
        assert snap["sni_routes"]["exact"] == 1 and snap["bytes_in"] == len(want_tail)  # the header is not payload
        assert snap["connect_failures"] >= 1
    finally:
        echo.close()


def test_a_rule_whose_pattern_changes_moves_its_route_and_the_listener_stays(lt, sites):
    listen = free_port()
    lt.call(lt.runtime.apply, sni_rules(listen, sites))
    fd = shared_fd(lt, listen)
    moved = tcp_rule("r-exact", listen, sites["exact"].port, sni_pattern="other.test")
    assert lt.call(lt.runtime.activate, moved).state == "active"
    assert shared_fd(lt, listen) == fd
    assert tls_ask(listen, "a.example.com", sites["wild"].cert) == b"wild:ping"  # the wildcard takes it now
    assert tls_ask(listen, "other.test", sites["exact"].cert, check_hostname=False) == b"exact:ping"

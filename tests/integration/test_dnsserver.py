"""The DNS codec against a real responder: plain sockets on 127.0.0.1, build_query -> DnsServer -> parse_response.

Also checks the test server's own controls (drop, delay, truncate, query log),
since resolver tests lean on them.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from dnsserver import DnsServer
from portunus.relay.dns import (
    QTYPE_A,
    QTYPE_AAAA,
    QTYPE_CNAME,
    DnsAnswer,
    DnsError,
    TcpReader,
    build_query,
    frame_tcp,
    parse_response,
)

TIMEOUT = 5.0


@pytest.fixture
def srv():
    server = DnsServer()
    yield server
    server.close()


def udp_exchange(srv: DnsServer, name: str, qtype: int, txid: int = 0x4242, timeout: float = TIMEOUT) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(build_query(name, qtype, txid), srv.address)
        data, peer = s.recvfrom(65535)
        assert peer == srv.address
        return data


def udp_query(srv: DnsServer, name: str, qtype: int = QTYPE_A, txid: int = 0x4242) -> DnsAnswer:
    return parse_response(udp_exchange(srv, name, qtype, txid), txid, name, qtype)


def tcp_query(srv: DnsServer, name: str, qtype: int = QTYPE_A, txid: int = 0x5151) -> DnsAnswer:
    with socket.create_connection(srv.address, timeout=TIMEOUT) as s:
        s.sendall(frame_tcp(build_query(name, qtype, txid)))
        return parse_response(read_tcp_message(s, TcpReader()), txid, name, qtype)


def read_tcp_message(s: socket.socket, reader: TcpReader) -> bytes:
    msg = reader.feed(b"")
    while msg is None:
        chunk = s.recv(7)  # small reads: the reader must stitch the pieces
        assert chunk, "server closed the connection before answering"
        msg = reader.feed(chunk)
    return msg


def test_a_and_aaaa(srv):
    srv.set("web.test", a=["10.0.0.1", "10.0.0.2"], aaaa=["fd00:0::1"], ttl=60)
    assert udp_query(srv, "web.test") == DnsAnswer(["10.0.0.1", "10.0.0.2"], 60, 0, False)
    assert udp_query(srv, "web.test", QTYPE_AAAA) == DnsAnswer(["fd00::1"], 60, 0, False)


def test_ttl_and_replacement(srv):
    srv.set("t.test", a=["192.0.2.1"], ttl=7)
    assert udp_query(srv, "t.test").ttl == 7
    srv.set("t.test", a=["192.0.2.2"], ttl=3600)
    assert udp_query(srv, "t.test") == DnsAnswer(["192.0.2.2"], 3600, 0, False)


def test_mixed_case_question_is_echoed_and_accepted(srv):
    srv.set("case.test", a=["10.1.0.1"])
    data = udp_exchange(srv, "CaSe.TeSt", QTYPE_A)
    assert b"\x04CaSe\x04TeSt\x00" in data
    assert parse_response(data, 0x4242, "case.test", QTYPE_A).addresses == ["10.1.0.1"]
    assert srv.count("case.test") == 1


def test_answers_use_a_compression_pointer_to_the_question(srv):
    srv.set("ptr.test", a=["10.2.0.1"])
    data = udp_exchange(srv, "ptr.test", QTYPE_A)
    question_end = 12 + len(b"\x03ptr\x04test\x00") + 4
    assert data[question_end:question_end + 2] == b"\xc0\x0c"


def test_cname_chain(srv):
    srv.set("www.test", cname="edge.cdn.test", ttl=300)
    srv.set("edge.cdn.test", cname="node1.cdn.test", ttl=20)
    srv.set("node1.cdn.test", a=["10.3.0.1"], aaaa=["fd00::3"], ttl=120)
    assert udp_query(srv, "www.test") == DnsAnswer(["10.3.0.1"], 20, 0, False)
    assert udp_query(srv, "www.test", QTYPE_AAAA) == DnsAnswer(["fd00::3"], 20, 0, False)
    assert udp_query(srv, "www.test", QTYPE_CNAME) == DnsAnswer(["edge.cdn.test"], 300, 0, False)


def test_cname_to_a_missing_name_is_nxdomain(srv):
    srv.set("dangling.test", cname="gone.test", ttl=60)
    srv.nxdomain("gone.test", ttl=9)
    assert udp_query(srv, "dangling.test") == DnsAnswer([], 9, 3, False)


def test_cname_loop_is_refused(srv):
    srv.set("loop1.test", cname="loop2.test")
    srv.set("loop2.test", cname="loop1.test")
    with pytest.raises(DnsError) as info:
        udp_query(srv, "loop1.test")
    assert info.value.code == "malformed"


def test_nxdomain_carries_the_negative_ttl(srv):
    assert udp_query(srv, "unknown.test") == DnsAnswer([], 30, 3, False)
    srv.nxdomain("gone.test", ttl=12)
    assert udp_query(srv, "gone.test") == DnsAnswer([], 12, 3, False)


def test_nodata(srv):
    srv.set("v4only.test", a=["10.4.0.1"], negative_ttl=17)
    assert udp_query(srv, "v4only.test", QTYPE_AAAA) == DnsAnswer([], 17, 0, False)
    srv.set("empty.test")
    assert udp_query(srv, "empty.test") == DnsAnswer([], 30, 0, False)


def test_servfail_and_refused(srv):
    srv.fail("broken.test")
    with pytest.raises(DnsError) as info:
        udp_query(srv, "broken.test")
    assert info.value.code == "servfail"
    srv.fail("closed.test", rcode=5)
    with pytest.raises(DnsError) as info:
        udp_query(srv, "closed.test")
    assert info.value.code == "refused"
    srv.set("broken.test", a=["10.5.0.1"])
    assert udp_query(srv, "broken.test").addresses == ["10.5.0.1"]


def test_reply_to_another_query_id_is_a_mismatch(srv):
    srv.set("id.test", a=["10.6.0.1"])
    data = udp_exchange(srv, "id.test", QTYPE_A, txid=1)
    with pytest.raises(DnsError) as info:
        parse_response(data, 2, "id.test", QTYPE_A)
    assert info.value.code == "mismatch"


def test_tcp_answers(srv):
    srv.set("tcp.test", a=["10.7.0.1"], ttl=44)
    assert tcp_query(srv, "tcp.test") == DnsAnswer(["10.7.0.1"], 44, 0, False)
    assert srv.queries == [("tcp.test", QTYPE_A, "tcp")]


def test_tcp_several_queries_on_one_connection(srv):
    srv.set("one.test", a=["10.8.0.1"])
    srv.set("two.test", aaaa=["fd00::8"])
    with socket.create_connection(srv.address, timeout=TIMEOUT) as s:
        s.sendall(frame_tcp(build_query("one.test", QTYPE_A, 1)) + frame_tcp(build_query("two.test", QTYPE_AAAA, 2)))
        reader = TcpReader()
        first = parse_response(read_tcp_message(s, reader), 1, "one.test", QTYPE_A)
        second = parse_response(read_tcp_message(s, reader), 2, "two.test", QTYPE_AAAA)
    assert first.addresses == ["10.8.0.1"] and second.addresses == ["fd00::8"]


def test_truncated_over_udp_then_full_over_tcp(srv):
    srv.set("big.test", a=["10.9.0.1", "10.9.0.2"], ttl=50)
    srv.truncate("big.test")
    assert udp_query(srv, "big.test") == DnsAnswer([], None, 0, True)
    assert tcp_query(srv, "big.test") == DnsAnswer(["10.9.0.1", "10.9.0.2"], 50, 0, False)
    assert srv.queries == [("big.test", QTYPE_A, "udp"), ("big.test", QTYPE_A, "tcp")]
    srv.truncate("big.test", False)
    assert udp_query(srv, "big.test").addresses == ["10.9.0.1", "10.9.0.2"]


def test_answer_over_512_bytes_is_truncated_over_udp(srv):
    addrs = [f"10.10.0.{i}" for i in range(1, 61)]
    srv.set("many.test", a=addrs)
    assert udp_query(srv, "many.test").truncated
    assert tcp_query(srv, "many.test").addresses == addrs


def test_drop_never_answers(srv):
    srv.set("silent.test", a=["10.11.0.1"])
    srv.drop("silent.test")
    with pytest.raises(socket.timeout):
        udp_exchange(srv, "silent.test", QTYPE_A, timeout=0.3)
    with socket.create_connection(srv.address, timeout=TIMEOUT) as s:
        s.sendall(frame_tcp(build_query("silent.test", QTYPE_A, 3)))
        s.settimeout(0.3)
        with pytest.raises(socket.timeout):
            s.recv(1)
    assert srv.count("silent.test") == 2
    assert srv.count("silent.test", transport="udp") == 1
    srv.drop("silent.test", False)
    assert udp_query(srv, "silent.test").addresses == ["10.11.0.1"]


def test_drop_of_one_name_leaves_others_answered(srv):
    srv.drop("silent.test")
    srv.set("loud.test", a=["10.12.0.1"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.sendto(build_query("silent.test", QTYPE_A, 1), srv.address)
        s.sendto(build_query("loud.test", QTYPE_A, 2), srv.address)
        data, _ = s.recvfrom(65535)
    assert parse_response(data, 2, "loud.test", QTYPE_A).addresses == ["10.12.0.1"]


def test_delay_answers_late(srv):
    srv.set("slow.test", a=["10.13.0.1"])
    srv.set("fast.test", a=["10.13.0.2"])
    srv.delay("slow.test", 0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(build_query("slow.test", QTYPE_A, 1), srv.address)
        s.settimeout(0.05)  # far below the delay: nothing may be there yet
        with pytest.raises(socket.timeout):
            s.recvfrom(65535)
        # the delayed answer still arrives, and the fast name is answered meanwhile
        s.sendto(build_query("fast.test", QTYPE_A, 2), srv.address)
        s.settimeout(TIMEOUT)
        replies = {}
        for _ in range(2):
            data, _ = s.recvfrom(65535)
            replies[struct.unpack_from(">H", data)[0]] = data
    assert parse_response(replies[2], 2, "fast.test", QTYPE_A).addresses == ["10.13.0.2"]
    assert parse_response(replies[1], 1, "slow.test", QTYPE_A).addresses == ["10.13.0.1"]
    srv.delay("slow.test", 0)
    assert udp_query(srv, "slow.test").addresses == ["10.13.0.1"]


def test_delay_over_tcp(srv):
    srv.set("slowtcp.test", a=["10.14.0.1"])
    srv.delay("slowtcp.test", 0.3)
    assert tcp_query(srv, "slowtcp.test").addresses == ["10.14.0.1"]


def test_client_gone_before_a_delayed_tcp_answer(srv):
    srv.set("late.test", a=["10.15.0.1"])
    srv.delay("late.test", 0.2)
    s = socket.create_connection(srv.address, timeout=TIMEOUT)
    s.sendall(frame_tcp(build_query("late.test", QTYPE_A, 9)))
    s.close()
    srv.delay("late.test", 0)
    assert udp_query(srv, "late.test").addresses == ["10.15.0.1"]


def test_queries_are_logged_from_many_threads(srv):
    srv.set("busy.test", a=["10.16.0.1"])
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(10):
                assert udp_query(srv, "busy.test", txid=n * 100 + i).addresses == ["10.16.0.1"]
        except BaseException as exc:  # reported below, on the test thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert srv.count("busy.test") == 80
    assert srv.count("busy.test", qtype=QTYPE_AAAA) == 0
    assert set(srv.queries) == {("busy.test", QTYPE_A, "udp")}


def test_malformed_query_gets_formerr_and_is_not_logged(srv):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.sendto(struct.pack(">HHHHHH", 77, 0, 2, 0, 0, 0), srv.address)
        data, _ = s.recvfrom(65535)
    qid, flags = struct.unpack_from(">HH", data, 0)
    assert qid == 77 and flags & 0x8000 and flags & 0xF == 1
    assert srv.queries == []


def test_close_is_clean_and_idempotent():
    server = DnsServer()
    server.set("x.test", a=["10.17.0.1"])
    assert udp_query(server, "x.test").addresses == ["10.17.0.1"]
    port = server.port
    server.close()
    server.close()
    assert not server._thread.is_alive()
    # both sockets are released: the port can be bound again
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))


def test_context_manager_and_open_tcp_connection_at_close():
    with DnsServer() as server:
        server.set("cm.test", a=["10.18.0.1"])
        idle = socket.create_connection(server.address, timeout=TIMEOUT)
        assert tcp_query(server, "cm.test").addresses == ["10.18.0.1"]
    idle.settimeout(TIMEOUT)
    assert idle.recv(1) == b""  # the server closed its end
    idle.close()

"""relay/mmsg.py: the mmsghdr/iovec/sockaddr arrays, the keys and addresses read off them, the
choice between batching and the per-datagram fallback, and real recvmmsg/sendmmsg on loopback."""

from __future__ import annotations

import ctypes
import errno
import socket
import sys

import pytest

from portunus.relay import mmsg

linux_only = pytest.mark.skipif(mmsg._libc_calls() is None, reason="recvmmsg/sendmmsg need Linux libc")


class Ctx:
    """Stands in for RelayContext: batch_for only keeps its Batch on it."""

    udp_batch = False  # as RelayContext starts


def sockaddr_in(ip: str, port: int) -> bytes:
    return (socket.AF_INET.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big")
            + socket.inet_pton(socket.AF_INET, ip) + bytes(8))


def sockaddr_in6(ip: str, port: int, flowinfo: int = 0, scope: int = 0) -> bytes:
    return (socket.AF_INET6.to_bytes(2, sys.byteorder) + port.to_bytes(2, "big")
            + flowinfo.to_bytes(4, "big") + socket.inet_pton(socket.AF_INET6, ip)
            + scope.to_bytes(4, sys.byteorder))


# ---- layout -----------------------------------------------------------------------------

def test_the_word_indexes_match_the_ctypes_layout():
    assert mmsg.HDR_SIZE == ctypes.sizeof(mmsg.mmsghdr)
    assert mmsg._LEN_WORD * 4 == mmsg.mmsghdr.msg_len.offset
    assert mmsg._NAME_WORD * mmsg.PTR == mmsg.msghdr.msg_name.offset
    assert mmsg._NAMELEN_WORD * 4 == mmsg.msghdr.msg_namelen.offset
    assert mmsg.IOV_SIZE == 2 * mmsg.PTR


def test_headers_point_each_entry_at_its_slot_iovec_and_name():
    slots = mmsg.Slots(4, 4096)
    names = (ctypes.c_char * (4 * mmsg.NAME_STRIDE))()
    base = ctypes.addressof(names)
    h = mmsg.Headers(4, slots.addrs, 4096, base, 16)
    for i in range(4):
        hdr = h.arr[i].msg_hdr
        assert hdr.msg_iovlen == 1
        assert hdr.msg_iov == ctypes.addressof(h.iovs) + i * mmsg.IOV_SIZE
        assert h.iovs[i].iov_base == slots.addrs[i] == slots.addrs[0] + i * 4096
        assert h.iovs[i].iov_len == 4096
        assert hdr.msg_name == base + i * mmsg.NAME_STRIDE and hdr.msg_namelen == 16
        assert h.at(i).value == ctypes.addressof(h.arr[i]) == h.addr + i * mmsg.HDR_SIZE
        # the views the hot path writes are the same memory as the ctypes fields
        assert h.iov[2 * i] == slots.addrs[i] and h.iov[2 * i + 1] == 4096
        assert h.words[i * mmsg.HDR_SIZE // mmsg.PTR + mmsg._NAME_WORD] == hdr.msg_name
        assert h.u32[i * mmsg.HDR_SIZE // 4 + mmsg._NAMELEN_WORD] == 16
    for i in range(4):
        h.arr[i].msg_len = 100 + i
    assert h.lengths(3) == [100, 101, 102]
    h.iov[5] = 7
    assert h.iovs[2].iov_len == 7


def test_headers_without_names_leave_msg_name_null():
    slots = mmsg.Slots(2, 1024)
    h = mmsg.Headers(2, slots.addrs, 0)
    assert all(h.arr[i].msg_hdr.msg_name is None and h.arr[i].msg_hdr.msg_namelen == 0 for i in range(2))
    assert all(h.iovs[i].iov_len == 0 for i in range(2))


def test_slot_data_is_a_view_of_the_slot():
    slots = mmsg.Slots(3, 1024)
    slots.view[1024:1027] = b"abc"
    assert bytes(slots.data(1, 3)) == b"abc"
    assert bytes(slots.data(0, 2)) == b"\0\0"


# ---- sockaddr keys and decoding -----------------------------------------------------------

@pytest.mark.parametrize("ip,port", [("127.0.0.1", 1), ("10.2.3.4", 65535), ("0.0.0.0", 0), ("192.168.1.200", 5353)])
def test_ipv4_decode_and_key(ip, port):
    raw = sockaddr_in(ip, port)
    assert mmsg.decode_sockaddr(raw) == (ip, port)
    b = mmsg.Batch((None, None), slots=2, slot_size=1024)
    b.names_view[mmsg.NAME_STRIDE:mmsg.NAME_STRIDE + 16] = raw
    assert b.name_key(socket.AF_INET, 1) == mmsg.key_of_raw(raw)
    assert b.raw_name(socket.AF_INET, 1) == raw


@pytest.mark.parametrize("ip,port,flow,scope", [("::1", 53, 0, 0), ("fe80::1", 9, 0, 2),
                                                ("2001:db8::5", 65535, 0x12345, 0), ("::ffff:127.0.0.1", 7, 0, 0)])
def test_ipv6_decode_and_key(ip, port, flow, scope):
    raw = sockaddr_in6(ip, port, flow, scope)
    assert mmsg.decode_sockaddr(raw) == (socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, ip)),
                                         port, flow, scope)
    b = mmsg.Batch((None, None), slots=2, slot_size=1024)
    b.names_view[0:28] = raw
    assert b.name_key(socket.AF_INET6, 0) == mmsg.key_of_raw(raw) == tuple(memoryview(raw).cast("I"))
    assert b.keys(socket.AF_INET6, 1) == [mmsg.key_of_raw(raw)]
    assert b.raw_name(socket.AF_INET6, 0) == raw


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_rounds_keys_read_in_c_are_each_slots_name_key(family):
    b = mmsg.Batch((None, None), slots=8, slot_size=1024)
    make = sockaddr_in6 if family == socket.AF_INET6 else sockaddr_in
    host = "2001:db8::7" if family == socket.AF_INET6 else "10.0.0.7"
    for i, port in enumerate([5, 5, 6, 7, 5, 65535, 1, 6]):
        b.names_view[i * mmsg.NAME_STRIDE:i * mmsg.NAME_STRIDE + len(make(host, port))] = make(host, port)
    for r in (1, 3, 8):
        keys = b.keys(family, r)
        assert keys == [b.name_key(family, i) for i in range(r)]
        assert keys == [mmsg.key_of_raw(b.raw_name(family, i)) for i in range(r)]
    keys = b.keys(family, 8)
    assert keys[0] == keys[1] == keys[4] != keys[2] == keys[7] and len(set(keys)) == 5


def test_keys_differ_by_port_and_address():
    keys = {mmsg.key_of_raw(sockaddr_in("127.0.0.1", 1)), mmsg.key_of_raw(sockaddr_in("127.0.0.1", 2)),
            mmsg.key_of_raw(sockaddr_in("127.0.0.2", 1)), mmsg.key_of_raw(sockaddr_in6("::1", 1)),
            mmsg.key_of_raw(sockaddr_in6("::1", 2))}
    assert len(keys) == 5


def test_an_unknown_family_is_refused():
    with pytest.raises(ValueError):
        mmsg.decode_sockaddr(bytes(16))


def test_name_buffer_holds_a_copy():
    raw = sockaddr_in("127.0.0.1", 4242)
    buf, addr, n = mmsg.name_buffer(raw)
    assert n == 16 and ctypes.string_at(addr, n) == raw and addr == ctypes.addressof(buf)


# ---- batching or the fallback ---------------------------------------------------------------

@linux_only
def test_batch_for_makes_one_batch_per_context_and_keeps_it():
    ctx = Ctx()
    b = mmsg.batch_for(ctx)
    assert isinstance(b, mmsg.Batch) and b.enabled
    assert mmsg.batch_for(ctx) is b
    assert mmsg.batch_for(Ctx()) is not b  # per context: no process-global state
    b.disable()
    assert mmsg.batch_for(ctx) is None


def test_the_environment_forces_the_fallback(monkeypatch):
    monkeypatch.setenv(mmsg.ENV_DISABLE, "1")
    ctx = Ctx()
    assert mmsg.batch_for(ctx) is None and ctx.udp_batch is None


def test_other_values_of_the_environment_do_not(monkeypatch):
    monkeypatch.setenv(mmsg.ENV_DISABLE, "0")
    assert (mmsg._libc_calls() is None) == (not sys.platform.startswith("linux"))


def test_not_linux_falls_back(monkeypatch):
    monkeypatch.setattr(mmsg.sys, "platform", "darwin")
    assert mmsg._libc_calls() is None
    assert mmsg.batch_for(Ctx()) is None


def test_a_libc_that_cannot_be_loaded_falls_back(monkeypatch):
    def refuse(*a, **kw):
        raise OSError("no libc")
    monkeypatch.setattr(mmsg.sys, "platform", "linux")
    monkeypatch.setattr(mmsg.ctypes, "PyDLL", refuse)
    assert mmsg._libc_calls() is None


def test_a_libc_without_the_calls_falls_back(monkeypatch):
    class OldLibc:  # a libc from before recvmmsg (glibc < 2.12): the symbol lookup fails
        def __init__(self, *a, **kw):
            pass

        def __getattr__(self, name):
            raise AttributeError(name)
    monkeypatch.setattr(mmsg.sys, "platform", "linux")
    monkeypatch.setattr(mmsg.ctypes, "PyDLL", OldLibc)
    assert mmsg._libc_calls() is None
    assert mmsg.batch_for(Ctx()) is None


def test_the_errnos_that_mean_unsupported():
    assert errno.ENOSYS in mmsg.UNSUPPORTED_ERRNOS and errno.EPERM in mmsg.UNSUPPORTED_ERRNOS
    assert errno.EAGAIN not in mmsg.UNSUPPORTED_ERRNOS


# ---- the real calls on loopback ---------------------------------------------------------------

@pytest.fixture
def v4pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", 0))
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    yield rx, a, c
    for s in (rx, a, c):
        s.close()


@linux_only
def test_recvmmsg_reads_several_datagrams_with_lengths_and_sources(v4pair):
    rx, a, c = v4pair
    b = mmsg.batch_for(Ctx())
    sent = [(a, b"x" * 1), (c, b"y" * 300), (a, b"z" * 65000), (c, b""), (a, b"w" * 64)]
    for s, data in sent:
        s.sendto(data, rx.getsockname())
    h = b.rx(socket.AF_INET)
    r = b.recvmmsg(rx.fileno(), h.ptr, b.n, mmsg.MSG_DONTWAIT, None)
    assert r == len(sent)
    assert h.lengths(r) == [len(d) for _, d in sent]
    for i, (s, data) in enumerate(sent):
        assert bytes(b.inbound.data(i, len(data))) == data
        assert mmsg.decode_sockaddr(b.raw_name(socket.AF_INET, i)) == s.getsockname()
        assert b.name_key(socket.AF_INET, i) == mmsg.key_of_raw(b.raw_name(socket.AF_INET, i))
    assert b.name_key(socket.AF_INET, 0) == b.name_key(socket.AF_INET, 2) != b.name_key(socket.AF_INET, 1)
    assert b.recvmmsg(rx.fileno(), h.ptr, b.n, mmsg.MSG_DONTWAIT, None) == -1
    assert ctypes.get_errno() in (errno.EAGAIN, errno.EWOULDBLOCK)


@linux_only
def test_recvmmsg_stops_at_the_slots_it_is_given(v4pair):
    rx, a, _ = v4pair
    b = mmsg.batch_for(Ctx())
    for i in range(b.n + 3):
        a.sendto(bytes([i]), rx.getsockname())
    h = b.rx(socket.AF_INET)
    assert b.recvmmsg(rx.fileno(), h.ptr, b.n, mmsg.MSG_DONTWAIT, None) == b.n
    assert [bytes(b.inbound.data(i, 1))[0] for i in range(b.n)] == list(range(b.n))
    assert b.recvmmsg(rx.fileno(), h.at(5), 3, mmsg.MSG_DONTWAIT, None) == 3  # from slot 5 on
    assert [bytes(b.inbound.data(i, 1))[0] for i in range(5, 8)] == [b.n, b.n + 1, b.n + 2]


@linux_only
def test_sendmmsg_on_a_connected_socket_sends_the_iovecs_written_per_datagram(v4pair):
    rx, a, _ = v4pair
    a.connect(rx.getsockname())
    b = mmsg.batch_for(Ctx())
    b.inbound.view[0:5] = b"hello"
    b.inbound.view[3 * mmsg.SLOT_SIZE:3 * mmsg.SLOT_SIZE + 3] = b"abc"
    tx = b.up_tx
    tx.iov[0], tx.iov[1] = b.inbound.addrs[3], 3
    tx.iov[2], tx.iov[3] = b.inbound.addrs[0], 5
    tx.iov[4], tx.iov[5] = b.inbound.addrs[0], 2
    assert b.sendmmsg(a.fileno(), tx.ptr, 3, 0) == 3
    rx.setblocking(True)
    rx.settimeout(2)
    assert [rx.recv(100) for _ in range(3)] == [b"abc", b"hello", b"he"]


@linux_only
def test_sendmmsg_with_a_name_per_message_reaches_each_destination(v4pair):
    rx, a, c = v4pair
    b = mmsg.batch_for(Ctx())
    tx = b.reply_tx
    bufs = []
    for i, dest in enumerate((a, c, a)):
        b.replies.view[i * mmsg.SLOT_SIZE:i * mmsg.SLOT_SIZE + 1] = bytes([65 + i])
        buf, addr, n = mmsg.name_buffer(sockaddr_in(*dest.getsockname()))
        bufs.append(buf)
        tx.iov[2 * i], tx.iov[2 * i + 1] = b.replies.addrs[i], 1
        tx.words[i * mmsg.HDR_SIZE // mmsg.PTR + mmsg._NAME_WORD] = addr
        tx.u32[i * mmsg.HDR_SIZE // 4 + mmsg._NAMELEN_WORD] = n
    assert b.sendmmsg(rx.fileno(), tx.ptr, 3, 0) == 3
    a.settimeout(2)
    c.settimeout(2)
    assert a.recv(10) == b"A" and c.recv(10) == b"B" and a.recv(10) == b"C"


@linux_only
def test_ipv6_sources_come_with_28_byte_names():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        rx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        rx.bind(("::1", 0))
    except OSError:
        pytest.skip("no ::1 here")
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.bind(("::1", 0))
        rx.setblocking(False)
        s.sendto(b"six", rx.getsockname())
        b = mmsg.batch_for(Ctx())
        h = b.rx(socket.AF_INET6)
        assert b.recvmmsg(rx.fileno(), h.ptr, b.n, mmsg.MSG_DONTWAIT, None) == 1
        assert h.u32[mmsg._NAMELEN_WORD] == 28
        assert mmsg.decode_sockaddr(b.raw_name(socket.AF_INET6, 0)) == s.getsockname()
        assert bytes(b.inbound.data(0, 3)) == b"six"
    finally:
        s.close()
        rx.close()


# ---- pack_messages: datagram iovecs laid out as (GSO) messages ----------------------------------

class Owner:
    def __init__(self, name_addr: int, name_len: int = 16, gso_max: int = mmsg.GSO_ANY):
        self.name_addr, self.name_len, self.gso_max = name_addr, name_len, gso_max


def laid_out(sizes, gso_max=mmsg.GSO_ANY, owners=None, start=0):
    slots = mmsg.Slots(len(sizes), 1024)
    tx = mmsg.Headers(len(sizes), slots.addrs, 0, cmsg=True)
    for i, n in enumerate(sizes):
        tx.iov[2 * i], tx.iov[2 * i + 1] = slots.addrs[i], n
    firsts, counts = mmsg.pack_messages(tx, start, len(sizes), gso_max, owners)
    return tx, firsts, counts


def message(tx, m):
    h = tx.arr[m].msg_hdr
    first = (h.msg_iov - tx.iov_addr) // mmsg.IOV_SIZE
    gso = None
    if h.msg_controllen:
        assert h.msg_controllen == mmsg.CMSG_SPACE_U16
        c = mmsg.cmsghdr.from_address(h.msg_control)
        assert (c.cmsg_len, c.cmsg_level, c.cmsg_type) == (mmsg.CMSG_LEN_U16, mmsg.SOL_UDP, mmsg.UDP_SEGMENT)
        gso = ctypes.c_uint16.from_address(h.msg_control + mmsg.CMSG_HDR).value
    return first, h.msg_iovlen, gso


@pytest.mark.parametrize("sizes,want", [
    ([64] * 8, [(0, 8, 64)]),
    ([64], [(0, 1, None)]),
    ([64, 64, 10], [(0, 3, 64)]),                       # a shorter last segment joins the run
    ([64, 10, 64], [(0, 1, None), (1, 1, None), (2, 1, None)]),  # a lone datagram has no cmsg
    ([10, 64, 64], [(0, 1, None), (1, 2, 64)]),
    ([64, 64, 10, 10], [(0, 3, 64), (3, 1, None)]),      # only one shorter one ends a run
    ([64, 64, 100, 100], [(0, 2, 64), (2, 2, 100)]),     # a longer one starts a new run
    ([0, 0, 0], [(0, 1, None), (1, 1, None), (2, 1, None)]),  # 0 bytes never as GSO
    ([64, 64, 0], [(0, 2, 64), (2, 1, None)]),
    ([30000, 30000, 30000], [(0, 2, 30000), (2, 1, None)]),  # at most GSO_MAX_BYTES a message
])
def test_runs_of_equal_sizes_become_one_message(sizes, want):
    tx, firsts, counts = laid_out(sizes)
    assert [message(tx, m) for m in range(len(firsts))] == want
    assert list(zip(firsts, counts)) == [(f, n) for f, n, _ in want]


def test_gso_off_or_over_the_limit_is_a_message_per_datagram():
    tx, firsts, counts = laid_out([64] * 4, gso_max=mmsg.GSO_OFF)
    assert counts == [1] * 4 and [message(tx, m)[2] for m in range(4)] == [None] * 4
    tx, firsts, counts = laid_out([64, 64, 20, 20, 20], gso_max=63)
    assert list(zip(firsts, counts)) == [(0, 1), (1, 1), (2, 3)]


def test_at_most_gso_max_segments_a_message():
    n = mmsg.GSO_MAX_SEGMENTS + 5
    tx, firsts, counts = laid_out([8] * n)
    assert list(zip(firsts, counts)) == [(0, mmsg.GSO_MAX_SEGMENTS), (mmsg.GSO_MAX_SEGMENTS, 5)]


def test_a_start_offset_lays_out_from_header_0():
    tx, firsts, counts = laid_out([5, 64, 64, 64], start=1)
    assert list(zip(firsts, counts)) == [(1, 3)] and message(tx, 0) == (1, 3, 64)


def test_owners_split_runs_name_each_message_and_carry_their_gso_limit():
    x, y, z = Owner(1000, 16), Owner(2000, 28), Owner(3000, 16, gso_max=mmsg.GSO_OFF)
    owners = [x, x, y, y, y, x, z, z]
    tx, firsts, counts = laid_out([64] * 8, owners=owners)
    assert list(zip(firsts, counts)) == [(0, 2), (2, 3), (5, 1), (6, 1), (7, 1)]
    names = [(tx.arr[m].msg_hdr.msg_name, tx.arr[m].msg_hdr.msg_namelen) for m in range(5)]
    assert names == [(1000, 16), (2000, 28), (1000, 16), (3000, 16), (3000, 16)]
    assert [message(tx, m)[2] for m in range(5)] == [64, 64, None, None, None]


def test_the_gso_probe_and_its_switch(monkeypatch):
    monkeypatch.setenv(mmsg.ENV_DISABLE_GSO, "1")
    assert mmsg.gso_available() is False
    monkeypatch.delenv(mmsg.ENV_DISABLE_GSO)
    expect = True
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.getsockopt(mmsg.SOL_UDP, mmsg.UDP_SEGMENT)
    except OSError:
        expect = False
    assert mmsg.gso_available() is expect
    assert mmsg.Batch((None, None), slots=1, slot_size=1024).gso_max == mmsg.GSO_OFF  # no calls, no GSO


@linux_only
def test_a_gso_message_reaches_the_receiver_as_separate_datagrams(v4pair):
    if not mmsg.gso_available():
        pytest.skip("no UDP GSO on this kernel")
    rx, a, _ = v4pair
    a.connect(rx.getsockname())
    b = mmsg.batch_for(Ctx())
    tx = b.up_tx
    sizes = [100, 100, 100, 40]
    for i, n in enumerate(sizes):
        b.inbound.view[i * mmsg.SLOT_SIZE:i * mmsg.SLOT_SIZE + n] = bytes([65 + i]) * n
        tx.iov[2 * i], tx.iov[2 * i + 1] = b.inbound.addrs[i], n
    firsts, counts = mmsg.pack_messages(tx, 0, 4, b.gso_max)
    assert counts == [4]
    assert b.sendmmsg(a.fileno(), tx.ptr, 1, 0) == 1
    rx.settimeout(2)
    rx.setblocking(True)
    assert [rx.recv(1000) for _ in range(4)] == [bytes([65 + i]) * n for i, n in enumerate(sizes)]

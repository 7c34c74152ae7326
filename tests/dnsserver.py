"""A real DNS responder on 127.0.0.1 for tests, steered at runtime from the test thread.

UDP and TCP listen on the same ephemeral port. The server answers from a table
of names set by the test (A, AAAA, CNAME, TTL), and can be told to fail a name,
call it nonexistent, never answer it, answer it late, or set TC over UDP. It
encodes responses itself (it does not use ``portunus.relay.dns``), so the codec
under test is checked against an independent implementation.

    srv = DnsServer()
    srv.set("web.test", a=["10.0.0.1"], aaaa=["fd00::1"], ttl=60)
    srv.set("alias.test", cname="web.test", ttl=30)
    srv.nxdomain("gone.test"); srv.fail("broken.test"); srv.drop("slow.test")
    ... query 127.0.0.1:srv.port ...
    srv.close()

Names not in the table get NXDOMAIN; a known name asked for a type it has no
data for gets NODATA. Both carry an SOA in the authority section whose TTL and
MINIMUM are the name's negative TTL (``negative_ttl``, default 30).
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import os
import selectors
import socket
import struct
import threading
import time

A, NS, CNAME, SOA, AAAA = 1, 2, 5, 6, 28
IN = 1
UDP_LIMIT = 512  # without EDNS a UDP answer is at most 512 bytes (RFC 1035 §4.2.1)


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


def _encode_name(name: str) -> bytes:
    name = name.rstrip(".")
    out = b""
    for label in name.split(".") if name else []:
        raw = label.encode("ascii")
        out += bytes((len(raw),)) + raw
    return out + b"\x00"


def _decode_question(msg: bytes):
    """(id, flags, name text, qtype, qclass, question bytes) of a query, or None when unreadable."""
    if len(msg) < 12:
        return None
    qid, flags, qdcount = struct.unpack_from(">HHH", msg, 0)
    if qdcount != 1 or flags & 0x8000:
        return (qid, flags, None, 0, 0, b"")
    pos = 12
    labels = []
    while True:
        if pos >= len(msg):
            return (qid, flags, None, 0, 0, b"")
        n = msg[pos]
        if n == 0:
            pos += 1
            break
        if n & 0xC0 or pos + 1 + n > len(msg):
            return (qid, flags, None, 0, 0, b"")
        labels.append(msg[pos + 1:pos + 1 + n].decode("ascii", "replace"))
        pos += 1 + n
    if pos + 4 > len(msg):
        return (qid, flags, None, 0, 0, b"")
    qtype, qclass = struct.unpack_from(">HH", msg, pos)
    return (qid, flags, ".".join(labels), qtype, qclass, msg[12:pos + 4])


class _Entry:
    def __init__(self):
        self.a: list[str] = []
        self.aaaa: list[str] = []
        self.cname: str | None = None
        self.ttl = 300
        self.rcode = 0
        self.exists = False
        self.negative_ttl: int | None = None
        self.drop = False
        self.delay = 0.0
        self.truncate = False


class _Message:
    """A response under construction, compressing names against those already written."""

    def __init__(self, qid: int, flags: int, question: bytes):
        self.buf = bytearray(struct.pack(">HHHHHH", qid, flags, 1 if question else 0, 0, 0, 0) + question)
        self.offsets: dict[str, int] = {}
        self.counts = [0, 0, 0]
        # every suffix of the question name can be pointed at (RFC 1035 §4.1.4)
        pos, labels = 12, []
        while question and self.buf[pos]:
            labels.append((pos, bytes(self.buf[pos + 1:pos + 1 + self.buf[pos]]).decode("ascii", "replace")))
            pos += 1 + self.buf[pos]
        for i, (at, _) in enumerate(labels):
            self.offsets[_norm(".".join(text for _, text in labels[i:]))] = at

    def put_name(self, name: str) -> None:
        """Append ``name``: a pointer if written before, else its labels up to a known suffix."""
        key = _norm(name)
        labels = key.split(".") if key else []
        for i in range(len(labels)):
            suffix = ".".join(labels[i:])
            if suffix in self.offsets:
                self.buf += struct.pack(">H", 0xC000 | self.offsets[suffix])
                return
            if len(self.buf) < 0x3FFF:
                self.offsets[suffix] = len(self.buf)
            self.buf += bytes((len(labels[i]),)) + labels[i].encode("ascii")
        self.buf += b"\x00"

    def record(self, section: int, owner: str, rtype: int, ttl: int, write_rdata) -> None:
        """Append one record; ``write_rdata(self)`` appends its data so names in it can be compressed."""
        self.put_name(owner)
        self.buf += struct.pack(">HHIH", rtype, IN, ttl, 0)
        start = len(self.buf)
        write_rdata(self)
        struct.pack_into(">H", self.buf, start - 2, len(self.buf) - start)
        self.counts[section] += 1

    def finish(self) -> bytes:
        struct.pack_into(">HHH", self.buf, 6, *self.counts)
        return bytes(self.buf)


def _put_bytes(data: bytes):
    def write(m: _Message) -> None:
        m.buf += data
    return write


def _put_name(name: str):
    return lambda m: m.put_name(name)


def _put_soa(zone: str, neg: int):
    def write(m: _Message) -> None:
        m.put_name("ns." + zone)
        m.put_name("hostmaster." + zone)
        m.buf += struct.pack(">IIIII", 1, 3600, 600, 86400, neg)
    return write


class DnsServer:
    """A UDP+TCP DNS responder on 127.0.0.1:``port`` running on its own selectors thread."""

    def __init__(self, negative_ttl: int = 30, host: str = "127.0.0.1"):
        self.host = host
        self.negative_ttl = negative_ttl
        self._lock = threading.Lock()
        self._names: dict[str, _Entry] = {}
        self._queries: list[tuple[str, int, str]] = []
        self._udp, self._tcp = self._bind_pair(host)
        self.port = self._udp.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._sel.register(self._udp, selectors.EVENT_READ, ("udp", None))
        self._sel.register(self._tcp, selectors.EVENT_READ, ("accept", None))
        self._conns: dict[socket.socket, dict] = {}
        self._timers: list = []  # heap of (due, seq, fn); touched by the server thread only
        self._seq = itertools.count()
        self._stopping = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"dns-server-{self.port}", daemon=True)
        self._thread.start()

    @staticmethod
    def _bind_pair(host: str):
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((host, 0))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(64)
            udp.setblocking(False)
            tcp.setblocking(False)
            return udp, tcp
        raise RuntimeError("no port free for both UDP and TCP on " + host)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    # -------------------------------------------------------- control (test thread)

    def _entry(self, name: str) -> _Entry:
        key = _norm(name)
        entry = self._names.get(key)
        if entry is None:
            entry = self._names[key] = _Entry()
        return entry

    def set(self, name: str, a=None, aaaa=None, ttl: int = 300, cname: str | None = None,
            negative_ttl: int | None = None) -> None:
        """Make ``name`` answer with these records (replacing earlier ones, clearing fail/nxdomain)."""
        if cname is not None and (a or aaaa):
            raise ValueError("a name with a CNAME has no other data (RFC 1034 §3.6.2)")
        a = [str(ipaddress.IPv4Address(x)) for x in (a or [])]
        aaaa = [str(ipaddress.IPv6Address(x)) for x in (aaaa or [])]
        with self._lock:
            e = self._entry(name)
            e.a, e.aaaa, e.cname, e.ttl = a, aaaa, cname, ttl
            e.rcode, e.exists, e.negative_ttl = 0, True, negative_ttl

    def fail(self, name: str, rcode: int = 2) -> None:
        """Answer ``name`` with ``rcode`` and no records (2 SERVFAIL, 5 REFUSED, ...)."""
        with self._lock:
            e = self._entry(name)
            e.rcode, e.exists = rcode, True

    def nxdomain(self, name: str, ttl: int | None = None) -> None:
        """Answer ``name`` NXDOMAIN, with an SOA giving negative TTL ``ttl`` (default ``negative_ttl``)."""
        with self._lock:
            e = self._entry(name)
            e.a, e.aaaa, e.cname = [], [], None
            e.rcode, e.exists, e.negative_ttl = 3, False, ttl

    def drop(self, name: str, on: bool = True) -> None:
        """Never answer queries for ``name`` (over UDP or TCP) while ``on``."""
        with self._lock:
            self._entry(name).drop = on

    def delay(self, name: str, seconds: float) -> None:
        """Answer queries for ``name`` ``seconds`` late (0 to stop delaying)."""
        with self._lock:
            self._entry(name).delay = float(seconds)

    def truncate(self, name: str, on: bool = True) -> None:
        """Over UDP, answer ``name`` with TC set and no records; TCP still gets the full answer."""
        with self._lock:
            self._entry(name).truncate = on

    @property
    def queries(self) -> list[tuple[str, int, str]]:
        """(lowercased name, qtype, "udp"|"tcp") of every query received, in order."""
        with self._lock:
            return list(self._queries)

    def count(self, name: str, qtype: int | None = None, transport: str | None = None) -> int:
        key = _norm(name)
        return sum(1 for n, t, tr in self.queries
                   if n == key and (qtype is None or t == qtype) and (transport is None or tr == transport))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(5)
        for conn in list(self._conns):
            conn.close()
        self._conns.clear()
        for s in (self._udp, self._tcp, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    def __enter__(self) -> "DnsServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------- answering

    def _respond(self, query: bytes, transport: str) -> tuple[bytes | None, float]:
        """(response or None to stay silent, delay in seconds) for one query message."""
        q = _decode_question(query)
        if q is None:
            return None, 0.0
        qid, qflags, qname, qtype, qclass, question = q
        if qflags & 0x8000:
            return None, 0.0  # a response sent to us: never answer those
        rd = qflags & 0x0100
        opcode = qflags & 0x7800
        if qname is None or opcode or qclass != IN:
            rcode = 4 if opcode else 1  # NOTIMP / FORMERR
            return self._header(qid, opcode | rd, rcode) + struct.pack(">HHHH", 0, 0, 0, 0), 0.0
        key = _norm(qname)
        with self._lock:
            self._queries.append((key, qtype, transport))
            entry = self._names.get(key)
            if entry is not None and entry.drop:
                return None, 0.0
            delay = entry.delay if entry is not None else 0.0
            if entry is not None and entry.truncate and transport == "udp":
                return self._header(qid, opcode | rd | 0x0200, entry.rcode if entry.exists else 3) \
                    + struct.pack(">HHHH", 1, 0, 0, 0) + question, delay
            msg = self._answer(qid, rd, key, qtype, question)
        if transport == "udp" and len(msg) > UDP_LIMIT:
            flags, = struct.unpack_from(">H", msg, 2)
            msg = struct.pack(">HH", qid, flags | 0x0200) + struct.pack(">HHHH", 1, 0, 0, 0) + question
        return msg, delay

    @staticmethod
    def _header(qid: int, flags: int, rcode: int) -> bytes:
        # QR, AA and RA set on every answer
        return struct.pack(">HH", qid, 0x8000 | 0x0400 | 0x0080 | flags | rcode)

    def _answer(self, qid: int, rd: int, key: str, qtype: int, question: bytes) -> bytes:
        """Build the full answer for ``key`` (lock held): follow CNAMEs through the table."""
        aa_ra = 0x8000 | 0x0400 | 0x0080  # QR, AA, RA
        entry = self._names.get(key)
        if entry is not None and entry.rcode not in (0, 3):
            return _Message(qid, aa_ra | rd | entry.rcode, question).finish()
        msg = _Message(qid, aa_ra | rd, question)
        rcode = 0
        current, seen = key, set()
        negative_ttl = None
        while True:
            e = self._names.get(current)
            if e is None or not e.exists:
                rcode = 3
                negative_ttl = e.negative_ttl if e is not None else None
                break
            negative_ttl = e.negative_ttl
            if e.cname is not None and qtype != CNAME:
                msg.record(0, current, CNAME, e.ttl, _put_name(e.cname))
                seen.add(current)
                current = _norm(e.cname)
                if current in seen or len(seen) > 16:  # a loop the test asked for: stop once it closes
                    break
                continue
            if qtype == A:
                for addr in e.a:
                    msg.record(0, current, A, e.ttl, _put_bytes(ipaddress.IPv4Address(addr).packed))
            elif qtype == AAAA:
                for addr in e.aaaa:
                    msg.record(0, current, AAAA, e.ttl, _put_bytes(ipaddress.IPv6Address(addr).packed))
            elif qtype == CNAME and e.cname is not None:
                msg.record(0, current, CNAME, e.ttl, _put_name(e.cname))
            break
        if msg.counts[0] == 0 or rcode == 3:
            # negative answer: the SOA of the enclosing "zone" in the authority section (RFC 2308 §3)
            neg = self.negative_ttl if negative_ttl is None else negative_ttl
            labels = current.split(".")
            zone = ".".join(labels[1:]) if len(labels) > 1 else current
            msg.record(1, zone, SOA, neg, _put_soa(zone, neg))
        struct.pack_into(">H", msg.buf, 2, aa_ra | rd | rcode)
        return msg.finish()

    # -------------------------------------------------------- the server thread

    def _later(self, delay: float, fn) -> None:
        if delay <= 0:
            fn()
        else:
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))

    def _run(self) -> None:
        try:
            while not self._stopping:
                timeout = 0.5
                if self._timers:
                    timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
                for key, mask in self._sel.select(timeout):
                    kind, _ = key.data
                    if kind == "wake":
                        return
                    if kind == "udp":
                        self._on_udp()
                    elif kind == "accept":
                        self._on_accept()
                    else:
                        self._on_conn(key.fileobj, mask)
                now = time.monotonic()
                while self._timers and self._timers[0][0] <= now:
                    heapq.heappop(self._timers)[2]()
        finally:
            self._stopping = True

    def _on_udp(self) -> None:
        for _ in range(64):
            try:
                data, peer = self._udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            msg, delay = self._respond(data, "udp")
            if msg is not None:
                self._later(delay, lambda m=msg, p=peer: self._sendto(m, p))

    def _sendto(self, msg: bytes, peer) -> None:
        try:
            self._udp.sendto(msg, peer)
        except OSError:
            pass

    def _on_accept(self) -> None:
        while True:
            try:
                conn, _ = self._tcp.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            conn.setblocking(False)
            self._conns[conn] = {"in": bytearray(), "out": bytearray()}
            self._sel.register(conn, selectors.EVENT_READ, ("conn", None))

    def _drop_conn(self, conn: socket.socket) -> None:
        if self._conns.pop(conn, None) is not None:
            self._sel.unregister(conn)
            conn.close()

    def _on_conn(self, conn: socket.socket, mask: int) -> None:
        state = self._conns.get(conn)
        if state is None:
            return
        if mask & selectors.EVENT_READ:
            try:
                data = conn.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._drop_conn(conn)
                return
            if data:
                buf = state["in"]
                buf += data
                while len(buf) >= 2:
                    size = struct.unpack_from(">H", buf, 0)[0]
                    if len(buf) < 2 + size:
                        break
                    query = bytes(buf[2:2 + size])
                    del buf[:2 + size]
                    msg, delay = self._respond(query, "tcp")
                    if msg is not None:
                        self._later(delay, lambda c=conn, m=msg: self._queue_tcp(c, m))
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)

    def _queue_tcp(self, conn: socket.socket, msg: bytes) -> None:
        state = self._conns.get(conn)
        if state is None:
            return  # the client went away while the answer was delayed
        state["out"] += struct.pack(">H", len(msg)) + msg
        self._flush(conn)

    def _flush(self, conn: socket.socket) -> None:
        state = self._conns.get(conn)
        if state is None:
            return
        out = state["out"]
        try:
            while out:
                n = conn.send(out)
                del out[:n]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop_conn(conn)
            return
        self._sel.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0), ("conn", None))


if __name__ == "__main__":  # manual poking: python3 tests/dnsserver.py, then dig @127.0.0.1 -p PORT
    srv = DnsServer()
    srv.set("example.test", a=["192.0.2.1"], aaaa=["2001:db8::1"], ttl=60)
    print(f"listening on 127.0.0.1:{srv.port} (pid {os.getpid()}); Ctrl-C to stop")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.close()

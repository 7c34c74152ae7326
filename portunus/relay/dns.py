"""A DNS stub client's message codec (RFC 1035, AAAA from RFC 3596), sans-IO.

Portunus resolves target names itself so that answers are cached for their real
TTL (SPEC §2.5). This module only turns a question into query bytes and response
bytes into a ``DnsAnswer``; the resolver owns every socket, timer and retry.
It also reads the two system files a stub needs: resolv.conf and hosts.

Every broken input raises ``DnsError`` with a stable code, never an
``IndexError`` or ``struct.error``: responses come from the network.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

QTYPE_A = 1
QTYPE_CNAME = 5
QTYPE_SOA = 6
QTYPE_AAAA = 28
QCLASS_IN = 1

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

MAX_CNAME_HOPS = 8
MAX_NAME_TEXT = 253   # presentation form, without the trailing dot
MAX_NAME_WIRE = 255   # RFC 1035 §3.1, length octets included
MAX_LABEL = 63
MAX_TCP_MESSAGE = 0xFFFF

_HEADER = struct.Struct(">HHHHHH")
_RR_FIXED = struct.Struct(">HHIH")   # type, class, ttl, rdlength
_FLAG_QR = 0x8000
_FLAG_TC = 0x0200
_FLAG_RD = 0x0100
_OPCODE_MASK = 0x7800
_RCODE_MASK = 0x000F
_LABEL_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
_ADDRESS_SIZE = {QTYPE_A: 4, QTYPE_AAAA: 16}
_SUPPORTED_QTYPES = (QTYPE_A, QTYPE_AAAA, QTYPE_CNAME)

ERROR_CODES = frozenset({"malformed", "mismatch", "servfail", "refused", "bad_name", "unexpected"})


class DnsError(Exception):
    """A query that cannot be built or a response that cannot be used; ``code`` is stable.

    Codes: ``bad_name`` (not a host name we will ask for), ``malformed`` (broken
    packet, CNAME loop or over-long chain), ``mismatch`` (not the answer to our
    question: id, QR bit, opcode or question differ), ``servfail`` (rcode 2),
    ``refused`` (rcode 5), ``unexpected`` (any other error rcode).
    """

    def __init__(self, code: str, message: str):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown DnsError code {code!r}")
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class DnsAnswer:
    """What a response says about our question.

    ``addresses`` holds canonical IP text for A/AAAA questions (target names for
    a CNAME question), in answer order, without duplicates. ``ttl`` is the
    minimum TTL along the CNAME chain used, or for an empty answer (NXDOMAIN,
    NODATA) the negative-caching TTL from the authority SOA, or None when the
    response carries none. ``truncated`` means the TC bit was set: the records
    may be partial, so none are read and the caller should retry over TCP.
    """

    addresses: list[str] = field(default_factory=list)
    ttl: int | None = None
    rcode: int = RCODE_NOERROR
    truncated: bool = False


# ------------------------------------------------------------------ names

def _name_labels(name: str) -> tuple[bytes, ...]:
    """A host name in text -> its wire labels, as given; ``bad_name`` unless it is one we ask for."""
    if not isinstance(name, str):
        raise DnsError("bad_name", f"host name must be a string, got {type(name).__name__}")
    text = name[:-1] if name.endswith(".") else name
    if not text:
        raise DnsError("bad_name", f"host name {name!r} is empty")
    if len(text) > MAX_NAME_TEXT:
        raise DnsError("bad_name", f"host name {name[:40]!r}... is {len(text)} characters, over {MAX_NAME_TEXT}")
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise DnsError("bad_name", f"host name {name!r} is not ASCII (use its IDNA form)") from None
    labels = tuple(raw.split(b"."))
    for label in labels:
        if not label:
            raise DnsError("bad_name", f"host name {name!r} has an empty label")
        if len(label) > MAX_LABEL:
            raise DnsError("bad_name", f"host name {name!r} has a label of {len(label)} characters, over {MAX_LABEL}")
        if not _LABEL_CHARS.issuperset(label):
            bad = next(chr(c) for c in label if c not in _LABEL_CHARS)
            raise DnsError("bad_name", f"host name {name!r} contains {bad!r}")
    return labels


def _fold(labels) -> tuple[bytes, ...]:
    # DNS compares names ASCII-case-insensitively (RFC 4343); bytes.lower() touches ASCII only
    return tuple(label.lower() for label in labels)


def _labels_text(labels) -> str:
    """Wire labels -> presentation text; bytes outside printable ASCII, '.' and '\\' as \\DDD."""
    out = []
    for label in labels:
        chars = []
        for c in label:
            if 0x21 <= c <= 0x7E and c not in (0x2E, 0x5C):
                chars.append(chr(c))
            else:
                chars.append(f"\\{c:03d}")
        out.append("".join(chars))
    return ".".join(out) if out else "."


def _read_name(data: bytes, pos: int) -> tuple[tuple[bytes, ...], int]:
    """Read a possibly compressed name at ``pos``; return (labels, offset just after it).

    Loop protection: every pointer must point strictly before the start of the
    run of labels it ends, so the runs move towards the start of the packet and
    the walk ends. The expanded name is held to 255 octets as well.
    """
    labels: list[bytes] = []
    wire = 0
    end: int | None = None
    run_start = pos
    size = len(data)
    while True:
        if pos >= size:
            raise DnsError("malformed", f"name at offset {run_start} runs past the end of the packet")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= size:
                raise DnsError("malformed", f"compression pointer at offset {pos} is cut short")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end is None:
                end = pos + 2
            if target >= run_start:
                raise DnsError("malformed", f"compression pointer at offset {pos} to {target} does not point back")
            pos = run_start = target
            continue
        if kind:
            raise DnsError("malformed", f"label type 0x{kind:02x} at offset {pos} is not supported")
        if length == 0:
            return tuple(labels), (pos + 1 if end is None else end)
        wire += length + 1
        if wire + 1 > MAX_NAME_WIRE:
            raise DnsError("malformed", f"name at offset {run_start} is longer than {MAX_NAME_WIRE} octets")
        if pos + 1 + length > size:
            raise DnsError("malformed", f"label at offset {pos} runs past the end of the packet")
        labels.append(bytes(data[pos + 1:pos + 1 + length]))
        pos += 1 + length


# ------------------------------------------------------------------ queries

def build_query(name: str, qtype: int, txid: int) -> bytes:
    """A standard query (opcode 0, RD=1) with one question ``name``/``qtype``/IN."""
    if not isinstance(txid, int) or not 0 <= txid <= 0xFFFF:
        raise ValueError(f"txid must be 0..65535, got {txid!r}")
    if not isinstance(qtype, int) or not 1 <= qtype <= 0xFFFF:
        raise ValueError(f"qtype must be 1..65535, got {qtype!r}")
    labels = _name_labels(name)
    qname = b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"
    return _HEADER.pack(txid, _FLAG_RD, 1, 0, 0, 0) + qname + struct.pack(">HH", qtype, QCLASS_IN)


# ------------------------------------------------------------------ responses

@dataclass
class _Record:
    owner: tuple[bytes, ...]   # case-folded
    rtype: int
    rclass: int
    ttl: int
    rdata_start: int
    rdata_end: int


def _read_record(data: bytes, pos: int) -> tuple[_Record, int]:
    owner, pos = _read_name(data, pos)
    if pos + _RR_FIXED.size > len(data):
        raise DnsError("malformed", f"resource record at offset {pos} is cut short")
    rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos)
    pos += _RR_FIXED.size
    if pos + rdlength > len(data):
        raise DnsError("malformed", f"record data at offset {pos} ({rdlength} bytes) runs past the end")
    if ttl > 0x7FFFFFFF:
        ttl = 0  # RFC 2181 §8: a TTL with the top bit set is read as zero
    return _Record(_fold(owner), rtype, rclass, ttl, pos, pos + rdlength), pos + rdlength


def _rdata_name(data: bytes, rec: _Record) -> tuple[bytes, ...]:
    labels, end = _read_name(data, rec.rdata_start)
    if end != rec.rdata_end:
        raise DnsError("malformed", f"name in record data at offset {rec.rdata_start} does not fill its "
                                    f"{rec.rdata_end - rec.rdata_start} bytes")
    return labels


def _soa_negative_ttl(data: bytes, rec: _Record) -> int:
    """RFC 2308 §5: a negative answer is cached for min(SOA record TTL, SOA MINIMUM)."""
    _mname, pos = _read_name(data, rec.rdata_start)
    _rname, pos = _read_name(data, pos)
    if pos + 20 != rec.rdata_end:
        raise DnsError("malformed", f"SOA record data at offset {rec.rdata_start} has the wrong length")
    minimum = struct.unpack_from(">I", data, pos + 16)[0]
    if minimum > 0x7FFFFFFF:
        minimum = 0
    return min(rec.ttl, minimum)


def _address_text(data: bytes, rec: _Record, qtype: int) -> str:
    raw = data[rec.rdata_start:rec.rdata_end]
    if len(raw) != _ADDRESS_SIZE[qtype]:
        kind = "A" if qtype == QTYPE_A else "AAAA"
        raise DnsError("malformed", f"{kind} record at offset {rec.rdata_start} has {len(raw)} bytes of data, "
                                    f"not {_ADDRESS_SIZE[qtype]}")
    return str(ipaddress.IPv4Address(raw) if qtype == QTYPE_A else ipaddress.IPv6Address(raw))


def parse_response(data: bytes, txid: int, name: str, qtype: int) -> DnsAnswer:
    """Check ``data`` answers query ``txid`` for ``name``/``qtype``; extract the addresses and TTL."""
    if qtype not in _SUPPORTED_QTYPES:
        raise ValueError(f"qtype must be one of {_SUPPORTED_QTYPES}, got {qtype!r}")
    want = _fold(_name_labels(name))
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise DnsError("malformed", f"response of {len(data)} bytes is shorter than a DNS header")
    rid, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data, 0)
    if rid != txid:
        raise DnsError("mismatch", f"response id {rid} is not query id {txid}")
    if not flags & _FLAG_QR:
        raise DnsError("mismatch", "message is a query, not a response (QR bit clear)")
    if flags & _OPCODE_MASK:
        raise DnsError("mismatch", f"response opcode {(flags & _OPCODE_MASK) >> 11} is not a standard query")
    if qdcount != 1:
        raise DnsError("mismatch", f"response carries {qdcount} questions, not 1")
    qlabels, pos = _read_name(data, _HEADER.size)
    if pos + 4 > len(data):
        raise DnsError("malformed", "question is cut short")
    rqtype, rqclass = struct.unpack_from(">HH", data, pos)
    pos += 4
    if _fold(qlabels) != want or rqtype != qtype or rqclass != QCLASS_IN:
        raise DnsError("mismatch", f"response answers {_labels_text(qlabels)!r} type {rqtype} class {rqclass}, "
                                   f"not {name!r} type {qtype} class {QCLASS_IN}")

    rcode = flags & _RCODE_MASK
    if rcode == RCODE_SERVFAIL:
        raise DnsError("servfail", f"server failed to answer {name!r} (SERVFAIL)")
    if rcode == RCODE_REFUSED:
        raise DnsError("refused", f"server refused to answer {name!r} (REFUSED)")
    if rcode not in (RCODE_NOERROR, RCODE_NXDOMAIN):
        raise DnsError("unexpected", f"server answered {name!r} with rcode {rcode}")
    if flags & _FLAG_TC:
        return DnsAnswer(addresses=[], ttl=None, rcode=rcode, truncated=True)

    answers: list[_Record] = []
    authority: list[_Record] = []
    for section, count in ((answers, ancount), (authority, nscount), (None, arcount)):
        for _ in range(count):
            rec, pos = _read_record(data, pos)
            if section is not None:
                section.append(rec)

    addresses: list[str] = []
    ttl: int | None = None
    if rcode == RCODE_NOERROR:
        addresses, ttl = _follow_chain(data, answers, want, qtype, name)
    if not addresses:
        ttl = None
        for rec in authority:
            if rec.rtype == QTYPE_SOA and rec.rclass == QCLASS_IN:
                ttl = _soa_negative_ttl(data, rec)
                break
    return DnsAnswer(addresses=addresses, ttl=ttl, rcode=rcode, truncated=False)


def _follow_chain(data: bytes, answers: list[_Record], want: tuple[bytes, ...], qtype: int,
                  name: str) -> tuple[list[str], int | None]:
    """Walk CNAMEs from ``want`` inside the answer section; collect ``qtype`` data of the last name."""
    current = want
    seen = {current}
    chain_ttl: int | None = None
    hops = 0
    while True:
        found: list[str] = []
        ttl = chain_ttl
        for rec in answers:
            if rec.owner != current or rec.rclass != QCLASS_IN or rec.rtype != qtype:
                continue
            if qtype == QTYPE_CNAME:
                text = _labels_text(_rdata_name(data, rec))
            else:
                text = _address_text(data, rec, qtype)
            if text not in found:
                found.append(text)
            ttl = rec.ttl if ttl is None else min(ttl, rec.ttl)
        if found:
            return found, ttl
        alias = next((rec for rec in answers
                      if rec.owner == current and rec.rclass == QCLASS_IN and rec.rtype == QTYPE_CNAME), None)
        if alias is None:
            return [], None
        target = _fold(_rdata_name(data, alias))
        if target in seen:
            raise DnsError("malformed", f"CNAME loop in the answer for {name!r} at {_labels_text(target)!r}")
        hops += 1
        if hops > MAX_CNAME_HOPS:
            raise DnsError("malformed", f"CNAME chain for {name!r} is longer than {MAX_CNAME_HOPS} hops")
        seen.add(target)
        chain_ttl = alias.ttl if chain_ttl is None else min(chain_ttl, alias.ttl)
        current = target


# ------------------------------------------------------------------ TCP framing

def frame_tcp(msg: bytes) -> bytes:
    """A DNS message for TCP: 2-byte big-endian length, then the message (RFC 1035 §4.2.2)."""
    if len(msg) > MAX_TCP_MESSAGE:
        raise ValueError(f"DNS message of {len(msg)} bytes does not fit a TCP frame ({MAX_TCP_MESSAGE} max)")
    return struct.pack(">H", len(msg)) + bytes(msg)


class TcpReader:
    """Bytes from a DNS TCP stream in any pieces -> whole messages, one per ``feed``.

    ``feed`` returns the first complete message it holds, or None when it needs
    more bytes; call ``feed(b"")`` to take a further message already buffered.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> bytes | None:
        self._buf += data
        if len(self._buf) < 2:
            return None
        size = (self._buf[0] << 8) | self._buf[1]
        if len(self._buf) < 2 + size:
            return None
        msg = bytes(self._buf[2:2 + size])
        del self._buf[:2 + size]
        return msg


# ------------------------------------------------------------------ system files

DEFAULT_NAMESERVERS = [("127.0.0.1", 53)]


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def read_resolv_conf(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    """The ``nameserver`` addresses, in file order, each with port 53.

    Unparsable addresses are skipped; a missing or unreadable file, or one with
    no usable nameserver, gives the resolver default of 127.0.0.1 (resolv.conf(5)).
    """
    servers: list[tuple[str, int]] = []
    for line in _read_lines(path):
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            addr = str(ipaddress.ip_address(fields[1]))
        except ValueError:
            continue
        if (addr, 53) not in servers:
            servers.append((addr, 53))
    return servers or list(DEFAULT_NAMESERVERS)


def read_hosts(path: str = "/etc/hosts") -> dict[str, list[str]]:
    """Lowercased names and aliases -> canonical addresses in file order; ``#`` starts a comment."""
    table: dict[str, list[str]] = {}
    for line in _read_lines(path):
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            addr = str(ipaddress.ip_address(fields[0]))
        except ValueError:
            continue
        for host in fields[1:]:
            host = host.lower().rstrip(".")
            if not host:
                continue
            addrs = table.setdefault(host, [])
            if addr not in addrs:
                addrs.append(addr)
    return table

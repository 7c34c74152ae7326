"""HAProxy PROXY protocol headers (SPEC §2.7), sans-IO.

The relay writes one header to the upstream before any payload so the backend
learns the original client address. ``encode_v1`` builds the text form
(``PROXY TCP4 src dst sport dport\\r\\n``), ``encode_v2`` the binary form (a
12-byte signature, version/command, family/transport, a big-endian length,
then the address block). ``parse`` reads either form back from the front of a
byte buffer, for tests and for anyone receiving headers; it never touches a
socket and reports "need more bytes" as ``(None, 0)``.

Family rules, shared by both encoders: two IPv4 endpoints (an IPv4-mapped IPv6
address ``::ffff:a.b.c.d`` counts as its plain IPv4) give TCP4; two IPv6
endpoints give TCP6, keeping a mapped address as IPv6 when the other side is
a real IPv6 address; an IPv4 endpoint facing a real IPv6 one is UNKNOWN
(v1 ``PROXY UNKNOWN``, v2 AF_UNSPEC with no addresses).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # whole line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_SIZE = 16  # signature + ver/cmd + fam + 2-byte length

_V2_VERSION = 0x2
_V2_LOCAL = 0x0
_V2_PROXY = 0x1

# family/transport byte -> (reported family, address block size)
_V2_FAMILIES: dict[int, tuple[str, int]] = {
    0x00: ("UNKNOWN", 0),  # AF_UNSPEC
    0x11: ("TCP4", 12),  # AF_INET, STREAM
    0x12: ("UNKNOWN", 12),  # AF_INET, DGRAM
    0x21: ("TCP6", 36),  # AF_INET6, STREAM
    0x22: ("UNKNOWN", 36),  # AF_INET6, DGRAM
    0x31: ("UNKNOWN", 216),  # AF_UNIX, STREAM
    0x32: ("UNKNOWN", 216),  # AF_UNIX, DGRAM
}
_V2_FAM_BYTE = {"UNKNOWN": 0x00, "TCP4": 0x11, "TCP6": 0x21}

Address = tuple[str, int]
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyProtocolError(ValueError):
    """A PROXY protocol header that cannot be read; the message names what is wrong."""


@dataclass(frozen=True)
class ProxyHeader:
    version: int  # 1 or 2
    command: str  # "PROXY" or "LOCAL"
    family: str  # "TCP4", "TCP6" or "UNKNOWN"
    src: Address | None
    dst: Address | None
    tlvs: bytes = b""  # raw TLV bytes after the v2 address block


# ---------------------------------------------------------------- encoding


def _endpoint(addr, what: str) -> tuple[_IP, int]:
    # sockets give (host, port) for IPv4 and (host, port, flowinfo, scope_id) for IPv6
    if not isinstance(addr, tuple) or len(addr) < 2:
        raise ValueError(f"{what} must be a (host, port) tuple, got {addr!r}")
    host, port = addr[0], addr[1]
    if not isinstance(host, str):
        raise ValueError(f"{what} host must be an IP address string, got {host!r}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{what} host {host!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        ip = ipaddress.IPv6Address(int(ip))  # the header has no room for a zone
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{what} port must be an integer in 0..65535, got {port!r}")
    return ip, port


def _as_ipv4(ip: _IP) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return ip.ipv4_mapped


def _classify(src, dst) -> tuple[str, tuple[_IP, int] | None, tuple[_IP, int] | None]:
    """-> (family, src endpoint, dst endpoint), addresses unified to the family."""
    (sip, sport), (dip, dport) = _endpoint(src, "source"), _endpoint(dst, "destination")
    s4, d4 = _as_ipv4(sip), _as_ipv4(dip)
    if s4 is not None and d4 is not None:
        return "TCP4", (s4, sport), (d4, dport)
    if isinstance(sip, ipaddress.IPv6Address) and isinstance(dip, ipaddress.IPv6Address):
        return "TCP6", (sip, sport), (dip, dport)
    return "UNKNOWN", None, None


def encode_v1(src: Address, dst: Address) -> bytes:
    """The text header for a TCP connection from ``src`` to ``dst``."""
    family, s, d = _classify(src, dst)
    if s is None or d is None:
        return b"PROXY UNKNOWN\r\n"
    return f"PROXY {family} {s[0]} {d[0]} {s[1]} {d[1]}\r\n".encode("ascii")


def encode_v2(src: Address, dst: Address, *, local: bool = False) -> bytes:
    """The binary header for a TCP connection from ``src`` to ``dst``.

    ``local=True`` gives a LOCAL header (the connection was made by the proxy
    itself, e.g. a health check): no addresses, and the endpoints are not read.
    """
    if local:
        return V2_SIGNATURE + bytes([(_V2_VERSION << 4) | _V2_LOCAL, 0x00]) + b"\x00\x00"
    family, s, d = _classify(src, dst)
    body = b""
    if s is not None and d is not None:
        body = s[0].packed + d[0].packed + struct.pack(">HH", s[1], d[1])
    head = bytes([(_V2_VERSION << 4) | _V2_PROXY, _V2_FAM_BYTE[family]])
    return V2_SIGNATURE + head + struct.pack(">H", len(body)) + body


def encode(version: str, src: Address, dst: Address) -> bytes:
    """The header a target's ``proxy_protocol = "v1" | "v2"`` asks for."""
    if version == "v1":
        return encode_v1(src, dst)
    if version == "v2":
        return encode_v2(src, dst)
    raise ValueError(f'proxy_protocol must be "v1" or "v2", got {version!r}')


# ---------------------------------------------------------------- parsing


def parse(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader | None, int]:
    """Read one header from the front of ``data``.

    Returns ``(header, bytes consumed)``, or ``(None, 0)`` while the bytes so
    far are a valid but incomplete header. Raises ``ProxyProtocolError`` as
    soon as the bytes cannot start a valid header.
    """
    data = bytes(data)
    if not data:
        return None, 0
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if data[0] == V1_PREFIX[0]:
        return _parse_v1(data)
    raise ProxyProtocolError(f"no PROXY protocol signature: data starts with {data[:16]!r}")


def _parse_v1(data: bytes) -> tuple[ProxyHeader | None, int]:
    window = data[:V1_MAX_LENGTH]
    if not window.startswith(V1_PREFIX[: len(window)]):
        raise ProxyProtocolError(f"no PROXY protocol signature: data starts with {data[:16]!r}")
    end = window.find(b"\r\n")
    lf = window.find(b"\n")
    if lf != -1 and (end == -1 or lf < end + 1):
        raise ProxyProtocolError(f"v1 header has a bare LF at offset {lf}")
    cr = window.find(b"\r")
    if cr != -1 and cr != end and cr != len(window) - 1:
        raise ProxyProtocolError(f"v1 header has a CR without LF at offset {cr}")
    if end == -1:
        if len(window) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 header has no CRLF within {V1_MAX_LENGTH} bytes")
        return None, 0
    line = window[:end]
    if line == b"PROXY UNKNOWN" or line.startswith(b"PROXY UNKNOWN "):
        # the receiver must ignore whatever follows UNKNOWN on the line
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None), end + 2
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError(f"v1 header is not ASCII: {line!r}") from None
    rest = text[len(V1_PREFIX):]
    fields = rest.split(" ")
    if len(fields) != 5:
        raise ProxyProtocolError(f"v1 header must be 'PROXY <proto> <src> <dst> <sport> <dport>', got {text!r}")
    proto, src_host, dst_host, src_port, dst_port = fields
    if proto == "TCP4":
        ip_type: type = ipaddress.IPv4Address
    elif proto == "TCP6":
        ip_type = ipaddress.IPv6Address
    else:
        raise ProxyProtocolError(f"v1 header protocol must be TCP4, TCP6 or UNKNOWN, got {proto!r}")
    src = (_v1_address(src_host, ip_type, proto), _v1_port(src_port))
    dst = (_v1_address(dst_host, ip_type, proto), _v1_port(dst_port))
    return ProxyHeader(1, "PROXY", proto, src, dst), end + 2


def _v1_address(text: str, ip_type: type, proto: str) -> str:
    if "%" in text:
        raise ProxyProtocolError(f"v1 {proto} address {text!r} carries a zone")
    try:
        return str(ip_type(text))
    except ValueError:
        raise ProxyProtocolError(f"v1 {proto} address {text!r} is not valid") from None


def _v1_port(text: str) -> int:
    # decimal, no sign, no leading zero (it could be read as octal)
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0") or len(text) > 5:
        raise ProxyProtocolError(f"v1 port {text!r} is not a decimal integer in 0..65535")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 port {text!r} is out of range 0..65535")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyHeader | None, int]:
    sig = data[: len(V2_SIGNATURE)]
    if sig != V2_SIGNATURE[: len(sig)]:
        raise ProxyProtocolError(f"no PROXY protocol signature: data starts with {data[:16]!r}")
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != _V2_VERSION:
            raise ProxyProtocolError(f"v2 header version nibble must be 2, got {version}")
        if command not in (_V2_LOCAL, _V2_PROXY):
            raise ProxyProtocolError(f"v2 header command must be LOCAL (0) or PROXY (1), got {command}")
    if len(data) > 13 and data[13] not in _V2_FAMILIES:
        raise ProxyProtocolError(f"v2 header family/transport byte 0x{data[13]:02x} is not defined")
    if len(data) < V2_HEADER_SIZE:
        return None, 0
    family, block = _V2_FAMILIES[data[13]]
    (length,) = struct.unpack_from(">H", data, 14)
    if length < block:
        raise ProxyProtocolError(
            f"v2 header length {length} is shorter than the {block}-byte address block of family 0x{data[13]:02x}"
        )
    total = V2_HEADER_SIZE + length
    if len(data) < total:
        return None, 0
    body = data[V2_HEADER_SIZE:total]
    tlvs = body[block:]
    if data[12] & 0x0F == _V2_LOCAL:
        # the receiver uses the real connection endpoints; the family is discarded
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, tlvs), total
    src = dst = None
    if family == "TCP4":
        sport, dport = struct.unpack_from(">HH", body, 8)
        src = (str(ipaddress.IPv4Address(body[0:4])), sport)
        dst = (str(ipaddress.IPv4Address(body[4:8])), dport)
    elif family == "TCP6":
        sport, dport = struct.unpack_from(">HH", body, 32)
        src = (str(ipaddress.IPv6Address(body[0:16])), sport)
        dst = (str(ipaddress.IPv6Address(body[16:32])), dport)
    return ProxyHeader(2, "PROXY", family, src, dst, tlvs), total

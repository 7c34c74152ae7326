"""TLS ClientHello server_name reader for SNI routing (SPEC §2.8), sans-IO.

The SNI listener (``relay/sni_listener.py``) hands every byte of a new
connection seen so far to ``parse_client_hello``; those bytes are replayed to the
upstream, so the connection is forwarded untouched. The parser re-reads the
whole buffer on each call and answers with one ``SniResult``:

- ``need_more``  the bytes are a valid prefix of a ClientHello that still fits
  in ``MAX_CLIENT_HELLO``; read again once more bytes arrive.
- ``ok``         a complete ClientHello naming a host (``server_name``).
- ``no_sni``     a complete ClientHello without a host_name entry.
- ``not_tls``    not a TLS handshake record (an HTTP request, an SSLv2 hello).
- ``malformed``  TLS framing, but the ClientHello breaks its own rules.
- ``too_large``  the ClientHello cannot fit in ``MAX_CLIENT_HELLO`` bytes.

Wire layout (RFC 5246 §6.2.1 / §7.4.1.2, RFC 8446 §4.1.2 / §5.1, RFC 6066 §3):
records are ``type(1) version(2) length(2) fragment``; a handshake message may
be split across several handshake records, so their fragments are joined
before the ``msg_type(1) length(3) body`` handshake header is read. The
ClientHello body is ``client_version(2) random(32) session_id<0..32>
cipher_suites<2..2^16-2> compression_methods<1..2^8-1>
[extensions<0..2^16-1>]``; extension 0 (server_name) holds a
``ServerNameList<1..2^16-1>`` of ``name_type(1) opaque<...>`` entries, where
type 0 is ``host_name``.

Which rule a name goes to is ``relay/sni_router.py``'s business.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CLIENT_HELLO = 64 * 1024  # cumulative bytes buffered per hello (post-quantum key shares make them big)

NEED_MORE = "need_more"
OK = "ok"
NO_SNI = "no_sni"
NOT_TLS = "not_tls"
MALFORMED = "malformed"
TOO_LARGE = "too_large"

_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_MAX_RECORD_PAYLOAD = 1 << 14  # RFC 8446 §5.1: TLSPlaintext.length MUST NOT exceed 2^14
_CONTENT_HANDSHAKE = 22
_HANDSHAKE_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_NAME_TYPE_HOST_NAME = 0
_MAX_HOST_NAME = 253

# One DNS label: letters, digits, '-' and '_' (seen in the wild), no edge hyphen.
# Same rule as the rule model's host labels; fullmatch so a trailing "\n" fails.
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")

@dataclass(frozen=True, slots=True)
class SniResult:
    status: str  # one of NEED_MORE, OK, NO_SNI, NOT_TLS, MALFORMED, TOO_LARGE
    server_name: str | None = None  # set only when status == OK


_NEED_MORE = SniResult(NEED_MORE)
_NO_SNI = SniResult(NO_SNI)
_NOT_TLS = SniResult(NOT_TLS)
_MALFORMED = SniResult(MALFORMED)
_TOO_LARGE = SniResult(TOO_LARGE)


class _NeedMore(Exception):
    """The declared structure goes on past the bytes received so far."""


class _Malformed(Exception):
    """The bytes contradict the ClientHello grammar."""


class _Reader:
    """A cursor over ``buf[pos:end]``; ``end`` is the declared end, which may lie past the bytes we have."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes, pos: int, end: int) -> None:
        self.buf = buf
        self.pos = pos
        self.end = end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def take(self, n: int) -> bytes:
        stop = self.pos + n
        if stop > self.end:
            raise _Malformed
        if stop > len(self.buf):
            raise _NeedMore
        chunk = self.buf[self.pos:stop]
        self.pos = stop
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, len_size: int, minimum: int, maximum: int) -> _Reader:
        """A length-prefixed vector as a sub-reader; its contents need not have arrived yet."""
        length = self.uint(len_size)
        if not minimum <= length <= maximum:
            raise _Malformed
        start = self.pos
        if start + length > self.end:
            raise _Malformed
        self.pos = start + length
        return _Reader(self.buf, start, start + length)


def parse_client_hello(data: bytes) -> SniResult:
    """Read the server_name from the ClientHello at the start of ``data`` (a peeked buffer)."""
    if not isinstance(data, bytes):
        data = bytes(data)
    if not data:
        return _NEED_MORE
    if data[0] != _CONTENT_HANDSHAKE:
        return _NOT_TLS  # also an SSLv2-style hello, whose first byte has the high bit set

    handshake = bytearray()  # fragments of every handshake record seen, joined
    declared = 0  # handshake bytes announced by the record headers seen
    wire_end = 0  # where the last record whose header we saw ends on the wire
    hello_size: int | None = None  # handshake header + body, once the header is known
    pos = 0
    while pos < len(data):
        header = data[pos:pos + _RECORD_HEADER]
        if header[0] != _CONTENT_HANDSHAKE:
            return _MALFORMED  # pos > 0 here: another record type before the hello is complete
        if len(header) >= 2 and header[1] != 3:
            return _NOT_TLS
        if len(header) < _RECORD_HEADER:
            break
        length = int.from_bytes(header[3:5], "big")
        if length == 0 or length > _MAX_RECORD_PAYLOAD:
            return _MALFORMED  # RFC 8446 §5.1: no empty handshake fragments, none over 2^14
        start = pos + _RECORD_HEADER
        handshake += data[start:start + length]
        declared += length
        wire_end = start + length
        if handshake and handshake[0] != _HANDSHAKE_CLIENT_HELLO:
            return _MALFORMED
        if hello_size is None and len(handshake) >= _HANDSHAKE_HEADER:
            hello_size = _HANDSHAKE_HEADER + int.from_bytes(handshake[1:4], "big")
        if hello_size is not None and len(handshake) >= hello_size:
            break
        pos = wire_end

    if hello_size is None:
        return _TOO_LARGE if len(data) >= MAX_CLIENT_HELLO else _NEED_MORE
    # The fewest bytes the caller has to buffer to see the whole hello; judged
    # the same whether or not it is all here, so the answer never depends on
    # how much more than the cap a caller happened to pass.
    if hello_size <= declared:
        needed = wire_end - (declared - hello_size)
    else:
        needed = wire_end + _RECORD_HEADER + (hello_size - declared)
    if needed > MAX_CLIENT_HELLO:
        return _TOO_LARGE
    complete = len(handshake) >= hello_size
    return _parse_body(bytes(handshake[_HANDSHAKE_HEADER:hello_size]), complete=complete, size=hello_size - _HANDSHAKE_HEADER)


def _parse_body(body: bytes, *, complete: bool, size: int) -> SniResult:
    """Check the ClientHello body (all of it, or the prefix received) and find its host_name."""
    reader = _Reader(body, 0, size)  # size is the declared length; body may be a prefix
    try:
        name = _client_hello_host_name(reader)
    except _NeedMore:
        return _NEED_MORE
    except _Malformed:
        return _MALFORMED
    if not complete:
        return _NEED_MORE
    return SniResult(OK, name) if name is not None else _NO_SNI


def _client_hello_host_name(r: _Reader) -> str | None:
    if r.uint(2) >> 8 != 3:
        raise _Malformed  # client_version is 3.x for every TLS version
    r.take(32)  # random
    r.vector(1, 0, 32)  # legacy_session_id
    suites = r.vector(2, 2, 0xFFFE)
    if (suites.end - suites.pos) % 2:
        raise _Malformed  # cipher suites are two bytes each
    r.vector(1, 1, 0xFF)  # compression_methods
    if r.at_end():
        return None  # a pre-extensions (TLS 1.2 and older) hello
    extensions = r.vector(2, 0, 0xFFFF)
    if not r.at_end():
        raise _Malformed  # bytes after the extensions block
    seen: set[int] = set()
    name = None
    while not extensions.at_end():
        ext_type = extensions.uint(2)
        ext_data = extensions.vector(2, 0, 0xFFFF)
        if ext_type in seen:
            raise _Malformed  # RFC 8446 §4.2: one extension of each type
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            name = _server_name_host(ext_data)
    return name


def _server_name_host(ext: _Reader) -> str | None:
    names = ext.vector(2, 1, 0xFFFF)
    if not ext.at_end():
        raise _Malformed
    seen: set[int] = set()
    host = None
    while not names.at_end():
        name_type = names.uint(1)
        # RFC 6066 §3: every name type's data starts with a 16-bit length.
        value = names.vector(2, 1 if name_type == _NAME_TYPE_HOST_NAME else 0, 0xFFFF)
        if name_type in seen:
            raise _Malformed  # RFC 6066 §3: one name per name_type
        seen.add(name_type)
        if name_type == _NAME_TYPE_HOST_NAME:
            host = _host_name(value.take(value.end - value.pos))
    return host


def _host_name(raw: bytes) -> str:
    if not raw.isascii():
        raise _Malformed
    name = raw.decode("ascii").lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > _MAX_HOST_NAME:
        raise _Malformed
    if not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise _Malformed
    return name

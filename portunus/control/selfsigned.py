"""The server's first self-signed ECDSA P-256 certificate, made with the standard library alone.

``serve`` on a new data dir used to import ``cryptography``'s x509 stack (~35-60 ms, about a
fifth of a fresh start) to make one key and sign one certificate. This module does the same
with ``secrets`` for the key, plain integer arithmetic on P-256 for the public point and the
one signature, ``hashlib`` and a small DER writer: a few milliseconds. The output is what
``tls._generate_pair`` made with ``cryptography`` (same fields, extensions, order and PEM
armour: a PKCS#8 key and an X.509 v3 certificate); OpenSSL loads and checks the pair
(``server_context``: the key must match the certificate) before any handshake, and
tests/unit/test_selfsigned.py checks both with ``cryptography``.

Scope: this signs exactly one certificate with a key it has just made, once, on the server's
own host. It is not a general ECDSA implementation (not constant-time: nothing observes it).
Loading operator-supplied files and every other certificate operation stay in ``cryptography``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import secrets

# ------------------------------------------------------------------ P-256 (SEC 2 / FIPS 186-4)

P = 0xffffffff00000001000000000000000000000000ffffffffffffffffffffffff
N = 0xffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551
B = 0x5ac635d8aa3a93e7b3ebbd55769886bc651d06b0cc53b0f63bce3c3e27d2604b
GX = 0x6b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296
GY = 0x4fe342e2fe1a7f9b8ee7eb4a7c0f9e162bce33576b315ececbb6406837bf51f5


def _double(pt):
    """Jacobian doubling for a = -3 (dbl-2001-b)."""
    x, y, z = pt
    if z == 0 or y == 0:
        return (1, 1, 0)
    delta = z * z % P
    gamma = y * y % P
    beta = x * gamma % P
    alpha = 3 * (x - delta) * (x + delta) % P
    x3 = (alpha * alpha - 8 * beta) % P
    z3 = ((y + z) * (y + z) - gamma - delta) % P
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % P
    return (x3, y3, z3)


def _add(p1, p2):
    """Jacobian addition (any two points, either may be the point at infinity, z == 0)."""
    x1, y1, z1 = p1
    x2, y2, z2 = p2
    if z1 == 0:
        return p2
    if z2 == 0:
        return p1
    z1z1 = z1 * z1 % P
    z2z2 = z2 * z2 % P
    u1 = x1 * z2z2 % P
    u2 = x2 * z1z1 % P
    s1 = y1 * z2 * z2z2 % P
    s2 = y2 * z1 * z1z1 % P
    if u1 == u2:
        return _double(p1) if s1 == s2 else (1, 1, 0)
    h = (u2 - u1) % P
    r = (s2 - s1) % P
    hh = h * h % P
    hhh = h * hh % P
    v = u1 * hh % P
    x3 = (r * r - hhh - 2 * v) % P
    y3 = (r * (v - x3) - s1 * hhh) % P
    z3 = h * z1 * z2 % P
    return (x3, y3, z3)


def scalar_mult(k: int, point: tuple[int, int] = (GX, GY)) -> tuple[int, int]:
    """k * point in affine coordinates (k in [1, N-1], so never the point at infinity)."""
    if not 0 < k < N:
        raise ValueError("scalar out of range")
    base = (point[0], point[1], 1)
    acc = (1, 1, 0)
    for bit in bin(k)[2:]:
        acc = _double(acc)
        if bit == "1":
            acc = _add(acc, base)
    x, y, z = acc
    if z == 0:
        raise ValueError("point at infinity")
    zinv = pow(z, -1, P)
    zinv2 = zinv * zinv % P
    return x * zinv2 % P, y * zinv2 * zinv % P


def on_curve(x: int, y: int) -> bool:
    return 0 <= x < P and 0 <= y < P and (y * y - (x * x * x - 3 * x + B)) % P == 0


def generate_key() -> tuple[int, tuple[int, int]]:
    """(private scalar d, public point d·G), d uniform in [1, N-1] from the OS CSPRNG."""
    d = secrets.randbelow(N - 1) + 1
    q = scalar_mult(d)
    if not on_curve(*q):  # cannot happen with the right constants; never write a broken key
        raise ArithmeticError("P-256 public point is not on the curve")
    return d, q


def sign_sha256(d: int, message: bytes) -> tuple[int, int]:
    """ECDSA (FIPS 186-4) over SHA-256 of ``message`` with a fresh random nonce."""
    e = int.from_bytes(hashlib.sha256(message).digest(), "big")  # 256-bit hash, 256-bit order: no truncation
    while True:
        k = secrets.randbelow(N - 1) + 1
        r = scalar_mult(k)[0] % N
        if r == 0:
            continue
        s = pow(k, -1, N) * (e + r * d) % N
        if s != 0:
            return r, s


# ------------------------------------------------------------------ DER (X.690), only what a certificate needs

def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + content


def seq(*items: bytes) -> bytes:
    return _tlv(0x30, b"".join(items))


def der_int(value: int) -> bytes:
    if value < 0:
        raise ValueError("only non-negative integers")
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))  # a leading 0 when the top bit is set


def oid(dotted: str) -> bytes:
    parts = [int(x) for x in dotted.split(".")]
    body = bytearray()
    for i, v in enumerate([parts[0] * 40 + parts[1], *parts[2:]]):
        chunk = [v & 0x7F]
        v >>= 7
        while v:
            chunk.append(0x80 | (v & 0x7F))
            v >>= 7
        body.extend(reversed(chunk))
    return _tlv(0x06, bytes(body))


def bit_string(data: bytes, unused_bits: int = 0) -> bytes:
    return _tlv(0x03, bytes((unused_bits,)) + data)


def octet_string(data: bytes) -> bytes:
    return _tlv(0x04, data)


def der_time(when: datetime.datetime) -> bytes:
    """UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 §4.1.2.5), whole seconds, Z."""
    when = when.astimezone(datetime.timezone.utc)
    if when.year < 2050:
        return _tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return _tlv(0x18, when.strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def _explicit(n: int, content: bytes) -> bytes:
    return _tlv(0xA0 | n, content)


OID_EC_PUBLIC_KEY = "1.2.840.10045.2.1"
OID_PRIME256V1 = "1.2.840.10045.3.1.7"
OID_ECDSA_SHA256 = "1.2.840.10045.4.3.2"
OID_COMMON_NAME = "2.5.4.3"
OID_SUBJECT_KEY_ID = "2.5.29.14"
OID_KEY_USAGE = "2.5.29.15"
OID_SUBJECT_ALT_NAME = "2.5.29.17"
OID_BASIC_CONSTRAINTS = "2.5.29.19"
OID_EXT_KEY_USAGE = "2.5.29.37"
OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"


def _extension(ext_oid: str, value: bytes, critical: bool) -> bytes:
    return seq(oid(ext_oid), *([_tlv(0x01, b"\xff")] if critical else []), octet_string(value))


def _general_names(sans: list[tuple[str, str]]) -> bytes:
    out = []
    for kind, value in sans:
        if kind == "dns":
            out.append(_tlv(0x82, value.encode("ascii")))                       # [2] IMPLICIT IA5String
        elif kind == "ip":
            out.append(_tlv(0x87, ipaddress.ip_address(value).packed))          # [7] IMPLICIT OCTET STRING
        else:
            raise ValueError(f"unknown SAN kind {kind!r}")
    return seq(*out)


def self_signed(common_name: str, sans: list[tuple[str, str]], not_before: datetime.datetime,
                not_after: datetime.datetime) -> tuple[bytes, bytes]:
    """(certificate DER, PKCS#8 private key DER): a new P-256 key and a self-signed server leaf.

    ``sans``: ("dns", name) / ("ip", address) in order. The extensions are those a TLS server
    leaf of Portunus always had: SAN, BasicConstraints CA:FALSE (critical), KeyUsage
    digitalSignature (critical), ExtendedKeyUsage serverAuth, SubjectKeyIdentifier."""
    d, (qx, qy) = generate_key()
    point = b"\x04" + qx.to_bytes(32, "big") + qy.to_bytes(32, "big")
    spki = seq(seq(oid(OID_EC_PUBLIC_KEY), oid(OID_PRIME256V1)), bit_string(point))
    name = seq(_tlv(0x31, seq(oid(OID_COMMON_NAME), _tlv(0x0C, common_name.encode("utf-8")))))
    serial = int.from_bytes(secrets.token_bytes(20), "big") >> 1  # positive, < 2^159 (RFC 5280: ≤ 20 octets)
    sig_alg = seq(oid(OID_ECDSA_SHA256))
    extensions = seq(
        _extension(OID_SUBJECT_ALT_NAME, _general_names(sans), False),
        _extension(OID_BASIC_CONSTRAINTS, seq(), True),
        _extension(OID_KEY_USAGE, bit_string(b"\x80", 7), True),               # digitalSignature only
        _extension(OID_EXT_KEY_USAGE, seq(oid(OID_SERVER_AUTH)), False),
        _extension(OID_SUBJECT_KEY_ID, octet_string(hashlib.sha1(point).digest()), False),  # RFC 5280 §4.2.1.2 (1)
    )
    tbs = seq(_explicit(0, der_int(2)), der_int(serial), sig_alg, name,
              seq(der_time(not_before), der_time(not_after)), name, spki, _explicit(3, extensions))
    r, s = sign_sha256(d, tbs)
    cert = seq(tbs, sig_alg, bit_string(seq(der_int(r), der_int(s))))
    ec_private_key = seq(der_int(1), octet_string(d.to_bytes(32, "big")), _explicit(1, bit_string(point)))
    pkcs8 = seq(der_int(0), seq(oid(OID_EC_PUBLIC_KEY), oid(OID_PRIME256V1)), octet_string(ec_private_key))
    return cert, pkcs8


def pem(label: str, der: bytes) -> bytes:
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i:i + 64] for i in range(0, len(b64), 64)]
    return (f"-----BEGIN {label}-----\n" + "\n".join(lines) + f"\n-----END {label}-----\n").encode("ascii")

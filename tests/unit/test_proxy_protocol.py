"""PROXY protocol headers (SPEC §2.7): the exact bytes a backend sees, and a parser that reads them back."""

from __future__ import annotations

import ipaddress
import random

import pytest

from portunus.relay.proxy_protocol import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode,
    encode_v1,
    encode_v2,
    parse,
)

SIG = b"\x0d\x0a\x0d\x0a\x00\x0d\x0a\x51\x55\x49\x54\x0a"  # the v2 signature, byte by byte
FFFF6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return SIG + bytes([ver_cmd, fam]) + size.to_bytes(2, "big") + body


def complete(data: bytes) -> ProxyHeader:
    header, used = parse(data)
    assert header is not None
    assert used == len(data)
    return header


# ---------------------------------------------------------------- the spec's own examples


def test_v2_signature_is_the_twelve_documented_bytes():
    assert V2_SIGNATURE == SIG
    assert len(V2_SIGNATURE) == 12


def test_v1_tcp4_worst_case_is_56_bytes():
    line = encode_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535))
    assert line == b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n"
    assert len(line) == 56
    assert complete(line) == ProxyHeader(1, "PROXY", "TCP4", ("255.255.255.255", 65535), ("255.255.255.255", 65535))


def test_v1_tcp6_worst_case_is_104_bytes():
    line = encode_v1((FFFF6, 65535), (FFFF6, 65535))
    assert line == f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode()
    assert len(line) == 104
    assert complete(line) == ProxyHeader(1, "PROXY", "TCP6", (FFFF6, 65535), (FFFF6, 65535))


def test_v1_unknown_shortest_is_15_bytes_and_longest_107():
    assert encode_v1(("10.0.0.1", 1), ("::1", 2)) == b"PROXY UNKNOWN\r\n"
    assert complete(b"PROXY UNKNOWN\r\n") == ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
    longest = f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode()
    assert len(longest) == V1_MAX_LENGTH == 107
    # whatever follows UNKNOWN on the line is ignored
    assert complete(longest) == ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
    with pytest.raises(ProxyProtocolError):
        parse(f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 655350\r\n".encode())


def test_v1_spec_example_leaves_the_request_untouched():
    data = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    header, used = parse(data)
    assert header == ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert data[used:] == b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == data[:used]


def test_v2_ipv4_header_is_28_bytes_written_out():
    got = encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert got == (
        b"\r\n\r\n\x00\r\nQUIT\n"
        b"\x21"  # version 2, PROXY
        b"\x11"  # AF_INET, STREAM
        b"\x00\x0c"  # 12 bytes follow
        b"\xc0\xa8\x00\x01"  # 192.168.0.1
        b"\xc0\xa8\x00\x0b"  # 192.168.0.11
        b"\xdc\x04"  # 56324
        b"\x01\xbb"  # 443
    )
    assert len(got) == 16 + 12 == 28
    assert complete(got) == ProxyHeader(2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), b"")


def test_v2_ipv6_header_is_52_bytes_written_out():
    got = encode_v2(("2001:db8::1", 1), ("::1", 65535))
    assert got == (
        SIG
        + b"\x21\x21\x00\x24"  # PROXY, AF_INET6 STREAM, 36 bytes follow
        + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"  # 2001:db8::1
        + b"\x00" * 15 + b"\x01"  # ::1
        + b"\x00\x01"  # port 1
        + b"\xff\xff"  # port 65535
    )
    assert len(got) == 16 + 36 == 52
    assert complete(got) == ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 1), ("::1", 65535), b"")


def test_v2_local_header_has_no_addresses():
    got = encode_v2(("10.0.0.1", 1000), ("10.0.0.2", 80), local=True)
    assert got == SIG + b"\x20\x00\x00\x00"
    assert complete(got) == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, b"")


def test_v2_mixed_families_is_af_unspec_with_no_addresses():
    assert encode_v2(("10.0.0.1", 1000), ("2001:db8::2", 80)) == SIG + b"\x21\x00\x00\x00"
    assert encode_v2(("2001:db8::2", 80), ("10.0.0.1", 1000)) == SIG + b"\x21\x00\x00\x00"
    assert complete(SIG + b"\x21\x00\x00\x00") == ProxyHeader(2, "PROXY", "UNKNOWN", None, None, b"")


def test_v2_ports_and_addresses_are_big_endian():
    got = encode_v2(("1.2.3.4", 0x0102), ("5.6.7.8", 0xA0B0))
    assert got[16:] == b"\x01\x02\x03\x04\x05\x06\x07\x08\x01\x02\xa0\xb0"


# ---------------------------------------------------------------- family rules


@pytest.mark.parametrize("encoder", [encode_v1, encode_v2])
def test_mapped_on_both_sides_is_plain_tcp4(encoder):
    got = encoder(("::ffff:10.1.2.3", 40000), ("::ffff:192.0.2.7", 8080))
    assert got == encoder(("10.1.2.3", 40000), ("192.0.2.7", 8080))
    header = complete(got)
    assert (header.family, header.src, header.dst) == ("TCP4", ("10.1.2.3", 40000), ("192.0.2.7", 8080))


def test_mapped_v1_text_and_v2_bytes():
    assert encode_v1(("::ffff:10.1.2.3", 1), ("::FFFF:a00:1", 2)) == b"PROXY TCP4 10.1.2.3 10.0.0.1 1 2\r\n"
    assert encode_v2(("::ffff:10.1.2.3", 1), ("::ffff:10.0.0.1", 2)) == (
        SIG + b"\x21\x11\x00\x0c" + b"\x0a\x01\x02\x03" + b"\x0a\x00\x00\x01" + b"\x00\x01\x00\x02"
    )


@pytest.mark.parametrize("encoder", [encode_v1, encode_v2])
def test_mapped_facing_plain_ipv4_is_tcp4(encoder):
    header = complete(encoder(("::ffff:10.1.2.3", 1), ("10.9.9.9", 2)))
    assert (header.family, header.src, header.dst) == ("TCP4", ("10.1.2.3", 1), ("10.9.9.9", 2))
    header = complete(encoder(("10.9.9.9", 2), ("::ffff:10.1.2.3", 1)))
    assert (header.family, header.src, header.dst) == ("TCP4", ("10.9.9.9", 2), ("10.1.2.3", 1))


@pytest.mark.parametrize("encoder", [encode_v1, encode_v2])
def test_mapped_facing_real_ipv6_stays_ipv6(encoder):
    header = complete(encoder(("::ffff:10.1.2.3", 1), ("2001:db8::5", 2)))
    assert (header.family, header.src, header.dst) == ("TCP6", ("::ffff:a01:203", 1), ("2001:db8::5", 2))


@pytest.mark.parametrize("encoder", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    "src,dst",
    [
        (("10.0.0.1", 1), ("::1", 2)),
        (("::1", 2), ("10.0.0.1", 1)),
        (("0.0.0.0", 0), ("2001:db8::", 0)),
    ],
)
def test_mixed_families_are_unknown(encoder, src, dst):
    header = complete(encoder(src, dst))
    assert (header.command, header.family, header.src, header.dst) == ("PROXY", "UNKNOWN", None, None)


def test_mixed_v1_is_exactly_proxy_unknown():
    assert encode_v1(("::1", 2), ("10.0.0.1", 1)) == b"PROXY UNKNOWN\r\n"


def test_addresses_are_written_in_canonical_text():
    assert encode_v1(("2001:0DB8:0000:0000:0000:0000:0000:0001", 5), ("FE80::0:1", 6)) == (
        b"PROXY TCP6 2001:db8::1 fe80::1 5 6\r\n"
    )


def test_socket_style_ipv6_sockaddr_and_zone_are_accepted():
    # getpeername() on an AF_INET6 socket gives (host, port, flowinfo, scope_id), and a zone in the host
    assert encode_v1(("fe80::1%eth0", 5, 0, 2), ("fe80::2%eth0", 6, 0, 2)) == b"PROXY TCP6 fe80::1 fe80::2 5 6\r\n"
    assert encode_v2(("fe80::1%eth0", 5, 0, 2), ("fe80::2", 6)) == encode_v2(("fe80::1", 5), ("fe80::2", 6))


# ---------------------------------------------------------------- encode() and bad input


def test_encode_dispatches_on_version():
    src, dst = ("198.51.100.4", 51000), ("203.0.113.9", 25)
    assert encode("v1", src, dst) == encode_v1(src, dst)
    assert encode("v2", src, dst) == encode_v2(src, dst)


@pytest.mark.parametrize("version", ["v3", "V1", "1", "", "v2 ", None, 2])
def test_encode_refuses_other_versions(version):
    with pytest.raises(ValueError, match="v1"):
        encode(version, ("1.2.3.4", 1), ("5.6.7.8", 2))


@pytest.mark.parametrize("encoder", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    "src",
    [
        ("example.com", 80),
        ("1.2.3.256", 80),
        ("", 80),
        (b"1.2.3.4", 80),
        ("1.2.3.4", -1),
        ("1.2.3.4", 65536),
        ("1.2.3.4", "80"),
        ("1.2.3.4", True),
        ("1.2.3.4", 80.0),
        ("1.2.3.4",),
        "1.2.3.4:80",
        None,
    ],
)
def test_encoders_refuse_what_is_not_an_ip_endpoint(encoder, src):
    with pytest.raises(ValueError):
        encoder(src, ("5.6.7.8", 2))
    with pytest.raises(ValueError):
        encoder(("5.6.7.8", 2), src)


def test_port_bounds_are_inclusive():
    assert encode_v1(("1.2.3.4", 0), ("5.6.7.8", 65535)) == b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n"
    assert complete(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n").src == ("1.2.3.4", 0)


# ---------------------------------------------------------------- round trips


def random_v4(rng: random.Random) -> str:
    return str(ipaddress.IPv4Address(rng.getrandbits(32)))


def random_v6(rng: random.Random) -> str:
    while True:
        groups = [rng.getrandbits(16) for _ in range(8)]
        # zero runs of assorted lengths so "::" compression lands everywhere
        start = rng.randrange(9)
        for i in range(start, min(8, start + rng.randrange(9))):
            groups[i] = 0
        ip = ipaddress.IPv6Address(int.from_bytes(b"".join(g.to_bytes(2, "big") for g in groups), "big"))
        if ip.ipv4_mapped is None:
            return str(ip)


def endpoints(seed: int, count: int, family: str):
    rng = random.Random(seed)
    pick = random_v4 if family == "TCP4" else random_v6
    return [((pick(rng), rng.randrange(65536)), (pick(rng), rng.randrange(65536))) for _ in range(count)]


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("family,seed", [("TCP4", 4), ("TCP6", 6)])
def test_round_trip_random_addresses(version, family, seed):
    encoder = encode_v1 if version == 1 else encode_v2
    payload = b"\r\n\x00payload PROXY \n"
    for src, dst in endpoints(seed, 400, family):
        wire = encoder(src, dst)
        header, used = parse(wire + payload)
        assert header == ProxyHeader(version, "PROXY", family, src, dst, b"")
        assert used == len(wire)
        if version == 2:
            assert len(wire) == {"TCP4": 28, "TCP6": 52}[family]
        else:
            assert len(wire) <= {"TCP4": 56, "TCP6": 104}[family]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_round_trip_random_mixed_pairs(version):
    rng = random.Random(46)
    for _ in range(100):
        src, dst = (random_v4(rng), rng.randrange(65536)), (random_v6(rng), rng.randrange(65536))
        if rng.random() < 0.5:
            src, dst = dst, src
        header = complete(encode(version, src, dst))
        assert (header.family, header.src, header.dst) == ("UNKNOWN", None, None)


def test_round_trip_random_mapped_pairs():
    rng = random.Random(64)
    for _ in range(200):
        a, b = random_v4(rng), random_v4(rng)
        src, dst = ("::ffff:" + a, rng.randrange(65536)), ("::ffff:" + b, rng.randrange(65536))
        for version in ("v1", "v2"):
            header = complete(encode(version, src, dst))
            assert (header.family, header.src, header.dst) == ("TCP4", (a, src[1]), (b, dst[1]))


# ---------------------------------------------------------------- incremental input

TLV_NOOP = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP carrying 3 bytes

WHOLE_HEADERS = [
    encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)),
    encode_v1((FFFF6, 65535), ("::", 0)),
    b"PROXY UNKNOWN\r\n",
    f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
    encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)),
    encode_v2(("2001:db8::1", 1), ("::1", 65535)),
    encode_v2(("1.1.1.1", 1), ("::1", 1)),
    encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), local=True),
    v2(0x21, 0x11, bytes(12) + TLV_NOOP),
    v2(0x21, 0x31, bytes(216)),
]


@pytest.mark.parametrize("wire", WHOLE_HEADERS, ids=range(len(WHOLE_HEADERS)))
def test_byte_by_byte_needs_more_until_complete(wire):
    for cut in range(len(wire)):
        assert parse(wire[:cut]) == (None, 0), cut
    header, used = parse(wire)
    assert header is not None and used == len(wire)
    assert parse(wire + b"\r\nQUIT\n") == (header, used)


@pytest.mark.parametrize("wire", WHOLE_HEADERS, ids=range(len(WHOLE_HEADERS)))
def test_accepts_bytearray_and_memoryview(wire):
    expected = parse(wire)
    assert parse(bytearray(wire)) == expected
    assert parse(memoryview(wire + b"tail")) == expected


def test_empty_input_needs_more():
    assert parse(b"") == (None, 0)


def test_v2_claiming_more_than_received_needs_more():
    head = SIG + b"\x21\x11\x01\x00"  # says 256 bytes follow
    assert parse(head + bytes(30)) == (None, 0)
    assert parse(head + bytes(255)) == (None, 0)
    header, used = parse(head + bytes(256) + b"next")
    assert used == 16 + 256
    assert header.tlvs == bytes(256 - 12)


def test_v2_largest_length():
    wire = v2(0x21, 0x00, bytes(0xFFFF))
    assert parse(wire[:-1]) == (None, 0)
    header = complete(wire)
    assert (header.family, len(header.tlvs)) == ("UNKNOWN", 0xFFFF)


# ---------------------------------------------------------------- v2 blocks the relay never writes


def test_v2_tlvs_after_addresses_are_returned_raw():
    body = b"\x7f\x00\x00\x01" + b"\x0a\x00\x00\x02" + b"\x30\x39\x00\x50" + TLV_NOOP
    header = complete(v2(0x21, 0x11, body))
    assert header == ProxyHeader(2, "PROXY", "TCP4", ("127.0.0.1", 12345), ("10.0.0.2", 80), TLV_NOOP)


def test_v2_local_with_addresses_discards_them_and_keeps_tlvs():
    header = complete(v2(0x20, 0x11, bytes(range(12)) + TLV_NOOP))
    assert header == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, TLV_NOOP)


def test_v2_unspec_body_is_all_tlvs():
    assert complete(v2(0x21, 0x00, TLV_NOOP)) == ProxyHeader(2, "PROXY", "UNKNOWN", None, None, TLV_NOOP)


@pytest.mark.parametrize("fam,block", [(0x12, 12), (0x22, 36), (0x31, 216), (0x32, 216)])
def test_v2_udp_and_unix_are_read_as_unknown(fam, block):
    header = complete(v2(0x21, fam, bytes(block) + TLV_NOOP))
    assert header == ProxyHeader(2, "PROXY", "UNKNOWN", None, None, TLV_NOOP)


# ---------------------------------------------------------------- malformed input

V1_GOOD = b"PROXY TCP4 1.2.3.4 5.6.7.8 1000 2000\r\n"

MALFORMED = {
    # no signature at all
    "http": b"GET / HTTP/1.1\r\n\r\n",
    "nul": b"\x00",
    "tls": b"\x16\x03\x01\x02\x00",
    "lowercase": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "prefix_typo": b"PROXZ",
    "no_space": b"PROXY\r\n",
    "tab": b"PROXY\tTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    # v1 framing
    "too_long_no_crlf": b"PROXY UNKNOWN " + b"x" * 93,
    "too_long_with_crlf": b"PROXY UNKNOWN " + b"x" * 150 + b"\r\n",
    "crlf_straddles_107": b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",  # CR is byte 107, LF byte 108
    "bare_lf": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "bare_lf_early": b"PROXY TCP4\n",
    "cr_inside": b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",
    # v1 fields
    "proto_tcp5": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "proto_udp4": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "proto_lower": b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n",
    "unknown_glued": b"PROXY UNKNOWNX\r\n",
    "empty_proto": b"PROXY \r\n",
    "too_few": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "too_many": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "double_space": b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",
    "trailing_space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "non_ascii": "PROXY TCP4 1.2.3.4 5.6.7.8 1 ٢\r\n".encode(),
    "v4_octet_256": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "v4_leading_zero": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "v4_three_octets": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v6_under_tcp4": b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
    "v4_under_tcp6": b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n",
    "v6_zone": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "v6_two_gaps": b"PROXY TCP6 1::2::3 ::1 1 2\r\n",
    "hostname": b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
    "port_65536": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "port_99999": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
    "port_negative": b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    "port_plus": b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    "port_leading_zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    "port_hex": b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n",
    "port_letters": b"PROXY TCP4 1.2.3.4 5.6.7.8 1a 2\r\n",
    "port_long": b"PROXY TCP4 1.2.3.4 5.6.7.8 000001 2\r\n",
    "port_underscore": b"PROXY TCP4 1.2.3.4 5.6.7.8 1_0 2\r\n",
    # v2
    "v2_sig_typo": SIG[:11] + b"X" + b"\x21\x11\x00\x0c" + bytes(12),
    "v2_sig_early_typo": b"\r\n\r\n\x01",
    "v2_version_1": SIG + b"\x11\x11\x00\x0c" + bytes(12),
    "v2_version_3": SIG + b"\x31\x11\x00\x0c" + bytes(12),
    "v2_version_0": SIG + b"\x01\x11\x00\x0c" + bytes(12),
    "v2_command_2": SIG + b"\x22\x11\x00\x0c" + bytes(12),
    "v2_command_f": SIG + b"\x2f\x11\x00\x0c" + bytes(12),
    "v2_family_4": SIG + b"\x21\x41\x00\x0c" + bytes(12),
    "v2_transport_3": SIG + b"\x21\x13\x00\x0c" + bytes(12),
    "v2_inet_unspec_transport": SIG + b"\x21\x10\x00\x0c" + bytes(12),
    "v2_unspec_stream": SIG + b"\x21\x01\x00\x00",
    "v2_inet_short": SIG + b"\x21\x11\x00\x0b" + bytes(11),
    "v2_inet6_short": SIG + b"\x21\x21\x00\x0c" + bytes(12),
    "v2_unix_short": SIG + b"\x21\x31\x00\xd7" + bytes(215),
    "v2_local_short": SIG + b"\x20\x11\x00\x00",
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_is_refused(data):
    with pytest.raises(ProxyProtocolError):
        parse(data)


@pytest.mark.parametrize(
    "data",
    [
        b"GET",
        b"\r\n\r\nX",
        SIG + b"\x11",
        SIG + b"\x21\x41",
        SIG + b"\x21\x11\x00\x0b",
        b"PROXY TCP4\n",
    ],
)
def test_malformed_input_is_refused_as_soon_as_it_shows(data):
    # a receiver need not wait for a full header to hang up on garbage
    with pytest.raises(ProxyProtocolError):
        parse(data)


def test_error_is_a_value_error_naming_the_offender():
    with pytest.raises(ValueError, match="65536"):
        parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n")
    with pytest.raises(ProxyProtocolError, match="TCP5"):
        parse(b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n")


# ---------------------------------------------------------------- v1 parse details


def test_v1_prefix_fragments_need_more():
    for cut in range(1, len(V1_GOOD)):
        assert parse(V1_GOOD[:cut]) == (None, 0)


def test_v1_line_up_to_107_bytes_without_crlf_needs_more():
    assert parse(b"PROXY UNKNOWN " + b"x" * 92) == (None, 0)  # 106 bytes, CRLF may still come
    assert parse(b"PROXY UNKNOWN " + b"x" * 91 + b"\r") == (None, 0)  # 106 bytes ending in CR


def test_v1_payload_after_the_line_is_not_inspected():
    data = V1_GOOD + b"\xff\n\r bare \n"
    header, used = parse(data)
    assert used == len(V1_GOOD)
    assert header == ProxyHeader(1, "PROXY", "TCP4", ("1.2.3.4", 1000), ("5.6.7.8", 2000))


def test_v1_ipv6_text_is_returned_canonical():
    header = complete(b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 ::FFFF:1.2.3.4 1 2\r\n")
    assert header.src == ("2001:db8::1", 1)
    assert header.dst == ("::ffff:102:304", 2)


def test_v1_header_has_no_tlvs_and_is_proxy_command():
    header = complete(V1_GOOD)
    assert (header.version, header.command, header.tlvs) == (1, "PROXY", b"")

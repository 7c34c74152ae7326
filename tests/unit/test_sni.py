"""TLS SNI routing (SPEC §2.8): reading server_name from real and hand-made ClientHellos, and picking a rule."""

from __future__ import annotations

import random
import re
import ssl

import pytest

from portunus.relay.sni import MAX_CLIENT_HELLO, SniResult, parse_client_hello

STATUSES = {"need_more", "ok", "no_sni", "not_tls", "malformed", "too_large"}
NAME_253 = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
VALID_NAME = re.compile(r"[a-z0-9_.-]{1,253}")


# ---------------------------------------------------------------- building hellos


def real_hello(server_hostname: str | None, maximum: ssl.TLSVersion | None = None) -> bytes:
    """The first flight the stdlib client sends, as it would arrive on the listener."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if maximum is not None:
        ctx.maximum_version = maximum
    outgoing = ssl.MemoryBIO()
    conn = ctx.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    data = outgoing.read()
    assert data[0] == 22
    return data


def handshake_of(records: bytes) -> bytes:
    """Join the fragments of the handshake records in ``records``."""
    out, pos = bytearray(), 0
    while pos < len(records):
        assert records[pos] == 22
        length = int.from_bytes(records[pos + 3:pos + 5], "big")
        out += records[pos + 5:pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def frame(handshake: bytes, fragment: int = 1 << 14, version: bytes = b"\x03\x01", content_type: int = 22) -> bytes:
    out = bytearray()
    for start in range(0, len(handshake), fragment):
        chunk = handshake[start:start + fragment]
        out += bytes([content_type]) + version + len(chunk).to_bytes(2, "big") + chunk
    return bytes(out)


def vec(data: bytes, size: int) -> bytes:
    return len(data).to_bytes(size, "big") + data


def ext(ext_type: int, data: bytes) -> bytes:
    return ext_type.to_bytes(2, "big") + vec(data, 2)


def sni_ext(*entries: tuple[int, bytes]) -> bytes:
    return ext(0, vec(b"".join(bytes([t]) + vec(v, 2) for t, v in entries), 2))


def host(name: bytes) -> bytes:
    return sni_ext((0, name))


def body(
    extensions: bytes | None,
    *,
    version: bytes = b"\x03\x03",
    session_id: bytes = b"\x11" * 32,
    suites: bytes = b"\x13\x01\xc0\x2f",
    compression: bytes = b"\x00",
) -> bytes:
    out = version + b"\x5a" * 32 + vec(session_id, 1) + vec(suites, 2) + vec(compression, 1)
    if extensions is not None:
        out += vec(extensions, 2)
    return out


def handshake(hello_body: bytes, msg_type: int = 1, length: int | None = None) -> bytes:
    size = len(hello_body) if length is None else length
    return bytes([msg_type]) + size.to_bytes(3, "big") + hello_body


def hello(extensions: bytes | None, **kw) -> bytes:
    return frame(handshake(body(extensions, **kw)))


def status(data: bytes) -> str:
    return parse_client_hello(data).status


REAL_CASES = [
    ("example.com", "example.com"),
    ("Upper.Example.COM", "upper.example.com"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("a.b.c.d.e.example.org", "a.b.c.d.e.example.org"),
    (NAME_253, NAME_253),
]
VERSIONS = [pytest.param(None, id="tls13"), pytest.param(ssl.TLSVersion.TLSv1_2, id="tls12max")]


# ---------------------------------------------------------------- real ClientHellos


def test_the_cap_is_sixty_four_kibibytes():
    assert MAX_CLIENT_HELLO == 65536  # SPEC §2.8: post-quantum key shares make real hellos large


@pytest.mark.parametrize("maximum", VERSIONS)
@pytest.mark.parametrize("sent,expected", REAL_CASES)
def test_real_hello_gives_the_lowercased_name(sent, expected, maximum):
    assert parse_client_hello(real_hello(sent, maximum)) == SniResult("ok", expected)


@pytest.mark.parametrize("maximum", VERSIONS)
@pytest.mark.parametrize("server_hostname", [None, "192.0.2.7", "2001:db8::1"])
def test_real_hello_without_sni_is_no_sni(server_hostname, maximum):
    # the stdlib sends no server_name for an IP literal either
    assert parse_client_hello(real_hello(server_hostname, maximum)) == SniResult("no_sni", None)


@pytest.mark.parametrize("maximum", VERSIONS)
@pytest.mark.parametrize("sent,expected", [REAL_CASES[0], REAL_CASES[1], (None, None)])
def test_real_hello_fed_byte_by_byte_needs_more_until_complete(sent, expected, maximum):
    data = real_hello(sent, maximum)
    for end in range(len(data)):
        assert parse_client_hello(data[:end]) == SniResult("need_more"), end
    assert parse_client_hello(data) == SniResult("ok" if expected else "no_sni", expected)


@pytest.mark.parametrize("maximum", VERSIONS)
@pytest.mark.parametrize("fragment", [1, 7, 100, 150])
def test_hello_split_across_records_is_reassembled(fragment, maximum):
    data = frame(handshake_of(real_hello("split.example.net", maximum)), fragment=fragment)
    assert data.count(b"\x16\x03\x01") >= 2
    assert parse_client_hello(data) == SniResult("ok", "split.example.net")


@pytest.mark.parametrize("maximum", VERSIONS)
def test_split_hello_fed_byte_by_byte(maximum):
    data = frame(handshake_of(real_hello("Piece.By.Piece.example", maximum)), fragment=100)
    for end in range(len(data)):
        assert parse_client_hello(data[:end]).status == "need_more", end
    assert parse_client_hello(data) == SniResult("ok", "piece.by.piece.example")


def test_bytes_after_the_hello_are_ignored():
    data = real_hello("example.com")
    early_data = b"\x17\x03\x03\x00\x05hello"
    assert parse_client_hello(data + early_data) == SniResult("ok", "example.com")
    assert parse_client_hello(data + b"GET / HTTP/1.1\r\n") == SniResult("ok", "example.com")


def test_bytearray_and_memoryview_are_accepted():
    data = real_hello("example.com")
    assert parse_client_hello(bytearray(data)).server_name == "example.com"
    assert parse_client_hello(memoryview(data)).server_name == "example.com"


# ---------------------------------------------------------------- hand-made edge cases that are fine


@pytest.mark.parametrize(
    "extensions,expected",
    [
        pytest.param(host(b"example.com"), SniResult("ok", "example.com"), id="plain"),
        pytest.param(host(b"example.com."), SniResult("ok", "example.com"), id="trailing-dot-stripped"),
        pytest.param(host(b"EXAMPLE.Com"), SniResult("ok", "example.com"), id="lowercased"),
        pytest.param(host(b"_acme.example.com"), SniResult("ok", "_acme.example.com"), id="underscore"),
        pytest.param(host(b"localhost"), SniResult("ok", "localhost"), id="single-label"),
        pytest.param(host(NAME_253.encode()), SniResult("ok", NAME_253), id="253-chars"),
        pytest.param(host(NAME_253.encode() + b"."), SniResult("ok", NAME_253), id="253-chars-plus-dot"),
        pytest.param(ext(10, b"\x00\x02\x00\x1d") + host(b"a.example") + ext(13, b"\x00\x02\x04\x03"),
                     SniResult("ok", "a.example"), id="among-other-extensions"),
        pytest.param(sni_ext((7, b"opaque"), (0, b"b.example")), SniResult("ok", "b.example"), id="after-unknown-name-type"),
        pytest.param(sni_ext((0, b"c.example"), (7, b"")), SniResult("ok", "c.example"), id="before-unknown-name-type"),
        pytest.param(None, SniResult("no_sni"), id="no-extensions-block"),
        pytest.param(b"", SniResult("no_sni"), id="empty-extensions-block"),
        pytest.param(ext(10, b"\x00\x02\x00\x1d") + ext(0xFF01, b"\x00"), SniResult("no_sni"), id="other-extensions-only"),
        pytest.param(sni_ext((1, b"not-a-host-name")), SniResult("no_sni"), id="only-non-host-name-entries"),
    ],
)
def test_hand_made_hellos(extensions, expected):
    assert parse_client_hello(hello(extensions)) == expected


def test_empty_session_id_and_ssl3_client_version_are_fine():
    data = hello(host(b"old.example"), version=b"\x03\x00", session_id=b"")
    assert parse_client_hello(data) == SniResult("ok", "old.example")


def test_handshake_header_split_over_one_byte_records():
    hs = handshake(body(host(b"tiny.example")))
    data = frame(hs[:1], fragment=1) + frame(hs[1:3], fragment=1) + frame(hs[3:], fragment=50)
    assert parse_client_hello(data) == SniResult("ok", "tiny.example")


def test_any_record_minor_version_is_accepted():
    hs = handshake(body(host(b"v.example")))
    for version in (b"\x03\x00", b"\x03\x03", b"\x03\x04"):
        assert parse_client_hello(frame(hs, version=version)).server_name == "v.example"


# ---------------------------------------------------------------- not TLS


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n", id="http-request"),
        pytest.param(b"G", id="one-http-byte"),
        pytest.param(b"SSH-2.0-OpenSSH_9.6\r\n", id="ssh-banner"),
        pytest.param(b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + bytes(37), id="sslv2-hello"),
        pytest.param(b"\x16\x02", id="record-major-2"),
        pytest.param(b"\x16\x00\x01\x00\x05", id="record-major-0"),
        pytest.param(b"\x17\x03\x03\x00\x05hello", id="application-data-first"),
        pytest.param(b"\x00" * 64, id="zeros"),
    ],
)
def test_not_tls(data):
    assert parse_client_hello(data) == SniResult("not_tls")


def test_a_later_record_with_another_major_version_is_not_tls():
    hs = handshake(body(host(b"example.com")))
    data = frame(hs[:40]) + b"\x16\x01\x01" + frame(hs[40:])[3:]
    assert status(data) == "not_tls"


@pytest.mark.parametrize("data", [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x02", b"\x16\x03\x01\x02\x00", b"\x16\x03\x01\x02\x00\x01"])
def test_short_tls_prefixes_need_more(data):
    assert parse_client_hello(data) == SniResult("need_more")


# ---------------------------------------------------------------- too large


def padded_handshake(total: int) -> bytes:
    """A ClientHello handshake message of exactly ``total`` bytes, grown with a padding extension (type 21)."""
    base = handshake(body(host(b"big.example") + ext(21, b"")))
    grown = handshake(body(host(b"big.example") + ext(21, bytes(total - len(base)))))
    assert len(grown) == total
    return grown


def test_hello_declaring_more_than_the_cap_is_too_large():
    data = frame(handshake(body(host(b"big.example")), length=MAX_CLIENT_HELLO))
    assert status(data) == "too_large"
    assert status(data[:5 + 4]) == "too_large"  # the handshake header alone tells
    assert status(data[:5 + 3]) == "need_more"  # its length is not known yet


# four full-size records: 65516 handshake bytes + 4 record headers = exactly the 64 KiB cap
FITS = MAX_CLIENT_HELLO - 4 * 5


def test_hello_that_fits_the_cap_exactly_parses_and_one_byte_more_does_not():
    fits = frame(padded_handshake(FITS))
    assert len(fits) == MAX_CLIENT_HELLO and fits.count(b"\x16\x03\x01") >= 4
    assert status(fits[:100]) == "need_more"
    assert status(fits[:-1]) == "need_more"
    assert parse_client_hello(fits) == SniResult("ok", "big.example")

    over = frame(padded_handshake(FITS + 1))  # one byte more
    assert len(over) == MAX_CLIENT_HELLO + 1
    assert status(over) == "too_large"


def test_record_headers_count_against_the_cap():
    hs = padded_handshake(FITS)
    assert parse_client_hello(frame(hs)).status == "ok"
    split = frame(hs, fragment=8192)  # eight record headers: 20 bytes over the cap
    assert len(split) == MAX_CLIENT_HELLO + 20
    assert status(split[:20]) == "need_more"
    assert status(split) == "too_large"


def test_huge_declared_handshake_length_is_too_large():
    data = b"\x16\x03\x01\x00\x04\x01\xff\xff\xff"
    assert status(data) == "too_large"


# ---------------------------------------------------------------- malformed


def raw_body_with_extensions_block(block: bytes) -> bytes:
    return body(None) + block


MALFORMED = [
    # lengths of the hello body
    pytest.param(frame(handshake(body(host(b"x.example"), session_id=bytes(33)))), id="session-id-33"),
    pytest.param(frame(handshake(body(host(b"x.example"), suites=b""))), id="no-cipher-suites"),
    pytest.param(frame(handshake(body(host(b"x.example"), suites=b"\x13\x01\x00"))), id="odd-cipher-suites"),
    pytest.param(frame(handshake(body(host(b"x.example"), compression=b""))), id="no-compression-methods"),
    pytest.param(frame(handshake(body(host(b"x.example"), version=b"\x02\x00"))), id="client-version-2"),
    pytest.param(frame(handshake(body(host(b"x.example"))[:40])), id="handshake-ends-inside-session-id"),
    pytest.param(frame(handshake(body(None) + b"\x00")), id="one-byte-extensions-length"),
    pytest.param(frame(handshake(raw_body_with_extensions_block(b"\x00\x20" + host(b"x.example")))), id="extensions-overrun-body"),
    pytest.param(frame(handshake(body(host(b"x.example")) + b"\x00")), id="bytes-after-extensions"),
    pytest.param(frame(handshake(raw_body_with_extensions_block(vec(b"\x00\x00\x00\x30" + b"\x00" * 8, 2)))), id="extension-overruns-block"),
    pytest.param(frame(handshake(raw_body_with_extensions_block(vec(b"\x00\x0a\x00", 2)))), id="extension-header-cut"),
    pytest.param(hello(ext(10, b"\x00\x02\x00\x1d") + ext(10, b"\x00\x02\x00\x17")), id="duplicate-extension"),
    pytest.param(hello(host(b"a.example") + host(b"b.example")), id="duplicate-server-name-extension"),
    # the server_name extension itself
    pytest.param(hello(ext(0, b"")), id="empty-server-name-extension"),
    pytest.param(hello(ext(0, vec(b"", 2))), id="empty-server-name-list"),
    pytest.param(hello(ext(0, b"\x00\x10\x00\x00\x01a")), id="name-list-overruns-extension"),
    pytest.param(hello(ext(0, vec(b"\x00\x00\x01a", 2) + b"\x00")), id="bytes-after-name-list"),
    pytest.param(hello(ext(0, vec(b"\x00\x00\x09a", 2))), id="host-name-overruns-list"),
    pytest.param(hello(ext(0, vec(b"\x00\x00", 2))), id="host-name-length-cut"),
    pytest.param(hello(sni_ext((0, b"a.example"), (0, b"b.example"))), id="two-host-names"),
    # the host name
    pytest.param(hello(host(b"")), id="empty-host-name"),
    pytest.param(hello(host(b".")), id="only-a-dot"),
    pytest.param(hello(host(b"b\xc3\xbccher.example")), id="utf8-name"),
    pytest.param(hello(host(b"caf\xe9.example")), id="latin1-name"),
    pytest.param(hello(host(b"bad name.example")), id="space"),
    pytest.param(hello(host(b"nul\x00.example")), id="nul-byte"),
    pytest.param(hello(host(b"example.com\n")), id="trailing-newline"),
    pytest.param(hello(host(b"a..example")), id="empty-label"),
    pytest.param(hello(host(b".example")), id="leading-dot"),
    pytest.param(hello(host(b"example.com..")), id="two-trailing-dots"),
    pytest.param(hello(host(b"-bad.example")), id="leading-hyphen"),
    pytest.param(hello(host(b"bad-.example")), id="trailing-hyphen"),
    pytest.param(hello(host(b"*.example.com")), id="wildcard-as-name"),
    pytest.param(hello(host(b"x" * 64 + b".example")), id="label-64"),
    pytest.param(hello(host(NAME_253.encode() + b"e")), id="254-chars"),
    pytest.param(hello(host(b"a" * 300)), id="300-chars"),
    pytest.param(hello(host(b"[2001:db8::1]")), id="bracketed-ipv6"),
    # framing
    pytest.param(frame(handshake(body(host(b"x.example")), msg_type=2)), id="server-hello-type"),
    pytest.param(frame(handshake(body(host(b"x.example")), msg_type=0)), id="hello-request-type"),
    pytest.param(b"\x16\x03\x01\x00\x00" + hello(host(b"x.example")), id="empty-record"),
    pytest.param(b"\x16\x03\x01\x40\x01" + handshake(body(host(b"x.example"))), id="record-over-2-14"),
    pytest.param(frame(handshake(body(host(b"x.example")), length=60)), id="handshake-length-cuts-hello"),
    pytest.param(frame(handshake(b"")), id="empty-handshake-body"),
]


@pytest.mark.parametrize("data", MALFORMED)
def test_malformed(data):
    assert parse_client_hello(data) == SniResult("malformed")


@pytest.mark.parametrize("content_type", [20, 21, 23, 24, 0])
def test_other_record_between_fragments_is_malformed(content_type):
    hs = handshake(body(host(b"x.example")))
    intruder = bytes([content_type]) + b"\x03\x03\x00\x01\x01"
    data = frame(hs[:30]) + intruder + frame(hs[30:])
    assert status(data) == "malformed"
    assert status(data[:35 + 1]) == "malformed"  # its first byte is enough


def test_a_broken_prefix_is_malformed_before_the_rest_arrives():
    data = frame(handshake(body(host(b"x.example"), session_id=bytes(33))))
    session_id_length_at = 5 + 4 + 2 + 32
    assert status(data[:session_id_length_at]) == "need_more"
    assert status(data[:session_id_length_at + 1]) == "malformed"

    bad_name = hello(host(b"b\xc3\xbccher.example") + ext(21, bytes(50)))
    name_end = bad_name.index(b"cher.example") + len(b"cher.example")
    assert status(bad_name[:name_end - 1]) == "need_more"
    # the name is judged once all its bytes are in, before the hello ends
    assert status(bad_name[:name_end]) == "malformed"


def test_non_ascii_name_spliced_into_a_real_hello_is_malformed():
    data = bytearray(real_hello("aaaa.example"))
    at = data.index(b"aaaa.example")
    data[at:at + 4] = "ü".encode() + b"\xff\xfe"
    assert status(bytes(data)) == "malformed"


# ---------------------------------------------------------------- fuzz: only ever a result


def check(data: bytes) -> SniResult:
    result = parse_client_hello(data)
    assert isinstance(result, SniResult)
    assert result.status in STATUSES
    if result.status == "ok":
        assert VALID_NAME.fullmatch(result.server_name)
        assert not result.server_name.endswith(".")
    else:
        assert result.server_name is None
    return result


def fuzz_seeds() -> list[bytes]:
    return [
        real_hello("fuzz.example.com"),
        real_hello("fuzz.example.com", ssl.TLSVersion.TLSv1_2),
        real_hello(None),
        frame(handshake_of(real_hello("frag.example")), fragment=60),
        hello(sni_ext((1, b"x"), (0, b"y.example")) + ext(21, bytes(20))),
        hello(None),
    ]


def test_fuzz_random_bytes_never_raise():
    rng = random.Random(0x5A1)
    prefixes = [b"", b"\x16", b"\x16\x03", b"\x16\x03\x01", b"\x16\x03\x01\x02\x00\x01"]
    for _ in range(4000):
        prefix = rng.choice(prefixes)
        check(prefix + rng.randbytes(rng.randrange(0, 700)))


def test_fuzz_every_truncation_of_valid_hellos_needs_more():
    for data in fuzz_seeds():
        final = check(data).status
        assert final in {"ok", "no_sni"}
        for end in range(len(data)):
            assert check(data[:end]).status == "need_more"


def test_fuzz_bit_flips_and_splices_never_raise():
    rng = random.Random(20240817)
    seeds = fuzz_seeds()
    seen: set[str] = set()
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            bit = rng.randrange(len(data) * 8)
            data[bit // 8] ^= 1 << (bit % 8)
        seen.add(check(bytes(data)).status)
        check(bytes(data[:rng.randrange(len(data) + 1)]))
    for _ in range(1500):
        data = bytearray(rng.choice(seeds))
        at = rng.randrange(len(data))
        op = rng.randrange(3)
        if op == 0:
            del data[at:at + rng.randrange(1, 8)]
        elif op == 1:
            data[at:at] = rng.randbytes(rng.randrange(1, 8))
        else:
            data[at:at + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x40\x01", b"\x00\x01"])
        seen.add(check(bytes(data)).status)
    assert {"ok", "malformed"} <= seen  # the flips reach both sides of the parser


# ---------------------------------------------------------------- more real and large hellos

def capture_hello(argv_for_port, accept_timeout: float = 10) -> bytes:
    """Start a real TLS client (``argv_for_port(port)``) against a local port and return its first flight."""
    import socket
    import subprocess
    srv = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen(argv_for_port(srv.getsockname()[1]), stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        srv.settimeout(accept_timeout)
        conn, _ = srv.accept()
        conn.settimeout(10)
        data = b""
        while parse_client_hello(data).status == "need_more":
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        conn.close()
        return data
    finally:
        proc.kill()
        proc.wait()
        srv.close()


def openssl_hello(server_name: str, version_flag: str) -> bytes:
    """The first flight of ``openssl s_client`` (a real, non-Python TLS stack), captured on a local port."""
    import shutil
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    return capture_hello(lambda port: ["openssl", "s_client", "-connect", f"127.0.0.1:{port}",
                                       "-servername", server_name, version_flag])


@pytest.mark.parametrize("version_flag", ["-tls1_2", "-tls1_3"])
def test_openssl_s_client_hellos(version_flag):
    assert parse_client_hello(openssl_hello("Site.Example.org", version_flag)) == SniResult("ok", "site.example.org")


def chromium_hello(server_name: str) -> bytes:
    """The first flight of a real headless Chromium (GREASE, X25519MLKEM768 key share, ~2 KB), captured
    on a local port: the name is mapped to 127.0.0.1 so the hello carries it as SNI."""
    import shutil
    import tempfile
    from conftest import require_tool
    chromium = require_tool("chromium")
    profile = tempfile.mkdtemp(prefix="portunus-sni-chromium-")
    try:
        return capture_hello(lambda port: [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                           "--disable-background-networking", "--disable-component-update",
                                           "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                                           f"--host-resolver-rules=MAP {server_name} 127.0.0.1",
                                           f"https://{server_name}:{port}/"], accept_timeout=30)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_a_real_chromium_hello_parses_whole_and_split_at_every_offset():
    data = chromium_hello("site.example.test")
    assert len(data) > 1500  # the post-quantum key share makes it large
    assert parse_client_hello(data) == SniResult("ok", "site.example.test")
    for cut in range(1, len(data)):
        assert parse_client_hello(data[:cut]).status == "need_more", cut


GREASE = b"\x0a\x0a"


def pq_hello(name: bytes, key_share_bytes: int, padding: int = 0) -> bytes:
    """A Chrome-shaped hello: GREASE suites/extensions, an X25519MLKEM768-sized key share, padding."""
    share = GREASE + vec(b"\x00", 2) + b"\x11\xec" + vec(b"\x42" * key_share_bytes, 2) + b"\x00\x1d" + vec(b"\x07" * 32, 2)
    exts = (ext(0x0a0a, b"") + host(name) + ext(0x002b, vec(GREASE + b"\x03\x04\x03\x03", 1))
            + ext(0x000a, vec(GREASE + b"\x11\xec\x00\x1d", 2)) + ext(0x0033, vec(share, 2))
            + (ext(0x0015, b"\x00" * padding) if padding else b"") + ext(0x1a1a, b"\x00"))
    return frame(handshake(body(exts, suites=GREASE + b"\x13\x01\x13\x02\xc0\x2b")))


@pytest.mark.parametrize("key_share,padding", [(1216, 300), (1216, 4000), (1216, 8500)])
def test_post_quantum_sized_hellos_with_grease(key_share, padding):
    data = pq_hello(b"pq.example.com", key_share, padding)
    assert 1500 < len(data) < 11000
    assert parse_client_hello(data) == SniResult("ok", "pq.example.com")


def test_a_hello_split_into_two_records_at_every_offset():
    hs = handshake_of(pq_hello(b"cut.example.com", 1216))
    for cut in range(1, len(hs)):
        data = frame(hs[:cut]) + frame(hs[cut:])
        assert parse_client_hello(data) == SniResult("ok", "cut.example.com"), cut


def test_a_large_hello_cut_into_segments_at_every_offset_needs_more_until_complete():
    data = pq_hello(b"seg.example.com", 1216, 2000)
    for end in range(len(data)):
        assert parse_client_hello(data[:end]).status == "need_more", end
    assert parse_client_hello(data).status == "ok"

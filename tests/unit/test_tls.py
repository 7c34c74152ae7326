"""Server certificate, SAN coverage, contexts and pinning (SPEC §3.1, §3.3, §4.1)."""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import socket
import ssl
import stat
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from portunus.control.tls import (CertInfo, client_context, ensure_server_cert, fingerprint_der, pins_match,
                                  san_covers, server_context)
from portunus.errors import PortunusError
from portunus.log import log


@pytest.fixture
def logbuf(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(log, "stream", buf)
    monkeypatch.setattr(log, "fmt", "json")

    def events(name):
        return [r for r in (json.loads(line) for line in buf.getvalue().splitlines()) if r["event"] == name]
    return events


@pytest.fixture
def hostname(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "edge-host-1")
    return "edge-host-1"


def paths(tmp_path):
    return str(tmp_path / "server.crt"), str(tmp_path / "server.key")


def load_cert(path) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------ generation

def test_first_run_generates_a_self_signed_p256_pair(tmp_path, hostname, logbuf):
    crt, key = paths(tmp_path)
    info = ensure_server_cert(crt, key)
    assert info.generated is True
    assert (info.cert_path, info.key_path) == (crt, key)
    assert mode_of(key) == 0o600
    assert mode_of(crt) == 0o644
    cert = load_cert(crt)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value == "portunus"
    assert cert.issuer == cert.subject
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life >= datetime.timedelta(days=3650)
    assert life < datetime.timedelta(days=3652)
    assert info.fingerprint == fingerprint_der(cert.public_bytes(serialization.Encoding.DER))
    assert len(info.fingerprint) == 64 and info.fingerprint == info.fingerprint.lower()
    with open(key, "rb") as f:
        priv = serialization.load_pem_private_key(f.read(), password=None)
    assert priv.public_key().public_numbers() == cert.public_key().public_numbers()
    # no temp files left behind next to the pair
    assert sorted(os.listdir(tmp_path)) == ["server.crt", "server.key"]
    [rec] = logbuf("tls.cert_generated")
    assert rec["fingerprint"] == info.fingerprint
    assert rec["cert_path"] == crt
    assert not logbuf("tls.operator_cert_in_use")


def test_generated_sans_cover_hostname_localhost_loopback(tmp_path, hostname):
    info = ensure_server_cert(*paths(tmp_path))
    assert info.sans_dns == ["edge-host-1", "localhost"]
    assert info.sans_ip == ["127.0.0.1"]
    san = load_cert(info.cert_path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["edge-host-1", "localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_extra_hosts_become_dns_or_ip_sans(tmp_path, hostname):
    info = ensure_server_cert(*paths(tmp_path),
                              extra_hosts=["portunus.example.com", "203.0.113.7", "LOCALHOST", "127.0.0.1", ""])
    assert info.sans_dns == ["edge-host-1", "localhost", "portunus.example.com"]
    assert info.sans_ip == ["127.0.0.1", "203.0.113.7"]
    assert san_covers(info, "portunus.example.com")
    assert san_covers(info, "203.0.113.7")


@pytest.mark.parametrize("bad", ["host.example.com:7443", "https://x", "a b", "héllo.example"])
def test_extra_host_that_cannot_be_a_san_is_skipped_with_a_warning(tmp_path, hostname, logbuf, bad):
    info = ensure_server_cert(*paths(tmp_path), extra_hosts=[bad, "ok.example.com"])
    assert info.sans_dns == ["edge-host-1", "localhost", "ok.example.com"]
    assert info.sans_ip == ["127.0.0.1"]
    [warn] = logbuf("tls.san_host_skipped")
    assert warn["host"] == bad.strip()


def test_odd_local_hostname_does_not_stop_first_run(tmp_path, monkeypatch, logbuf):
    monkeypatch.setattr(socket, "gethostname", lambda: "")
    info = ensure_server_cert(*paths(tmp_path))
    assert info.sans_dns == ["localhost"] and info.sans_ip == ["127.0.0.1"]


def test_missing_data_dir_is_created_private(tmp_path, hostname):
    d = tmp_path / "state" / "portunus"
    info = ensure_server_cert(str(d / "server.crt"), str(d / "server.key"))
    assert info.generated
    assert mode_of(d) == 0o700


def test_key_is_0600_even_under_a_permissive_umask(tmp_path, hostname):
    old = os.umask(0)
    try:
        info = ensure_server_cert(*paths(tmp_path))
    finally:
        os.umask(old)
    assert mode_of(info.key_path) == 0o600
    assert mode_of(info.cert_path) == 0o644


# ------------------------------------------------------------------ reuse

def test_second_call_reuses_the_pair_with_the_same_fingerprint(tmp_path, hostname, logbuf):
    crt, key = paths(tmp_path)
    first = ensure_server_cert(crt, key)
    with open(crt, "rb") as f:
        pem = f.read()
    second = ensure_server_cert(crt, key, extra_hosts=["other.example.com"])
    assert second.generated is False
    assert second.fingerprint == first.fingerprint
    assert second.sans_dns == first.sans_dns and second.sans_ip == first.sans_ip
    with open(crt, "rb") as f:
        assert f.read() == pem
    [rec] = logbuf("tls.operator_cert_in_use")
    assert rec == {**rec, "cert_path": crt, "fingerprint": first.fingerprint}


def test_operator_supplied_rsa_chain_is_used_and_the_leaf_is_pinned(tmp_path, logbuf):
    from cryptography.hazmat.primitives.asymmetric import rsa
    crt, key = paths(tmp_path)
    now = datetime.datetime.now(datetime.timezone.utc)

    def make(subject_cn, issuer_cn, pub, signer, sans=None):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, subject_cn)]))
             .issuer_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, issuer_cn)]))
             .public_key(pub).serial_number(x509.random_serial_number())
             .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=30)))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = make("edge", "ca", leaf_key.public_key(), ca_key,
                [x509.DNSName("*.example.com"), x509.IPAddress(ipaddress.ip_address("198.51.100.4"))])
    ca = make("ca", "ca", ca_key.public_key(), ca_key)
    with open(crt, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption()))
    os.close(fd)
    info = ensure_server_cert(crt, key)
    assert info.generated is False
    assert info.fingerprint == fingerprint_der(leaf.public_bytes(serialization.Encoding.DER))
    assert info.sans_dns == ["*.example.com"] and info.sans_ip == ["198.51.100.4"]
    assert logbuf("tls.operator_cert_in_use")[0]["fingerprint"] == info.fingerprint
    server_context(info)  # loads


# ------------------------------------------------------------------ refusals

@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610, 0o602])
def test_key_open_to_group_or_others_is_refused(tmp_path, hostname, mode):
    crt, key = paths(tmp_path)
    ensure_server_cert(crt, key)
    os.chmod(key, mode)
    with pytest.raises(PortunusError) as ei:
        ensure_server_cert(crt, key)
    e = ei.value
    assert e.code == "startup.tls_key_permissions"
    assert f"server.key is mode {mode:04o}; it must be 0600 (chmod 600 {key})" == e.message
    assert e.exit_code == 1


def test_owner_only_key_modes_are_accepted(tmp_path, hostname):
    # 0700/0400 open nothing to group or others
    crt, key = paths(tmp_path)
    first = ensure_server_cert(crt, key)
    for mode in (0o400, 0o700):
        os.chmod(key, mode)
        assert ensure_server_cert(crt, key).fingerprint == first.fingerprint


@pytest.mark.parametrize("keep", ["cert", "key"])
def test_only_one_of_the_pair_is_refused_naming_both(tmp_path, hostname, keep):
    crt, key = paths(tmp_path)
    ensure_server_cert(crt, key)
    os.unlink(key if keep == "cert" else crt)
    with pytest.raises(PortunusError) as ei:
        ensure_server_cert(crt, key)
    assert ei.value.code == "startup.tls_files_incomplete"
    assert crt in ei.value.message and key in ei.value.message
    # nothing was regenerated over the operator's remaining file
    assert os.path.exists(crt) == (keep == "cert")
    assert os.path.exists(key) == (keep == "key")


@pytest.mark.parametrize("which,content", [
    ("cert", b"not a certificate\n"),
    ("cert", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
    ("cert", b""),
    ("key", b"garbage"),
    ("key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
    ("key", b""),
])
def test_corrupt_cert_or_key_is_refused_naming_the_file(tmp_path, hostname, which, content):
    crt, key = paths(tmp_path)
    ensure_server_cert(crt, key)
    target = crt if which == "cert" else key
    with open(target, "wb") as f:
        f.write(content)
    with pytest.raises(PortunusError) as ei:
        ensure_server_cert(crt, key)
    assert ei.value.code == "startup.tls_invalid"
    assert target in ei.value.message


def test_encrypted_key_is_refused_clearly(tmp_path, hostname):
    crt, key = paths(tmp_path)
    ensure_server_cert(crt, key)
    with open(key, "rb") as f:
        priv = serialization.load_pem_private_key(f.read(), password=None)
    with open(key, "wb") as f:
        f.write(priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(PortunusError) as ei:
        ensure_server_cert(crt, key)
    assert ei.value.code == "startup.tls_invalid"
    assert "encrypted" in ei.value.message and key in ei.value.message


def test_key_that_does_not_match_the_cert_is_refused(tmp_path, hostname):
    crt, key = paths(tmp_path)
    ensure_server_cert(crt, key)
    other_crt, other_key = str(tmp_path / "o.crt"), str(tmp_path / "o.key")
    ensure_server_cert(other_crt, other_key)
    os.replace(other_key, key)
    with pytest.raises(PortunusError) as ei:
        ensure_server_cert(crt, key)
    assert ei.value.code == "startup.tls_invalid"
    assert "does not match" in ei.value.message


# ------------------------------------------------------------------ fingerprints and pins

def test_fingerprint_der_is_lowercase_sha256_hex():
    assert fingerprint_der(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert fingerprint_der(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.parametrize("expected,ok", [
    ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", True),
    ("BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD", True),
    ("sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", True),
    ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ae", False),
    ("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015", False),
    ("", False),
    ("é" * 64, False),
])
def test_pins_match(expected, ok):
    assert pins_match(expected, b"abc") is ok


def test_pins_match_refuses_non_string_or_empty_der():
    fp = fingerprint_der(b"abc")
    assert pins_match(None, b"abc") is False
    assert pins_match(fp, b"") is False


# ------------------------------------------------------------------ SAN coverage (§3.3)

def info_with(dns=(), ips=()) -> CertInfo:
    return CertInfo(cert_path="c", key_path="k", fingerprint="0" * 64, sans_dns=list(dns), sans_ip=list(ips))


SAN_CASES = [
    # (dns SANs, ip SANs, host, covered)
    (["portunus.example.com"], [], "portunus.example.com", True),
    (["portunus.example.com"], [], "PORTUNUS.Example.COM", True),
    (["Portunus.EXAMPLE.com"], [], "portunus.example.com", True),
    (["portunus.example.com"], [], "portunus.example.com.", True),
    (["portunus.example.com"], [], "other.example.com", False),
    (["portunus.example.com"], [], "example.com", False),
    (["portunus.example.com"], [], "x.portunus.example.com", False),
    (["*.example.com"], [], "a.example.com", True),
    (["*.example.com"], [], "A.Example.Com", True),
    (["*.EXAMPLE.com"], [], "edge-1.example.com", True),
    (["*.example.com"], [], "a.b.example.com", False),
    (["*.example.com"], [], "example.com", False),
    (["*.example.com"], [], ".example.com", False),
    (["*.example.com"], [], "a.example.org", False),
    (["*.example.com"], [], "*.example.com", False),
    (["a*.example.com"], [], "ab.example.com", False),
    (["*.*.example.com"], [], "a.b.example.com", False),
    ([], ["127.0.0.1"], "127.0.0.1", True),
    ([], ["127.0.0.1"], "127.0.0.2", False),
    (["127.0.0.1"], [], "127.0.0.1", False),  # a DNS SAN spelling an IP does not count
    (["127.0.0.1"], ["10.0.0.1"], "127.0.0.1", False),
    ([], ["127.0.0.1"], "localhost", False),
    (["localhost"], ["127.0.0.1"], "localhost", True),
    ([], ["2001:db8::1"], "2001:db8::1", True),
    ([], ["2001:db8::1"], "2001:DB8:0::1", True),
    ([], ["2001:db8::1"], "[2001:db8::1]", True),
    (["*.example.com"], ["127.0.0.1"], "", False),
    (["example.com"], [], " example.com", False),
    ([], [], "example.com", False),
]


@pytest.mark.parametrize("dns,ips,host,covered", SAN_CASES,
                         ids=[f"{'|'.join(d + i) or 'none'}->{h or 'empty'}" for d, i, h, _ in SAN_CASES])
def test_san_covers(dns, ips, host, covered):
    assert san_covers(info_with(dns, ips), host) is covered


def test_san_covers_accepts_a_certificate_or_der(tmp_path, hostname):
    info = ensure_server_cert(*paths(tmp_path), extra_hosts=["*.edge.example.net"])
    cert = load_cert(info.cert_path)
    der = cert.public_bytes(serialization.Encoding.DER)
    for subject in (info, cert, der):
        assert san_covers(subject, "edge-host-1")
        assert san_covers(subject, "LOCALHOST")
        assert san_covers(subject, "127.0.0.1")
        assert san_covers(subject, "a.edge.example.net")
        assert not san_covers(subject, "a.b.edge.example.net")
        assert not san_covers(subject, "10.0.0.1")


# ------------------------------------------------------------------ contexts and a real handshake

def test_contexts_require_tls_1_2_or_later(tmp_path, hostname):
    info = ensure_server_cert(*paths(tmp_path))
    for ctx in (server_context(info), client_context()):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    c = client_context()
    assert c.check_hostname is False and c.verify_mode == ssl.CERT_NONE


def test_server_context_refuses_unloadable_files(tmp_path, hostname):
    info = ensure_server_cert(*paths(tmp_path))
    bad = CertInfo(cert_path=str(tmp_path / "missing.crt"), key_path=info.key_path, fingerprint=info.fingerprint)
    with pytest.raises(PortunusError) as ei:
        server_context(bad)
    assert ei.value.code == "startup.tls_invalid"
    assert "missing.crt" in ei.value.message


def _handshake(info: CertInfo):
    """Serve one TLS connection on 127.0.0.1; return (peer DER, TLS version, echoed bytes)."""
    sctx = server_context(info)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)
    errors = []

    def serve():
        try:
            conn, _ = listener.accept()
            conn.settimeout(10)
            with sctx.wrap_socket(conn, server_side=True) as tconn:
                data = tconn.recv(1024)
                tconn.sendall(b"echo:" + data)
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        with client_context().wrap_socket(raw) as conn:
            der = conn.getpeercert(binary_form=True)
            version = conn.version()
            conn.sendall(b"hello")
            reply = conn.recv(1024)
    finally:
        t.join(10)
        listener.close()
    assert not errors, errors
    return der, version, reply


def test_real_handshake_pins_the_generated_leaf(tmp_path, hostname):
    info = ensure_server_cert(*paths(tmp_path))
    der, version, reply = _handshake(info)
    assert pins_match(info.fingerprint, der)
    assert fingerprint_der(der) == info.fingerprint
    assert version in ("TLSv1.2", "TLSv1.3")
    assert reply == b"echo:hello"
    # a pin for any other certificate does not match this server
    other = ensure_server_cert(str(tmp_path / "o.crt"), str(tmp_path / "o.key"))
    assert other.fingerprint != info.fingerprint
    assert not pins_match(other.fingerprint, der)


def test_the_tls_module_never_logs_key_material(tmp_path, hostname, logbuf):
    info = ensure_server_cert(*paths(tmp_path))
    ensure_server_cert(info.cert_path, info.key_path)
    with open(info.key_path) as f:
        key_body = "".join(line for line in f.read().splitlines() if "-----" not in line)
    assert logbuf("tls.cert_generated") and logbuf("tls.operator_cert_in_use")
    assert not logbuf("audit.redaction_violation")
    for rec in logbuf("tls.cert_generated") + logbuf("tls.operator_cert_in_use"):
        assert key_body[:40] not in json.dumps(rec)

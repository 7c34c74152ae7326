"""rotate_self_signed_cert and --san validation on real files: a new pair with the asked-for SANs,
the old pair kept (key still 0600), and an operator-supplied certificate never replaced."""

from __future__ import annotations

import datetime
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from portunus.control import tls
from portunus.errors import PortunusError


def paths(tmp_path):
    return str(tmp_path / "server.crt"), str(tmp_path / "server.key")


def test_rotation_replaces_the_pair_keeps_the_old_one_and_names_every_host(tmp_path):
    cert, key = paths(tmp_path)
    first = tls.ensure_server_cert(cert, key)
    new, old_fp = tls.rotate_self_signed_cert(cert, key, extra_hosts=["edge-gw.example.net", "127.0.0.2"])
    assert old_fp == first.fingerprint and new.fingerprint != first.fingerprint
    assert {"localhost", "edge-gw.example.net"} <= set(new.sans_dns)
    assert {"127.0.0.1", "127.0.0.2"} <= set(new.sans_ip)
    assert tls.san_covers(new, "127.0.0.2") and not tls.san_covers(first, "127.0.0.2")
    for path in (key, key + tls.PREVIOUS_SUFFIX):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert tls.ensure_server_cert(cert + tls.PREVIOUS_SUFFIX, key + tls.PREVIOUS_SUFFIX).fingerprint == old_fp
    assert tls.ensure_server_cert(cert, key).fingerprint == new.fingerprint


def test_rotation_without_a_pair_just_generates_one(tmp_path):
    cert, key = paths(tmp_path)
    new, old_fp = tls.rotate_self_signed_cert(cert, key)
    assert old_fp is None and os.path.exists(cert) and not os.path.exists(cert + tls.PREVIOUS_SUFFIX)
    assert new.fingerprint == tls.ensure_server_cert(cert, key).fingerprint


def _operator_pair(cert_path: str, key_path: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portunus.example.com")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    tls.write_atomic(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), 0o600)
    tls.write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def test_an_operator_certificate_is_never_replaced(tmp_path):
    cert, key = paths(tmp_path)
    _operator_pair(cert, key)
    before = open(cert, "rb").read()
    with pytest.raises(PortunusError) as ei:
        tls.rotate_self_signed_cert(cert, key)
    assert ei.value.code == "failed_precondition" and "operator-supplied" in ei.value.message
    assert open(cert, "rb").read() == before and not os.path.exists(cert + tls.PREVIOUS_SUFFIX)


@pytest.mark.parametrize("text, expected", [
    ("edge-gw.example.net", "edge-gw.example.net"), ("*.example.net", "*.example.net"),
    ("127.0.0.2", "127.0.0.2"), ("[2001:db8::1]", "2001:db8::1"), ("2001:db8::1", "2001:db8::1"),
])
def test_san_hosts_accepted(text, expected):
    assert tls.validate_san_host(text) == expected


@pytest.mark.parametrize("text", ["edge:7443", "https://edge", "edge/x", "", "two words", "*", "a..b", "é.example"])
def test_san_hosts_refused_naming_the_value(text):
    with pytest.raises(PortunusError) as ei:
        tls.validate_san_host(text)
    assert ei.value.code == "validation.invalid_san" and repr(text) in ei.value.message
    assert ei.value.exit_code == 2

"""control/selfsigned.py: the first certificate made with the standard library (issue 15, startup).

``cryptography`` is the referee here: it parses what selfsigned writes, verifies its signature,
derives the same public points, and re-encodes the key byte for byte; OpenSSL (ssl) loads the pair
and completes a handshake with it over real loopback sockets.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from portunus.control import selfsigned as s
from portunus.control import tls

NOW = datetime.datetime(2026, 12, 1, 12, 30, 45, tzinfo=datetime.timezone.utc)
SANS = [("dns", "edge-1.example"), ("dns", "localhost"), ("ip", "127.0.0.1"), ("ip", "2001:db8::1")]


@pytest.fixture(scope="module")
def pair():
    cert_der, key_der = s.self_signed("portunus", SANS, NOW - datetime.timedelta(minutes=5),
                                      NOW + datetime.timedelta(days=3650))
    return cert_der, key_der, x509.load_der_x509_certificate(cert_der), serialization.load_der_private_key(key_der, None)


@pytest.mark.parametrize("k", [1, 2, 3, 0xdeadbeef, 2 ** 128 + 12345, s.N - 2, s.N - 1])
def test_scalar_mult_agrees_with_cryptography(k):
    nums = ec.derive_private_key(k, ec.SECP256R1()).public_key().public_numbers()
    assert s.scalar_mult(k) == (nums.x, nums.y)
    assert s.on_curve(nums.x, nums.y)


def test_scalar_mult_of_n_minus_one_is_minus_g_and_out_of_range_scalars_are_refused():
    assert s.scalar_mult(s.N - 1) == (s.GX, s.P - s.GY)
    for bad in (0, s.N, -1):
        with pytest.raises(ValueError):
            s.scalar_mult(bad)


def test_a_signature_verifies_with_cryptography():
    d, (x, y) = s.generate_key()
    pub = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    r, sig_s = s.sign_sha256(d, b"portunus")
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
    pub.verify(encode_dss_signature(r, sig_s), b"portunus", ec.ECDSA(hashes.SHA256()))
    assert 0 < r < s.N and 0 < sig_s < s.N
    assert s.sign_sha256(d, b"portunus") != (r, sig_s)  # a fresh nonce each time


def test_the_certificate_is_a_self_signed_v3_p256_leaf_with_the_key_it_came_with(pair):
    cert_der, key_der, cert, key = pair
    assert cert.version == x509.Version.v3
    assert cert.subject == cert.issuer == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "portunus")])
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"
    assert cert.signature_hash_algorithm.name == "sha256"
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()
    assert 0 < cert.serial_number < 2 ** 159
    assert cert.not_valid_before_utc == NOW - datetime.timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + datetime.timedelta(days=3650)
    # the key file is PKCS#8 exactly as cryptography itself would write it
    assert key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()) == key_der


def test_the_extensions_are_those_of_a_portunus_server_leaf(pair):
    cert = pair[2]
    exts = {e.oid.dotted_string: e for e in cert.extensions}
    assert list(exts) == [s.OID_SUBJECT_ALT_NAME, s.OID_BASIC_CONSTRAINTS, s.OID_KEY_USAGE, s.OID_EXT_KEY_USAGE,
                          s.OID_SUBJECT_KEY_ID]
    san = exts[s.OID_SUBJECT_ALT_NAME]
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == ["edge-1.example", "localhost"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1"),
                                                             ipaddress.ip_address("2001:db8::1")]
    bc = exts[s.OID_BASIC_CONSTRAINTS]
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None
    ku = exts[s.OID_KEY_USAGE]
    assert ku.critical and ku.value.digital_signature
    assert not any([ku.value.content_commitment, ku.value.key_encipherment, ku.value.data_encipherment,
                    ku.value.key_agreement, ku.value.key_cert_sign, ku.value.crl_sign])
    eku = exts[s.OID_EXT_KEY_USAGE]
    assert not eku.critical and list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert exts[s.OID_SUBJECT_KEY_ID].value == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def test_the_pem_armour_is_the_standard_one(pair):
    cert_der = pair[0]
    assert s.pem("CERTIFICATE", cert_der).decode() == ssl.DER_cert_to_PEM_cert(cert_der)
    assert ssl.PEM_cert_to_DER_cert(s.pem("CERTIFICATE", cert_der).decode()) == cert_der


@pytest.mark.parametrize("value, der", [
    (0, "020100"), (1, "020101"), (127, "02017f"), (128, "02020080"), (255, "020200ff"), (256, "02020100"),
])
def test_der_integers_are_minimal_and_positive(value, der):
    assert s.der_int(value).hex() == der


def test_der_oids_lengths_and_times():
    assert s.oid("1.2.840.10045.2.1").hex() == "06072a8648ce3d0201"
    assert s.oid("2.5.29.17").hex() == "0603551d11"
    assert s.seq(b"\x00" * 200)[:3].hex() == "3081c8"
    assert s.seq(b"\x00" * 300)[:4].hex() == "3082012c"
    utc = datetime.timezone.utc
    assert s.der_time(datetime.datetime(2049, 12, 31, 23, 59, 59, tzinfo=utc)) == b"\x17\x0d491231235959Z"
    assert s.der_time(datetime.datetime(2050, 1, 1, tzinfo=utc)) == b"\x18\x0f20500101000000Z"
    with pytest.raises(ValueError):
        s.der_int(-1)


def test_validity_past_2049_is_generalized_time_and_still_parses():
    cert_der, _ = s.self_signed("portunus", [("dns", "localhost")], NOW, datetime.datetime(2060, 1, 2, tzinfo=datetime.timezone.utc))
    assert x509.load_der_x509_certificate(cert_der).not_valid_after_utc.year == 2060


def test_ensure_server_cert_writes_a_pair_openssl_serves_and_a_client_pins(tmp_path):
    info = tls.ensure_server_cert(str(tmp_path / "server.crt"), str(tmp_path / "server.key"),
                                  extra_hosts=["edge.example", "[::1]", "bad host"])
    assert info.generated and (tmp_path / "server.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "server.crt").stat().st_mode & 0o777 == 0o644
    assert "edge.example" in info.sans_dns and "localhost" in info.sans_dns
    assert info.sans_ip == ["127.0.0.1", "::1"]
    cert_pem = (tmp_path / "server.crt").read_text()
    assert info.fingerprint == tls.fingerprint_der(ssl.PEM_cert_to_DER_cert(cert_pem))
    # what the file says is what CertInfo says (a restart reads it back through cryptography)
    again = tls.ensure_server_cert(str(tmp_path / "server.crt"), str(tmp_path / "server.key"))
    assert (again.fingerprint, again.sans_dns, again.sans_ip) == (info.fingerprint, info.sans_dns, info.sans_ip)
    assert not again.generated

    server_ctx = tls.server_context(info)
    listener = socket.create_server(("127.0.0.1", 0))
    got = {}

    def serve():
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
            tls_conn.sendall(b"ok")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            with tls.client_context().wrap_socket(raw) as c:
                got["der"] = c.getpeercert(binary_form=True)
                got["data"] = c.recv(2)
    finally:
        t.join(10)
        listener.close()
    assert got["data"] == b"ok"
    assert tls.pins_match(info.fingerprint, got["der"])

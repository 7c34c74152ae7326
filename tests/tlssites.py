"""Real TLS sites for the SNI tests: each with its own self-signed certificate, made here.

``TlsSite`` terminates TLS on 127.0.0.1 (Portunus never does) and answers every
line with ``<site name>:<line>``; ``tls_ask`` is a Python ``ssl`` client that sends
SNI and verifies the answering site's own certificate, so a reply proves the
connection reached that site end to end, untouched.
"""

from __future__ import annotations

import datetime
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_cert(directory: Path, name: str, sans: list[str]) -> tuple[str, str]:
    """A self-signed certificate for the DNS names ``sans``; returns (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


class TlsSite:
    """A TLS server with its own certificate on 127.0.0.1:``port``, one thread per connection."""

    def __init__(self, directory: Path, name: str, sans: list[str], port: int):
        self.name = name
        self.cert, key = make_cert(directory, name, sans)
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(self.cert, key)
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = port
        self.handshakes = 0
        self.stopping = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                self.handshakes += 1
                f = tls.makefile("rwb")
                for line in f:
                    f.write(f"{self.name}:".encode() + line)
                    f.flush()
        except (OSError, ssl.SSLError):
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stopping = True
        self.sock.close()


def client_context(cafile: str, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = check_hostname
    return ctx


def tls_connect(port: int, server_name: str | None, cafile: str, timeout: float = 10,
                check_hostname: bool = True) -> ssl.SSLSocket:
    """A verified TLS connection through ``port``: SNI ``server_name`` (None: no SNI), the site's cert.

    The chain is always verified against ``cafile`` (the site's own certificate);
    ``check_hostname=False`` only skips matching the name against its SANs.
    """
    ctx = client_context(cafile, check_hostname=check_hostname and server_name is not None)
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname=server_name)


def ask(tls: ssl.SSLSocket, line: bytes = b"ping") -> bytes:
    tls.sendall(line + b"\n")
    got = b""
    while not got.endswith(b"\n"):
        chunk = tls.recv(4096)
        if not chunk:
            break
        got += chunk
    return got.rstrip(b"\n")


def tls_ask(port: int, server_name: str | None, cafile: str, line: bytes = b"ping",
            check_hostname: bool = True) -> bytes:
    with tls_connect(port, server_name, cafile, check_hostname=check_hostname) as tls:
        return ask(tls, line)


def closed_without_answer(sock: socket.socket, timeout: float = 10) -> bool:
    """True when the peer closes (EOF or reset) without sending a byte."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True

"""Server certificate, TLS contexts and leaf pinning for the control channel (SPEC §3.1, §3.3, §4.1).

The server uses an operator-supplied cert/key pair when both files exist, else
generates a self-signed ECDSA P-256 pair on first run. Clients do not use a CA:
they pin the SHA-256 of the server's leaf DER, taken from the enrollment URI.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
import re
import socket
import ssl
import stat

from portunus.errors import PortunusError
from portunus.log import log

# ``cryptography`` (~35-90 ms to import) is loaded only where an existing certificate is read (a
# server restart, rotate-cert, an operator's pair); a first start makes its pair with the standard
# library (``selfsigned``), and the client and ``enroll`` pin, fingerprint and build contexts with
# ssl/hashlib alone.

CERT_VALIDITY_DAYS = 3650
CERT_COMMON_NAME = "portunus"
_SAN_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class CertInfo:
    """The server certificate in use. (A plain class: the client and `enroll` import this module and
    need no dataclasses import for it.)"""
    __slots__ = ("cert_path", "key_path", "fingerprint", "sans_dns", "sans_ip", "generated")

    def __init__(self, cert_path: str, key_path: str, fingerprint: str, sans_dns: list[str] | None = None,
                 sans_ip: list[str] | None = None, generated: bool = False):
        self.cert_path = cert_path
        self.key_path = key_path
        self.fingerprint = fingerprint  # lowercase hex SHA-256 of the leaf DER
        self.sans_dns = [] if sans_dns is None else sans_dns
        self.sans_ip = [] if sans_ip is None else sans_ip
        self.generated = generated

    def _key(self) -> tuple:
        return (self.cert_path, self.key_path, self.fingerprint, self.sans_dns, self.sans_ip, self.generated)

    def __eq__(self, other):
        return self._key() == other._key() if other.__class__ is self.__class__ else NotImplemented

    __hash__ = None  # mutable, like the dataclass it was

    def __repr__(self) -> str:
        return (f"CertInfo(cert_path={self.cert_path!r}, key_path={self.key_path!r}, fingerprint={self.fingerprint!r}, "
                f"sans_dns={self.sans_dns!r}, sans_ip={self.sans_ip!r}, generated={self.generated!r})")


# ------------------------------------------------------------------ fingerprints

def fingerprint_der(der: bytes) -> str:
    """Lowercase hex SHA-256 of a certificate's DER bytes."""
    return hashlib.sha256(der).hexdigest()


def pins_match(expected_hex: str, der: bytes) -> bool:
    """Constant-time comparison of a pinned fingerprint with the SHA-256 of ``der``."""
    if not isinstance(expected_hex, str) or not der:
        return False
    expected = expected_hex.strip().lower()
    if expected.startswith("sha256:"):
        expected = expected[len("sha256:"):]
    # bytes, not str: compare_digest refuses non-ASCII str, and a pin is attacker-adjacent input
    return hmac.compare_digest(expected.encode("utf-8"), fingerprint_der(der).encode("ascii"))


# ------------------------------------------------------------------ files

def write_atomic(path: str, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temp file created with ``mode`` in the same dir, fsync, rename.

    The temp file is never looser than ``mode``, so a secret is never readable by others,
    not even for a moment, and a crash leaves either the old file or the new one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    tmp = os.path.join(directory, f".{base}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have removed bits we want (e.g. 0644 cert under umask 077)
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself is done
    finally:
        os.close(dfd)


# ------------------------------------------------------------------ server certificate

def ensure_server_cert(cert_path: str, key_path: str, *, extra_hosts=()) -> CertInfo:
    """Load the operator's cert/key, or generate a self-signed pair when both are missing."""
    cert_exists = os.path.exists(cert_path)
    key_exists = os.path.exists(key_path)
    if cert_exists and key_exists:
        info = _load_pair(cert_path, key_path)
        log.info("tls.operator_cert_in_use", cert_path=cert_path, fingerprint=info.fingerprint)
        return info
    if cert_exists or key_exists:
        present, missing = (cert_path, key_path) if cert_exists else (key_path, cert_path)
        raise PortunusError(
            "startup.tls_files_incomplete",
            f"{present} exists but {missing} does not; restore {missing}, "
            f"or remove {present} to generate a new self-signed pair",
            present=present, missing=missing)
    info = _generate_pair(cert_path, key_path, list(extra_hosts))
    log.info("tls.cert_generated", cert_path=cert_path, fingerprint=info.fingerprint,
             sans_dns=info.sans_dns, sans_ip=info.sans_ip)
    return info


def _check_key_mode(key_path: str) -> None:
    mode = stat.S_IMODE(os.stat(key_path).st_mode)
    if mode & 0o077:
        raise PortunusError(
            "startup.tls_key_permissions",
            f"{os.path.basename(key_path)} is mode {mode:04o}; it must be 0600 (chmod 600 {key_path})",
            path=key_path, mode=f"{mode:04o}")


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PortunusError("startup.tls_invalid", f"cannot read {path}: {e.strerror}", path=path) from None


def _load_pair(cert_path: str, key_path: str) -> CertInfo:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    _check_key_mode(key_path)
    cert_pem = _read(cert_path)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise PortunusError("startup.tls_invalid",
                            f"{cert_path} is not a PEM certificate", path=cert_path) from None
    leaf = chain[0]  # an operator file may carry the chain; the leaf comes first and is what clients pin
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except TypeError:
        raise PortunusError("startup.tls_invalid",
                            f"{key_path} is encrypted; Portunus needs an unencrypted private key",
                            path=key_path) from None
    except (ValueError, UnsupportedAlgorithm):
        raise PortunusError("startup.tls_invalid",
                            f"{key_path} is not a PEM private key", path=key_path) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise PortunusError("startup.tls_invalid",
                            f"{key_path} does not match the certificate in {cert_path}",
                            path=key_path, cert_path=cert_path)
    return _info_from_cert(leaf, cert_path, key_path, generated=False)


def _info_from_cert(cert: x509.Certificate, cert_path: str, key_path: str, generated: bool) -> CertInfo:
    from cryptography.hazmat.primitives import serialization
    dns, ips = _sans_of(cert)
    return CertInfo(cert_path=cert_path, key_path=key_path,
                    fingerprint=fingerprint_der(cert.public_bytes(serialization.Encoding.DER)),
                    sans_dns=dns, sans_ip=ips, generated=generated)


def _sans_of(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    from cryptography import x509
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return [], []
    dns = list(ext.value.get_values_for_type(x509.DNSName))
    ips = [str(ip) for ip in ext.value.get_values_for_type(x509.IPAddress)]
    return dns, ips


def _san_names(extra_hosts: list[str]) -> list[tuple[str, str]]:
    """The SAN entries of a generated certificate, in order: ("dns", name) or ("ip", address)."""
    names: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(host: str) -> None:
        host = host.strip() if isinstance(host, str) else ""
        if not host:
            return
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is not None:
            key, name = f"ip:{ip}", ("ip", str(ip))
        else:
            if not host.isascii() or any(c.isspace() or c in "/:@" for c in host):
                # an odd hostname must not stop first-run startup; the caller validates the seed endpoint itself
                log.warn("tls.san_host_skipped", host=host,
                         reason="not a DNS name (A-label) or an IP address")
                return
            key, name = f"dns:{host.lower()}", ("dns", host)
        if key not in seen:
            seen.add(key)
            names.append(name)

    for h in [socket.gethostname(), "localhost", "127.0.0.1", *extra_hosts]:
        add(h)
    return names


def _generate_pair(cert_path: str, key_path: str, extra_hosts: list[str]) -> CertInfo:
    """A new self-signed P-256 pair, written key first. Made with the standard library
    (``selfsigned``): a first start does not pay for importing ``cryptography``'s x509 stack."""
    from .selfsigned import pem, self_signed
    sans = _san_names(extra_hosts)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    cert_der, key_der = self_signed(CERT_COMMON_NAME, sans,
                                    not_before=now - datetime.timedelta(minutes=5),  # a peer's clock running behind
                                    not_after=now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
    for path in (cert_path, key_path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            os.makedirs(parent, mode=0o700, exist_ok=True)
    # key first: a crash in between leaves "key without cert", which startup reports as incomplete
    write_atomic(key_path, pem("PRIVATE KEY", key_der), 0o600)
    write_atomic(cert_path, pem("CERTIFICATE", cert_der), 0o644)
    return CertInfo(cert_path=cert_path, key_path=key_path, fingerprint=fingerprint_der(cert_der),
                    sans_dns=[v for k, v in sans if k == "dns"], sans_ip=[v for k, v in sans if k == "ip"],
                    generated=True)


PREVIOUS_SUFFIX = ".prev"


def rotate_self_signed_cert(cert_path: str, key_path: str, *, extra_hosts=()) -> tuple[CertInfo, str | None]:
    """A new self-signed pair in place of the current one; returns (new info, old fingerprint or None).

    The old pair is kept next to it as ``*.prev`` (the key stays 0600), so a rotation by
    mistake can be undone. An operator-supplied certificate is never replaced.
    """
    old_fingerprint = None
    if os.path.exists(cert_path) and os.path.exists(key_path):
        old = _load_pair(cert_path, key_path)
        if not _is_generated(cert_path):
            raise PortunusError(
                "failed_precondition",
                f"{cert_path} is not a Portunus self-signed certificate (an operator-supplied one); "
                f"rotate-cert only replaces the generated pair: replace your files instead",
                path=cert_path)
        old_fingerprint = old.fingerprint
        for path in (key_path, cert_path):
            os.replace(path, path + PREVIOUS_SUFFIX)
    elif os.path.exists(cert_path) or os.path.exists(key_path):
        present = cert_path if os.path.exists(cert_path) else key_path
        os.replace(present, present + PREVIOUS_SUFFIX)  # half a pair is no certificate; keep it aside
    info = _generate_pair(cert_path, key_path, list(extra_hosts))
    log.info("tls.cert_rotated", cert_path=cert_path, fingerprint=info.fingerprint,
             previous_fingerprint=old_fingerprint, sans_dns=info.sans_dns, sans_ip=info.sans_ip)
    return info, old_fingerprint


def validate_san_host(text: str) -> str:
    """A host for the certificate's SAN: an IP address, a DNS name, or ``*.`` and a DNS name."""
    host = text.strip() if isinstance(text, str) else ""
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(literal))
    except ValueError:
        pass
    name = host[2:] if host.startswith("*.") else host
    labels = name.rstrip(".").split(".")
    if not name or not name.isascii() or len(name) > 253 or not all(_SAN_LABEL.fullmatch(x) for x in labels):
        raise PortunusError("validation.invalid_san",
                            f"--san {text!r} is not a DNS name or an IP address (no port, scheme or path)")
    return host


def _is_generated(cert_path: str) -> bool:
    """Self-signed with our common name: what _generate_pair writes."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    leaf = x509.load_pem_x509_certificates(_read(cert_path))[0]
    subject = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return leaf.issuer == leaf.subject and [a.value for a in subject] == [CERT_COMMON_NAME]


# ------------------------------------------------------------------ SAN coverage (§3.3)

def san_covers(info_or_cert, host: str) -> bool:
    """Whether the certificate's SAN covers ``host``.

    DNS names compare case-insensitively; ``*.example.com`` covers exactly one
    left-most label; an IP literal needs an IP SAN (a DNS SAN spelling the same
    text does not count). ``info_or_cert`` is a CertInfo, an x509.Certificate or DER bytes.
    """
    if isinstance(info_or_cert, CertInfo):
        dns, ips = info_or_cert.sans_dns, info_or_cert.sans_ip
    elif isinstance(info_or_cert, (bytes, bytearray, memoryview)):
        from cryptography import x509
        dns, ips = _sans_of(x509.load_der_x509_certificate(bytes(info_or_cert)))
    elif _is_x509_certificate(info_or_cert):
        dns, ips = _sans_of(info_or_cert)
    else:
        raise TypeError("san_covers needs a CertInfo, x509.Certificate or DER bytes, "
                        f"got {type(info_or_cert).__name__}")
    if not isinstance(host, str) or not host or host != host.strip():
        return False
    literal = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(literal)
    except ValueError:
        ip = None
    if ip is not None:
        for s in ips:
            try:
                if ipaddress.ip_address(s) == ip:
                    return True
            except ValueError:
                continue
        return False
    name = _dns_norm(host)
    if not name or "*" in name:
        return False
    for san in dns:
        pattern = _dns_norm(san)
        if not pattern:
            continue
        if pattern.startswith("*."):
            suffix = pattern[2:]
            label, dot, rest = name.partition(".")
            if dot and label and rest == suffix and "*" not in suffix:
                return True
        elif pattern == name:
            return True
    return False


def _is_x509_certificate(obj) -> bool:
    from cryptography import x509
    return isinstance(obj, x509.Certificate)


def _dns_norm(name: str) -> str:
    return name.lower().rstrip(".") if isinstance(name, str) else ""


# ------------------------------------------------------------------ contexts

def server_context(info: CertInfo) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(info.cert_path, info.key_path)
    except (ssl.SSLError, OSError) as e:
        raise PortunusError("startup.tls_invalid",
                            f"cannot load {info.cert_path} with {info.key_path}: {e}",
                            path=info.cert_path) from None
    # No session tickets: no client resumes (the agent and `client enroll` pin the leaf on every fresh
    # handshake), so the two TLS 1.3 tickets OpenSSL would mint per connection are work for nothing:
    # ~25 % of the server's CPU per handshake, which a reconnect storm of 1 000 clients pays 1 000 times.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 clients alike
    return ctx


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No CA/hostname check: the caller pins the leaf SHA-256 (pins_match) after the handshake, before any secret.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx

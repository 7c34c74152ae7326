"""Enrollment URI and the client bundle (SPEC §3.2, §3.3).

The URI parser is sans-IO and strict: it accepts exactly
``portunus://HOST:PORT/enroll?pin=sha256:<64hex>&code=<code>`` and names what is
wrong with anything else. The code and the token are secrets: no message, repr
or log line here ever contains them.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import stat

from portunus.control.tls import write_atomic
from portunus.errors import PortunusError
from portunus.log import log

SCHEME = "portunus"
ENROLL_PATH = "/enroll"
PIN_PREFIX = "sha256:"
MAX_URI_LENGTH = 2048
BUNDLE_VERSION = 1
BUNDLE_FILENAME = "client.bundle.json"
BUNDLE_FIELDS = ("version", "client_id", "client_name", "server_endpoint", "server_cert_sha256", "token")

_URI_ERROR = "validation.enrollment_uri_invalid"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HOST_CHARS = re.compile(r"[A-Za-z0-9._-]+")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PORT = re.compile(r"[1-9][0-9]{0,4}")
_CODE_RAW = re.compile(r"(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})+")


def _uri_error(what: str) -> PortunusError:
    return PortunusError(_URI_ERROR, f"invalid enrollment URI: {what}")


# ------------------------------------------------------------------ host:port

def split_endpoint(text: str, error=_uri_error) -> tuple[str, int]:
    """Split a bare ``host:port`` (DNS name or IPv4; never IPv6, §3.3); ``error(what)`` builds the exception.

    The message names what is wrong: whitespace, a scheme, a path, or an IPv6 literal.
    """
    if any(c.isspace() for c in text):
        raise error(f"{text!r} contains whitespace; the host may only contain letters, digits, '-', '.' and '_'")
    scheme, sep, rest = text.partition("://")
    if sep:
        raise error(f"{text!r} has a scheme ({scheme}://); give only HOST:PORT, e.g. {rest.split('/')[0]!r}")
    if "/" in text or "?" in text or "#" in text:
        cut = min(i for i in (text.find("/"), text.find("?"), text.find("#")) if i >= 0)
        raise error(f"{text!r} has a path ({text[cut:]!r}); give only HOST:PORT, e.g. {text[:cut]!r}")
    if text.startswith("[") or text.count(":") > 1:
        raise error(f"IPv6 literal hosts are not supported ({text!r}); the advertised endpoint "
                    "must be a DNS name or an IPv4 address")
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise error(f"missing port in {text!r} (expected HOST:PORT)")
    if not host:
        raise error("missing host (expected HOST:PORT)")
    if not port_text:
        raise error(f"missing port after {host!r}: (expected HOST:PORT)")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise error(f"port {port_text!r} is not a number 1-65535")
    _check_host(host, error)
    return host, int(port_text)


def parse_advertised_endpoint(text) -> tuple[str, int]:
    """An advertised endpoint (seed, override, --advertised-endpoint): ``endpoint_invalid`` naming what is wrong."""
    if not isinstance(text, str):
        raise PortunusError("endpoint_invalid", f"advertised endpoint must be a bare host:port, got {text!r}")
    return split_endpoint(text, lambda what: PortunusError(
        "endpoint_invalid", f"advertised endpoint must be a bare host:port: {what}"))


def seed_san_hosts(seed: str | None) -> list[str]:
    """The seed endpoint's host, for a new certificate's SAN ([] without a seed or when it is not HOST:PORT).

    A bad seed must not stop the certificate from being made: validating it reports what is wrong.
    """
    if not seed:
        return []
    try:
        return [split_endpoint(seed)[0]]
    except PortunusError:
        return []


def _check_host(host: str, error) -> None:
    if not _HOST_CHARS.fullmatch(host):
        raise error(f"host {host!r} may only contain letters, digits, '-', '.' and '_'")
    if all(c.isdigit() or c == "." for c in host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise error(f"host {host!r} is not a valid IPv4 address") from None
        return
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise error(f"host {host!r} is not a valid DNS name")


# ------------------------------------------------------------------ URI

class EnrollmentURI:
    """A parsed enrollment URI; immutable, compared by value, and its repr never shows the code.
    (A plain class: the client and `enroll` need no dataclasses import for it.)"""
    __slots__ = ("host", "port", "fingerprint", "code")

    def __init__(self, host: str, port: int, fingerprint: str, code: str):
        set_ = object.__setattr__
        set_(self, "host", host)
        set_(self, "port", port)
        set_(self, "fingerprint", fingerprint)  # lowercase 64-hex SHA-256 of the server's leaf certificate
        set_(self, "code", code)  # one-time secret

    def __setattr__(self, name, value):
        raise AttributeError(f"cannot assign to field {name!r}")

    def __delattr__(self, name):
        raise AttributeError(f"cannot delete field {name!r}")

    def _key(self) -> tuple:
        return (self.host, self.port, self.fingerprint, self.code)

    def __eq__(self, other):
        return self._key() == other._key() if other.__class__ is self.__class__ else NotImplemented

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"EnrollmentURI(host={self.host!r}, port={self.port!r}, fingerprint={self.fingerprint!r})"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def to_uri(self) -> str:
        return make_uri(self.host, self.port, self.fingerprint, self.code)


def normalize_fingerprint(value: str) -> str:
    """A 64-hex SHA-256 fingerprint, lowercased; an optional ``sha256:`` prefix is dropped."""
    text = value[len(PIN_PREFIX):] if isinstance(value, str) and value.startswith(PIN_PREFIX) else value
    if not isinstance(text, str) or not _HEX64.fullmatch(text):
        raise _uri_error(f"fingerprint {value!r} is not 64 hex digits")
    return text.lower()


def make_uri(host: str, port: int, fingerprint: str, code: str) -> str:
    """``portunus://HOST:PORT/enroll?pin=sha256:<64hex>&code=<code>``."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _uri_error(f"port {port!r} is not a number 1-65535")
    if not isinstance(host, str):
        raise _uri_error(f"host {host!r} is not a string")
    split_endpoint(f"{host}:{port}")
    pin = normalize_fingerprint(fingerprint)
    if not isinstance(code, str) or not code or not _code_ok(code):
        raise _uri_error("code <redacted> must be a non-empty string of printable, non-space characters")
    from urllib.parse import quote  # here: the client's start reads its bundle and never parses a URI
    return f"{SCHEME}://{host}:{port}{ENROLL_PATH}?pin={PIN_PREFIX}{pin}&code={quote(code, safe='-._~')}"


def _code_ok(code: str) -> bool:
    return code.isprintable() and not any(c.isspace() for c in code)


def parse_uri(uri: str) -> EnrollmentURI:
    """Parse an enrollment URI; anything malformed raises validation.enrollment_uri_invalid."""
    if not isinstance(uri, str):
        raise _uri_error(f"expected a string, got {type(uri).__name__}")
    if not uri:
        raise _uri_error("empty")
    if len(uri) > MAX_URI_LENGTH:
        raise _uri_error(f"longer than {MAX_URI_LENGTH} characters")
    if not uri.isascii() or any(c.isspace() or not c.isprintable() for c in uri):
        raise _uri_error("contains whitespace, control or non-ASCII characters (copy the URI exactly)")
    scheme, sep, rest = uri.partition("://")
    if not sep:
        raise _uri_error(f"missing scheme (expected {SCHEME}://HOST:PORT{ENROLL_PATH}?pin=...&code=...)")
    if scheme.lower() != SCHEME:
        shown = scheme if len(scheme) <= 32 and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) else "<other>"
        raise _uri_error(f"scheme must be {SCHEME}://, got {shown}://")
    if "#" in rest:
        raise _uri_error("unexpected fragment ('#...')")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, rest = rest[:cut], rest[cut:]
    if "@" in authority:
        raise _uri_error("user info ('...@') is not allowed before the host")
    host, port = split_endpoint(authority)
    path, qmark, query = rest.partition("?")
    if path != ENROLL_PATH:
        shown = path if len(path) <= 64 else path[:64] + "..."
        raise _uri_error(f"path must be {ENROLL_PATH}, got {shown!r}")
    if not qmark or not query:
        raise _uri_error("missing query (expected ?pin=sha256:<64 hex>&code=<code>)")
    params: dict[str, str] = {}
    for i, part in enumerate(query.split("&"), 1):
        name, eq, value = part.partition("=")
        if not eq:
            # the segment may be the pasted code itself: never echo it
            raise _uri_error(f"query parameter #{i} has no '=' (expected name=value)")
        if name not in ("pin", "code"):
            shown = name if re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name) else "<other>"
            raise _uri_error(f"unexpected query parameter {shown!r} (only pin and code are allowed)")
        if name in params:
            raise _uri_error(f"query parameter {name!r} appears more than once")
        params[name] = value
    pin = params.get("pin", "")
    if not pin:
        raise _uri_error("missing pin (expected pin=sha256:<64 hex>)")
    if not pin.startswith(PIN_PREFIX) or not _HEX64.fullmatch(pin[len(PIN_PREFIX):]):
        shown = pin if len(pin) <= 80 else pin[:80] + "..."
        raise _uri_error(f"pin must be sha256:<64 hex digits>, got {shown!r}")
    raw_code = params.get("code", "")
    if not raw_code:
        raise _uri_error("missing code (expected code=<one-time code>)")
    if not _CODE_RAW.fullmatch(raw_code):
        raise _uri_error("code <redacted> contains characters that are not allowed in a URI")
    from urllib.parse import unquote
    try:
        code = unquote(raw_code, errors="strict")
    except UnicodeDecodeError:
        raise _uri_error("code <redacted> is not valid percent-encoded UTF-8") from None
    if not _code_ok(code):
        raise _uri_error("code <redacted> decodes to whitespace or control characters")
    return EnrollmentURI(host=host, port=port, fingerprint=pin[len(PIN_PREFIX):].lower(), code=code)


def enroll_command(uri) -> str:
    """The command an operator pastes on the edge host, with the URI single-quoted for any POSIX shell."""
    text = uri.to_uri() if isinstance(uri, EnrollmentURI) else str(uri)
    return "portunus-client enroll '" + text.replace("'", "'\"'\"'") + "'"


# ------------------------------------------------------------------ bundle

def _bundle_error(path: str, what: str) -> PortunusError:
    return PortunusError("bundle_invalid", f"client bundle {path}: {what}", path=path)


def _validate_bundle(data, path: str) -> dict:
    """The bundle's fields in canonical order; raises bundle_invalid naming the first bad field."""
    if not isinstance(data, dict):
        raise _bundle_error(path, f"expected a JSON object, got {type(data).__name__}")
    missing = [k for k in BUNDLE_FIELDS if k not in data]
    if missing:
        raise _bundle_error(path, "missing field(s) " + ", ".join(missing))
    version = data["version"]
    if type(version) is not int or version != BUNDLE_VERSION:
        shown = version if isinstance(version, (int, float, str)) and len(str(version)) <= 16 else "<other>"
        raise _bundle_error(path, f"field 'version' must be {BUNDLE_VERSION}, got {shown!r}")
    out = {"version": BUNDLE_VERSION}
    for name in ("client_id", "client_name"):
        value = data[name]
        if not isinstance(value, str) or not value.strip():
            raise _bundle_error(path, f"field {name!r} must be a non-empty string")
        out[name] = value
    if any(c.isspace() or not c.isprintable() for c in out["client_id"]):
        raise _bundle_error(path, f"field 'client_id' {out['client_id']!r} contains whitespace or control characters")
    endpoint = data["server_endpoint"]
    if not isinstance(endpoint, str):
        raise _bundle_error(path, "field 'server_endpoint' must be a HOST:PORT string")
    split_endpoint(endpoint, lambda what: _bundle_error(path, f"field 'server_endpoint': {what}"))
    out["server_endpoint"] = endpoint
    pin = data["server_cert_sha256"]
    if not isinstance(pin, str) or not _HEX64.fullmatch(pin):
        raise _bundle_error(path, "field 'server_cert_sha256' must be 64 hex digits")
    out["server_cert_sha256"] = pin.lower()
    token = data["token"]
    if not isinstance(token, str) or not token or any(c.isspace() or not c.isprintable() for c in token):
        raise _bundle_error(path, "field 'token' must be a non-empty string without whitespace (value not shown)")
    out["token"] = token
    return out


def write_bundle(path: str, bundle: dict) -> None:
    """Write the bundle as JSON, mode 0600, atomically; missing parent dirs are created 0700."""
    if isinstance(bundle, dict) and "version" not in bundle:
        bundle = {"version": BUNDLE_VERSION, **bundle}
    data = _validate_bundle(bundle, path)
    _make_private_dirs(os.path.dirname(os.path.abspath(path)))
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, text.encode("utf-8"), 0o600)


def _make_private_dirs(directory: str) -> None:
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            continue
        os.chmod(d, 0o700)  # the umask must not loosen a dir that will hold a token


def read_bundle(path: str) -> dict:
    """Read and validate a bundle; returns its fields in canonical order (token included, never logged)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
            mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    except FileNotFoundError:
        raise PortunusError("bundle_not_found", f"client bundle {path} does not exist",
                            path=path, tried=[path]) from None
    except IsADirectoryError:
        raise _bundle_error(path, "is a directory, not a bundle file") from None
    except OSError as e:
        raise _bundle_error(path, f"cannot read: {e.strerror}") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise _bundle_error(path, "is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        # e.msg and the position only: the document itself holds the token
        raise _bundle_error(path, f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise _bundle_error(path, "is not a bundle: its JSON is nested too deeply") from None
    bundle = _validate_bundle(data, path)
    if mode & 0o077:
        log.warn("bundle.permissions_loose", path=path, mode=f"{mode:04o}",
                 hint=f"chmod 600 {path}: the bundle holds the client's credential")
    return bundle


def default_bundle_path(env=os.environ) -> str:
    """Where ``enroll`` writes the bundle without ``--out``."""
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "portunus", BUNDLE_FILENAME)
    return os.path.join(_home(env), ".config", "portunus", BUNDLE_FILENAME)


def _home(env) -> str:
    home = env.get("HOME", "")
    return home or os.path.expanduser("~")


def bundle_search_paths(env=os.environ) -> list[str]:
    """§3.2 lookup order; unset variables are skipped and duplicates dropped."""
    paths = []
    explicit = env.get("PORTUNUS_CLIENT_BUNDLE", "")
    if explicit:
        paths.append(explicit)
    xdg = env.get("XDG_CONFIG_HOME", "")
    if xdg and os.path.isabs(xdg):  # the XDG spec says a relative value is ignored
        paths.append(os.path.join(xdg, "portunus", BUNDLE_FILENAME))
    home = _home(env)
    if home and not home.startswith("~"):
        paths.append(os.path.join(home, ".config", "portunus", BUNDLE_FILENAME))
    paths.append(os.path.join(".", BUNDLE_FILENAME))
    out = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def find_bundle(explicit: str | None, env=os.environ) -> str:
    """The bundle to use: ``--bundle PATH`` if given (it must exist), else the first existing search path."""
    if explicit:
        if os.path.isfile(explicit):
            return explicit
        why = "is not a file" if os.path.exists(explicit) else "does not exist"
        raise PortunusError("bundle_not_found", f"client bundle {explicit} {why}",
                            path=explicit, tried=[explicit])
    tried = bundle_search_paths(env)
    for p in tried:
        if os.path.isfile(p):
            return p
    raise PortunusError(
        "bundle_not_found",
        "no client bundle found; tried " + ", ".join(tried)
        + " (enroll with `portunus-client enroll URI`, or pass --bundle PATH)",
        tried=tried)

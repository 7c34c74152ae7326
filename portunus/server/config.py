"""server.toml: defaults, strict validation, and the data dir (SPEC §4.1)."""

from __future__ import annotations

import ipaddress
import os
import reprlib
import tomllib
from dataclasses import dataclass, field

from ..errors import PortunusError

DEFAULTS = {
    "control_listen": "0.0.0.0:7443",
    "operator_http_listen": "127.0.0.1:7080",
    "operator_http_public_origin": None,
    "metrics_listen": "127.0.0.1:7081",
    "tls_cert_path": None,
    "tls_key_path": None,
    "operator_token": None,
    "shutdown_drain_timeout_secs": 30,
    "log_format": "json",
    "range_rule_max_ports": 1024,
    "udp_flow_idle_secs": 60,
    "udp_max_flows_per_rule": 1024,
    "stats_report_interval_secs": 5,
    "enrollment_ttl_secs": 600,
}
_BOUNDS = {
    "shutdown_drain_timeout_secs": (0, 3600),
    "range_rule_max_ports": (1, 65535),
    "udp_flow_idle_secs": (30, 300),
    "udp_max_flows_per_rule": (1, 65535),
    "stats_report_interval_secs": (1, 3600),
    "enrollment_ttl_secs": (1, 86400),
}


def default_data_dir(env=os.environ) -> str:
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "portunus")


# No Portunus config needs more than a few levels; tomllib recurses per level and
# dies with RecursionError a few hundred levels down, so deeper documents are refused up front.
MAX_TOML_DEPTH = 32


def parse_toml(raw: bytes, path: str) -> dict:
    """TOML bytes -> dict; every failure is ``config_invalid`` naming the file (and the key if it is too deep)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PortunusError("config_invalid", f"{path}: not UTF-8 text (byte {exc.start})") from None
    too_deep = _too_deep(text)
    if too_deep is not None:
        line, key = too_deep
        raise PortunusError("config_invalid", f"{path}: line {line}: {key} is nested more than "
                                              f"{MAX_TOML_DEPTH} levels deep")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PortunusError("config_invalid", f"{path}: TOML syntax error: {exc}") from None
    except RecursionError:  # the scan above is a heuristic; this is the guarantee
        raise PortunusError("config_invalid", f"{path}: values nested too deeply") from None
    deep_key = _deep_key(doc)  # dotted keys and table headers nest without brackets
    if deep_key is not None:
        raise PortunusError("config_invalid", f"{path}: key {deep_key!r} is nested more than "
                                              f"{MAX_TOML_DEPTH} levels deep")
    return doc


def _deep_key(doc: dict) -> str | None:
    """The (shortened) key path of a value deeper than MAX_TOML_DEPTH in a parsed document, else None."""
    stack = [(doc, ())]
    while stack:
        value, keys = stack.pop()
        if len(keys) > MAX_TOML_DEPTH:
            return "".join(k if k.startswith("[") or i == 0 else "." + k for i, k in enumerate(keys[:6])) + ".…"
        if isinstance(value, dict):
            stack.extend((v, keys + (str(k),)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, keys + (f"[{i}]",)) for i, v in enumerate(value))
    return None


_SHOWN = reprlib.Repr()
_SHOWN.maxstring = _SHOWN.maxother = 80


def shown(value) -> str:
    """``repr`` for error messages: bounded in length and depth, whatever a config file holds."""
    return _SHOWN.repr(value)


def _too_deep(text: str) -> tuple[int, str] | None:
    """(line, key description) of the first value nested deeper than MAX_TOML_DEPTH, else None.

    Counts ``[``/``{`` outside strings and comments; keys are named as ``[table] key``.
    """
    depth, line, i, n = 0, 1, 0, len(text)
    table, key, line_start = "", "a value", 0
    while i < n:
        c = text[i]
        if c == "\n":
            line, line_start = line + 1, i + 1
        elif c == "#":
            i = text.find("\n", i)
            i = n if i < 0 else i
            continue
        elif c in "\"'":
            end = _skip_string(text, i)
            newlines = text.count("\n", i, end)
            if newlines:
                line, line_start = line + newlines, text.rfind("\n", i, end) + 1
            i = end
            continue
        elif c in "[{":
            if depth == 0 and c == "[" and not text[line_start:i].strip():
                end = text.find("\n", i)
                table = text[i:n if end < 0 else end].split("#")[0].strip()
            depth += 1
            if depth > MAX_TOML_DEPTH:
                return line, f"{table} {key}".strip()
        elif c in "]}":
            depth = max(depth - 1, 0)
        elif c == "=" and depth == 0:
            key = repr(text[line_start:i].strip())
        i += 1
    return None


def _skip_string(text: str, i: int) -> int:
    """Index just past the TOML string starting at ``text[i]`` (basic, literal, or multi-line)."""
    q = text[i]
    if text.startswith(q * 3, i):
        end = i + 3
        while True:
            end = text.find(q * 3, end)
            if end < 0:
                return len(text)
            if q == '"' and _escaped(text, end):
                end += 1
                continue
            end += 3
            for _ in range(2):  # the content may end in up to two quotes: """a""""" is 'a""'
                if end < len(text) and text[end] == q:
                    end += 1
            return end
    j = i + 1
    while j < len(text) and text[j] != "\n":
        if text[j] == "\\" and q == '"':
            j += 2
            continue
        if text[j] == q:
            return j + 1
        j += 1
    return j


def _escaped(text: str, pos: int) -> bool:
    backslashes = 0
    while pos - backslashes - 1 >= 0 and text[pos - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def parse_listen(value, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise PortunusError("config_invalid", f"{key} must look like host:port, got {shown(value)}")
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise PortunusError("config_invalid", f"{key} host must be an IP address, got {shown(host)}") from None
        host = "127.0.0.1"
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise PortunusError("config_invalid", f"{key} port must be 0-65535, got {shown(port)}")
    return host, int(port)


@dataclass
class ServerConfig:
    data_dir: str
    values: dict = field(default_factory=dict)

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    @property
    def cert_path(self) -> str:
        return self.values["tls_cert_path"] or os.path.join(self.data_dir, "server.crt")

    @property
    def key_path(self) -> str:
        return self.values["tls_key_path"] or os.path.join(self.data_dir, "server.key")

    @property
    def control_addr(self) -> tuple[str, int]:
        return parse_listen(self.values["control_listen"], "control_listen")

    @property
    def http_addr(self) -> tuple[str, int]:
        return parse_listen(self.values["operator_http_listen"], "operator_http_listen")

    @property
    def metrics_addr(self) -> tuple[str, int]:
        return parse_listen(self.values["metrics_listen"], "metrics_listen")

    @property
    def public_origin(self) -> str:
        if self.values["operator_http_public_origin"]:
            return self.values["operator_http_public_origin"].rstrip("/")
        host, port = self.http_addr
        return f"http://{host}:{port}"


def load(data_dir: str) -> ServerConfig:
    path = os.path.join(data_dir, "server.toml")
    values = dict(DEFAULTS)
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise PortunusError("config_invalid", f"{path}: cannot read: {exc.strerror}") from None
        doc = parse_toml(raw, path)
        unknown = sorted(set(doc) - set(DEFAULTS))
        if unknown:
            raise PortunusError("config_invalid", f"{path}: unknown key(s) {', '.join(unknown)} "
                                                  f"(see server.toml.example)")
        for key, value in doc.items():
            values[key] = _check(path, key, value)
    cfg = ServerConfig(data_dir=data_dir, values=values)
    for key in ("control_listen", "operator_http_listen", "metrics_listen"):
        parse_listen(values[key], f"{path}: {key}")
    return cfg


def _check(path: str, key: str, value):
    if key in _BOUNDS:
        lo, hi = _BOUNDS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise PortunusError("config_invalid", f"{path}: {key} must be an integer {lo}..{hi}, got {shown(value)}")
        return value
    if key == "log_format":
        if value not in ("json", "compact"):
            raise PortunusError("config_invalid", f"{path}: log_format must be json or compact, got {shown(value)}")
        return value
    if key == "operator_token":
        if not isinstance(value, str) or len(value) < 32:
            raise PortunusError("config_invalid", f"{path}: operator_token must be a string of at least 32 chars "
                                                  "(generate one with `portunus-server gen-token`)")
        return value
    if key == "operator_http_public_origin":
        if not isinstance(value, str) or not value.startswith(("http://", "https://")) or \
                value.rstrip("/").count("/") > 2:
            raise PortunusError("config_invalid", f"{path}: operator_http_public_origin must be an origin like "
                                                  f"https://portunus.example.com, got {shown(value)}")
        return value
    if not isinstance(value, str):
        raise PortunusError("config_invalid", f"{path}: {key} must be a string, got {shown(value)}")
    return value

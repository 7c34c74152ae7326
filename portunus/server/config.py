"""server.toml: defaults, strict validation, and the data dir (SPEC §4.1)."""

from __future__ import annotations

import ipaddress
import os
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


def parse_listen(value, key: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    if not isinstance(value, str) or ":" not in value:
        raise PortunusError("config_invalid", f"{key} must look like host:port, got {value!r}")
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise PortunusError("config_invalid", f"{key} host must be an IP address, got {host!r}") from None
        host = "127.0.0.1"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise PortunusError("config_invalid", f"{key} port must be 0-65535, got {port!r}")
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
                doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise PortunusError("config_invalid", f"{path}: TOML syntax error: {exc}") from None
        except OSError as exc:
            raise PortunusError("config_invalid", f"{path}: cannot read: {exc.strerror}") from None
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
            raise PortunusError("config_invalid", f"{path}: {key} must be an integer {lo}..{hi}, got {value!r}")
        return value
    if key == "log_format":
        if value not in ("json", "compact"):
            raise PortunusError("config_invalid", f"{path}: log_format must be json or compact, got {value!r}")
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
                                                  f"https://portunus.example.com, got {value!r}")
        return value
    if not isinstance(value, str):
        raise PortunusError("config_invalid", f"{path}: {key} must be a string, got {value!r}")
    return value

"""Standalone TOML config -> validated rules and settings (SPEC §7.4).

Unknown tables and fields are errors; every error names the file, the rule and
the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import PortunusError
from ..model import Rule, UDP_FLOW_IDLE_BOUNDS, UDP_MAX_FLOWS_BOUNDS, port_conflict
from ..server.config import parse_toml, shown

LOG_FORMATS = ("json", "compact")        # the one vocabulary of every role (SPEC §4.1)
LOG_FORMAT_ALIASES = {"pretty": "compact"}  # standalone's older name, still accepted
LOG_LEVELS = ("debug", "info", "warn", "error")

_TOP = {"global", "defaults", "rule", "stats"}
_GLOBAL = {"label", "log_level", "log_format", "shutdown_drain_secs", "dns_servers"}
_DEFAULTS = {"protocol", "udp_max_flows", "udp_flow_idle_secs", "prefer_ipv6"}
_STATS = {"socket_path", "refresh_ms"}
_RULE = {"name", "protocol", "listen_port", "listen_ports", "listen_host", "target", "targets",
         "prefer_ipv6", "udp_max_flows", "udp_flow_idle_secs", "sni_pattern", "rate_limit"}
_TARGET = {"host", "port", "priority", "proxy_protocol"}


@dataclass
class StandaloneConfig:
    path: str
    label: str = "portunus"
    log_level: str = "info"
    log_format: str = "json"
    shutdown_drain_secs: float = 30.0
    udp_max_flows: int = 1024
    udp_flow_idle_secs: int = 60
    stats_socket_path: str | None = None
    stats_refresh_ms: int = 1000
    dns_servers: list = field(default_factory=list)  # [(ip, port)]; empty = /etc/resolv.conf
    rules: list[Rule] = field(default_factory=list)


def log_format_name(value) -> str | None:
    """The canonical log format for ``value`` (``pretty`` -> ``compact``), or None if it is not one."""
    if not isinstance(value, str):
        return None
    value = LOG_FORMAT_ALIASES.get(value, value)
    return value if value in LOG_FORMATS else None


def _err(path: str, where: str, message: str) -> PortunusError:
    return PortunusError("config_invalid", f"{path}: {where}: {message}")


def _unknown(path: str, where: str, table: dict, allowed: set) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise _err(path, where, f"unknown field(s) {', '.join(repr(e) for e in extra)} "
                                f"(allowed: {', '.join(sorted(allowed))})")


def _table(path: str, doc: dict, name: str) -> dict:
    t = doc.get(name, {})
    if not isinstance(t, dict):
        raise _err(path, f"[{name}]", "must be a table")
    return t


def _int(path: str, where: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _err(path, where, f"must be an integer {lo}..{hi}, got {shown(value)}")
    return value


def load(path: str) -> StandaloneConfig:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise PortunusError("config_invalid", f"{path}: no such file (pass --config PATH)") from None
    except OSError as exc:
        raise PortunusError("config_invalid", f"{path}: cannot read: {exc.strerror}") from None
    return parse(parse_toml(raw, path), path)


def parse(doc: dict, path: str = "<config>") -> StandaloneConfig:
    _unknown(path, "top level", doc, _TOP)
    cfg = StandaloneConfig(path=path)
    _parse_global(path, _table(path, doc, "global"), cfg)
    default_protocol, default_v6 = _parse_defaults(path, _table(path, doc, "defaults"), cfg)
    _parse_stats(path, _table(path, doc, "stats"), cfg)
    rules = doc.get("rule", [])
    if not isinstance(rules, list):
        raise _err(path, "rule", "use [[rule]] (an array of tables)")
    if not rules:
        raise _err(path, "[[rule]]", "no rules: add at least one [[rule]] table")
    names: set[str] = set()
    for i, r in enumerate(rules):
        cfg.rules.append(_parse_rule(path, i, r, names, default_protocol, default_v6))
    _check_overlaps(path, cfg.rules)
    return cfg


def _parse_global(path: str, g: dict, cfg: StandaloneConfig) -> None:
    _unknown(path, "[global]", g, _GLOBAL)
    if "label" in g:
        if not isinstance(g["label"], str):
            raise _err(path, "[global] label", f"must be a string, got {shown(g['label'])}")
        cfg.label = g["label"]
    if "log_level" in g:
        if g["log_level"] not in LOG_LEVELS:
            raise _err(path, "[global] log_level",
                       f"must be one of {', '.join(LOG_LEVELS)}, got {shown(g['log_level'])}")
        cfg.log_level = g["log_level"]
    if "log_format" in g:
        fmt = log_format_name(g["log_format"])
        if fmt is None:
            raise _err(path, "[global] log_format", f"must be one of {', '.join(LOG_FORMATS)} "
                                                    f"(pretty is an alias of compact), got {shown(g['log_format'])}")
        cfg.log_format = fmt
    if "shutdown_drain_secs" in g:
        v = g["shutdown_drain_secs"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 3600:
            raise _err(path, "[global] shutdown_drain_secs", f"must be a number 0..3600, got {shown(v)}")
        cfg.shutdown_drain_secs = float(v)

    if "dns_servers" in g:
        v = g["dns_servers"]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise _err(path, "[global] dns_servers", f"must be a list of \"ip[:port]\" strings, got {shown(v)}")
        from ..relay.resolver import parse_servers
        try:
            cfg.dns_servers = parse_servers(v)
        except PortunusError as exc:
            raise _err(path, "[global] dns_servers", exc.message) from None


def _parse_defaults(path: str, d: dict, cfg: StandaloneConfig) -> tuple[str, bool]:
    """[defaults]: the UDP settings go on ``cfg``; the protocol and prefer_ipv6 every rule starts from."""
    _unknown(path, "[defaults]", d, _DEFAULTS)
    default_protocol = d.get("protocol", "tcp")
    if default_protocol not in ("tcp", "udp"):
        raise _err(path, "[defaults] protocol", f"must be \"tcp\" or \"udp\", got {shown(default_protocol)}")
    if "udp_max_flows" in d:
        cfg.udp_max_flows = _int(path, "[defaults] udp_max_flows", d["udp_max_flows"], *UDP_MAX_FLOWS_BOUNDS)
    if "udp_flow_idle_secs" in d:
        cfg.udp_flow_idle_secs = _int(path, "[defaults] udp_flow_idle_secs", d["udp_flow_idle_secs"],
                                      *UDP_FLOW_IDLE_BOUNDS)
    default_v6 = d.get("prefer_ipv6", False)
    if not isinstance(default_v6, bool):
        raise _err(path, "[defaults] prefer_ipv6", f"must be true or false, got {shown(default_v6)}")
    return default_protocol, default_v6


def _parse_stats(path: str, s: dict, cfg: StandaloneConfig) -> None:
    _unknown(path, "[stats]", s, _STATS)
    if "socket_path" in s:
        if not isinstance(s["socket_path"], str) or not s["socket_path"]:
            raise _err(path, "[stats] socket_path", f"must be a file path, got {shown(s['socket_path'])}")
        cfg.stats_socket_path = s["socket_path"]
    if "refresh_ms" in s:
        cfg.stats_refresh_ms = _int(path, "[stats] refresh_ms", s["refresh_ms"], 100, 60000)


def _parse_rule(path: str, i: int, r, names: set[str], default_protocol: str, default_v6: bool) -> Rule:
    """One [[rule]] table -> Rule, validated by model like the API's (messages name the rule)."""
    where = f"[[rule]] #{i + 1}"
    if not isinstance(r, dict):
        raise _err(path, where, "must be a table")
    if isinstance(r.get("name"), str):
        where = f"[[rule]] #{i + 1} ({shown(r['name'])})"
    _unknown(path, where, r, _RULE)
    name = r.get("name")
    if not isinstance(name, str) or not name:
        raise _err(path, where, "needs a name = \"...\"")
    if name in names:
        raise _err(path, where, f"duplicate rule name {shown(name)}")
    names.add(name)
    if "listen_port" in r and "listen_ports" in r:
        raise _err(path, where, "give listen_port or listen_ports, not both")
    if "listen_port" not in r and "listen_ports" not in r:
        raise _err(path, where, "needs listen_port = N or listen_ports = \"a-b\"")
    targets = r.get("targets")
    if targets is not None:
        if not isinstance(targets, list):
            raise _err(path, f"{where} targets", "must be an array of {host, port, ...} tables")
        for j, t in enumerate(targets):
            if isinstance(t, dict):
                _unknown(path, f"{where} targets[{j}]", t, _TARGET)
    if "rate_limit" in r and not isinstance(r["rate_limit"], dict):
        raise _err(path, f"{where} rate_limit", "must be a [rule.rate_limit] table of caps")
    spec = {
        "rule_id": name,
        "protocol": r.get("protocol", default_protocol),
        "listen_port": r.get("listen_port"),
        "listen": r.get("listen_ports"),
        "listen_host": r.get("listen_host"),
        "target": r.get("target"),
        "targets": targets,
        "prefer_ipv6": r.get("prefer_ipv6", default_v6),
        "udp_max_flows": r.get("udp_max_flows"),
        "udp_flow_idle_secs": r.get("udp_flow_idle_secs"),
        "sni_pattern": r.get("sni_pattern"),
        "rate_limit": r.get("rate_limit"),  # validated by model.RateLimit like the API's
    }
    try:
        rule = Rule.from_dict({k: v for k, v in spec.items() if v is not None},
                              max_range_ports=65535, allow_health_check=False)
    except PortunusError as exc:
        detail = f"{exc.code}: {exc.message}" if exc.code.startswith("validation.rate_limit") else exc.message
        raise _err(path, where, detail) from None
    return rule


def _check_overlaps(path: str, rules: list[Rule]) -> None:
    """The server's port rules (SPEC §2.8), in file order: the first rule on a TCP port sets its mode.

    Two rules may not listen on one (protocol, port) unless their listen hosts differ,
    except on an SNI port: distinct patterns and one plain fallback share it.
    """
    for i, rule in enumerate(rules):
        error = port_conflict(rule, ((other, True) for other in rules[:i]))
        if error is None:
            continue
        where = f"[[rule]] {rule.rule_id!r}"
        if error.code == "port_in_use":
            raise _err(path, where, f"{rule.protocol} port {error.fields['port']} is also used by rule "
                                    f"{error.fields['rule_id']!r}")
        raise _err(path, where, f"{error.code}: {error.message.replace(' on this client', '')}")

"""Rules, targets and port ranges: parsing and validation in one place (rate limits: ``ratelimit``).

Server, client and standalone all build rules through ``Rule.from_dict``; every
refusal is a ``PortunusError`` whose code is stable and whose message names the
offending value.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, replace

from .errors import PortunusError
from .ratelimit import CAP_MAX, RateLimit, burst_bounds  # noqa: F401 -- re-exported: rules and every role import them from here

PROTOCOLS = ("tcp", "udp")
PROXY_PROTOCOLS = ("v1", "v2")
MAX_TARGETS = 8
DEFAULT_RANGE_MAX_PORTS = 1024
UDP_MAX_FLOWS_BOUNDS = (1, 65535)
UDP_FLOW_IDLE_BOUNDS = (30, 300)
HEALTH_CHECK_BOUNDS = (1, 3600)

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# ASCII digits only: str.isdigit() also accepts "²", which int() then refuses with ValueError
_DECIMAL = re.compile(r"[0-9]+")


def _bad(code: str, message: str, **fields) -> PortunusError:
    return PortunusError(code, message, **fields)


# ---------------------------------------------------------------- primitives

def parse_port(value, what: str = "port") -> int:
    """A TCP/UDP port 1..65535 given as int or decimal string."""
    if isinstance(value, bool):
        raise _bad("validation.invalid_port", f"{what} must be a number 1-65535, got {value!r}")
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = int(value.strip())
    if not isinstance(value, int) or not 1 <= value <= 65535:
        raise _bad("validation.invalid_port", f"{what} must be a number 1-65535, got {value!r}")
    return value


def parse_port_span(value, what: str = "listen port") -> tuple[int, int]:
    """``8080``, ``"8080"`` or ``"30000-30050"`` -> (start, end), inclusive."""
    if isinstance(value, str) and "-" in value:
        left, _, right = value.partition("-")
        start = parse_port(left, what)
        end = parse_port(right, what)
        if end < start:
            raise _bad("validation.invalid_port_range",
                       f"{what} range {value!r} ends before it starts")
        return start, end
    port = parse_port(value, what)
    return port, port


def validate_host(host, what: str = "target host") -> str:
    """An IP literal (v4 or v6) or a DNS name."""
    if not isinstance(host, str) or not host.strip():
        raise _bad("validation.invalid_target", f"{what} must be a non-empty string, got {host!r}")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOSTNAME_LABEL.fullmatch(lbl) for lbl in name.split(".")):
        raise _bad("validation.invalid_target", f"{what} {host!r} is neither an IP address nor a DNS name")
    return name.lower()


@functools.lru_cache(maxsize=4096)  # asked once per new connection: parse each host once
def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def split_host_port(text, what: str = "target") -> tuple[str, str]:
    """``host:port``, ``host:a-b`` or ``[v6]:port`` -> (host, port-part)."""
    if not isinstance(text, str) or not text.strip():
        raise _bad("validation.invalid_target", f"{what} must look like host:port, got {text!r}")
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or end + 1 >= len(text) or text[end + 1] != ":":
            raise _bad("validation.invalid_target", f"{what} {text!r} must look like [v6addr]:port")
        return text[1:end], text[end + 2:]
    host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host:
        raise _bad("validation.invalid_target",
                   f"{what} {text!r} must look like host:port (IPv6 as [addr]:port)")
    return host, port


# ---------------------------------------------------------------- targets

@dataclass(frozen=True)
class Target:
    host: str
    port: int
    port_end: int | None = None  # set only on a range rule's single target
    priority: int = 1
    proxy_protocol: str | None = None

    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        ports = f"{self.port}-{self.port_end}" if self.port_end and self.port_end != self.port else str(self.port)
        return f"{host}:{ports}"

    def to_dict(self) -> dict:
        d = {"host": self.host, "port": self.port, "priority": self.priority,
             "proxy_protocol": self.proxy_protocol}
        if self.port_end is not None and self.port_end != self.port:
            d["port_end"] = self.port_end
        return d


def parse_target_text(text, what: str = "target") -> Target:
    host, port_part = split_host_port(text, what)
    host = validate_host(host, f"{what} host")
    start, end = parse_port_span(port_part, f"{what} port")
    return Target(host=host, port=start, port_end=end if end != start else None)


def parse_target_spec(text, index: int = 0, what: str | None = None) -> Target:
    """``host:port``, ``host:a-b`` or ``[v6]:port``, optionally ``@priority`` -> Target.

    Without ``@priority`` a target's priority is its list position + 1 (the first is preferred).
    """
    what = what or f"targets[{index}]"
    prio = ""
    if isinstance(text, str):
        text, _, prio = text.partition("@")
    t = parse_target_text(text, what)
    priority = _int_in(prio, f"{what} priority", 0, 65535) if prio else index + 1
    return replace(t, priority=priority)


def parse_target(obj, index: int) -> Target:
    """One entry of a rule's ``targets``: a ``host:port[@priority]`` string or an object."""
    what = f"targets[{index}]"
    if isinstance(obj, str):
        return parse_target_spec(obj, index, what)
    if not isinstance(obj, dict):
        raise _bad("validation.invalid_target", f"{what} must be an object with host and port, got {obj!r}")
    # port_end: a range rule's target as Target.to_dict() writes it
    unknown = set(obj) - {"host", "port", "port_end", "priority", "proxy_protocol"}
    if unknown:
        raise _bad("validation.unknown_field", f"{what} has unknown field(s): {', '.join(sorted(unknown))}")
    if "host" not in obj or "port" not in obj:
        raise _bad("validation.invalid_target", f"{what} needs both host and port")
    host = validate_host(obj["host"], f"{what} host")
    port = parse_port(obj["port"], f"{what} port")
    port_end = None
    if obj.get("port_end") is not None:
        port_end = parse_port(obj["port_end"], f"{what} port_end")
        if port_end < port:
            raise _bad("validation.invalid_port_range", f"{what} port_end {port_end} is below port {port}")
        if port_end == port:
            port_end = None
    priority = obj.get("priority")
    priority = index + 1 if priority is None else _int_in(priority, f"{what} priority", 0, 65535)
    pp = obj.get("proxy_protocol")
    if pp is not None and pp not in PROXY_PROTOCOLS:
        raise _bad("validation.proxy_protocol_invalid",
                   f"{what} proxy_protocol must be \"v1\" or \"v2\", got {pp!r}")
    return Target(host=host, port=port, port_end=port_end, priority=priority, proxy_protocol=pp)


def _int_in(value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip().removeprefix("-")):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad("validation.out_of_range", f"{what} must be an integer {lo}..{hi}, got {value!r}")
    return value


# ---------------------------------------------------------------- SNI pattern

def validate_sni_pattern(p) -> str:
    if not isinstance(p, str) or not p or len(p) > 253 or not p.isascii():
        raise _bad("validation.sni_pattern_malformed", f"sni_pattern must be an ASCII host of at most 253 chars, got {p!r}")
    p = p.lower()
    labels = p.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise _bad("validation.sni_pattern_malformed", f"wildcard sni_pattern {p!r} needs at least two labels after '*.'")
    if not all(_HOSTNAME_LABEL.fullmatch(lbl) for lbl in labels):
        raise _bad("validation.sni_pattern_malformed", f"sni_pattern {p!r} is not a host name or '*.domain'")
    return p


# ---------------------------------------------------------------- rules

_RULE_FIELDS = {
    "rule_id", "id", "protocol", "listen_port", "listen_port_end", "listen", "listen_host",
    "target", "targets", "prefer_ipv6", "sni_pattern", "rate_limit",
    "health_check_interval_secs", "owner", "udp_max_flows", "udp_flow_idle_secs",
}


@dataclass(frozen=True)
class Rule:
    rule_id: str
    protocol: str
    listen_port: int
    listen_port_end: int
    targets: tuple[Target, ...]
    listen_host: str = "0.0.0.0"
    prefer_ipv6: bool = False
    sni_pattern: str | None = None
    rate_limit: RateLimit | None = None
    health_check_interval_secs: int | None = None
    owner: str | None = None
    udp_max_flows: int | None = None
    udp_flow_idle_secs: int | None = None

    @property
    def port_count(self) -> int:
        return self.listen_port_end - self.listen_port + 1

    @property
    def is_range(self) -> bool:
        return self.listen_port_end != self.listen_port

    @property
    def listen_ports(self) -> range:
        return range(self.listen_port, self.listen_port_end + 1)

    @property
    def is_multi_target(self) -> bool:
        return len(self.targets) > 1

    @property
    def listen_label(self) -> str:
        return f"{self.listen_port}-{self.listen_port_end}" if self.is_range else str(self.listen_port)

    def ordered_targets(self) -> list[tuple[int, Target]]:
        """(index, target) by priority, ties in list order."""
        return sorted(enumerate(self.targets), key=lambda it: (it[1].priority, it[0]))

    def to_dict(self) -> dict:
        return {
            "rule_id": self.rule_id,
            "protocol": self.protocol,
            "listen_port": self.listen_port,
            "listen_port_end": self.listen_port_end,
            "listen_host": self.listen_host,
            "targets": [t.to_dict() for t in self.targets],
            "prefer_ipv6": self.prefer_ipv6,
            "sni_pattern": self.sni_pattern,
            "rate_limit": self.rate_limit.to_dict() if self.rate_limit else None,
            "health_check_interval_secs": self.health_check_interval_secs,
            "owner": self.owner,
            "udp_max_flows": self.udp_max_flows,
            "udp_flow_idle_secs": self.udp_flow_idle_secs,
        }

    @classmethod
    def from_dict(cls, d, *, max_range_ports: int = DEFAULT_RANGE_MAX_PORTS,
                  allow_health_check: bool = True) -> "Rule":
        """Validate a rule as the API, the control channel and the TOML config give it.

        Checks run in a fixed order (identity, listen, targets, features), so the
        error a rule with several faults gets does not change between releases.
        """
        if not isinstance(d, dict):
            raise _bad("validation.invalid_rule", f"a rule must be an object, got {type(d).__name__}")
        unknown = set(d) - _RULE_FIELDS
        if unknown:
            raise _bad("validation.unknown_field", f"rule has unknown field(s): {', '.join(sorted(unknown))}")
        rule_id, protocol = _parse_identity(d)
        start, end, listen_host = _parse_listen(d, max_range_ports)
        targets = _parse_targets(d, protocol, start, end)
        features = _parse_features(d, protocol, end - start + 1, allow_health_check)
        return cls(rule_id=rule_id, protocol=protocol, listen_port=start, listen_port_end=end,
                   targets=targets, listen_host=listen_host, **features)


def _parse_identity(d: dict) -> tuple[str, str]:
    rule_id = d.get("rule_id", d.get("id"))
    if not isinstance(rule_id, str) or not _RULE_ID.fullmatch(rule_id):
        raise _bad("validation.invalid_rule_id",
                   f"rule id must be 1-128 chars of letters, digits, '.', '_', ':' or '-', got {rule_id!r}")
    protocol = d.get("protocol", "tcp")
    if protocol not in PROTOCOLS:
        raise _bad("validation.invalid_protocol", f"protocol must be \"tcp\" or \"udp\", got {protocol!r}")
    return rule_id, protocol


def _parse_listen(d: dict, max_range_ports: int) -> tuple[int, int, str]:
    """listen_port [+ listen_port_end] or listen: "a-b", and listen_host -> (start, end, host)."""
    if d.get("listen") is not None:
        if d.get("listen_port") is not None:
            raise _bad("validation.invalid_listen", "give either listen or listen_port, not both")
        start, end = parse_port_span(d["listen"], "listen port")
    elif d.get("listen_port") is not None:
        start, end = parse_port_span(d["listen_port"], "listen port")
        if d.get("listen_port_end") is not None:
            end = parse_port(d["listen_port_end"], "listen_port_end")
            if end < start:
                raise _bad("validation.invalid_port_range",
                           f"listen_port_end {end} is below listen_port {start}")
    else:
        raise _bad("validation.invalid_listen", "a rule needs listen_port (or listen: \"a-b\")")
    width = end - start + 1
    if width > max_range_ports:
        raise _bad("validation.port_range_too_large",
                   f"listen range {start}-{end} spans {width} ports; the limit is {max_range_ports} "
                   f"(range_rule_max_ports)")

    listen_host = d.get("listen_host") or "0.0.0.0"
    if not is_ip_literal(str(listen_host).strip("[]")):
        raise _bad("validation.invalid_listen_host",
                   f"listen_host must be an IP address of this host, got {listen_host!r}")
    return start, end, str(ipaddress.ip_address(str(listen_host).strip("[]")))


def _parse_targets(d: dict, protocol: str, start: int, end: int) -> tuple[Target, ...]:
    """target / targets, checked against the listen range they serve."""
    if d.get("target") is not None and d.get("targets") is not None:
        raise _bad("validation.invalid_target", "give either target or targets, not both")
    if d.get("target") is not None:
        targets = [parse_target_text(d["target"]) if isinstance(d["target"], str)
                   else parse_target(d["target"], 0)]
    elif d.get("targets") is not None:
        raw = d["targets"]
        if not isinstance(raw, list) or not raw:
            raise _bad("validation.invalid_target", "targets must be a non-empty list")
        if len(raw) > MAX_TARGETS:
            raise _bad("validation.too_many_targets", f"at most {MAX_TARGETS} targets, got {len(raw)}")
        targets = [parse_target(t, i) for i, t in enumerate(raw)]
    else:
        raise _bad("validation.invalid_target", "a rule needs a target (host:port) or targets")

    width = end - start + 1
    for i, t in enumerate(targets):
        if t.port_end is not None:
            if len(targets) > 1:
                raise _bad("validation.invalid_target", f"targets[{i}] may not be a port range on a multi-target rule")
            if t.port_end - t.port + 1 != width:
                raise _bad("validation.port_range_width_mismatch",
                           f"listen range {start}-{end} has {width} ports but target {t.label()} has "
                           f"{t.port_end - t.port + 1}")
    if width > 1 and targets[0].port_end is None:
        if len(targets) > 1:
            raise _bad("validation.invalid_target", "a port-range rule takes exactly one target")
        # "listen 30000-30050 -> host:30000" is ambiguous; require an explicit matching range
        raise _bad("validation.port_range_width_mismatch",
                   f"listen range {start}-{end} needs a target range of the same width, e.g. "
                   f"{targets[0].host}:{targets[0].port}-{targets[0].port + width - 1}")
    if width > 1 and len(targets) > 1:
        raise _bad("validation.invalid_target", "a port-range rule takes exactly one target")

    if any(t.proxy_protocol for t in targets) and protocol != "tcp":
        raise _bad("validation.proxy_protocol_on_unsupported_rule",
                   "proxy_protocol is for TCP rules only")
    return tuple(targets)


def _parse_features(d: dict, protocol: str, width: int, allow_health_check: bool) -> dict:
    """The optional fields, as ``Rule`` keyword arguments."""
    sni = d.get("sni_pattern")
    if sni is not None:
        if protocol != "tcp" or width > 1:
            raise _bad("validation.sni_on_unsupported_rule",
                       "sni_pattern is allowed only on single-port TCP rules")
        sni = validate_sni_pattern(sni)

    prefer_ipv6 = d.get("prefer_ipv6", False)
    if not isinstance(prefer_ipv6, bool):
        raise _bad("validation.invalid_bool", f"prefer_ipv6 must be true or false, got {prefer_ipv6!r}")

    hci = d.get("health_check_interval_secs")
    if hci is not None:
        if not allow_health_check:
            raise _bad("validation.health_check_unsupported",
                       "health_check_interval_secs is only available on server-pushed rules")
        hci = _int_in(hci, "health_check_interval_secs", *HEALTH_CHECK_BOUNDS)
        if protocol != "tcp":
            # the probe is a TCP connect: it says nothing about a UDP service
            raise _bad("validation.health_check_on_unsupported_rule",
                       "health_check_interval_secs (active TCP probes) is for TCP rules only")

    udp_max_flows = d.get("udp_max_flows")
    if udp_max_flows is not None:
        udp_max_flows = _int_in(udp_max_flows, "udp_max_flows", *UDP_MAX_FLOWS_BOUNDS)
    udp_idle = d.get("udp_flow_idle_secs")
    if udp_idle is not None:
        udp_idle = _int_in(udp_idle, "udp_flow_idle_secs", *UDP_FLOW_IDLE_BOUNDS)

    owner = d.get("owner")
    if owner is not None and not isinstance(owner, str):
        raise _bad("validation.invalid_owner", f"owner must be a string, got {owner!r}")

    return {"prefer_ipv6": prefer_ipv6, "sni_pattern": sni, "rate_limit": RateLimit.from_dict(d.get("rate_limit")),
            "health_check_interval_secs": hci, "owner": owner,
            "udp_max_flows": udp_max_flows, "udp_flow_idle_secs": udp_idle}


# ---------------------------------------------------------------- listeners

WILDCARD_HOSTS = ("0.0.0.0", "::")


def same_listeners(a: Rule, b: Rule) -> bool:
    """True when b can reuse a's listening sockets."""
    return (a.protocol, a.listen_host, a.listen_port, a.listen_port_end) == \
        (b.protocol, b.listen_host, b.listen_port, b.listen_port_end)


def listen_hosts_overlap(a: str, b: str) -> bool:
    """Two listen hosts collide when equal or when either is a wildcard."""
    return a == b or a in WILDCARD_HOSTS or b in WILDCARD_HOSTS


def shared_listen_port(a: Rule, b: Rule) -> int | None:
    """The lowest port both rules would listen on, or None when their listeners cannot collide.

    Listeners collide on the same protocol, overlapping port ranges and colliding
    listen hosts. (Whether they may still share the port is ``port_conflict``'s call.)
    """
    if a.protocol != b.protocol or not listen_hosts_overlap(a.listen_host, b.listen_host):
        return None
    low, high = max(a.listen_port, b.listen_port), min(a.listen_port_end, b.listen_port_end)
    return low if low <= high else None


def listeners_overlap(a: Rule, b: Rule) -> bool:
    """True when the two rules cannot both be bound on one host."""
    return shared_listen_port(a, b) is not None


# ---------------------------------------------------------------- port modes (SPEC §2.8)

def _port_in_use(rule: Rule, other: Rule, port: int, why: str = "") -> PortunusError:
    return _bad("port_in_use", f"port {port} already used by rule {other.rule_id} on this client{why}",
                rule_id=other.rule_id, port=port)


def port_conflict(rule: Rule, others) -> PortunusError | None:
    """Why ``rule`` cannot listen beside ``others`` (one client's rules), or None.

    ``others`` yields ``(rule, counts)`` oldest first; ``counts`` is true for an
    active or failed rule. Only single-port TCP rules on the very same listen host
    share a port: its mode is set by the oldest rule that counts (else the oldest
    one). In SNI mode each pattern appears once and one plain rule is the fallback;
    in plain mode nothing else may join.
    """
    sharing = [(o, counts) for o, counts in others if shared_listen_port(rule, o) is not None]
    if not sharing:
        return None
    port = rule.listen_port
    for other, _ in sharing:
        if rule.protocol != "tcp" or rule.is_range or other.is_range:
            return _port_in_use(rule, other, shared_listen_port(rule, other))
        if other.listen_host != rule.listen_host:
            return _port_in_use(rule, other, port, f" (listen host {other.listen_host})")
    mode_rule = next((o for o, counts in sharing if counts), sharing[0][0])
    if mode_rule.sni_pattern is None:
        if rule.sni_pattern is not None:
            return _bad("conflict.legacy_to_sni_unsupported",
                        f"port {port} on this client is in plain mode (rule {mode_rule.rule_id}); "
                        f"SNI rule {rule.sni_pattern!r} cannot share it", rule_id=mode_rule.rule_id, port=port)
        return _port_in_use(rule, mode_rule, port)
    for other, _ in sharing:
        if rule.sni_pattern is None and other.sni_pattern is None:
            return _bad("conflict.sni_fallback_duplicate",
                        f"port {port} on this client already has a fallback (plain rule {other.rule_id}); "
                        f"an SNI port takes one", rule_id=other.rule_id, port=port)
        if rule.sni_pattern is not None and other.sni_pattern == rule.sni_pattern:
            return _bad("conflict.sni_route_duplicate",
                        f"SNI pattern {rule.sni_pattern!r} on port {port} is already routed by rule "
                        f"{other.rule_id} on this client", rule_id=other.rule_id, port=port)
    return None

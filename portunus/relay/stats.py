"""Per-rule and per-port counters, updated on the loop thread and snapshotted as dicts."""

from __future__ import annotations

import time

from .sni_router import RESULTS as SNI_RESULTS


class PortCounters:
    """Counters of one listen port of a rule. Bytes count *delivered* bytes."""

    __slots__ = ("listen_port", "bytes_in", "bytes_out", "active_connections", "connections_total",
                 "datagrams_in", "datagrams_out", "active_flows")

    def __init__(self, listen_port: int):
        self.listen_port = listen_port
        self.bytes_in = 0          # end user -> target
        self.bytes_out = 0         # target -> end user
        self.active_connections = 0
        self.connections_total = 0
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.active_flows = 0

    def to_dict(self) -> dict:
        return {
            "listen_port": self.listen_port,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "active_connections": self.active_connections,
            "datagrams_in": self.datagrams_in,
            "datagrams_out": self.datagrams_out,
        }


class RuleCounters:
    """Counters of one rule: per-port rows plus rule-wide drop/failure counters."""

    def __init__(self, ports):
        self.ports: dict[int, PortCounters] = {p: PortCounters(p) for p in ports}
        self.dns_failures = 0
        self.flows_dropped_overflow = 0
        self.send_dropped = 0
        self.flows_evicted_icmp = 0
        self.connect_failures = 0
        self.target_failovers_total = 0
        self.quota_refused = 0      # connections / new flows refused while the owner's quota is exhausted
        self.quota_dropped = 0      # datagrams of live flows dropped for the quota
        self.sni_routes = dict.fromkeys(SNI_RESULTS, 0)  # connections an SNI listener routed here, by result
        self.updated_at = time.time()

    def total(self, attr: str) -> int:
        return sum(getattr(p, attr) for p in self.ports.values())

    def snapshot(self, per_port: bool = False) -> dict:
        snap = {
            "bytes_in": self.total("bytes_in"),
            "bytes_out": self.total("bytes_out"),
            "active_connections": self.total("active_connections"),
            "connections_total": self.total("connections_total"),
            "dns_failures": self.dns_failures,
            "datagrams_in": self.total("datagrams_in"),
            "datagrams_out": self.total("datagrams_out"),
            "active_flows": self.total("active_flows"),
            "flows_dropped_overflow": self.flows_dropped_overflow,
            "send_dropped": self.send_dropped,
            "connect_failures": self.connect_failures,
            "target_failovers_total": self.target_failovers_total,
            "quota_refused": self.quota_refused,
            "quota_dropped": self.quota_dropped,
            "updated_at": time.time(),
        }
        if per_port:
            snap["per_port"] = [self.ports[p].to_dict() for p in sorted(self.ports)]
        return snap

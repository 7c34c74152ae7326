"""Server domain services: enrollment, clients, rule push/remove, stats, metrics.

HTTP handlers and online CLI commands both end here. Methods run on HTTP
threads; anything that touches a client channel goes through ``hub.call``.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

from ..control.enrollment import enroll_command, make_uri, parse_advertised_endpoint
from ..control.tls import san_covers
from ..errors import PortunusError
from ..log import log
from ..model import Rule
from ..store import clients as store_clients
from ..store import rules as store_rules
from ..store import settings as store_settings
from ..store.db import rfc3339
from ..store.ids import new_ulid
from ..control.hub import REJECT_REASONS
from ..control.stats_report import PORT_COUNTERS, api_stats_extras
from .control_hub import ControlHub
from .metrics import render, server_families

# capability each rule feature needs from the client (SPEC §3.1)
def required_capabilities(rule: Rule) -> list[tuple[str, str]]:
    need = []
    if rule.protocol == "udp":
        need.append(("udp", "unsupported_protocol"))
    if rule.is_multi_target:
        need.append(("multi_target", "multi_target_unsupported_by_client"))
    if any(t.proxy_protocol for t in rule.targets):
        need.append(("proxy_protocol", "proxy_protocol_unsupported_by_client"))
    if rule.sni_pattern:
        need.append(("sni", "sni_unsupported_by_client"))
    if rule.rate_limit:
        need.append(("rate_limit", "rate_limit_unsupported_by_client"))
    if rule.is_range:
        need.append(("port_range", "port_range_unsupported_by_client"))
    return need


ADVERTISED_OVERRIDE_KEY = "advertised_endpoint_override"
# the counters GET /v1/rules/{id}/stats shows (SPEC §6): a subset of what a report carries (RULE_COUNTERS)
API_RULE_COUNTERS = ("bytes_in", "bytes_out", "active_connections", "dns_failures", "datagrams_in",
                     "datagrams_out", "active_flows", "flows_dropped_overflow", "target_failovers_total")


class StatsCache:
    """Latest stats_report snapshot per rule, and a condition SSE streams wait on.

    The hub hands over only snapshots it validated (``control.stats_report``) of rules
    the reporting client owns, so what is held here is bounded by the rule count.
    """

    def __init__(self):
        self._lock = threading.Condition()
        self._by_rule: dict[str, dict] = {}
        self.tick = 0

    def update(self, client_id: str, report: dict) -> None:
        with self._lock:
            for snap in report.get("rules", []):
                if isinstance(snap, dict) and isinstance(snap.get("rule_id"), str):
                    snap = dict(snap)
                    snap["client_id"] = client_id
                    snap["reported_at"] = report.get("at")
                    self._by_rule[snap["rule_id"]] = snap
            self.tick += 1
            self._lock.notify_all()

    def get(self, rule_id: str) -> dict | None:
        with self._lock:
            return self._by_rule.get(rule_id)

    def forget(self, rule_id: str) -> None:
        with self._lock:
            self._by_rule.pop(rule_id, None)

    def wait_tick(self, last_tick: int, timeout: float) -> int:
        with self._lock:
            self._lock.wait_for(lambda: self.tick != last_tick, timeout)
            return self.tick


class ServerCore:
    def __init__(self, cfg, store, hub: ControlHub, cert_info, *, advertised_seed: str | None = None,
                 seed_error: PortunusError | None = None):
        self.cfg = cfg
        self.store = store
        self.hub = hub
        self.cert_info = cert_info
        self.stats = StatsCache()
        self.advertised_seed = advertised_seed
        self.seed_error = seed_error  # why the seed was refused (enrollment then fails closed)
        self.started_at = time.time()
        self.operator_requests: dict[tuple[str, str], int] = {}
        self.audit_drops = 0  # audit rows that could not be written (OperatorAccess.record reports them)
        # services serve attaches (server.traffic.TrafficServices, server.owner_caps); None in offline commands
        self.quotas = None       # server.quotas.QuotaService
        self.traffic = None      # server.traffic.TrafficAccounting
        self.owner_caps = None   # server.owner_caps.OwnerCapService
        self._req_lock = threading.Lock()

    # ---- advertised endpoint (SPEC §3.3; tiers 2-4 for now) -----------------
    def advertised_endpoint_info(self, request_host: str | None = None) -> dict:
        """Where enrollment URIs point, and why (SPEC §3.3 tiers: override, seed, Host, loopback)."""
        control_port = self.control_port
        override = store_settings.get_setting(self.store, ADVERTISED_OVERRIDE_KEY)
        if override:
            try:
                effective = validate_seed_endpoint(override, self.cert_info)
                return {"override": override, "effective": effective, "source": "override", "diagnostic": None}
            except PortunusError as exc:  # e.g. the certificate was replaced since
                return {"override": override, "effective": None, "source": "override",
                        "diagnostic": exc.message, "error": exc}
        if self.seed_error is not None:  # an explicit seed that is invalid fails closed
            return {"override": None, "effective": None, "source": "seed", "diagnostic": self.seed_error.message,
                    "error": self.seed_error}
        if self.advertised_seed:
            return {"override": None, "effective": self.advertised_seed, "source": "seed", "diagnostic": None}
        if request_host:
            host = request_host.rsplit(":", 1)[0] if not request_host.startswith("[") else ""
            if host and not host.startswith("[") and san_covers(self.cert_info, host):
                return {"override": None, "effective": f"{host}:{control_port}", "source": "request_host",
                        "diagnostic": None}
        return {"override": None, "effective": f"127.0.0.1:{control_port}", "source": "loopback",
                "diagnostic": "127.0.0.1 is reachable only from this host: set an override or "
                              "PORTUNUS_ADVERTISED_ENDPOINT to a host:port the edge hosts can dial"}

    def advertised_endpoint(self, request_host: str | None = None) -> str:
        info = self.advertised_endpoint_info(request_host)
        if info["effective"] is None:
            raise info["error"]
        return info["effective"]

    def set_advertised_override(self, value) -> dict:
        if value is None:
            store_settings.delete_setting(self.store, ADVERTISED_OVERRIDE_KEY)
            log.info("settings.advertised_endpoint_cleared")
        else:
            if not isinstance(value, str):
                raise PortunusError("endpoint_invalid", f"override must be a host:port string or null, got {value!r}")
            endpoint = validate_seed_endpoint(value, self.cert_info)  # fails closed: nothing stored
            store_settings.set_setting(self.store, ADVERTISED_OVERRIDE_KEY, endpoint)
            log.info("settings.advertised_endpoint_set", endpoint=endpoint)
        info = self.advertised_endpoint_info()
        info.pop("error", None)
        return info

    @property
    def control_port(self) -> int:
        return self.hub.bound_port or self.cfg.control_addr[1]

    # ---- clients ------------------------------------------------------------
    def enroll_client(self, name: str, *, address: str | None = None, ttl_secs: int | None = None,
                      request_host: str | None = None) -> dict:
        name = store_clients.check_client_name(name)
        ttl = self._ttl(ttl_secs)
        self.advertised_endpoint(request_host)  # fail closed before anything is stored
        client = store_clients.create_client(self.store, name, address)
        return self._enrollment(client, ttl, request_host)

    def reenroll_client(self, client_id: str, *, ttl_secs: int | None = None,
                        request_host: str | None = None) -> dict:
        client = store_clients.get_client(self.store, client_id)
        return self._enrollment(client, self._ttl(ttl_secs), request_host)

    def _ttl(self, ttl_secs) -> int:
        return store_clients.check_enrollment_ttl(self.cfg.enrollment_ttl_secs if ttl_secs is None else ttl_secs)

    def _enrollment(self, client: dict, ttl: int, request_host: str | None) -> dict:
        endpoint = self.advertised_endpoint(request_host)
        code = store_clients.create_enrollment(self.store, client["client_id"], ttl, endpoint)
        host, _, port = endpoint.rpartition(":")
        uri = make_uri(host, int(port), self.cert_info.fingerprint, code)
        log.info("enrollment.created", client_id=client["client_id"], client_name=client["client_name"],
                 endpoint=endpoint, ttl_secs=ttl)
        return {"client": self.client_view(client), "enrollment_uri": uri, "command": enroll_command(uri),
                "expires_at": _rfc3339(time.time() + ttl), "server_endpoint": endpoint}

    def client_view(self, client: dict) -> dict:
        info = self.hub.session_info(client["client_id"]) if self.hub else None
        return {
            "client_id": client["client_id"],
            "client_name": client["client_name"],
            "connected": info is not None,
            "remote_addr": info["remote_addr"] if info else None,
            "connected_at": _rfc3339(info["connected_at"]) if info else None,
            "address": client.get("address"),
            "revoked": bool(client.get("revoked_at")),
            "client_version": (info or {}).get("client_version") or client.get("client_version"),
            "capabilities": (info or {}).get("capabilities") or client.get("capabilities") or [],
        }

    def list_clients(self, only: set[str] | None = None) -> list[dict]:
        """Every client, or (``only``) those of the given ids: what a tenant's grants cover."""
        return [self.client_view(c) for c in store_clients.list_clients(self.store)
                if only is None or c["client_id"] in only]

    def get_client(self, ref: str) -> dict:
        return self.client_view(store_clients.resolve_client_ref(self.store, ref))

    def rename_client(self, client_id: str, name: str) -> dict:
        store_clients.rename_client(self.store, client_id, name)  # the store applies the one name rule
        return self.client_view(store_clients.get_client(self.store, client_id))

    def set_address(self, client_id: str, address) -> dict:
        if address is not None and (not isinstance(address, str) or len(address) > 255):
            raise PortunusError("validation.invalid_address", f"address must be a host name or IP, got {address!r}")
        store_clients.set_address(self.store, client_id, address)
        return self.client_view(store_clients.get_client(self.store, client_id))

    def revoke_client(self, client_id: str) -> dict:
        client = store_clients.get_client(self.store, client_id)
        store_clients.revoke_client(self.store, client_id)
        self.hub.call(self.hub.disconnect, client_id, "token_revoked",
                      "this client's token was revoked").result(5)
        log.info("client.revoked", client_id=client_id, client_name=client["client_name"])
        return self.client_view(store_clients.get_client(self.store, client_id))

    def delete_client(self, client_id: str) -> None:
        for rule_id in store_clients.delete_client(self.store, client_id):
            self.stats.forget(rule_id)

    # ---- rules ----------------------------------------------------------------
    def push_rule(self, body: dict, *, owner: str | None, ack_timeout: float = 2.0,
                  request_id: str | None = None, authorize=None) -> tuple[int, dict]:
        """Validate, authorize (``authorize(rule, client_id)`` raises a grant refusal; None for
        superadmins), gate on capabilities, store, send and wait for the ack (SPEC §4.3)."""
        if not isinstance(body, dict):
            raise PortunusError("bad_request", "the body must be a JSON object")
        started = time.monotonic()
        body = dict(body)
        client_ref = body.pop("client", None)
        if not isinstance(client_ref, str) or not client_ref:
            raise PortunusError("validation.missing_client", "client (id or unique name) is required")
        if "rule_id" in body or "id" in body or "owner" in body:
            raise PortunusError("validation.unknown_field", "rule_id and owner are assigned by the server")
        body["rule_id"] = new_ulid()
        body["owner"] = owner
        rule = Rule.from_dict(body, max_range_ports=self.cfg.range_rule_max_ports)
        client = store_clients.resolve_client_ref(self.store, client_ref)
        if authorize is not None:
            authorize(rule, client["client_id"])  # RBAC before anything about the client's state (SPEC §4.3)
        if client.get("revoked_at"):
            raise PortunusError("conflict.client_revoked", f"client {client['client_name']!r} is revoked")
        info = self.hub.session_info(client["client_id"])
        if info is None:
            raise PortunusError("client_not_connected",
                                f"client {client['client_name']!r} ({client['client_id']}) is not connected")
        caps = set(info["capabilities"])
        for cap, code in required_capabilities(rule):
            if cap not in caps:
                raise PortunusError(code, f"client {client['client_name']!r} does not support {cap} "
                                          f"(client version {info['client_version']})")
        store_rules.insert_rule(self.store, rule, client["client_id"], owner)
        log.info("rule.push", rule=rule.rule_id, client_id=client["client_id"], request_id=request_id,
                 listen=rule.listen_label, protocol=rule.protocol)
        try:
            ack = self.hub.call(self.hub.push_rule, client["client_id"], rule.to_dict(), request_id).result(5)
            status = ack.result(ack_timeout)
        except concurrent.futures.TimeoutError:
            return 202, self.get_rule(rule.rule_id)
        except PortunusError as exc:
            if exc.code == "client_not_connected":
                store_rules.delete_rule(self.store, rule.rule_id)  # nothing stored when offline
            raise
        state = "active" if status["state"] == "active" else "failed"
        reason = None if state == "active" else (status.get("reason") or "activation failed")
        store_rules.set_rule_state(self.store, rule.rule_id, state, reason)
        log.info("rule.pushed", rule=rule.rule_id, state=state, reason=reason, ports=rule.port_count,
                 duration_ms=round((time.monotonic() - started) * 1000, 2), request_id=request_id)
        if state == "active":
            return 201, self.get_rule(rule.rule_id)
        raise PortunusError("activation_failed", reason, rule_id=rule.rule_id, reason=reason,
                            port=status.get("port"))

    def get_rule(self, rule_id: str) -> dict:
        return store_rules.get_rule(self.store, rule_id)

    def list_rules(self, client: str | None = None, owner: str | None = None) -> list[dict]:
        client_id = store_clients.resolve_client_ref(self.store, client)["client_id"] if client else None
        return store_rules.list_rules(self.store, client_id=client_id, owner=owner)

    def remove_rule(self, rule_id: str, request_id: str | None = None) -> dict:
        rule = store_rules.get_rule(self.store, rule_id)
        store_rules.delete_rule(self.store, rule_id)
        try:
            sent = self.hub.call(self.hub.remove_rule, rule["client_id"], rule_id, request_id).result(5)
        finally:
            # after the hub stopped accepting this rule's stats, so a report in flight cannot re-add it
            self.stats.forget(rule_id)
        log.info("rule.remove", rule=rule_id, client_id=rule["client_id"], delivered=sent, request_id=request_id)
        if self.owner_caps is not None:  # the owner's last rule takes its cap
            self.owner_caps.rule_removed(rule["client_id"], rule.get("owner"))
        return {"rule_id": rule_id, "removed": True, "client_notified": sent}

    def rule_stats(self, rule_id: str, per_port: bool = False, per_target: bool = False) -> dict:
        rule = store_rules.get_rule(self.store, rule_id)
        snap = self.stats.get(rule_id) or {}
        out = {
            "rule_id": rule_id,
            "client": rule["client_id"],
            "protocol": rule["protocol"],
            "state": rule["state"],
        }
        for key in API_RULE_COUNTERS:
            out[key] = snap.get(key, 0)
        out["updated_at"] = _rfc3339(snap["reported_at"]) if snap.get("reported_at") else None
        if per_port:
            rows = {r["listen_port"]: r for r in snap.get("per_port", [])}
            out["per_port"] = [
                rows.get(p, {"listen_port": p, **dict.fromkeys(PORT_COUNTERS, 0)})
                for p in range(rule["listen_port"], rule["listen_port_end"] + 1)]
        if per_target:
            out["per_target"] = snap.get("per_target", [])
        out.update(api_stats_extras(snap))  # SNI routes and listener, rate-limit counters (when reported)
        return out

    # ---- observability ----------------------------------------------------------
    def count_request(self, outcome: str, reason: str) -> None:
        with self._req_lock:
            key = (outcome, reason)
            self.operator_requests[key] = self.operator_requests.get(key, 0) + 1

    def count_audit_drop(self) -> None:
        with self._req_lock:
            self.audit_drops += 1

    def metrics_text(self) -> str:
        # one row per live rule: failed rules bind nothing and have no series
        rules = [r for r in store_rules.list_rules(self.store) if r["state"] in ("active", "pending")]
        with self._req_lock:
            reqs, audit_drops = dict(self.operator_requests), self.audit_drops
        return render(server_families(
            clients=store_clients.list_clients(self.store), connected_ids=self.hub.connected_ids(),
            rules=rules, snapshot_of=self.stats.get, auth_failures=self.hub.auth_failure_counts(),
            rejected_messages=self.hub.rejected_message_counts(), rejected_reasons=REJECT_REASONS,
            operator_requests=reqs, audit_drops=audit_drops,
            store_busy=getattr(self.store, "busy_count", 0), owner_rows=self.hub.owner_stat_rows())
            + (self.quotas.metric_families() if self.quotas is not None else []))


def _rfc3339(ts: float | None) -> str | None:
    return None if ts is None else rfc3339(ts)


def validate_seed_endpoint(value: str, cert_info) -> str:
    """Tier-2 seed: a bare host:port covered by the certificate SAN (fail closed)."""
    host, port = parse_advertised_endpoint(value)
    if not san_covers(cert_info, host):
        raise PortunusError("endpoint_not_in_cert_san",
                            f"advertised endpoint host {host!r} is not covered by the server certificate SAN "
                            f"({', '.join(cert_info.sans_dns + cert_info.sans_ip)}); fix: stop the server, run "
                            f"`portunus-server rotate-cert --san {host}`, start it again and re-enroll every "
                            f"client (their pins change)", host=host)
    return f"{host}:{port}"

"""Persisted rules: the conflict check, states, and the SPEC §6 rule shape.

``spec_json`` (``Rule.to_dict()``) is the rule; the columns beside it exist for
queries (conflicts by port, rules by owner, targets by host).
"""

from __future__ import annotations

import json
from dataclasses import replace

from ..errors import PortunusError
from ..model import Rule, port_conflict
from .db import Store, now_rfc3339

RULE_STATES = ("pending", "active", "failed", "removing")
# a stored rule is rebuilt whatever range_rule_max_ports says today; the limit applies at push time
_STORED_RANGE_LIMIT = 65535

_SELECT = ("SELECT r.*, c.client_name FROM rules r JOIN clients c ON c.client_id = r.client_id")


def _rule(row) -> dict:
    spec = json.loads(row["spec_json"])
    return {
        "rule_id": row["rule_id"],
        "client_id": row["client_id"],
        "client_name": row["client_name"],
        "owner": row["owner"],
        "protocol": row["protocol"],
        "listen_host": row["listen_host"],
        "listen_port": row["listen_port"],
        "listen_port_end": row["listen_port_end"],
        "targets": spec["targets"],
        "prefer_ipv6": spec.get("prefer_ipv6", False),
        "sni_pattern": spec.get("sni_pattern"),
        "rate_limit": spec.get("rate_limit"),
        "health_check_interval_secs": spec.get("health_check_interval_secs"),
        "state": row["state"],
        "reason": row["reason"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def _not_found(rule_id) -> PortunusError:
    return PortunusError("not_found", f"rule {rule_id!r} not found", rule_id=rule_id)


def _get(conn, rule_id) -> dict:
    row = None
    if isinstance(rule_id, str):
        row = conn.execute(_SELECT + " WHERE r.rule_id = ?", (rule_id,)).fetchone()
    if row is None:
        raise _not_found(rule_id)
    return _rule(row)


# the rules whose state decides a port's mode (SPEC §2.8); pending and removing ones do not
_MODE_STATES = ("active", "failed")


def _port_holders(conn, rule: Rule, client_id: str) -> list[tuple[Rule, bool]]:
    """The client's rules that may listen where ``rule`` would, oldest first, with 'counts for the mode'."""
    rows = conn.execute(
        "SELECT spec_json, state FROM rules "
        "WHERE client_id = ? AND protocol = ? AND listen_port <= ? AND listen_port_end >= ? "
        "ORDER BY created_at, rule_id",
        (client_id, rule.protocol, rule.listen_port_end, rule.listen_port)).fetchall()
    return [(Rule.from_dict(json.loads(r["spec_json"]), max_range_ports=_STORED_RANGE_LIMIT),
             r["state"] in _MODE_STATES) for r in rows]


def _write_targets(conn, rule: Rule) -> None:
    conn.execute("DELETE FROM rule_targets WHERE rule_id = ?", (rule.rule_id,))
    conn.executemany(
        "INSERT INTO rule_targets (rule_id, idx, host, port, port_end, priority, proxy_protocol) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(rule.rule_id, i, t.host, t.port, t.port_end, t.priority, t.proxy_protocol)
         for i, t in enumerate(rule.targets)])


def insert_rule(store: Store, rule: Rule, client_id: str, owner: str | None = None) -> dict:
    """Persist a rule as ``pending`` after the conflict check, both in one write transaction.

    Any rule of the client in any state (failed included: SPEC §2.1) with the same
    protocol, an overlapping listen range and an overlapping listen host blocks it,
    except on an SNI port (SPEC §2.8, ``model.port_conflict``): there distinct
    patterns and one plain fallback share the listener.
    """
    if owner is not None and owner != rule.owner:
        rule = replace(rule, owner=owner)
    now = now_rfc3339()
    with store.write() as conn:
        client = conn.execute("SELECT client_id, revoked_at FROM clients WHERE client_id = ?",
                              (client_id,)).fetchone()
        if client is None:
            raise PortunusError("not_found", f"client {client_id!r} not found", client_id=client_id)
        if client["revoked_at"] is not None:
            raise PortunusError("conflict.client_revoked", f"client {client_id} is revoked", client_id=client_id)
        if conn.execute("SELECT 1 FROM rules WHERE rule_id = ?", (rule.rule_id,)).fetchone():
            raise PortunusError("conflict.rule_exists", f"rule {rule.rule_id} already exists", rule_id=rule.rule_id)
        error = port_conflict(rule, _port_holders(conn, rule, client_id))
        if error is not None:
            raise error
        conn.execute(
            "INSERT INTO rules (rule_id, client_id, owner, protocol, listen_host, listen_port, listen_port_end, "
            "spec_json, state, reason, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', NULL, ?, ?)",
            (rule.rule_id, client_id, rule.owner, rule.protocol, rule.listen_host, rule.listen_port,
             rule.listen_port_end, json.dumps(rule.to_dict(), sort_keys=True), now, now))
        _write_targets(conn, rule)
        return _get(conn, rule.rule_id)


def update_rule_spec(store: Store, rule: Rule) -> dict:
    """Replace a stored rule's spec (e.g. a new rate_limit); its listen side may not change."""
    with store.write() as conn:
        old = _get(conn, rule.rule_id)
        # the port mode checks (SPEC §2.8) ran at insert: what they looked at may not change here
        if (old["protocol"], old["listen_host"], old["listen_port"], old["listen_port_end"], old["sni_pattern"]) != \
                (rule.protocol, rule.listen_host, rule.listen_port, rule.listen_port_end, rule.sni_pattern):
            raise PortunusError("validation.listen_immutable",
                                f"rule {rule.rule_id}: protocol, listen address and sni_pattern cannot change; "
                                f"delete the rule and push a new one")
        if rule.owner != old["owner"]:
            rule = replace(rule, owner=old["owner"])
        conn.execute("UPDATE rules SET spec_json = ?, updated_at = ? WHERE rule_id = ?",
                     (json.dumps(rule.to_dict(), sort_keys=True), now_rfc3339(), rule.rule_id))
        _write_targets(conn, rule)
        return _get(conn, rule.rule_id)


def set_rule_state(store: Store, rule_id: str, state: str, reason: str | None = None) -> dict:
    if state not in RULE_STATES:
        raise PortunusError("internal", f"unknown rule state {state!r} (one of {', '.join(RULE_STATES)})")
    with store.write() as conn:
        cur = conn.execute("UPDATE rules SET state = ?, reason = ?, updated_at = ? WHERE rule_id = ?",
                           (state, reason, now_rfc3339(), rule_id))
        if cur.rowcount == 0:
            raise _not_found(rule_id)
        return _get(conn, rule_id)


def get_rule(store: Store, rule_id: str) -> dict:
    return _get(store.read(), rule_id)


def list_rules(store: Store, client_id: str | None = None, owner: str | None = None) -> list[dict]:
    where, args = [], []
    if client_id is not None:
        where.append("r.client_id = ?")
        args.append(client_id)
    if owner is not None:
        where.append("r.owner = ?")
        args.append(owner)
    sql = _SELECT + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY r.created_at, r.rule_id"
    return [_rule(r) for r in store.read().execute(sql, args).fetchall()]


def rules_for_client(store: Store, client_id: str) -> list[Rule]:
    """Every persisted rule of a client (any state) as ``Rule``, oldest first: the reconnect replay."""
    rows = store.read().execute("SELECT spec_json FROM rules WHERE client_id = ? ORDER BY created_at, rule_id",
                                (client_id,)).fetchall()
    return [Rule.from_dict(json.loads(r["spec_json"]), max_range_ports=_STORED_RANGE_LIMIT) for r in rows]


def delete_rule(store: Store, rule_id: str) -> bool:
    """Remove a rule (its targets cascade). False when there was no such rule."""
    with store.write() as conn:
        return conn.execute("DELETE FROM rules WHERE rule_id = ?", (rule_id,)).rowcount > 0

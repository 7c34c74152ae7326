"""Owner envelope caps per (client, owner), below HTTP and the control hub (SPEC §2.9, §3.4, §6).

The service owns the owner-cap rules: validation (``model.RateLimit``, the one validator), the
capability gate, the errors for an unknown client or owner, the ``owner_rate_limit_update`` push
after each committed change, dropping a cap when its owner's last rule on the client goes, and
the reconnect replay. It never touches a socket: pushes go to the injected ``publish(OwnerCapPush)``
(the wiring sends them on the loop; an offline client gets the current state from
``replay_messages``). Superadmin only: the HTTP and CLI layers check the role before calling.

    caps = OwnerCapService(store, clock=time.time, publish=hub_post)
    caps.put("edge-tokyo", "alice", {"rate_limit": {"bandwidth_in_bps": 10_000_000}})
    caps.list_owners("edge-tokyo")   # [{owner_id, has_rate_limit, rule_count}]
    caps.rule_removed(client_id, "alice")   # after a rule removal committed

``update_rule_caps`` is the other cap route, ``PUT /v1/rules/{id} {rate_limit}`` (owner or
superadmin: the route's access level): it changes only the caps, persists the new spec and pushes
the rule again, which the client applies as a hot update (its buckets keep their state).
``attach_owner_caps`` is what ``serve`` calls to wire the service to the hub and the core.
"""

from __future__ import annotations

import concurrent.futures
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable

from ..control import messages
from ..errors import PortunusError
from ..log import log
from ..model import RateLimit
from ..store import clients as store_clients
from ..store import owner_caps as store_caps
from ..store import rules as store_rules
from ..store import users as store_users
from ..store.db import Store, rfc3339

RATE_LIMIT_CAPABILITY = "rate_limit"
PUT_FIELDS = ("rate_limit",)


@dataclass(frozen=True)
class OwnerCapPush:
    """One ``owner_rate_limit_update`` for a client: ``set`` with the caps, or ``remove``."""

    client_id: str
    owner_id: str
    action: str
    rate_limit: dict | None = None

    def message(self) -> dict:
        return messages.owner_rate_limit_update(self.client_id, self.owner_id, self.action, self.rate_limit)


def _shown(value, limit: int = 64) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _capability_gate(client: dict) -> None:
    """Caps for a client that said it cannot enforce them are refused (a never-seen client passes:
    its first hello decides, and the replay warns when it cannot take them)."""
    if RATE_LIMIT_CAPABILITY not in client["capabilities"] and client["client_version"] is not None:
        raise PortunusError("rate_limit_unsupported_by_client",
                            f"client {client['client_name']!r} ({client['client_version']}) does not support "
                            f"rate limits; upgrade it first", client_id=client["client_id"])


def parse_put_body(body) -> RateLimit:
    """``{rate_limit: {...}}`` with at least one cap; the caps checked by ``RateLimit.from_dict``."""
    if not isinstance(body, dict):
        raise PortunusError("bad_request", f"the body must be a JSON object, got {_shown(body)}")
    unknown = sorted(k for k in body if k not in PUT_FIELDS)
    if unknown:
        raise PortunusError("validation.unknown_field",
                            f"unknown field {_shown(unknown[0])}; allowed: {', '.join(PUT_FIELDS)}", field=unknown[0])
    cap = RateLimit.from_dict(body.get("rate_limit"))
    if cap is None:
        raise PortunusError("validation.rate_limit_no_caps_provided",
                            "rate_limit is required and must name at least one cap; "
                            "DELETE the owner's rate-limit to remove it")
    return cap


class OwnerCapService:
    def __init__(self, store: Store, *, clock: Callable[[], float] = time.time,
                 publish: Callable[[OwnerCapPush], None] | None = None):
        self.store = store
        self.clock = clock
        self.publish = publish

    def _stamp(self) -> str:
        return rfc3339(datetime.fromtimestamp(int(self.clock()), timezone.utc))

    # ---------------------------------------------------------------- lookups

    def _client(self, client_ref) -> dict:
        return store_clients.resolve_client_ref(self.store, client_ref)

    def _owner_on(self, client: dict, owner_id) -> str:
        """A user with at least one rule on the client (caps exist only for such owners)."""
        if not isinstance(owner_id, str) or not owner_id \
                or store_caps.rule_count(self.store, client["client_id"], owner_id) == 0 \
                or store_users.find_user_row(self.store, owner_id) is None:  # a removed user's rules drain
            raise PortunusError("not_found", f"owner {_shown(owner_id)} has no rules on client "
                                             f"{client['client_name']!r} ({client['client_id']})",
                                owner_id=owner_id, client_id=client["client_id"])
        return owner_id

    def list_owners(self, client_ref) -> list[dict]:
        """``[{owner_id, has_rate_limit, rule_count}]`` of the client."""
        return store_caps.list_owners(self.store, self._client(client_ref)["client_id"])

    def get(self, client_ref, owner_id) -> dict:
        """``{client_id, owner_id, rate_limit, updated_at}``; ``rate_limit`` None when uncapped."""
        client = self._client(client_ref)
        row = store_caps.find_owner_cap(self.store, client["client_id"], owner_id) \
            if isinstance(owner_id, str) else None
        if row is not None:
            return store_caps.owner_cap_view(row)
        self._owner_on(client, owner_id)
        return {"client_id": client["client_id"], "owner_id": owner_id, "rate_limit": None, "updated_at": None}

    # ---------------------------------------------------------------- changes

    def put(self, client_ref, owner_id, body) -> dict:
        """Set or replace the owner's caps on the client; pushes ``set``. Returns the view."""
        cap = parse_put_body(body)
        client = self._client(client_ref)
        if client["revoked"]:
            raise PortunusError("conflict.client_revoked", f"client {client['client_id']} is revoked",
                                client_id=client["client_id"])
        _capability_gate(client)
        client_id = client["client_id"]
        with self.store.write():
            self._owner_on(client, owner_id)
            store_caps.set_owner_cap(self.store, client_id, owner_id, cap.to_dict(), self._stamp())
            view = store_caps.owner_cap_view(store_caps.find_owner_cap(self.store, client_id, owner_id))
        log.info("owner_rate_limit.set", client_id=client_id, owner_id=owner_id, rate_limit=view["rate_limit"])
        self._send(OwnerCapPush(client_id, owner_id, "set", view["rate_limit"]))
        return view

    def delete(self, client_ref, owner_id) -> dict:
        """Remove the owner's caps on the client (``not_found`` when there are none); pushes ``remove``.
        Returns the last view."""
        client = self._client(client_ref)
        client_id = client["client_id"]
        with self.store.write():
            row = store_caps.find_owner_cap(self.store, client_id, owner_id) if isinstance(owner_id, str) else None
            if row is None:
                raise PortunusError("not_found", f"owner {_shown(owner_id)} has no rate limit on client "
                                                 f"{client['client_name']!r} ({client_id})",
                                    owner_id=owner_id, client_id=client_id)
            store_caps.delete_owner_cap(self.store, client_id, owner_id)
        log.info("owner_rate_limit.removed", client_id=client_id, owner_id=owner_id)
        self._send(OwnerCapPush(client_id, owner_id, "remove"))
        return store_caps.owner_cap_view(row)

    def rule_removed(self, client_id: str, owner_id: str | None) -> OwnerCapPush | None:
        """A rule of ``owner_id`` on the client was removed (committed): when it was the owner's last
        rule there, the cap goes too (and the client hears ``remove``). Returns that push, if any."""
        if not owner_id:
            return None
        with self.store.write():
            if store_caps.rule_count(self.store, client_id, owner_id) > 0:
                return None
            if not store_caps.delete_owner_cap(self.store, client_id, owner_id):
                return None
        log.info("owner_rate_limit.removed", client_id=client_id, owner_id=owner_id, reason="last_rule_removed")
        push = OwnerCapPush(client_id, owner_id, "remove")
        self._send(push)
        return push

    def _send(self, push: OwnerCapPush) -> None:
        if self.publish is None:
            return
        try:
            self.publish(push)
        except Exception as e:  # the change is committed; the reconnect replay carries it
            log.error("owner_rate_limit.push_failed", client_id=push.client_id, owner_id=push.owner_id,
                      error=str(e))

    # ---------------------------------------------------------------- reconnect

    def replay_messages(self, client_id: str) -> list[dict]:
        """``owner_rate_limit_update`` messages for a reconnecting client, to send FIRST (before its
        quotas and rules, so no rule runs a moment outside its owner's envelope): a ``set`` per cap,
        and a ``remove`` for every other rule owner there (a cap deleted while it was offline)."""
        rows = store_caps.list_owner_caps(self.store, client_id)
        capped = {r["owner_id"] for r in rows}
        out = [OwnerCapPush(client_id, r["owner_id"], "set", store_caps.owner_cap_view(r)["rate_limit"]).message()
               for r in rows]
        out += [OwnerCapPush(client_id, o["owner_id"], "remove").message()
                for o in store_caps.list_owners(self.store, client_id) if o["owner_id"] not in capped]
        return out


# ---------------------------------------------------------------- PUT /v1/rules/{id} {rate_limit}

def parse_rule_caps_body(body) -> RateLimit | None:
    """``{rate_limit: {...} | null}``: the new caps, or None to make the rule uncapped."""
    if not isinstance(body, dict):
        raise PortunusError("bad_request", f"the body must be a JSON object, got {_shown(body)}")
    unknown = sorted(k for k in body if k not in PUT_FIELDS)
    if unknown:
        raise PortunusError("validation.unknown_field",
                            f"unknown field {_shown(unknown[0])}: PUT /v1/rules/{{id}} changes only rate_limit",
                            field=unknown[0])
    if "rate_limit" not in body:
        raise PortunusError("validation.missing_field", "rate_limit is required (null makes the rule uncapped)")
    return RateLimit.from_dict(body["rate_limit"])


def update_rule_caps(core, rule_id: str, body, *, request_id: str | None = None,
                     ack_timeout: float = 2.0) -> dict:
    """Replace a rule's caps (nothing else), persist the spec, push the rule again. The client keeps
    the rule's limiter (a hot update, SPEC §2.9); an offline client gets the new spec on replay.
    Returns the rule view plus ``client_notified``."""
    cap = parse_rule_caps_body(body)
    view = store_rules.get_rule(core.store, rule_id)  # not_found for an unknown id
    client = store_clients.get_client(core.store, view["client_id"])
    if cap is not None:
        _capability_gate(client)
    stored = next((r for r in store_rules.rules_for_client(core.store, client["client_id"])
                   if r.rule_id == rule_id), None)
    if stored is None:  # removed meanwhile
        raise PortunusError("not_found", f"rule {rule_id} not found", rule_id=rule_id)
    rule = replace(stored, rate_limit=cap)
    store_rules.update_rule_spec(core.store, rule)
    log.info("rule.rate_limit_updated", rule=rule_id, client_id=client["client_id"],
             rate_limit=cap.to_dict() if cap else None, request_id=request_id)
    notified = False
    if view["state"] != "failed" and core.hub.session_info(client["client_id"]) is not None:
        try:
            ack = core.hub.call(core.hub.push_rule, client["client_id"], rule.to_dict(), request_id).result(5)
            status = ack.result(ack_timeout)
            notified = True
            if status.get("state") == "failed":
                store_rules.set_rule_state(core.store, rule_id, "failed", status.get("reason") or "update failed")
        except concurrent.futures.TimeoutError:
            notified = True  # sent; the ack is late (its status is applied when it comes)
        except PortunusError as exc:
            if exc.code != "client_not_connected":
                raise
    return {**store_rules.get_rule(core.store, rule_id), "client_notified": notified}


def attach_owner_caps(store: Store, hub, core) -> OwnerCapService:
    """``serve``'s wiring: pushes through ``hub.post_update`` (any thread -> the loop), the hub's
    reconnect replay (``hub.owner_caps``, sent before quotas and rules), and ``core.owner_caps``
    for the routes and the rule-removal hook."""
    service = OwnerCapService(store, publish=lambda push: hub.post_update(push.client_id, push.message()))
    hub.owner_caps = service
    core.owner_caps = service
    return service

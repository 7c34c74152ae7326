"""The control hub's ``ClientRegistry`` on the SQLite store (control/registry.py is the interface)."""

from __future__ import annotations

from typing import Iterable

from ..model import Rule
from ..store import clients as store_clients
from ..store import rules as store_rules
from ..store.db import Store


class StoreClientRegistry:
    """Clients and their rules as the hub sees them; every call blocks on the database (run off the loop)."""

    def __init__(self, store: Store):
        self.store = store

    def redeem_enrollment(self, code: str) -> tuple[dict, str]:
        return store_clients.redeem_enrollment(self.store, code)

    def authenticate_client(self, token: str) -> dict:
        return store_clients.authenticate_client(self.store, token)

    def record_connection(self, client_id: str, client_version: str | None, capabilities: Iterable[str]) -> None:
        store_clients.record_connection(self.store, client_id, client_version, capabilities)

    def replay_rules(self, client_id: str) -> tuple[list[Rule], set[str]]:
        failed = {r["rule_id"] for r in store_rules.list_rules(self.store, client_id=client_id)
                  if r["state"] == "failed"}
        return store_rules.rules_for_client(self.store, client_id), failed

    def set_rule_state(self, rule_id: str, state: str, reason: str | None) -> None:
        store_rules.set_rule_state(self.store, rule_id, state, reason)

    def set_rule_state_unless_stored(self, rule_id: str, state: str, reason: str | None) -> None:
        row = store_rules.get_rule(self.store, rule_id)  # a read: WAL readers never wait for the writer
        if row["state"] != state:  # the waiter stored it (with its own wording of a failure reason)
            store_rules.set_rule_state(self.store, rule_id, state, reason)

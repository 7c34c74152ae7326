"""What the control hub needs from the server's state, as an interface (the hub never imports the store).

``server.client_registry.StoreClientRegistry`` implements it on the SQLite store. Every method
blocks (it reads or writes the database), so the hub calls them through ``Offload``, never on
the loop thread.
"""

from __future__ import annotations

from typing import Iterable, Protocol

from ..model import Rule


class ClientRegistry(Protocol):
    def redeem_enrollment(self, code: str) -> tuple[dict, str]:
        """Consume a one-time code: (client, its new plaintext token); ``PortunusError`` if invalid."""

    def authenticate_client(self, token: str) -> dict:
        """The client a bearer token belongs to; ``PortunusError`` (``token_revoked`` …) otherwise."""

    def record_connection(self, client_id: str, client_version: str | None, capabilities: Iterable[str]) -> None:
        """A client said hello: remember when, its version and its capabilities."""

    def replay_rules(self, client_id: str) -> tuple[list[Rule], set[str]]:
        """Every stored rule of the client (oldest first) and the ids of those in state ``failed``."""

    def set_rule_state(self, rule_id: str, state: str, reason: str | None) -> None:
        """Persist what the client reported; ``PortunusError`` if the rule is gone."""

    def set_rule_state_unless_stored(self, rule_id: str, state: str, reason: str | None) -> None:
        """``set_rule_state`` unless the store already holds that state (then only a read:
        no write lock taken); ``PortunusError`` if the rule is gone."""

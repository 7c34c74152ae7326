"""What ``ServerCore`` needs from the control hub, as an interface, and the hub of an offline command.

``control.hub.Hub`` is the live implementation (on the loop; every method here is safe from
an HTTP thread). ``OfflineHub`` is the one a command uses when no ``serve`` runs (offline
``enroll-client``): no client is connected, so nothing can be pushed or disconnected.
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Protocol

from ..errors import PortunusError


class ControlHub(Protocol):
    bound_port: int | None  # the control port the listener took (port 0 in server.toml picks one); None offline

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on the hub's thread; the future holds its result."""

    def session_info(self, client_id: str) -> dict | None:
        """The connected session of a client (remote_addr, connected_at, version, capabilities), else None."""

    def push_rule(self, client_id: str, rule_dict: dict, request_id: str | None) -> concurrent.futures.Future:
        """Send a rule; the future resolves with the client's rule_status (hub thread only, via ``call``)."""

    def remove_rule(self, client_id: str, rule_id: str, request_id: str | None) -> bool:
        """Tell a connected client to remove a rule; False if it is not connected (hub thread only)."""

    def disconnect(self, client_id: str, code: str, message: str) -> bool:
        """Close a client's session with an error (hub thread only)."""

    def post_update(self, client_id: str, update: dict) -> None:
        """From any thread: an owner-cap or quota update for the client, if it is connected."""

    def connected_ids(self) -> set[str]: ...

    def auth_failure_counts(self) -> dict[str, int]: ...

    def rejected_message_counts(self) -> dict[str, int]: ...

    def owner_stat_rows(self) -> dict[str, list[dict]]: ...


class OfflineHub:
    """No listener and no sessions: what the server's services see while ``serve`` is not running."""

    bound_port: int | None = None

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args))
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    def session_info(self, client_id: str) -> dict | None:
        return None

    def push_rule(self, client_id: str, rule_dict: dict, request_id: str | None) -> concurrent.futures.Future:
        ack: concurrent.futures.Future = concurrent.futures.Future()
        ack.set_exception(PortunusError("client_not_connected", f"client {client_id} is not connected"))
        return ack

    def remove_rule(self, client_id: str, rule_id: str, request_id: str | None) -> bool:
        return False

    def disconnect(self, client_id: str, code: str, message: str) -> bool:
        return False

    def post_update(self, client_id: str, update: dict) -> None:
        """Nothing is connected: the client's reconnect replay reads the stored state."""

    def connected_ids(self) -> set[str]:
        return set()

    def auth_failure_counts(self) -> dict[str, int]:
        return {}

    def rejected_message_counts(self) -> dict[str, int]:
        return {}

    def owner_stat_rows(self) -> dict[str, list[dict]]:
        return {}

"""One authenticated client channel on the server and what the server told it.

Split out of ``control.hub`` (which re-exports ``ClientSession``): the session's own checks —
whether a rule message is about this client's rule, whether it may receive an update type —
live with the state they read.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time

from . import stats_report
from .channel import Channel

# why a message about a rule was dropped (labels of portunus_control_rejected_messages_total)
RULE_NOT_OWNED = "rule_not_owned"
REQUEST_ID_UNKNOWN = "request_id_unknown"
# the capability a client needs before it is sent a non-rule update of that type (SPEC §3.4)
UPDATE_CAPABILITIES = {"owner_rate_limit_update": "rate_limit", "traffic_quota_update": "traffic_quota"}


class ClientSession:
    """One authenticated client channel and what the server told it.

    ``rules`` holds the shapes of the rules this client owns (None until the replay
    has loaded them): every message about a rule is checked against it.
    ``sent_requests`` is the request id of the last push or remove sent per rule.
    ``held_updates`` keeps owner-cap / quota updates published while the replay still loads:
    they are newer than what the replay read, so they go out right after its updates.
    """

    __slots__ = ("serial", "client_id", "client_name", "channel", "capabilities", "client_version",
                 "connected_at", "remote_addr", "waiters", "rules", "sent_requests", "removing", "last_status",
                 "replayed", "held_updates")

    _serials = itertools.count(1)

    def __init__(self, client: dict, channel: Channel, hello: dict):
        self.serial = next(self._serials)
        self.client_id = client["client_id"]
        self.client_name = client["client_name"]
        self.channel = channel
        self.capabilities = list(hello.get("capabilities", []))
        self.client_version = hello.get("client_version")
        self.connected_at = time.time()
        self.remote_addr = channel.peer
        self.waiters: dict[str, list[concurrent.futures.Future]] = {}
        self.rules: dict[str, stats_report.RuleShape] | None = None
        self.sent_requests: dict[str, str | None] = {}
        self.removing: dict[str, str | None] = {}  # removed rule id -> request id of the remove
        self.last_status: dict[str, tuple] = {}  # rule id -> (state, reason) last applied
        self.replayed = False
        self.held_updates: list[dict] = []

    def owns(self, rule_id: str) -> bool:
        return self.rules is not None and rule_id in self.rules

    def may_receive(self, update: dict) -> bool:
        """Whether this client announced the capability a non-rule update of this type needs."""
        need = UPDATE_CAPABILITIES.get(update["type"])
        return need is None or need in self.capabilities

    def rule_status_problem(self, msg: dict) -> str | None:
        """Why a rule_status may not be applied, or None when it is about this client's rule."""
        rule_id, request_id = msg["rule_id"], msg.get("request_id")
        if msg["state"] == "removed" and rule_id in self.removing:
            expected = self.removing[rule_id]
        elif self.owns(rule_id):
            expected = self.sent_requests.get(rule_id)
        else:
            return RULE_NOT_OWNED
        if request_id is not None and request_id != expected:
            return REQUEST_ID_UNKNOWN
        return None

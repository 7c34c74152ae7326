"""The one interface ``RuleRuntime`` drives: the relay of one rule, TCP or UDP.

``relay/tcp.py`` (listeners + connections) and ``relay/udp.py`` (listen sockets +
flows) both implement it, so the runtime never asks which kind it holds. Every
method runs on the loop thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from ..model import Rule


@dataclass
class RuntimeSettings:
    """Defaults a rule may override (``udp_*``) and how long a removed rule may drain."""

    udp_max_flows: int = 1024
    udp_flow_idle_secs: float = 60.0
    drain_timeout: float = 30.0


@runtime_checkable
class RuleRelay(Protocol):
    """Listening sockets and live sessions (TCP connections, UDP flows) of one rule.

    Constructed as ``Relay(ctx, rule, counters, settings)``; ``settings`` is read
    at construction and on ``update``, never later (a changed default reaches a
    rule at its next update, as before).
    """

    rule: Rule
    # set by the runtime while the rule drains; called once when the last session ends
    on_idle: Callable[[], None] | None

    def bind(self) -> None:
        """Bind every listen port or none; raise ``BindError`` naming the first port that failed."""

    def start(self) -> None:
        """Start serving on the bound sockets (and start active probes, if the rule has them)."""

    def update(self, rule: Rule, settings: RuntimeSettings) -> None:
        """Same listeners, new targets/options: applies to new sessions, live ones stay."""

    def close_listeners(self) -> None:
        """Stop taking new sessions. Sessions that cannot outlive their listener end here too
        (a UDP flow answers through the listen socket); TCP connections drain."""

    def abort_sessions(self) -> None:
        """End every live session now (the drain timeout passed)."""

    @property
    def active(self) -> int:
        """Live sessions: TCP connections or UDP flows."""

    def snapshot(self) -> list[dict]:
        """Per-target rows (health, counters) as the stats report carries them."""

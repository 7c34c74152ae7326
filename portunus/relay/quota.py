"""Traffic quota enforcement on the client (SPEC §2.10, §3.4), sans-IO: budgets, not sockets.

One ``QuotaHandle`` per (user, client) — on a client, one per user, kept in a ``QuotaBook``. A
handle with no state is unmetered. The server's ``traffic_quota_update`` installs or replaces its
state; every data path of that user's rules asks it before moving bytes and debits what moved:

    n = handle.allow(SPLICE_CHUNK)        # TCP splice or recv: at most the remaining budget
    if n == 0: cut                        # exhausted (allow never answers 0 otherwise for want > 0)
    moved = os.splice(src, pipe_w, n) …   # or recv_into(view[:n])
    handle.debit(moved)                   # at read time, so two pumps cannot spend one byte twice
    ok = handle.admit_datagram(len(dgram))  # UDP: the whole datagram or nothing

Bytes are debited when they leave the source socket, so the sum over every connection and both
directions never exceeds the budget: a quota-bound splice stays on the kernel path and the cut
lands within the chunk in flight. When the budget runs out the handle turns exhausted and calls
its listeners once (relays cut the pair's connections, the agent tells the server); it stays
exhausted — ``allow`` 0, datagrams refused — until a fresh state arrives.

The server computes the budget from the bytes it has been told about. Bytes debited here since
the last stats report sent (``mark_reported``) are not in that figure yet, so a new state is
installed minus them: the client and the server agree once that report lands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

COUNTER_LIMIT = 1 << 63


class QuotaStateError(ValueError):
    """A ``traffic_quota_update`` state this handle cannot install (names the bad field)."""


def _counter(state: dict, name: str) -> int:
    value = state.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < COUNTER_LIMIT:
        raise QuotaStateError(f"traffic quota state {name} must be an integer 0..2^63-1, got {value!r:.40}")
    return value


@dataclass(frozen=True)
class QuotaState:
    monthly_bytes: int
    budget_remaining_bytes: int
    period_started_at: int
    period_ends_at: int
    exhausted: bool

    @classmethod
    def from_message(cls, state) -> "QuotaState":
        """From the ``state`` object of a ``traffic_quota_update {action: set}``."""
        if not isinstance(state, dict):
            raise QuotaStateError(f"traffic quota state must be an object, got {state!r:.40}")
        exhausted = state.get("exhausted")
        if not isinstance(exhausted, bool):
            raise QuotaStateError(f"traffic quota state exhausted must be true or false, got {exhausted!r:.40}")
        return cls(_counter(state, "monthly_bytes"), _counter(state, "budget_remaining_bytes"),
                   _counter(state, "period_started_at"), _counter(state, "period_ends_at"), exhausted)


Listener = Callable[["QuotaHandle"], None]


class QuotaHandle:
    __slots__ = ("user_id", "state", "remaining", "exhausted", "debited_total", "_unreported", "_listeners")

    def __init__(self, user_id: str):
        self.user_id = user_id
        self.state: QuotaState | None = None
        self.remaining: int | None = None   # None: unmetered
        self.exhausted = False
        self.debited_total = 0              # every byte debited since the handle existed
        self._unreported = 0                # debited since the last stats report went out
        self._listeners: list[Listener] = []

    @property
    def limited(self) -> bool:
        return self.remaining is not None

    # ---------------------------------------------------------------- the data paths

    def allow(self, want: int) -> int:
        """How many of ``want`` bytes a splice or recv may move now (0 only when exhausted)."""
        if self.remaining is None:
            return want
        if self.exhausted:
            return 0
        return min(want, self.remaining)

    def debit(self, n: int) -> None:
        """Count ``n`` bytes taken off a source socket; the last byte of the budget exhausts."""
        if n <= 0:
            return
        self.debited_total += n
        self._unreported += n
        if self.remaining is None:
            return
        self.remaining = max(0, self.remaining - n)
        if self.remaining == 0:
            self._exhaust()

    def admit_datagram(self, size: int) -> bool:
        """UDP: debit and admit a whole datagram, or refuse it. One that no longer fits ends the
        budget (what is left is less than a datagram): the pair turns exhausted."""
        if self.remaining is None:
            self.debit(size)
            return True
        if self.exhausted:
            return False
        if size > self.remaining:
            self._exhaust()
            return False
        self.debit(size)
        return True

    def admit_datagrams(self, sizes, total: int | None = None) -> int:
        """UDP, a batch: how many of ``sizes`` (datagram lengths, in order) pass, debited in one
        step — the same answer, debit, exhaustion and listener call as ``admit_datagram`` asked
        for each in turn. What passes is always a prefix: the first datagram that does not fit
        (or any after the budget reached 0) ends the budget, and every later one is refused too.
        ``total``: ``sum(sizes)`` when the caller has it."""
        if total is None:
            total = sum(sizes)
        if self.remaining is None:
            self.debit(total)
            return len(sizes)
        if self.exhausted:
            return 0
        left = self.remaining
        if total < left:  # the common case: all of them, and the budget does not reach 0
            self.debit(total)
            return len(sizes)
        taken = k = 0
        for size in sizes:
            if (taken and taken == left) or size > left - taken:
                break
            taken += size
            k += 1
        self.debit(taken)       # exhausts here if the budget reached 0 exactly
        if k < len(sizes):
            self._exhaust()     # the first refused one ends the budget (no-op if it did already)
        return k

    # ---------------------------------------------------------------- state from the server

    def apply_state(self, state: QuotaState) -> None:
        """Install or replace the state (``traffic_quota_update {action: set}``)."""
        self.state = state
        self.remaining = max(0, state.budget_remaining_bytes - self._unreported)
        if state.exhausted or self.remaining == 0:
            self._exhaust()
        else:
            self.exhausted = False

    def clear(self) -> None:
        """The quota was removed: unmetered again (``action: remove``)."""
        self.state = None
        self.remaining = None
        self.exhausted = False

    def mark_reported(self) -> None:
        """A stats report carrying every byte debited so far went out to the server."""
        self._unreported = 0

    # ---------------------------------------------------------------- exhaustion listeners

    def add_listener(self, listener: Listener) -> None:
        """Called with the handle each time it turns exhausted (on the thread that debited;
        a relay should schedule its cut rather than close sockets from inside a pump)."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _exhaust(self) -> None:
        if self.exhausted:
            return
        self.exhausted = True
        failed = None
        for listener in list(self._listeners):
            try:
                listener(self)
            except Exception as e:  # every listener still runs; the first failure surfaces
                failed = failed or e
        if failed is not None:
            raise failed


class QuotaBook:
    """The client's handles by user id. A handle, once asked for, lives as long as the book, so
    relays may hold it: a removed quota leaves it unmetered, a new one limits it again."""

    def __init__(self):
        self._handles: dict[str, QuotaHandle] = {}

    def handle(self, user_id: str) -> QuotaHandle:
        handle = self._handles.get(user_id)
        if handle is None:
            handle = self._handles[user_id] = QuotaHandle(user_id)
        return handle

    def apply_update(self, msg: dict) -> QuotaHandle:
        """Apply a validated ``traffic_quota_update``; returns the handle it changed
        (the agent logs ``traffic_quota.applied_set`` for a ``set``)."""
        handle = self.handle(msg["user_id"])
        if msg["action"] == "set":
            handle.apply_state(QuotaState.from_message(msg.get("state")))
        else:
            handle.clear()
        return handle

    def mark_reported(self) -> None:
        for handle in self._handles.values():
            handle.mark_reported()

    def exhausted_users(self) -> list[str]:
        return sorted(u for u, h in self._handles.items() if h.exhausted)

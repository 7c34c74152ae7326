"""Rate limits and QoS on the data plane (SPEC §2.9), sans-IO: no sockets, no timers, no loop.

Every method takes ``now`` (monotonic seconds, the loop's clock), so tests move time by hand.
The buckets, limiters and tickets live here; ``LimiterBook``, the registry of one client's
limiters, in ``relay.limiter_book``.

    book = LimiterBook("edge-01")
    book.set_rule("web", owner="alice", cap=rule.rate_limit, now=loop.time())
    book.set_owner_cap("alice", owner_cap, now)
    ticket = book.admit("web", "tcp", now)          # at accept / flow creation
    if isinstance(ticket, str):                     # one of REJECT_REASONS: RST (TCP) or drop (UDP)
        ...
    n = ticket.allowance("in", len(buf), now)       # TCP: how many bytes this read may move now
    if n == 0:
        bucket, arm_at = ticket.park("in", pump, now)   # park the read half; arm_at: arm ONE timer
    else:
        ticket.spend("in", sock.recv_into(buf, n), now)
    ticket.datagram("out", 1200, now)               # UDP: all or nothing
    ticket.release(now)                             # connection / flow closed

One refill timer per bucket: the first pump parked on a bucket gets the instant to arm a timer at;
the next ones just join its waiter list. When the timer fires, ``bucket.due(now, armed_for=when)``
hands back the few waiters the refilled tokens can serve, from the front of the queue, and the
instant to re-arm the timer at for the rest (a stale timer resumes nobody); a pump that still
gets nothing parks again at the back. Hot updates and removals return the waiters the relay must
resume at once.

Tokens are integers scaled by 10^9 and time is integer nanoseconds, so a refill is one exact
multiplication: 1 B/s and 10 Gbit/s are as precise as each other, and nothing drifts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from ..model import RateLimit, Rule

NS = 1_000_000_000          # nanoseconds per second; also the token scale
DIRECTIONS = ("in", "out")  # in: from the connecting peer towards the target (bytes_in); out: back

REJECT_REASONS = ("conn_concurrent", "conn_rate", "udp_flow_rate",
                  "owner_concurrent", "owner_conn_rate", "owner_udp_flow_rate")


def _ns(now: float) -> int:
    return int(round(now * NS))


def splice_allowed(rule: Rule, owner_cap: RateLimit | None, *, linux: bool, disabled: bool) -> bool:
    """The splice predicate (SPEC §2.9), the one place it is decided: Linux ∧ TCP ∧ not disabled ∧
    no bandwidth cap on the rule ∧ none on its owner. Connection-rate and concurrency caps keep splice."""
    rule_bw = rule.rate_limit is not None and rule.rate_limit.has_bandwidth_cap
    owner_bw = owner_cap is not None and owner_cap.has_bandwidth_cap
    return linux and rule.protocol == "tcp" and not disabled and not rule_bw and not owner_bw


# ---------------------------------------------------------------- token bucket

class TokenBucket:
    """``rate`` tokens per second up to ``burst`` (default one second of rate), starting full.

    Refilled lazily from the elapsed time on every call: no timer per connection. Waiters are the
    parked readers of this bucket; ``timer_due`` is the instant of its one armed refill timer.
    """

    __slots__ = ("rate", "burst", "_level", "_at", "waiters", "turn", "timer_due", "_throttled_ns",
                 "_throttle_since")

    def __init__(self, rate: int, burst: int | None = None, *, now: float):
        self.rate, self.burst = self._checked(rate, burst)
        self._level = self.burst * NS       # tokens * NS
        self._at = _ns(now)
        self.waiters: dict = {}             # insertion-ordered set: FIFO wake order
        self.turn: set = set()              # the waiters the last timer tick woke
        self.timer_due: float | None = None
        self._throttled_ns = 0
        self._throttle_since: int | None = None

    @staticmethod
    def _checked(rate: int, burst: int | None) -> tuple[int, int]:
        if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
            raise ValueError(f"rate must be a positive integer, got {rate!r}")
        burst = rate if burst is None else burst
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be a positive integer, got {burst!r}")
        return rate, burst

    def _refill(self, now: float) -> None:
        t = _ns(now)
        if t <= self._at:
            return  # a clock that stands still (or steps back) refills nothing
        self._level = min(self.burst * NS, self._level + (t - self._at) * self.rate)
        self._at = t

    def available(self, now: float) -> int:
        """Whole tokens available now."""
        self._refill(now)
        return self._level // NS

    def take(self, n: int, now: float) -> int:
        """Take up to ``n`` whole tokens; returns how many were granted (0..n)."""
        granted = min(n, self.available(now))
        if granted > 0:
            self._level -= granted * NS
        return granted

    def take_exactly(self, n: int, now: float) -> bool:
        """All or nothing: take ``n`` tokens if they are there (a UDP datagram, a new connection)."""
        if n > self.available(now):
            return False
        self._level -= n * NS
        return True

    def wait_for(self, n: int, now: float) -> float:
        """Seconds until ``n`` tokens are available (``n`` is capped at the burst: more never fits)."""
        self._refill(now)
        deficit = min(n, self.burst) * NS - self._level
        if deficit <= 0:
            return 0.0
        return -(-deficit // self.rate) / NS  # ceil: waking a nanosecond early would find too little

    def wake_quantum(self) -> int:
        """Tokens a parked reader waits for: ~10 ms of rate (at least 1, at most the burst), so a
        fast bucket does not wake per byte and a slow one wakes for the first byte."""
        return max(1, min(self.burst, -(-self.rate // 100)))

    def update(self, rate: int, burst: int | None, now: float) -> None:
        """Hot update: settle the old rate up to now, then switch. Raising a cap mints no tokens;
        lowering the burst trims the level to it."""
        rate, burst = self._checked(rate, burst)
        self._refill(now)
        self.rate, self.burst = rate, burst
        self._level = min(self._level, burst * NS)

    # ---- parking ---------------------------------------------------------

    def park(self, waiter, now: float) -> float | None:
        """Add a parked reader (at the back of the queue). Returns the instant to arm this bucket's
        refill timer at, or None when one is already armed (the waiter then rides on it)."""
        self.turn.discard(waiter)
        self.waiters[waiter] = None
        if self._throttle_since is None:
            self._throttle_since = _ns(now)
        if self.timer_due is not None:
            return None
        self.timer_due = now + self.wait_for(self.wake_quantum(), now)
        return self.timer_due

    def unpark(self, waiter, now: float) -> None:
        """A parked or woken reader went away (its connection closed)."""
        self.waiters.pop(waiter, None)
        self.turn.discard(waiter)
        if not self.waiters:
            self._stop_throttle(now)

    def may_move(self, waiter) -> bool:
        """Whether a reader may take tokens now: nobody is queued, or it was woken for this round
        (a reader that happens to poll often must queue behind the parked ones, not starve them)."""
        return not self.waiters or waiter in self.turn

    def due(self, now: float, armed_for: float | None = None) -> tuple[list, float | None]:
        """The refill timer fired. Returns the waiters to resume — as many, from the front of the
        queue, as the tokens there can serve a wake quantum each (at least one) — and the instant
        to re-arm the timer at for the rest (None: nobody is left). ``armed_for`` is the instant the
        timer was armed at: a stale timer (the bucket re-armed since, after a hot update) resumes
        nobody, so a bucket never runs two timers. Resuming a few per tick keeps the cost of a
        thousand throttled connections at a few wake-ups per tick, not a thousand."""
        if armed_for is not None and armed_for != self.timer_due:
            return [], None
        quantum = self.wake_quantum()
        count = max(1, self.available(now) // quantum)
        woken = list(itertools.islice(self.waiters, count))
        for waiter in woken:
            del self.waiters[waiter]
        self.turn = set(woken)
        if self.waiters:
            self.timer_due = now + max(self.wait_for(quantum * (count + 1), now), -(-quantum * NS // self.rate) / NS)
        else:
            self.timer_due = None
            self._stop_throttle(now)
        return woken, self.timer_due

    def resume_all(self, now: float) -> list:
        """Every waiter, to resume at once (the cap changed or went away); the armed timer goes stale."""
        self.timer_due = None
        woken = list(self.waiters)
        self.waiters.clear()
        self.turn = set()
        self._stop_throttle(now)
        return woken

    def _stop_throttle(self, now: float) -> None:
        if self._throttle_since is not None:
            self._throttled_ns += max(0, _ns(now) - self._throttle_since)
            self._throttle_since = None

    def throttle_seconds(self, now: float) -> float:
        """Seconds this bucket has had at least one parked reader (``…_throttle_seconds_total``)."""
        running = max(0, _ns(now) - self._throttle_since) if self._throttle_since is not None else 0
        return (self._throttled_ns + running) / NS


# ---------------------------------------------------------------- one scope

@dataclass
class LimiterCounters:
    """Cumulative per-scope counters for metrics and stats; they survive hot updates."""

    rejects: dict = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))
    bandwidth_dropped_in: int = 0
    bandwidth_dropped_out: int = 0
    throttle_seconds_retired: dict = field(default_factory=lambda: dict.fromkeys(DIRECTIONS, 0.0))

    def count_drop(self, direction: str) -> None:
        if direction == "in":
            self.bandwidth_dropped_in += 1
        else:
            self.bandwidth_dropped_out += 1


class Limiter:
    """The caps of one scope: a rule (``owner`` is its owner), or an owner envelope (``rule_id`` None).

    Holds the bandwidth in/out buckets and the new-connections bucket; a rule's Limiter also counts
    its live connections (an owner's live count is the LimiterBook's, because it must be right
    even for connections admitted before the owner had a cap). An uncapped rule still gets a
    Limiter: its connections are counted and its owner-cap rejects recorded against it.
    """

    def __init__(self, client_id: str, rule_id: str | None, owner: str | None, cap: RateLimit | None, now: float):
        self.client_id, self.rule_id, self.owner = client_id, rule_id, owner
        self.cap: RateLimit | None = None
        self.bw_capped = False              # cap.has_bandwidth_cap, kept with cap (asked per userspace read)
        self.bandwidth: dict[str, TokenBucket | None] = dict.fromkeys(DIRECTIONS)
        self.new_connections: TokenBucket | None = None
        self.concurrent = 0                 # live connections / flows (rule scopes)
        self.counters = LimiterCounters()
        self.update(cap, now)

    @property
    def is_owner_envelope(self) -> bool:
        return self.rule_id is None

    @property
    def has_bandwidth_cap(self) -> bool:
        return self.bw_capped

    def labels(self) -> dict:
        """Metric labels (SPEC §8.1): owner aggregate rows use ``rule=""``."""
        return {"client": self.client_id, "rule": self.rule_id or "", "owner": self.owner or ""}

    def update(self, cap: RateLimit | None, now: float) -> list:
        """Apply new caps keeping bucket state. Returns the parked readers the relay must resume
        now: those of a bucket that went away (its cap was removed; the counted throttle time is
        kept) and of a kept bucket whose rate or burst changed (their timer was armed for the old
        rate; it goes stale and they park again, arming a new one)."""
        self.cap = cap
        self.bw_capped = cap is not None and cap.has_bandwidth_cap
        c = cap or RateLimit()
        woken = []
        for direction, rate, burst in (("in", c.bandwidth_in_bps, c.bandwidth_in_burst),
                                       ("out", c.bandwidth_out_bps, c.bandwidth_out_burst)):
            old = self.bandwidth[direction]
            before = (old.rate, old.burst) if old is not None else None
            new = self.bandwidth[direction] = self._rebucket(old, rate, burst, now)
            if old is not None and new is None:
                woken += old.resume_all(now)
                self.counters.throttle_seconds_retired[direction] += old.throttle_seconds(now)
            elif new is not None and before is not None and (new.rate, new.burst) != before:
                woken += new.resume_all(now)
        self.new_connections = self._rebucket(self.new_connections, c.new_connections_per_sec,
                                              c.new_connections_burst, now)
        return woken

    @staticmethod
    def _rebucket(bucket: TokenBucket | None, rate: int | None, burst: int | None, now: float):
        if rate is None:
            return None
        if bucket is None:
            return TokenBucket(rate, burst, now=now)  # a cap where there was none starts full
        bucket.update(rate, burst, now)
        return bucket

    def refusal(self, protocol: str, live: int, now: float) -> str | None:
        """The reject reason this scope would give a new connection now (``live`` connections in
        the scope), consuming nothing."""
        owner = self.is_owner_envelope
        limit = self.cap.concurrent_connections if self.cap else None
        if limit is not None and live >= limit:
            return "owner_concurrent" if owner else "conn_concurrent"
        if self.new_connections is not None and self.new_connections.available(now) < 1:
            reason = "udp_flow_rate" if protocol == "udp" else "conn_rate"
            return "owner_" + reason if owner else reason

    def admit(self, now: float) -> None:
        """Spend a new-connection token: the whole chain admitted."""
        if self.new_connections is not None:
            self.new_connections.take(1, now)

    def throttle_seconds(self, direction: str, now: float) -> float:
        bucket = self.bandwidth[direction]
        live = bucket.throttle_seconds(now) if bucket is not None else 0.0
        return self.counters.throttle_seconds_retired[direction] + live

    def retire(self, now: float) -> list:
        """The scope is going away: its waiters to resume (they run uncapped by it from now on)."""
        woken = []
        for direction, bucket in self.bandwidth.items():
            if bucket is not None:
                woken += bucket.resume_all(now)
                self.counters.throttle_seconds_retired[direction] += bucket.throttle_seconds(now)
                self.bandwidth[direction] = None  # tickets that still hold this scope stop paying it
        return woken


# ---------------------------------------------------------------- one connection / flow

class Ticket:
    """An admitted connection or flow: the chain of scopes it is accounted to (owner envelope first,
    then the rule). ``release`` gives back its concurrency slots, exactly once.

    With ``owner_scope`` (the book: ``owner_scope.owner_limiter(owner)`` looks up the owner's current
    envelope) the chain follows the envelope: one installed after the connection was admitted caps it
    from then on too. A ticket is per connection, so it holds no closure and no dict until it parks."""

    __slots__ = ("_chain", "rule", "_owner_live", "_owner", "_parked", "released", "_owner_scope")

    def __init__(self, chain: tuple[Limiter, ...], rule: Limiter, owner_live: dict[str, int],
                 owner_scope=None):
        self._chain = chain
        self._owner_scope = owner_scope
        self.rule = rule
        self._owner_live = owner_live
        self._owner = rule.owner
        self._parked: dict[str, tuple[TokenBucket, object]] | None = None  # made at the first park
        self.released = False

    @property
    def chain(self) -> tuple[Limiter, ...]:
        if self._owner_scope is None:
            return self._chain
        owner = self._owner_scope.owner_limiter(self._owner)
        return (owner, self.rule) if owner is not None else (self.rule,)

    def _buckets(self, direction: str) -> list[TokenBucket]:
        return [b for b in (lim.bandwidth[direction] for lim in self.chain) if b is not None]

    @property
    def bandwidth_capped(self) -> bool:
        """Whether a scope of the chain caps bandwidth now. Asked per userspace read: the flags of
        the fixed chain, or the rule's and then its owner's current envelope; no chain tuple built."""
        if self.rule.bw_capped:
            return True
        owner = self._owner
        if not owner:
            return False  # the rule is the whole chain
        scope = self._owner_scope
        if scope is None:
            return self._chain[0].bw_capped  # the fixed chain: the owner envelope (if any) first
        lim = scope.owner_limiter(owner)
        return lim is not None and lim.bw_capped

    def allowance(self, direction: str, want: int, now: float) -> int:
        """TCP: how many of ``want`` bytes the next read may move now (nothing is taken yet).

        0 — park — while a bucket of the chain has a queue this reader was not woken from (see
        ``TokenBucket.may_move``) or holds less than ``min(want, wake quantum)``: reads move at
        least ~10 ms of rate, never a trickle of tiny chunks. A woken reader keeps its turn until
        it is allowed nothing and parks again."""
        buckets = self._buckets(direction)
        if not buckets:
            return want
        parked = self._parked
        waiter = parked[direction][1] if parked is not None and direction in parked else None
        n = want
        for b in buckets:
            have = b.available(now)
            if not b.may_move(waiter) or have < min(want, b.wake_quantum()):
                return 0
            n = min(n, have)
        return n

    def spend(self, direction: str, n: int, now: float) -> None:
        """The read moved ``n`` bytes (at most the allowance): debit every bucket of the chain."""
        for b in self._buckets(direction):
            b.take(n, now)

    def grant(self, direction: str, want: int, now: float) -> int:
        """``allowance`` and ``spend`` at once, for a caller that moves exactly what it is allowed."""
        n = self.allowance(direction, want, now)
        self.spend(direction, n, now)
        return n

    def park(self, direction: str, waiter, now: float) -> tuple[TokenBucket | None, float | None]:
        """Park a reader that was allowed nothing on the bucket that refills last. Returns that
        bucket and the instant to arm its timer at (None: a timer is already armed, or no bucket)."""
        buckets = self._buckets(direction)
        if not buckets:
            return None, None
        # the bucket that refills last; at a tie, one that already has a queue (and a timer)
        slowest = max(buckets, key=lambda b: (b.wait_for(b.wake_quantum(), now), bool(b.waiters)))
        for b in buckets:
            b.turn.discard(waiter)
        if self._parked is None:
            self._parked = {}
        self._parked[direction] = (slowest, waiter)
        return slowest, slowest.park(waiter, now)

    def datagram(self, direction: str, size: int, now: float) -> bool:
        """UDP: pass the whole datagram or drop it. A drop counts on the rule (its stats) and, when
        the owner envelope refused it, on the envelope too."""
        buckets = self._buckets(direction)
        refuser = next((lim for lim in self.chain
                        if lim.bandwidth[direction] is not None and lim.bandwidth[direction].available(now) < size),
                       None)
        if refuser is None:
            for b in buckets:
                b.take_exactly(size, now)
            return True
        for lim in {id(self.rule): self.rule, id(refuser): refuser}.values():
            lim.counters.count_drop(direction)
        return False

    def release(self, now: float) -> None:
        """The connection or flow closed: give back its concurrency slots (once) and leave any
        bucket it was parked on."""
        if self.released:
            return
        self.released = True
        if self._parked is not None:
            for bucket, waiter in self._parked.values():
                bucket.unpark(waiter, now)
            self._parked = None
        self.rule.concurrent -= 1
        if self._owner:
            left = self._owner_live[self._owner] - 1
            if left:
                self._owner_live[self._owner] = left
            else:
                del self._owner_live[self._owner]

"""The client's QuotaHandle (SPEC §2.10): budget arithmetic on every path — splice chunking,
userspace copies, UDP datagrams all-or-nothing — state replacement from traffic_quota_update,
the unreported-bytes correction, and exhaustion listeners."""

from __future__ import annotations

import random

import pytest

from portunus.relay.quota import QuotaBook, QuotaHandle, QuotaState, QuotaStateError

SPLICE_CHUNK = 1 << 20   # relay/tcp.py's splice request size
COPY_BUFFER = 256 << 10  # a userspace copy buffer
MiB = 1 << 20


def state(remaining: int, *, monthly: int | None = None, exhausted: bool = False) -> QuotaState:
    return QuotaState(monthly if monthly is not None else remaining, remaining, 1_800_000_000, 1_802_592_000,
                      exhausted)


def limited(remaining: int) -> tuple[QuotaHandle, list]:
    handle, fired = QuotaHandle("alice"), []
    handle.add_listener(fired.append)
    handle.apply_state(state(remaining))
    return handle, fired


class Source:
    """A socket with ``left`` bytes to read that hands out at most ``max_read`` per call."""

    def __init__(self, left: int, rng: random.Random, max_read: int):
        self.left, self.rng, self.max_read = left, rng, max_read

    def read(self, ask: int) -> int:
        n = min(ask, self.left, self.rng.randint(1, self.max_read))
        self.left -= n
        return n


def pump(handle: QuotaHandle, sources: list[Source], ask: int, rng: random.Random) -> int:
    """Interleave reads across sources as the loop would; stop each at EOF or when cut."""
    moved, live = 0, list(sources)
    while live:
        src = rng.choice(live)
        n = handle.allow(ask)
        if n == 0:
            break  # exhausted: the relay cuts every connection of the pair
        got = src.read(n)
        if got == 0:
            live.remove(src)
            continue
        handle.debit(got)
        moved += got
    return moved


def test_unmetered_handle_allows_everything_and_still_counts():
    handle = QuotaHandle("alice")
    assert not handle.limited and handle.allow(SPLICE_CHUNK) == SPLICE_CHUNK
    handle.debit(10)
    assert handle.admit_datagram(1500)
    assert handle.debited_total == 1510 and not handle.exhausted


def test_splice_chunks_never_exceed_the_budget_across_connections_and_directions():
    for seed in range(20):
        rng = random.Random(seed)
        budget = rng.randint(1, 8 * MiB)
        handle, fired = limited(budget)
        # four connections, each with two directions, with far more to send than the budget
        sources = [Source(rng.randint(budget, 3 * budget), rng, SPLICE_CHUNK) for _ in range(8)]
        moved = pump(handle, sources, SPLICE_CHUNK, rng)
        assert moved == budget, seed  # exactly the budget: the cut lands inside the chunk in flight
        assert handle.exhausted and fired == [handle] and handle.allow(SPLICE_CHUNK) == 0


def test_userspace_copies_are_capped_the_same_way():
    for seed in range(20):
        rng = random.Random(1000 + seed)
        budget = rng.randint(1, 2 * MiB)
        handle, _ = limited(budget)
        moved = pump(handle, [Source(4 * MiB, rng, COPY_BUFFER)], COPY_BUFFER, rng)
        assert moved == budget and handle.exhausted


def test_traffic_below_the_budget_is_untouched():
    rng = random.Random(7)
    handle, fired = limited(10 * MiB)
    moved = pump(handle, [Source(3 * MiB, rng, SPLICE_CHUNK), Source(MiB, rng, COPY_BUFFER)], SPLICE_CHUNK, rng)
    assert moved == 4 * MiB and handle.remaining == 6 * MiB and not handle.exhausted and fired == []


def test_allow_caps_a_request_at_the_remainder():
    handle, fired = limited(100)
    assert handle.allow(SPLICE_CHUNK) == 100 and handle.allow(40) == 40
    handle.debit(60)
    assert handle.allow(SPLICE_CHUNK) == 40 and fired == []
    handle.debit(0)
    handle.debit(-5)  # nothing moved: no change
    assert handle.remaining == 40
    handle.debit(40)
    assert handle.exhausted and handle.allow(1) == 0 and fired == [handle]


def test_a_debit_past_the_remainder_floors_at_zero():
    handle, fired = limited(10)
    handle.debit(25)  # a path that could not be capped (a header already written)
    assert handle.remaining == 0 and handle.exhausted and handle.debited_total == 25 and len(fired) == 1


def test_udp_datagrams_are_all_or_nothing():
    handle, fired = limited(3000)
    assert handle.admit_datagram(1500) and handle.remaining == 1500
    assert handle.admit_datagram(0) and handle.remaining == 1500
    assert handle.admit_datagram(1500)  # exactly the rest fits, and ends the budget
    assert handle.exhausted and fired == [handle]
    assert not handle.admit_datagram(1) and not handle.admit_datagram(0)

    handle, fired = limited(1000)
    assert not handle.admit_datagram(1400)  # does not fit: dropped whole, none of it debited
    assert handle.exhausted and handle.remaining == 1000 and handle.debited_total == 0 and fired == [handle]
    assert not handle.admit_datagram(10)


def test_a_zero_budget_or_an_exhausted_state_blocks_at_once():
    handle, fired = limited(0)
    assert handle.exhausted and handle.allow(SPLICE_CHUNK) == 0 and fired == [handle]
    other = QuotaHandle("bob")
    other.apply_state(state(500, exhausted=True))  # the server saw the exhaustion first
    assert other.exhausted and other.allow(10) == 0 and not other.admit_datagram(1)


def test_a_fresh_state_resumes_and_a_later_exhaustion_fires_again():
    handle, fired = limited(100)
    handle.debit(100)
    handle.mark_reported()
    assert fired == [handle]
    handle.apply_state(state(50))  # credit, raise or new period
    assert not handle.exhausted and handle.allow(SPLICE_CHUNK) == 50
    handle.apply_state(state(80))  # a replace while forwarding: no exhaustion in between
    assert handle.remaining == 80 and len(fired) == 1
    handle.debit(80)
    assert fired == [handle, handle]


def test_a_new_state_is_installed_minus_bytes_not_reported_yet():
    handle, _ = limited(1000)
    handle.debit(300)
    handle.mark_reported()          # the server will count these 300
    handle.debit(120)               # these are not in the server's figure yet
    handle.apply_state(state(10_000))
    assert handle.remaining == 10_000 - 120
    handle.mark_reported()
    handle.apply_state(state(500))
    assert handle.remaining == 500
    handle.debit(50)
    handle.apply_state(state(40))   # less than the unreported bytes: exhausted, not negative
    assert handle.remaining == 0 and handle.exhausted


def test_remove_makes_the_same_handle_unmetered_and_a_new_quota_limits_it_again():
    book = QuotaBook()
    handle = book.handle("alice")
    book.apply_update({"type": "traffic_quota_update", "user_id": "alice", "client_id": "C", "action": "set",
                       "state": {"monthly_bytes": 10, "budget_remaining_bytes": 0, "period_started_at": 1,
                                 "period_ends_at": 2, "exhausted": True}})
    assert handle.exhausted and book.exhausted_users() == ["alice"]
    assert book.apply_update({"user_id": "alice", "client_id": "C", "action": "remove", "state": None}) is handle
    assert not handle.limited and not handle.exhausted and handle.allow(SPLICE_CHUNK) == SPLICE_CHUNK
    assert book.exhausted_users() == []
    book.apply_update({"user_id": "alice", "client_id": "C", "action": "set",
                       "state": {"monthly_bytes": 10, "budget_remaining_bytes": 7, "period_started_at": 1,
                                 "period_ends_at": 2, "exhausted": False}})
    assert book.handle("alice") is handle and handle.allow(SPLICE_CHUNK) == 7


def test_book_marks_every_handle_reported():
    book = QuotaBook()
    a, b = book.handle("alice"), book.handle("bob")
    a.debit(5)
    b.debit(7)
    book.mark_reported()
    a.apply_state(state(100))
    b.apply_state(state(100))
    assert (a.remaining, b.remaining) == (100, 100)


def test_listeners_run_once_each_and_a_failing_one_does_not_stop_the_rest():
    handle, calls = QuotaHandle("alice"), []

    def broken(h):
        calls.append("broken")
        raise RuntimeError("relay gone")

    def removed(h):
        calls.append("removed")

    handle.add_listener(broken)
    handle.add_listener(removed)
    handle.add_listener(lambda h: calls.append("cut"))
    handle.remove_listener(removed)
    handle.remove_listener(removed)  # twice is harmless
    handle.apply_state(state(10))
    with pytest.raises(RuntimeError):
        handle.debit(10)
    assert calls == ["broken", "cut"] and handle.exhausted
    handle.debit(5)
    assert calls == ["broken", "cut"]  # already exhausted: no second call


@pytest.mark.parametrize("bad", [
    None, [], {"budget_remaining_bytes": 1, "period_started_at": 1, "period_ends_at": 2, "exhausted": False},
    {"monthly_bytes": -1, "budget_remaining_bytes": 1, "period_started_at": 1, "period_ends_at": 2, "exhausted": False},
    {"monthly_bytes": 1, "budget_remaining_bytes": True, "period_started_at": 1, "period_ends_at": 2,
     "exhausted": False},
    {"monthly_bytes": 1, "budget_remaining_bytes": 1, "period_started_at": 1, "period_ends_at": 2, "exhausted": 0},
    {"monthly_bytes": 1 << 63, "budget_remaining_bytes": 1, "period_started_at": 1, "period_ends_at": 2,
     "exhausted": False},
])
def test_malformed_states_are_refused_naming_the_field(bad):
    handle = QuotaHandle("alice")
    with pytest.raises(QuotaStateError) as ei:
        handle.apply_state(QuotaState.from_message(bad))
    assert "traffic quota state" in str(ei.value)
    assert not handle.limited

"""QuotaHandle.admit_datagrams (SPEC §2.10): a batch of UDP datagrams admitted with one debit gives
exactly what admit_datagram asked for each in turn gives — the admitted prefix, the remaining
budget, debited_total, the exhaustion flag and how often the listeners fire — for every small
budget and batch (exhaustively), random larger ones, an unmetered handle and an exhausted one."""

from __future__ import annotations

import itertools
import random

from portunus.relay.quota import QuotaHandle, QuotaState


def handle_with(remaining: int | None, exhausted: bool = False) -> tuple[QuotaHandle, list]:
    h, fired = QuotaHandle("alice"), []
    h.add_listener(fired.append)
    if remaining is not None:
        h.apply_state(QuotaState(1 << 40, remaining, 1_800_000_000, 1_802_592_000, exhausted))
    return h, fired


def outcome(h: QuotaHandle, fired: list) -> tuple:
    return h.remaining, h.exhausted, h.debited_total, len(fired)


def one_by_one(remaining, sizes, exhausted=False) -> tuple:
    h, fired = handle_with(remaining, exhausted)
    before = len(fired)
    passed = [h.admit_datagram(s) for s in sizes]
    k = passed.index(False) if False in passed else len(passed)
    assert all(not p for p in passed[k:]), "admit_datagram passes a prefix"
    return k, outcome(h, fired), len(fired) - before


def batched(remaining, sizes, exhausted=False, give_total=True) -> tuple:
    h, fired = handle_with(remaining, exhausted)
    before = len(fired)
    k = h.admit_datagrams(sizes, sum(sizes) if give_total else None)
    return k, outcome(h, fired), len(fired) - before


def test_every_small_budget_and_batch_matches_datagram_by_datagram():
    cases = 0
    for remaining in range(0, 9):
        for n in range(0, 5):
            for sizes in itertools.product((0, 1, 2, 3, 5), repeat=n):
                sizes = list(sizes)
                for exhausted in (False, True):
                    want = one_by_one(remaining, sizes, exhausted)
                    assert batched(remaining, sizes, exhausted) == want, (remaining, sizes, exhausted)
                    assert batched(remaining, sizes, exhausted, give_total=False) == want
                    cases += 1
    assert cases > 10_000


def test_random_batches_match_datagram_by_datagram():
    rng = random.Random(15)
    for _ in range(3000):
        sizes = [rng.choice((0, 1, 64, 512, 1400, 1472)) for _ in range(rng.randrange(0, 40))]
        remaining = rng.randrange(0, sum(sizes) + 200)
        assert batched(remaining, sizes) == one_by_one(remaining, sizes), (remaining, sizes)


def test_unmetered_handle_admits_all_and_counts_them():
    h, fired = handle_with(None)
    assert h.admit_datagrams([64, 1400, 0]) == 3
    assert h.remaining is None and not h.exhausted and h.debited_total == 1464 and not fired


def test_budget_ending_inside_a_batch_fires_the_listener_once_and_refuses_the_rest():
    h, fired = handle_with(1000)
    assert h.admit_datagrams([400, 400, 400, 10]) == 2   # the third overshoots: dropped whole
    assert h.exhausted and h.remaining == 200 and fired == [h]
    assert h.admit_datagrams([1]) == 0 and fired == [h]  # stays exhausted, no second call
    h.mark_reported()  # the server has heard of those 800 bytes: its new budget is the whole truth
    h.apply_state(QuotaState(1 << 40, 500, 1_800_000_000, 1_802_592_000, False))
    assert h.admit_datagrams([250, 250, 0]) == 2         # exactly the rest: ends the budget
    assert h.exhausted and h.remaining == 0 and fired == [h, h]

"""CAP_EPOCH: every change a book makes that can change a ticket's ``bandwidth_capped`` moves it,
so a reader that caches the answer (the TCP pump) asks again exactly then."""

from __future__ import annotations

import pytest

from portunus.model import RateLimit
from portunus.relay.limiter_book import CAP_EPOCH, LimiterBook

BW = RateLimit.from_dict({"bandwidth_in_bps": 1 << 20})
CONN = RateLimit.from_dict({"concurrent_connections": 3})


def moved(action) -> bool:
    before = CAP_EPOCH[0]
    action()
    return CAP_EPOCH[0] != before


@pytest.fixture
def book():
    b = LimiterBook("c1")
    b.set_rule("r", owner="alice", cap=None, now=0.0)
    return b


def test_each_mutation_of_a_book_moves_the_epoch(book):
    assert moved(lambda: book.set_rule("r2", owner=None, cap=BW, now=1.0))        # a new rule
    assert moved(lambda: book.set_rule("r2", owner=None, cap=None, now=1.0))      # hot update
    assert moved(lambda: book.set_owner_cap("alice", BW, now=1.0))               # envelope installed
    assert moved(lambda: book.set_owner_cap("alice", CONN, now=1.0))             # envelope updated
    assert moved(lambda: book.remove_owner_cap("alice", now=1.0))                # envelope gone
    assert moved(lambda: book.remove_rule("r2", now=1.0))                        # rule gone
    assert moved(lambda: setattr(book, "client_id", "c2"))                       # envelope keys move
    assert book.client_id == "c2"


def test_reads_and_admissions_do_not_move_it(book):
    assert not moved(lambda: book.admit("r", "tcp", 1.0))
    assert not moved(lambda: book.owner_cap("alice"))
    assert not moved(lambda: book.owner_limiter("alice"))


@pytest.mark.parametrize("change", ["rule cap", "owner envelope"])
def test_a_cached_answer_is_stale_exactly_when_the_epoch_moved(book, change):
    ticket = book.admit("r", "tcp", 1.0)
    seen, cached = CAP_EPOCH[0], ticket.bandwidth_capped
    assert cached is False
    if change == "rule cap":
        book.set_rule("r", owner="alice", cap=BW, now=2.0)
    else:
        book.set_owner_cap("alice", BW, now=2.0)
    assert CAP_EPOCH[0] != seen
    assert ticket.bandwidth_capped is True

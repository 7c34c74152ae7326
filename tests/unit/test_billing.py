"""Billing periods (SPEC §4.4): every anchor day of a 4-year cycle, month-end clamps, leap days,
23:59:59 anchors, clock jumps forward and back. Checked against an oracle that clamps by trying
dates, not by asking calendar.monthrange like the code does."""

from __future__ import annotations

import calendar
from datetime import date, datetime, timedelta, timezone

import pytest

from portunus.server.billing import billing_period, period_index, period_start


def ts(y, mo, d, h=0, mi=0, s=0) -> int:
    return calendar.timegm((y, mo, d, h, mi, s))


def iso(t: int) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def oracle_start(anchor: datetime, year: int, month: int) -> int:
    """The period start inside (year, month): the anchor's day, or the latest day before it that exists."""
    day = anchor.day
    while True:
        try:
            d = date(year, month, day)
            break
        except ValueError:
            day -= 1
    return ts(d.year, d.month, d.day, anchor.hour, anchor.minute, anchor.second)


CYCLE_START = date(2024, 1, 1)  # 2024 is a leap year: 2024-2027 is a whole 4-year cycle
CYCLE_DAYS = [CYCLE_START + timedelta(days=i) for i in range(4 * 365 + 1)]
MONTHS_AHEAD = 49  # one whole leap cycle after any anchor, plus one month


@pytest.mark.parametrize("hms", [(0, 0, 0), (23, 59, 59)], ids=["midnight", "23:59:59"])
def test_every_anchor_day_of_a_four_year_cycle(hms):
    for day in CYCLE_DAYS:
        anchor_dt = datetime(day.year, day.month, day.day, *hms, tzinfo=timezone.utc)
        anchor = int(anchor_dt.timestamp())
        assert period_start(anchor, 0) == anchor
        starts = []
        for k in range(MONTHS_AHEAD + 1):
            year, month0 = divmod(day.year * 12 + day.month - 1 + k, 12)
            expected = oracle_start(anchor_dt, year, month0 + 1)
            assert period_start(anchor, k) == expected, (iso(anchor), k)
            starts.append(expected)
        for k in range(MONTHS_AHEAD):
            start, end = starts[k], starts[k + 1]
            assert start < end
            # the first and the last second of each period, and one in the middle, all map to it
            for probe in (start, start + (end - start) // 2, end - 1):
                assert billing_period(anchor, probe) == (start, end), (iso(anchor), iso(probe))
            assert period_index(anchor, end - 1) == k and period_index(anchor, end) == k + 1


def test_jan_31_clamps_to_february_and_returns_to_31():
    anchor = ts(2025, 1, 31, 10, 30, 0)
    starts = [iso(period_start(anchor, k)) for k in range(4)]
    assert starts == ["2025-01-31T10:30:00Z", "2025-02-28T10:30:00Z", "2025-03-31T10:30:00Z",
                      "2025-04-30T10:30:00Z"]
    leap = ts(2024, 1, 31)
    assert [iso(period_start(leap, k)) for k in range(3)] == [
        "2024-01-31T00:00:00Z", "2024-02-29T00:00:00Z", "2024-03-31T00:00:00Z"]


def test_feb_29_is_feb_28_in_common_years_and_feb_29_again_in_leap_years():
    anchor = ts(2024, 2, 29, 12, 0, 0)
    februaries = [iso(period_start(anchor, 12 * y)) for y in range(5)]
    assert februaries == ["2024-02-29T12:00:00Z", "2025-02-28T12:00:00Z", "2026-02-28T12:00:00Z",
                          "2027-02-28T12:00:00Z", "2028-02-29T12:00:00Z"]
    # the months between keep the 29th: the clamp never sticks
    assert iso(period_start(anchor, 13)) == "2025-03-29T12:00:00Z"
    assert billing_period(anchor, ts(2025, 3, 1)) == (ts(2025, 2, 28, 12), ts(2025, 3, 29, 12))


def test_235959_anchor_boundary_to_the_second():
    anchor = ts(2025, 3, 31, 23, 59, 59)
    # April has 30 days: the period turns at Apr 30 23:59:59, not a second earlier
    assert billing_period(anchor, ts(2025, 4, 30, 23, 59, 58)) == (anchor, ts(2025, 4, 30, 23, 59, 59))
    assert billing_period(anchor, ts(2025, 4, 30, 23, 59, 59))[0] == ts(2025, 4, 30, 23, 59, 59)
    # the year wraps at December's end
    dec = ts(2025, 12, 31, 23, 59, 59)
    assert billing_period(dec, ts(2026, 1, 31, 23, 59, 59)) == (ts(2026, 1, 31, 23, 59, 59),
                                                                 ts(2026, 2, 28, 23, 59, 59))


def test_forward_jump_catches_up_in_one_step():
    anchor = ts(2025, 1, 15, 8)
    stored = billing_period(anchor, ts(2025, 1, 20))
    jumped = billing_period(anchor, ts(2025, 11, 2), current_start=stored[0])
    assert jumped == (ts(2025, 10, 15, 8), ts(2025, 11, 15, 8))


def test_rewind_never_rolls_back():
    anchor = ts(2025, 1, 15, 8)
    stored_start, stored_end = billing_period(anchor, ts(2025, 3, 20))
    for back in (ts(2025, 3, 15, 7, 59, 59), ts(2025, 2, 1), ts(2024, 6, 1)):
        assert billing_period(anchor, back, current_start=stored_start) == (stored_start, stored_end)
    # inside the stored period the answer is the same with or without it
    assert billing_period(anchor, ts(2025, 3, 16), current_start=stored_start) == (stored_start, stored_end)


def test_anchor_in_the_future_fixes_the_billing_day_of_earlier_periods():
    anchor = ts(2026, 1, 31, 6)
    assert billing_period(anchor, ts(2025, 12, 1)) == (ts(2025, 11, 30, 6), ts(2025, 12, 31, 6))
    assert period_index(anchor, ts(2025, 12, 1)) == -2


def test_epoch_anchor():
    assert billing_period(0, ts(1970, 2, 1)) == (ts(1970, 2, 1), ts(1970, 3, 1))
    assert billing_period(0, ts(1970, 1, 31, 23, 59, 59)) == (0, ts(1970, 2, 1))

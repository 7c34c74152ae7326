"""Billing periods of a traffic quota (SPEC §4.4), as pure functions of unix seconds, in UTC.

Period ``k`` of an anchor starts ``k`` calendar months after the anchor's month, on the anchor's
day clamped to that month's length, at the anchor's time of day. The clamp always starts from the
*original* anchor, so a Jan 31 anchor gives Feb 28 (29) and then Mar 31 again, and a Feb 29 anchor
gives Feb 28 in common years and Feb 29 again in leap years. ``k`` may be negative: an anchor in the
future still fixes the billing day of the periods before it.

    start, end = billing_period(anchor, now)                       # the period holding now
    start, end = billing_period(anchor, now, current_start=start)  # never earlier than the stored one

A clock that jumps forward lands in the right period in one step (the period is computed, not
stepped); a clock that jumps back keeps the stored period, so usage is never rolled back.
"""

from __future__ import annotations

import calendar
from datetime import datetime, timezone

# 0 .. 3000-01-01T00:00:00Z: far enough for any real contract, and period maths stays inside datetime
MAX_ANCHOR = 32503680000


def _parts(ts: int) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def _month_index(dt: datetime) -> int:
    return dt.year * 12 + dt.month - 1


def period_start(anchor: int, k: int) -> int:
    """Start of period ``k`` (0 = the anchor's own) in unix seconds."""
    a = _parts(anchor)
    year, month0 = divmod(_month_index(a) + k, 12)
    day = min(a.day, calendar.monthrange(year, month0 + 1)[1])
    return calendar.timegm((year, month0 + 1, day, a.hour, a.minute, a.second))


def period_index(anchor: int, ts: int) -> int:
    """The ``k`` whose period holds ``ts``: the last start at or before it."""
    k = _month_index(_parts(ts)) - _month_index(_parts(anchor))
    # period k starts inside ts's month, so it either already started (k) or not yet (k - 1)
    return k if period_start(anchor, k) <= ts else k - 1


def billing_period(anchor: int, now: int, current_start: int | None = None) -> tuple[int, int]:
    """``(start, end)`` of the period holding ``now``; with ``current_start``, never an earlier one."""
    anchor, now = int(anchor), int(now)
    k = period_index(anchor, now)
    start = period_start(anchor, k)
    if current_start is not None and start < current_start:
        # the clock went back: stay in the stored period (its own k, so its end is exact too)
        k = period_index(anchor, int(current_start))
        return int(current_start), period_start(anchor, k + 1)
    return start, period_start(anchor, k + 1)

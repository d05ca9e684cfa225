"""Candle boundaries of common/candles.py for the calendar-like intervals, over
tricky timestamps; the expected values are computed here with ``datetime``.

1w: Hyperliquid's weekly candles open on Thursday 00:00 UTC: multiples of 7 days
since the Unix epoch (1970-01-01 was a Thursday), as observed on the public API
(e.g. rainbow-me/rainbow#6920 logs a weekly candle ``t`` of Thu 30 Oct 2025
00:00 UTC and shifts it to Monday for display). 1M: calendar months (UTC)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from hlbook.common.candles import INTERVALS, KEPT, Candle, bounds, oldest_kept

UTC = timezone.utc
WEEK_MS = 7 * 86_400_000


def ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


def thursday_on_or_before(when: datetime) -> datetime:
    day = datetime(when.year, when.month, when.day, tzinfo=UTC)
    return day - timedelta(days=(day.weekday() - 3) % 7)  # weekday(): Monday 0 .. Thursday 3


def month_bounds(when: datetime) -> tuple[datetime, datetime]:
    year, month = divmod(when.year * 12 + when.month, 12)  # month after, 0-based
    return datetime(when.year, when.month, 1, tzinfo=UTC), datetime(year, month + 1, 1, tzinfo=UTC)


WEEK_CASES = [
    0,                                    # the epoch: a Thursday
    WEEK_MS - 1,                          # Wed 1970-01-07 23:59:59.999
    WEEK_MS,                              # Thu 1970-01-08
    ms(1970, 1, 5),                       # the first Monday: not a boundary
    ms(2025, 10, 30),                     # Thu: the candle observed on Hyperliquid
    ms(2025, 10, 29, 23, 59, 59) + 999,   # Wed before it
    ms(2025, 11, 2, 12),                  # Sun after it
    ms(2025, 10, 27),                     # Mon: mid-week
    ms(2025, 12, 31, 23, 59, 59) + 999,   # year change inside a week (Wed)
    ms(2026, 1, 1),                       # Thu 2026-01-01
    ms(2024, 2, 29, 6),                   # leap day (Thu)
    ms(2024, 3, 6, 23, 59, 59) + 999,     # Wed after the leap day
]


@pytest.mark.parametrize("at", WEEK_CASES)
def test_weeks_start_on_thursday_midnight_utc(at: int) -> None:
    when = datetime.fromtimestamp(at / 1000, UTC)
    start = thursday_on_or_before(when)
    assert start.weekday() == 3
    assert bounds("1w", at) == (int(start.timestamp() * 1000), int((start + timedelta(days=7)).timestamp() * 1000))
    assert bounds("1w", at)[0] % WEEK_MS == 0


MONTH_CASES = [
    0,
    ms(1970, 1, 31, 23, 59, 59) + 999,
    ms(2024, 2, 29, 23, 59, 59) + 999,  # leap February: 29 days
    ms(2024, 3, 1),
    ms(2023, 2, 28, 23, 59, 59) + 999,  # common February: 28 days
    ms(2100, 2, 28, 12),                # not a leap year (century)
    ms(2000, 2, 29, 12),                # leap year (400)
    ms(2025, 4, 30, 23, 59, 59) + 999,  # 30-day month
    ms(2025, 12, 1),                    # December: ends in the next year
    ms(2025, 12, 31, 23, 59, 59) + 999,
    ms(2026, 1, 1),
    ms(2026, 1, 31, 23, 59, 59) + 999,
]


@pytest.mark.parametrize("at", MONTH_CASES)
def test_months_are_calendar_months(at: int) -> None:
    first, after = month_bounds(datetime.fromtimestamp(at / 1000, UTC))
    assert bounds("1M", at) == (int(first.timestamp() * 1000), int(after.timestamp() * 1000))


def test_month_lengths_across_a_leap_year_and_a_year_change() -> None:
    days = []
    start = ms(2023, 12, 1)
    for _ in range(14):
        begin, end = bounds("1M", start)
        assert begin == start
        days.append((end - begin) // 86_400_000)
        start = end
    assert days == [31, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31]  # Dec 2023 .. Jan 2025


def test_candle_t_and_T_of_a_trade_on_a_boundary() -> None:
    for interval, at in (("1w", ms(2026, 1, 1)), ("1M", ms(2025, 12, 31, 23, 59, 59) + 999), ("1M", ms(2024, 2, 29))):
        body = Candle.of_trade(interval, at, 10**10, 10**10, 1).to_dict("BTC", interval)
        start, end = bounds(interval, at)
        assert (body["t"], body["T"]) == (start, end - 1)
        assert start <= at < end


def test_oldest_kept_months_and_weeks() -> None:
    newest = ms(2026, 3, 15)
    months_back = 2026 * 12 + 2 - (KEPT - 1)  # 0-based month index
    year, month = divmod(months_back, 12)
    assert year < 1970 and oldest_kept("1M", newest) == 0  # 5000 months reach before the epoch
    assert oldest_kept("1w", newest) == bounds("1w", newest)[0] - (KEPT - 1) * INTERVALS["1w"]
    assert oldest_kept("1w", newest) % WEEK_MS == 0

"""Candles of the public API: the 14 intervals, their bounds, and a candle that
trades can be folded into in any order.

A candle's ``t`` is the start of its interval in epoch ms: multiples of the
interval since the epoch for 1m..1w (so weeks start on Thursday 00:00 UTC, as
1970-01-01 was a Thursday: Hyperliquid's weekly candles do too), calendar
months for 1M. ``T`` is its end minus 1 ms. Each trade counts once,
from the taker's fill. A trade's ``seq`` (block height and its place in the
block) orders trades, so ``open``/``close`` come out right whichever order the
trades are folded in (live blocks and a backfill of older ones meet in one
candle) and two partial candles merge into the one a single pass would give.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from hlbook.common import fixed

MINUTE = 60_000
INTERVALS = {
    "1m": MINUTE, "3m": 3 * MINUTE, "5m": 5 * MINUTE, "15m": 15 * MINUTE, "30m": 30 * MINUTE,
    "1h": 60 * MINUTE, "2h": 120 * MINUTE, "4h": 240 * MINUTE, "8h": 480 * MINUTE, "12h": 720 * MINUTE,
    "1d": 1440 * MINUTE, "3d": 3 * 1440 * MINUTE, "1w": 7 * 1440 * MINUTE, "1M": 0,
}
KEPT = 5000  # candles of a series the public API serves (the most recent)
SEQ_BITS = 20  # seq = height << SEQ_BITS | place in the block


def bounds(interval: str, ms: int) -> tuple[int, int]:
    """(start, end) in epoch ms of the interval that holds ``ms``."""
    if interval == "1M":
        day = datetime.fromtimestamp(ms / 1000, timezone.utc)
        first = datetime(day.year, day.month, 1, tzinfo=timezone.utc)
        after = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=timezone.utc)
        return int(first.timestamp() * 1000), int(after.timestamp() * 1000)
    width = INTERVALS[interval]
    start = ms // width * width
    return start, start + width


def oldest_kept(interval: str, newest_ms: int) -> int:
    """Start of the oldest of a series' ``KEPT`` most recent candles, the newest holding ``newest_ms``."""
    if interval == "1M":
        day = datetime.fromtimestamp(newest_ms / 1000, timezone.utc)
        month = day.year * 12 + day.month - 1 - (KEPT - 1)
        if month < 1970 * 12:
            return 0
        return int(datetime(month // 12, month % 12 + 1, 1, tzinfo=timezone.utc).timestamp() * 1000)
    return bounds(interval, newest_ms)[0] - (KEPT - 1) * INTERVALS[interval]


def seq(height: int, place: int) -> int:
    return height << SEQ_BITS | place


class Candle:
    """One candle; prices and volume are fixed-point ints (``common.fixed``)."""

    __slots__ = ("start", "end", "open", "close", "high", "low", "volume", "trades", "first", "last")

    def __init__(self, start: int, end: int, open: int, close: int, high: int, low: int,
                 volume: int, trades: int, first: int, last: int) -> None:
        self.start, self.end = start, end
        self.open, self.close, self.high, self.low = open, close, high, low
        self.volume, self.trades = volume, trades
        self.first, self.last = first, last  # seq of the opening and the closing trade

    @classmethod
    def of_trade(cls, interval: str, time: int, px: int, sz: int, at: int) -> Candle:
        start, end = bounds(interval, time)
        return cls(start, end, px, px, px, px, sz, 1, at, at)

    def merge(self, other: Candle) -> None:
        """Fold in a candle of the same interval holding other trades."""
        if other.first < self.first:
            self.first, self.open = other.first, other.open
        if other.last > self.last:
            self.last, self.close = other.last, other.close
        self.high = max(self.high, other.high)
        self.low = min(self.low, other.low)
        self.volume += other.volume
        self.trades += other.trades

    def to_dict(self, coin: str, interval: str) -> dict[str, Any]:
        return {"t": self.start, "T": self.end - 1, "s": coin, "i": interval, "o": fixed.fmt(self.open),
                "c": fixed.fmt(self.close), "h": fixed.fmt(self.high), "l": fixed.fmt(self.low),
                "v": fixed.fmt(self.volume), "n": self.trades}

"""Candles built from trades, for every coin and every public interval.

A candle's ``t`` is the start of its interval in epoch ms: multiples of the
interval since the epoch for 1m..3d, weeks starting Monday 00:00 UTC for 1w,
calendar months for 1M. ``T`` is its end minus 1 ms. Only trades seen since
the gateway started count (the node files carry no history before that), and
each (coin, interval) keeps its last ``kept`` candles.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timezone
from typing import Any

from hlbook.common import fixed, wire
from hlbook.services.gateway import metrics

MINUTE = 60_000
INTERVALS = {
    "1m": MINUTE, "3m": 3 * MINUTE, "5m": 5 * MINUTE, "15m": 15 * MINUTE, "30m": 30 * MINUTE,
    "1h": 60 * MINUTE, "2h": 120 * MINUTE, "4h": 240 * MINUTE, "8h": 480 * MINUTE, "12h": 720 * MINUTE,
    "1d": 1440 * MINUTE, "3d": 3 * 1440 * MINUTE, "1w": 7 * 1440 * MINUTE, "1M": 0,
}
MONDAY_OFFSET = 4 * 1440 * MINUTE  # 1970-01-01 was a Thursday; the first Monday is 4 days later


def bounds(interval: str, ms: int) -> tuple[int, int]:
    """(start, end) in epoch ms of the interval that holds ``ms``."""
    if interval == "1M":
        day = datetime.fromtimestamp(ms / 1000, timezone.utc)
        start = datetime(day.year, day.month, 1, tzinfo=timezone.utc)
        end = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=timezone.utc)
        return int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    width = INTERVALS[interval]
    offset = MONDAY_OFFSET if interval == "1w" else 0
    start = (ms - offset) // width * width + offset
    return start, start + width


class Candle:
    __slots__ = ("start", "end", "open", "close", "high", "low", "volume", "trades")

    def __init__(self, start: int, end: int, px: int) -> None:
        self.start, self.end = start, end
        self.open = self.close = self.high = self.low = px
        self.volume = 0
        self.trades = 0

    def add(self, px: int, sz: int) -> None:
        self.close = px
        self.high = max(self.high, px)
        self.low = min(self.low, px)
        self.volume += sz
        self.trades += 1

    def to_dict(self, coin: str, interval: str) -> dict[str, Any]:
        return {"t": self.start, "T": self.end - 1, "s": coin, "i": interval, "o": fixed.fmt(self.open),
                "c": fixed.fmt(self.close), "h": fixed.fmt(self.high), "l": fixed.fmt(self.low),
                "v": fixed.fmt(self.volume), "n": self.trades}


class Candles:
    """Candles of every coin and interval, updated trade by trade."""

    def __init__(self, kept: int = 200) -> None:
        self.kept = kept
        self.series: dict[tuple[str, str], deque[Candle]] = {}

    def add(self, trades: list[wire.Trade]) -> set[tuple[str, str]]:
        """Fold trades in (time order); returns the (coin, interval) keys whose last candle changed."""
        changed = set()
        for trade in trades:
            px, sz = fixed.parse(trade.px), fixed.parse(trade.sz)
            for interval in INTERVALS:
                key = (trade.coin, interval)
                series = self.series.get(key)
                if series is None:
                    series = self.series[key] = deque(maxlen=self.kept)
                    metrics.CANDLE_SERIES.set(len(self.series))
                if not series or trade.time >= series[-1].end:
                    series.append(Candle(*bounds(interval, trade.time), px))
                elif trade.time < series[-1].start:
                    continue  # older than the current candle (late trade): kept candles are final
                series[-1].add(px, sz)
                changed.add(key)
        return changed

    def last(self, coin: str, interval: str) -> dict[str, Any] | None:
        series = self.series.get((coin, interval))
        return series[-1].to_dict(coin, interval) if series else None

    def snapshot(self, coin: str, interval: str, start: int, end: int) -> list[dict[str, Any]]:
        """Kept candles of ``coin`` that overlap [start, end]."""
        return [c.to_dict(coin, interval) for c in self.series.get((coin, interval), ()) if c.end > start and c.start <= end]

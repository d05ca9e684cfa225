"""Per-subscription metrics: counts, rates and reconnects."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

_WINDOW = 60


class SubscriptionMetrics:
    """Message counters of one user subscription.

    ``messages_last_minute`` counts messages of the last 60 s in one-second
    buckets (bounded memory); ``messages_per_minute`` is the lifetime average,
    over at least a minute (a young subscription is not extrapolated: one
    message in its first 50 ms reads 1, not 1,200). ``clock``: monotonic seconds.
    """

    __slots__ = ("subscribed_at", "last_message_at", "message_count", "reconnects", "dropped", "_clock", "_mono0", "_buckets", "_stamps")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.subscribed_at = time.time()
        self.last_message_at: float | None = None
        self.message_count = 0
        self.reconnects = 0
        self.dropped = 0
        self._clock = clock
        self._mono0 = clock()
        self._buckets = [0] * _WINDOW
        self._stamps = [-1] * _WINDOW

    def record(self) -> None:
        """Count one delivered message."""
        self.message_count += 1
        self.last_message_at = time.time()
        second = int(self._clock())
        slot = second % _WINDOW
        if self._stamps[slot] != second:
            self._stamps[slot] = second
            self._buckets[slot] = 0
        self._buckets[slot] += 1

    def messages_last_minute(self) -> int:
        """Messages received in the last 60 seconds."""
        now = int(self._clock())
        return sum(n for n, s in zip(self._buckets, self._stamps) if now - s < _WINDOW and s >= 0)

    def uptime_seconds(self) -> float:
        """Seconds since the subscription was made."""
        return self._clock() - self._mono0

    def messages_per_minute(self) -> float:
        """Average messages per minute since the subscription was made (over at least one minute)."""
        return self.message_count * 60.0 / max(self.uptime_seconds(), 60.0)

    def as_dict(self) -> dict[str, Any]:
        """A plain snapshot of every metric."""
        return {
            "message_count": self.message_count,
            "subscribed_at": self.subscribed_at,
            "last_message_at": self.last_message_at,
            "last_message_age": None if self.last_message_at is None else round(time.time() - self.last_message_at, 3),
            "messages_per_minute": round(self.messages_per_minute(), 3),
            "messages_last_minute": self.messages_last_minute(),
            "uptime_seconds": round(self.uptime_seconds(), 3),
            "reconnects": self.reconnects,
            "dropped": self.dropped,
        }

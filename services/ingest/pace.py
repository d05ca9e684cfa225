"""Replay pacing: a block goes out when its block time, counted from the first block's, has
passed on the wall clock divided by ``speed`` (``speed`` 0: no waiting)."""

from __future__ import annotations

import time


class Pace:
    def __init__(self, speed: float) -> None:
        self.speed = speed
        self.origin: tuple[int, float] | None = None  # (first block's time in ms, when it went out)

    def delay(self, time_ms: int, now: float | None = None) -> float:
        """Seconds to wait before the block of ``time_ms`` goes out (the first: none)."""
        now = time.monotonic() if now is None else now
        if self.speed <= 0:
            return 0.0
        if self.origin is None:
            self.origin = (time_ms, now)
            return 0.0
        first_ms, start = self.origin
        return max(0.0, start + (time_ms - first_ms) / 1000 / self.speed - now)

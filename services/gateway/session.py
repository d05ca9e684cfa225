"""One client connection: its subscriptions with their statistics, a bounded
outbox drained by a writer task, and the inbound rate limit.

The outbox holds texts (sent in order) and feed keys of conflated feeds: a
conflated feed keeps only its latest text per client, so a slow client gets the
newest l2Book/bbo/allMids and never a backlog (at most one entry per
subscription). When ``queue_size`` texts wait, the client is closed with an
error: a trades or l4Book message would otherwise be lost.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hlbook.services.gateway.frames import FrameWriter, frame_of
from hlbook.services.gateway.protocol import FeedKey

_ids = itertools.count(1)
WRITE_BATCH = 256  # at most this many frames ...
WRITE_BYTES = 256 << 10  # ... or bytes joined into one transport write


class RateWindow:
    """Events per minute over a sliding window, estimated from two one-minute buckets."""

    __slots__ = ("start", "current", "previous")

    def __init__(self, now: float) -> None:
        self.start, self.current, self.previous = now, 0, 0

    def _roll(self, now: float) -> None:
        elapsed = now - self.start
        if elapsed >= 60:
            self.previous = self.current if elapsed < 120 else 0
            self.current = 0
            self.start = now - elapsed % 60

    def add(self, now: float) -> None:
        self._roll(now)
        self.current += 1

    def per_minute(self, now: float) -> float:
        self._roll(now)
        return self.previous * (1 - (now - self.start) / 60) + self.current


@dataclass
class SubscriptionStats:
    subscription: dict[str, Any]
    feed: FeedKey
    subscribed_at: float = field(default_factory=time.time)
    message_count: int = 0
    last_message_at: float | None = None
    window: RateWindow = field(default_factory=lambda: RateWindow(time.monotonic()))

    def count(self, now: float, mono: float) -> None:
        self.message_count += 1
        self.last_message_at = now
        self.window.add(mono)

    def to_dict(self) -> dict[str, Any]:
        now = time.time()
        return {
            "subscription": self.subscription,
            "message_count": self.message_count,
            "subscribed_at": self.subscribed_at,
            "last_message_at": self.last_message_at,
            "messages_per_minute": round(self.window.per_minute(time.monotonic()), 1),
            "uptime_seconds": round(now - self.subscribed_at, 3),
        }


class Session:
    """State of one WebSocket client; ``send`` writes one text frame."""

    def __init__(self, peer: str, send: Callable[[str], Awaitable[None]], queue_size: int, max_per_minute: int,
                 frames: FrameWriter | None = None) -> None:
        self.id = next(_ids)
        self.peer = peer
        self._send = send
        self.frames = frames  # direct frame writes (no compression negotiated); else ASGI sends
        self.queue_size = queue_size
        self.subs: dict[str, SubscriptionStats] = {}  # by subscription identity
        self.outbox: deque[str | FeedKey] = deque()
        self.texts = 0  # texts (not conflated keys) in the outbox
        self.latest: dict[FeedKey, str] = {}  # conflated feeds: the text to send when their key comes up
        self.wakeup = asyncio.Event()
        self.closing: str | None = None  # why the session must end (set once)
        self.close_text: str | None = None
        self.connected_at = time.time()
        self.sent = 0
        self.conflated = 0
        self.tokens = float(max_per_minute)  # inbound token bucket
        self.max_per_minute = max_per_minute
        self.refilled = time.monotonic()
        self.heard = self.refilled  # last frame received (idle timeout)
        self.sending_since = 0.0  # when the send in progress started (0: none)
        self.pending_posts = 0

    # ------------------------------------------------------------ inbound

    def allow_request(self) -> bool:
        """Take a token of the per-minute request budget; False when exhausted."""
        now = time.monotonic()
        self.tokens = min(self.max_per_minute, self.tokens + (now - self.refilled) * self.max_per_minute / 60)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    # ------------------------------------------------------------ outbound

    def reply(self, text: str) -> None:
        """Queue a protocol message (ack, error, pong, post answer)."""
        self._queue(text)

    def deliver(self, text: str, ident: str, conflate: FeedKey | None, clock: tuple[float, float] | None = None) -> bool:
        """Queue a feed message for subscription ``ident``; ``conflate``: the feed key when only
        the latest counts; ``clock``: (time, monotonic) read once for a whole fan-out.
        True when it replaced a message the client had not received yet."""
        stats = self.subs.get(ident)
        if stats is not None:
            stats.count(*(clock or (time.time(), time.monotonic())))
        if conflate is None:
            self._queue(text)
            return False
        replaced = conflate in self.latest
        if replaced:
            self.conflated += 1
        else:
            self._queue(conflate)
        self.latest[conflate] = text
        return replaced

    def _queue(self, item: str | FeedKey) -> None:
        if self.closing:
            return
        if isinstance(item, str):
            if self.texts >= self.queue_size:
                self.close("slow_client", f"Connection closed: client too slow, {self.texts} messages queued")
                return
            self.texts += 1
        self.outbox.append(item)
        self.wakeup.set()

    def close(self, reason: str, text: str | None = None) -> None:
        """Ask the writer to send ``text`` as an error (if any) and end the session."""
        if self.closing:
            return
        self.closing = reason
        self.close_text = text
        self.outbox.clear()
        self.texts = 0
        self.latest.clear()
        self.wakeup.set()

    async def writer(self) -> None:
        """Send queued messages until the session closes."""
        while not self.closing:
            await self.wakeup.wait()
            self.wakeup.clear()
            while self.outbox and not self.closing:
                self.sending_since = time.monotonic()
                if self.frames is not None:
                    batch, size = [], 0
                    while self.outbox and len(batch) < WRITE_BATCH and size < WRITE_BYTES:
                        batch.append(frame_of(self._next()))
                        size += len(batch[-1])
                    await self.frames.write(batch)
                    self.sent += len(batch)
                else:
                    await self._send(self._next())
                    self.sent += 1
                self.sending_since = 0.0

    def _next(self) -> str:
        item = self.outbox.popleft()
        if isinstance(item, str):
            self.texts -= 1
            return item
        return self.latest.pop(item)

    def info(self) -> dict[str, Any]:
        """The debug view of this connection."""
        return {
            "id": self.id,
            "peer": self.peer,
            "connected_at": self.connected_at,
            "queue_depth": len(self.outbox),
            "direct_frames": self.frames is not None,
            "sent": self.sent,
            "conflated": self.conflated,
            "subscriptions": [s.to_dict() for s in self.subs.values()],
        }

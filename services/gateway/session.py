"""One client connection: its subscriptions with their statistics, a bounded
outbox drained by a writer task, and the inbound rate limit.

The outbox holds messages (sent in order) and feed keys of conflated feeds: a
conflated feed keeps only its latest text per client, so a slow client gets the
newest l2Book/bbo/allMids and never a backlog (at most one entry per
subscription). When ``queue_size`` messages wait, the client is closed with an
error: a trades or l4Book message would otherwise be lost.

Sending: whatever is queued during one turn of the event loop (a batch of
upstream messages, a request) is written at the end of the turn by
:class:`Outbound`, one ``transport.write`` per session, straight from the loop
when the transport has room; a session whose transport is full, or that is in
the middle of a big message (:class:`frames.Blob`), has its writer task do it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from hlbook.services.gateway.frames import Blob, FrameWriter, Message, frame_of
from hlbook.services.gateway.protocol import FeedKey

log = logging.getLogger(__name__)
_ids = itertools.count(1)
_KEY_META = type(FeedKey)  # msgspec's StructMeta: feed keys are the only Structs an outbox holds
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


class Counted:
    """Messages counted once for everyone who gets them (a feed's fan-out)."""

    __slots__ = ("count", "last_at", "window")

    def __init__(self) -> None:
        self.count = 0
        self.last_at: float | None = None
        self.window = RateWindow(time.monotonic())

    def add(self, now: float, mono: float) -> None:
        self.count += 1
        self.last_at = now
        self.window.add(mono)


@dataclass
class SubscriptionStats:
    """One subscription's statistics: the messages counted for it alone (snapshots,
    catch-up) plus those of the feed it follows since it subscribed."""

    subscription: dict[str, Any]
    feed: FeedKey
    subscribed_at: float = field(default_factory=time.time)
    own: Counted = field(default_factory=Counted)
    shared: Counted | None = None  # the feed's counter
    shared_base: int = 0  # its count when this subscription started following it

    def follow(self, shared: Counted) -> None:
        self.shared, self.shared_base = shared, shared.count

    def count(self, now: float, mono: float) -> None:
        self.own.add(now, mono)

    def to_dict(self) -> dict[str, Any]:
        now, mono = time.time(), time.monotonic()
        count, last, per_minute = self.own.count, self.own.last_at, self.own.window.per_minute(mono)
        shared = self.shared
        if shared is not None and shared.count > self.shared_base:
            count += shared.count - self.shared_base
            last = max(last or 0.0, shared.last_at or 0.0)
            per_minute += shared.window.per_minute(mono)  # the feed's rate (over its last minute)
        return {
            "subscription": self.subscription,
            "message_count": count,
            "subscribed_at": self.subscribed_at,
            "last_message_at": last,
            "messages_per_minute": round(per_minute, 1),
            "uptime_seconds": round(now - self.subscribed_at, 3),
        }


class Outbound:
    """Sessions with something queued, flushed once at the end of the event loop's turn."""

    def __init__(self) -> None:
        self.dirty: set[Session] = set()
        self.scheduled = False

    def mark(self, session: Session) -> None:
        self.dirty.add(session)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        dirty, self.dirty = self.dirty, set()
        for session in dirty:
            try:
                session.flush()
            except Exception as exc:  # a broken transport costs its own session only
                log.warning("session %d: write failed (%s); closing it", session.id, exc)
                session.close("write_failed")


class Session:
    """State of one WebSocket client; ``send`` writes one text frame."""

    def __init__(self, peer: str, send: Callable[[str], Awaitable[None]], queue_size: int, max_per_minute: int,
                 frames: FrameWriter | None = None, outbound: Outbound | None = None, lossless: bool = False) -> None:
        self.id = next(_ids)
        self.peer = peer
        self.ip = peer.rpartition(":")[0]  # whose budget it counts against (guard.AddressBudget)
        self._send = send
        self.frames = frames  # direct frame writes (no compression negotiated); else ASGI sends
        self.outbound = outbound or Outbound()
        self.queue_size = queue_size
        self.lossless = lossless  # nothing conflated, never cut off: the gateway stops reading upstream instead
        self.subs: dict[str, SubscriptionStats] = {}  # by subscription identity
        self.outbox: deque[Message | FeedKey] = deque()
        self.texts = 0  # messages (not conflated keys) in the outbox
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
        self.writing = False  # the writer task is sending: only it may write until it is done
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

    def deliver(self, text: Message, ident: str, conflate: FeedKey | None, clock: tuple[float, float] | None = None) -> bool:
        """Queue a message for subscription ``ident`` alone, counted in its statistics
        (``clock``: (time, monotonic) read once for a whole fan-out)."""
        stats = self.subs.get(ident)
        if stats is not None:
            stats.count(*(clock or (time.time(), time.monotonic())))
        return self.push(text, conflate)

    def push(self, text: Message, conflate: FeedKey | None) -> bool:
        """Queue a feed message (counted by the feed); ``conflate``: the feed key when only
        the latest counts. True when it replaced a message the client had not received yet."""
        if conflate is None or self.lossless:
            self._queue(text)
            return False
        replaced = conflate in self.latest
        self.latest[conflate] = text  # type: ignore[assignment]  # conflated feeds send texts
        if replaced:
            self.conflated += 1
        else:
            self._queue_key(conflate)
        return replaced

    def forget(self, key: FeedKey) -> None:
        """A conflated feed the client left: its pending text is not sent (its key leaves the outbox)."""
        if self.latest.pop(key, None) is not None and key in self.outbox:
            self.outbox.remove(key)

    def _queue(self, item: Message) -> None:
        """Queue a message (counted against ``queue_size``)."""
        if self.closing:
            return
        if self.texts >= self.queue_size and not self.lossless:
            self.close("slow_client", f"Connection closed: client too slow, {self.texts} messages queued")
            return
        self.texts += 1
        self.outbox.append(item)
        self.outbound.mark(self)

    def _queue_key(self, key: FeedKey) -> None:
        """Queue the place of a conflated feed's latest text (kept in ``latest``; not counted)."""
        if self.closing:
            return
        self.outbox.append(key)
        self.outbound.mark(self)

    def flush(self) -> None:
        """Write the queued small messages now if nothing is in the way; else leave it to the writer task."""
        frames = self.frames
        if not self.outbox or self.closing:
            return
        if self.writing or frames is None or not frames.ready() or isinstance(self.outbox[0], Blob):
            self.wakeup.set()
            return
        batch = self._small_batch()
        frames.write_now(batch)
        self.sent += len(batch)
        if self.outbox:
            self.wakeup.set()

    def close(self, reason: str, text: str | None = None) -> None:
        """Ask the writer to send ``text`` as an error (if any) and end the session. A client
        cut off as too slow is dropped at once: what is queued for it (megabytes, maybe) and
        its socket are freed now, not when it finally reads."""
        if self.closing:
            return
        self.closing = reason
        self.close_text = text
        self.outbox.clear()
        self.texts = 0
        self.latest.clear()
        self.wakeup.set()
        if reason == "slow_client" and self.frames is not None:
            self.frames.abort()

    async def writer(self) -> None:
        """Send queued messages until the session closes."""
        while not self.closing:
            await self.wakeup.wait()
            self.wakeup.clear()
            self.writing = True
            try:
                while self.outbox and not self.closing:
                    self.sending_since = time.monotonic()
                    await self._write_some()
                    self.sending_since = 0.0
            finally:
                self.writing = False

    async def _write_some(self) -> None:
        frames = self.frames
        if frames is None:  # through ASGI (compression negotiated)
            item = self._next()
            await self._send(item.text() if isinstance(item, Blob) else item)
            self.sent += 1
        elif isinstance(self.outbox[0], Blob):
            blob = self._next()
            assert isinstance(blob, Blob)
            await frames.write_blob(blob)
            self.sent += 1
        else:
            batch = self._small_batch()
            await frames.write(batch)
            self.sent += len(batch)

    def _small_batch(self) -> list[bytes]:
        """Frames of the queued messages up to the next Blob, at most WRITE_BATCH / WRITE_BYTES."""
        outbox = self.outbox
        batch: list[bytes] = []
        size = 0
        while outbox and len(batch) < WRITE_BATCH and size < WRITE_BYTES and not isinstance(outbox[0], Blob):
            frame = frame_of(self._next())  # type: ignore[arg-type]  # not a Blob
            batch.append(frame)
            size += len(frame)
        return batch

    def _next(self) -> Message:
        item = self.outbox.popleft()
        if type(type(item)) is _KEY_META:  # a feed key (cheaper than isinstance(item, FeedKey) on every frame)
            return self.latest.pop(item)  # type: ignore[arg-type]
        self.texts -= 1
        return item  # type: ignore[return-value]

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

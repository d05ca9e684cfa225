"""Feeds: one encoded stream per (channel, params), shared by its subscribers.

A feed encodes each update once and hands the same text to every subscriber.
``L4Feed`` adds the l4Book protocol: a snapshot from the owning shard, then
one ``Updates`` per block with contiguous heights, checked against the shard's
``prev`` chain; a gap or a shard reset sends every subscriber a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from hlbook.common import wire
from hlbook.services.gateway import metrics
from hlbook.services.gateway.protocol import FeedKey, message
from hlbook.services.gateway.session import Session

log = logging.getLogger(__name__)

RECENT_BLOCKS = 64  # l4 updates kept to bring a new subscriber from its snapshot to the live block
RETRY_DELAY = 0.5


class Feed:
    """Subscribers of one stream and, for conflated feeds, its latest text."""

    def __init__(self, key: FeedKey, channel: str, conflate: bool, topic: bytes | None) -> None:
        self.key = key
        self.channel = channel
        self.conflate = conflate
        self.topic = topic  # upstream topic subscribed while the feed has subscribers
        self.subscribers: dict[Session, str] = {}  # session -> its subscription identity
        self.last: str | None = None

    def add(self, session: Session, ident: str) -> None:
        self.subscribers[session] = ident
        if self.last is not None:
            session.deliver(self.last, ident, self.key)

    def remove(self, session: Session) -> None:
        self.subscribers.pop(session, None)

    def __len__(self) -> int:
        return len(self.subscribers)

    def publish(self, data: Any) -> None:
        self.publish_text(message(self.channel, data))

    def publish_text(self, text: str) -> None:
        """Hand an already encoded message to every subscriber."""
        if self.conflate:
            self.last = text
        metrics.ENCODED.labels(self.channel).inc()
        if not self.subscribers:
            return
        metrics.SENT.labels(self.channel).inc(len(self.subscribers))
        conflate = self.key if self.conflate else None
        clock = (time.time(), time.monotonic())
        replaced = sum(session.deliver(text, ident, conflate, clock) for session, ident in self.subscribers.items())
        if replaced:
            metrics.CONFLATED.inc(replaced)


Fetch = Callable[[], Awaitable[dict[str, Any]]]


class L4Feed(Feed):
    """l4Book of one coin (see module docstring)."""

    def __init__(self, key: FeedKey, topic: bytes, shard: int, fetch: Fetch) -> None:
        super().__init__(key, "l4Book", False, topic)
        self.shard = shard
        self._fetch = fetch
        self.waiting: dict[Session, str] = {}  # subscribers awaiting a snapshot
        self.skip_until: dict[Session, int] = {}  # subscribers whose snapshot is ahead of the stream
        self.synced = False
        self.last_height = 0  # last block sent (Updates, possibly empty)
        self.last_change = 0  # last block that changed the coin (the shard's prev chain)
        self.exact = False  # whether last_change is an update's height (not the snapshot's)
        self.buffer: list[wire.L4Updates] = []  # while fetching the first snapshot
        self.recent: deque[tuple[int, str]] = deque(maxlen=RECENT_BLOCKS)
        self.task: asyncio.Task[None] | None = None

    def add(self, session: Session, ident: str) -> None:
        self.waiting[session] = ident
        self._start_fetch()

    def remove(self, session: Session) -> None:
        self.subscribers.pop(session, None)
        self.waiting.pop(session, None)
        self.skip_until.pop(session, None)
        if not self.subscribers and not self.waiting and self.task is not None:
            self.task.cancel()
            self.task = None

    def __len__(self) -> int:
        return len(self.subscribers) + len(self.waiting)

    def resync(self, reason: str) -> None:
        """Every subscriber gets a fresh snapshot (gap or shard reset)."""
        if not self.synced and self.task is not None:
            return  # already fetching one
        log.info("l4Book %s: resync (%s)", self.key[1], reason)
        self.synced = False
        self.buffer = []
        self.recent.clear()
        self.waiting.update(self.subscribers)
        self.subscribers.clear()
        self.skip_until.clear()
        self._start_fetch()

    def _start_fetch(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._fetch_loop())

    async def _fetch_loop(self) -> None:
        while self.waiting:
            try:
                snapshot = await self._fetch()
            except Exception as exc:  # QueryError, or a shard not live for this coin yet
                metrics.L4_SNAPSHOTS.labels("error").inc()
                log.info("l4Book %s snapshot: %s; retrying", self.key[1], exc)
                await asyncio.sleep(RETRY_DELAY)
                continue
            metrics.L4_SNAPSHOTS.labels("ok").inc()
            if not self._install(snapshot):
                metrics.L4_SNAPSHOTS.labels("stale").inc()
                await asyncio.sleep(RETRY_DELAY)
        self.task = None

    def _install(self, snap: dict[str, Any]) -> bool:
        """Send the snapshot to the waiting subscribers; False if it cannot be joined to the stream."""
        height = int(snap["height"])
        text = message("l4Book", {"Snapshot": {"coin": snap["coin"], "time": snap["time"], "height": height, "levels": snap["levels"]}})
        if not self.synced:
            buffered, self.buffer = self.buffer, []
            self.last_height = self.last_change = height
            self.exact = False
            self.synced = True
            self._send_snapshot(text)
            for update in buffered:
                self.on_update(update)  # a broken chain resyncs (the fetch loop goes on)
            return True
        if height >= self.last_height:
            for session in self.waiting:
                self.skip_until[session] = height
            self._send_snapshot(text)
            return True
        if not self.recent or self.recent[0][0] > height + 1:
            return False  # the snapshot is older than what is kept: fetch a newer one
        catch_up = [t for h, t in self.recent if h > height]
        waiting = dict(self.waiting)
        self._send_snapshot(text)
        for session, ident in waiting.items():
            for update in catch_up:
                session.deliver(update, ident, None)
        return True

    def _send_snapshot(self, text: str) -> None:
        metrics.ENCODED.labels("l4Book").inc()
        metrics.SENT.labels("l4Book").inc(len(self.waiting))
        for session, ident in self.waiting.items():
            session.deliver(text, ident, None)
        self.subscribers.update(self.waiting)
        self.waiting.clear()

    def on_update(self, u: wire.L4Updates) -> None:
        """The shard's updates of one block that changed the coin."""
        if not self.synced:
            if self.task is not None:
                self.buffer.append(u)
            return
        if u.height <= self.last_change:
            return  # already in the snapshot
        if self.exact:
            chained = u.prev == self.last_change
        else:  # first update after the snapshot: the coin's previous change is in it
            chained = u.prev is None or u.prev <= self.last_change
        if not chained:
            metrics.GAPS.labels("l4").inc()
            self.resync(f"lost update: prev {u.prev}, expected {self.last_change}")
            return
        self.exact = True
        self.last_change = u.height
        self._emit(u.height, {"time": u.time, "height": u.height, "order_statuses": u.order_statuses, "book_diffs": u.book_diffs})

    def on_block(self, height: int, time: int) -> None:
        """The owning shard finished ``height``: blocks that left the coin unchanged get empty updates."""
        if self.synced and height > self.last_height:
            self._emit(height, {"time": time, "height": height, "order_statuses": [], "book_diffs": []})

    def _emit(self, height: int, updates: dict[str, Any]) -> None:
        text = message("l4Book", {"Updates": updates})
        self.last_height = height
        self.recent.append((height, text))
        metrics.ENCODED.labels("l4Book").inc()
        metrics.SENT.labels("l4Book").inc(len(self.subscribers))
        for session, ident in self.subscribers.items():
            if self.skip_until.get(session, 0) < height:
                session.deliver(text, ident, None)

"""Feeds: one encoded stream per (channel, params), shared by its subscribers.

A feed encodes each update once and hands the same text to every subscriber.
``L4Feed`` adds the l4Book protocol: a snapshot, then one ``Updates`` per
block with contiguous heights (see its docstring).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from hlbook.common import wire
from hlbook.common.chain import Chain, Step
from hlbook.services.gateway import metrics
from hlbook.services.gateway.frames import Blob, Text
from hlbook.services.gateway.protocol import CoinKey, FeedKey, dumps, message
from hlbook.services.gateway.session import Counted, Session
from hlbook.services.gateway.upstream import Reply

log = logging.getLogger(__name__)

MAX_RECORDS = 600  # l4 updates kept above the cached snapshot (40 s at 15 blocks/s) ...
MAX_RECORD_BYTES = 16 << 20  # ... and at most this many bytes of them
REFRESH_BLOCKS = 150  # a joiner finding the cached snapshot older than this (10 s) starts a fresh fetch
RETRY_DELAY = 0.5
SYNC_TIMEOUT = 3.0  # seconds to wait for the shard's sync marker before subscribing again


Render = Callable[[Any, Any], Any]  # (feed key, upstream message) -> the data of the client message (None: no message)


class Several(list[Any]):
    """What a render returns for several client messages from one upstream message, in order."""


def no_render(key: Any, m: Any) -> None:
    return None


class Feed:
    """Subscribers of one stream and, for conflated feeds, its latest text."""

    shared_count = True  # subscribers' statistics follow the feed's count (l4Book: each subscriber counts its own)

    def __init__(self, key: FeedKey, channel: str, conflate: bool, topic: bytes | None, render: Render = no_render) -> None:
        self.key = key
        self.channel = channel
        self.conflate = conflate
        self.topic = topic  # upstream topic routed to the feed (subscribed while it has subscribers, unless always)
        self.render = render
        self.subscribers: dict[Session, str] = {}  # session -> its subscription identity
        self.last: str | None = None
        self.counted = Counted()  # what every subscriber got (their statistics follow it)
        self.encoded, self.sent = metrics.ENCODED.labels(channel), metrics.SENT.labels(channel)  # labelled once: ~1 µs a message

    def add(self, session: Session, ident: str) -> None:
        self.subscribers[session] = ident
        if self.last is not None:
            session.deliver(self.last, ident, self.key)

    def remove(self, session: Session) -> None:
        self.subscribers.pop(session, None)

    def members(self) -> list[Session]:
        """Every subscriber, those still waiting for a snapshot too."""
        return list(self.subscribers)

    def __len__(self) -> int:
        return len(self.subscribers)

    def on_upstream(self, m: Any) -> None:
        """A message of the feed's upstream topic."""
        data = self.render(self.key, m)
        for each in data if isinstance(data, Several) else () if data is None else (data,):
            self.publish(each)

    def publish(self, data: Any) -> None:
        self.publish_text(message(self.channel, data))

    def publish_text(self, text: str) -> None:
        """Hand an already encoded message to every subscriber."""
        if self.conflate:
            self.last = text
        self.encoded.inc()
        if not self.subscribers:
            return
        self.sent.inc(len(self.subscribers))
        self.counted.add(time.time(), time.monotonic())
        conflate = self.key if self.conflate else None
        replaced = sum([session.push(text, conflate) for session in self.subscribers])
        if replaced:
            metrics.CONFLATED.inc(replaced)


Join = Callable[[], Awaitable[tuple[int | None, str]]]  # -> (newest block the snapshot holds, its text)
MAX_HELD = 1000  # updates held for one joiner while its snapshot is fetched
# (each try asks for every block heard so far, so only updates of one try's few seconds must fit)
MAX_RETRY_DELAY = 5.0


class NoSnapshot(Exception):
    """A joiner's snapshot cannot be had now (``retry``) or at all (no history service)."""

    def __init__(self, text: str, retry: bool) -> None:
        super().__init__(text)
        self.retry = retry


class JoinedFeed(Feed):
    """A feed whose every joiner first gets a snapshot of its own (userFills and
    userTwapSliceFills: the user's fills so far, from the history service). A
    joiner's updates wait until its snapshot came; then those of blocks the
    snapshot does not hold follow it: nothing missed, nothing twice."""

    def __init__(self, key: FeedKey, channel: str, topic: bytes | None, snapshot: Join, render: Render) -> None:
        super().__init__(key, channel, False, topic, render)
        self.snapshot = snapshot
        self.joining: dict[Session, tuple[str, deque[tuple[int, str]]]] = {}

    def on_upstream(self, m: Any) -> None:
        data = self.render(self.key, m)
        if data is not None:
            self.publish_at(m.height, data)

    def add(self, session: Session, ident: str) -> None:
        self.joining[session] = (ident, deque(maxlen=MAX_HELD))
        asyncio.create_task(self._join(session))

    async def _join(self, session: Session) -> None:
        """Snapshot, then the held updates it does not hold. A snapshot that cannot be had is
        said to the client (an ``error`` message, once) and tried again until it comes, never
        replaced by an empty one; without a history service there is none: updates follow."""
        height: int | None = None
        text: str | None = None
        delay, told = RETRY_DELAY, False
        while True:
            try:
                height, text = await self.snapshot()
                break
            except NoSnapshot as exc:
                if session not in self.joining:
                    return
                if not told:
                    metrics.ERRORS.labels("no_snapshot").inc()
                    session.reply(message("error", str(exc)))
                    told = True
                if not exc.retry:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
        joining = self.joining.pop(session, None)
        if joining is None:  # unsubscribed meanwhile
            return
        ident, held = joining
        if text is not None:
            session.deliver(text, ident, None)
        for update_height, update in held:
            if height is None or update_height > height:
                session.deliver(update, ident, None)
        self.subscribers[session] = ident

    def remove(self, session: Session) -> None:
        self.joining.pop(session, None)
        super().remove(session)

    def __len__(self) -> int:
        return len(self.subscribers) + len(self.joining)

    def publish_at(self, height: int, data: Any) -> None:
        """Publish the update of block ``height`` (held for joiners whose snapshot may not hold it)."""
        text = message(self.channel, data)
        for _, held in self.joining.values():
            held.append((height, text))
        self.publish_text(text)


Fetch = Callable[[int], Awaitable[Reply]]  # min_height -> l4 reply of the owner shard (header, levels frames)


class Snapshot(NamedTuple):
    """An l4Book snapshot as clients get it, built once and shared by every joiner."""

    height: int
    blob: Blob


def snapshot_message(header: dict[str, Any], levels: list[memoryview]) -> Blob:
    """``{"channel":"l4Book","data":{"Snapshot":{coin,time,height,levels}}}`` around the shard's rendered levels."""
    head = f'{{"channel":"l4Book","data":{{"Snapshot":{{"coin":{dumps(header["coin"])},"time":{int(header["time"])},'
    return Blob([f'{head}"height":{int(header["height"])},"levels":'.encode(), *levels, b"}}}"])


class L4Feed(Feed):
    """l4Book of one coin: a snapshot, then one ``Updates`` per block, heights contiguous.

    **Following.** After subscribing ``L4|<coin>|`` the feed waits for the owner
    shard's ``L4Sync`` (the subscription is in effect from there on, and it
    gives the coin's chain position), then records every block: the coin's
    ``L4Updates`` (``prev`` chain checked) and, from the shard's ``S|`` messages,
    an empty ``Updates`` for each block that left the coin unchanged. The
    records above the cached snapshot are kept (``records``, heights
    ``base+1 .. last_height``), also while a snapshot is being fetched.

    **Joining.** A subscriber gets the cached snapshot and the records above it
    at once; when there is none it can join (none yet, or the records no longer
    reach back to it), it waits for one fetch shared by every waiting
    subscriber (``min_height`` = ``base``, so the shard's snapshot always joins
    the records). An old cached snapshot is refreshed in the background.

    **Resync.** A lost update or a shard ``RESET`` drops the snapshot and the
    records and sends every subscriber a fresh snapshot.
    """

    shared_count = False  # each subscriber counts its own messages (its snapshot, its catch-up)

    def __init__(self, key: CoinKey, topic: bytes, shard: int, fetch: Fetch, resubscribe: Callable[[], None]) -> None:
        super().__init__(key, "l4Book", False, topic)
        self.coin = key.coin
        self.shard = shard
        self._fetch = fetch
        self._resubscribe = resubscribe
        self.upstream = Chain()  # the shard's L4|<coin>| chain
        self.following = False  # the sync marker came: every block from ``base`` on is recorded
        self.base = 0
        self.last_height = 0  # last height recorded
        self.records: deque[tuple[int, Text]] = deque()  # heights base+1 .. last_height (those above the snapshot)
        self.record_bytes = 0
        self.snapshot: Snapshot | None = None
        self.positions: dict[Session, int] = {}  # subscriber -> last height it got
        self.waiting: dict[Session, str] = {}  # subscribers awaiting a snapshot
        self.task: asyncio.Task[None] | None = None
        self.synced = asyncio.Event()  # set with ``following``

    def __len__(self) -> int:
        return len(self.subscribers) + len(self.waiting)

    def members(self) -> list[Session]:
        return [*self.subscribers, *self.waiting]

    # ------------------------------------------------------------ subscribers

    def add(self, session: Session, ident: str) -> None:
        snap = self.snapshot
        if snap is not None and self._joinable(snap.height):
            self._join(session, ident, snap)
            if self.last_height - snap.height > REFRESH_BLOCKS:
                self._start_fetch()  # keep the cache recent, so joiners catch up little
            return
        self.waiting[session] = ident
        self._start_fetch()

    def remove(self, session: Session) -> None:
        self.subscribers.pop(session, None)
        self.positions.pop(session, None)
        self.waiting.pop(session, None)
        if not len(self) and self.task is not None:
            self.task.cancel()
            self.task = None

    def _joinable(self, height: int) -> bool:
        return self.following and height >= self.base

    def _join(self, session: Session, ident: str, snap: Snapshot) -> None:
        metrics.SENT.labels("l4Book").inc()
        session.deliver(snap.blob, ident, None)
        position = snap.height
        for height, text in self.records:
            if height > snap.height:
                session.deliver(text, ident, None)
                position = height
        self.subscribers[session] = ident
        self.positions[session] = max(position, snap.height)

    # ------------------------------------------------------------ upstream

    def on_upstream(self, m: wire.L4Updates | wire.L4Sync) -> None:
        if isinstance(m, wire.L4Sync):
            self.on_sync(m)
        else:
            self.on_update(m)

    def on_sync(self, m: wire.L4Sync) -> None:
        """The shard saw our subscription (or someone's: ignored once following)."""
        if self.following:
            return
        self.following = True
        self.synced.set()
        if m.prev is None:
            self.upstream.clear()
        else:
            self.upstream.at(m.prev)
        self._restart_records(m.height)
        if self.waiting:
            self._start_fetch()

    def on_update(self, u: wire.L4Updates) -> None:
        """The shard's updates of one block that changed the coin."""
        if not self.following:
            return  # sent before the marker: the snapshot (at least the marker's height) holds it
        step = self.upstream.step(u.height, u.prev)
        if step is Step.SEEN:
            return
        if step is Step.GAP:
            metrics.GAPS.labels("l4").inc()
            self.resync(f"lost update: prev {u.prev}, {self.upstream!r}", u.height)
            self.upstream.at(u.height)
            return
        self.upstream.advance(u.height)
        if u.height > self.last_height + 1:
            self.on_block(u.height - 1, u.time)  # the shard's S| of the blocks before were lost
        self._record(u.height, {"time": u.time, "height": u.height, "order_statuses": u.order_statuses, "book_diffs": u.book_diffs})

    def on_block(self, height: int, time: int) -> None:
        """The owner shard finished ``height``: blocks that left the coin unchanged get empty updates."""
        if not self.following or height <= self.last_height:
            return
        if height - self.last_height > MAX_RECORDS:
            self.resync(f"{height - self.last_height} blocks at once", height)
            return
        for h in range(self.last_height + 1, height + 1):
            self._record(h, {"time": time, "height": h, "order_statuses": [], "book_diffs": []})

    def on_reset(self, height: int, reason: str) -> None:
        """The shard rebuilt the coin's book at ``height``."""
        if not self.following:
            return  # the snapshot comes after the marker, so after the rebuild
        self.resync(f"shard reset: {reason}", max(height, self.last_height))
        self.upstream.from_snapshot(self.base)

    def resync(self, reason: str, height: int) -> None:
        """Every subscriber gets a fresh snapshot taken at ``height`` or later."""
        log.info("l4Book %s: resync (%s)", self.coin, reason)
        metrics.L4_RESYNCS.inc()
        self.snapshot = None
        self._restart_records(height)
        for session, ident in self.subscribers.items():
            self.waiting[session] = ident
        self.subscribers.clear()
        self.positions.clear()
        if self.waiting:
            self._start_fetch()

    def _restart_records(self, height: int) -> None:
        self.base = self.last_height = height
        self.records.clear()
        self.record_bytes = 0

    def _record(self, height: int, updates: dict[str, Any]) -> None:
        text = message("l4Book", {"Updates": updates})
        self.last_height = height
        metrics.ENCODED.labels("l4Book").inc()
        positions = self.positions
        clock = (time.time(), time.monotonic())
        sent = 0
        for session, ident in self.subscribers.items():
            if positions[session] < height:
                session.deliver(text, ident, None, clock)
                positions[session] = height
                sent += 1
        metrics.SENT.labels("l4Book").inc(sent)
        snap = self.snapshot
        if snap is not None and height <= snap.height:
            self.base = height  # the snapshot holds it: nothing to keep
            return
        self.records.append((height, text))
        self.record_bytes += len(text)
        while len(self.records) > MAX_RECORDS or self.record_bytes > MAX_RECORD_BYTES:
            dropped, old = self.records.popleft()
            self.record_bytes -= len(old)
            self.base = dropped

    # ------------------------------------------------------------ snapshots

    def _start_fetch(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._fetch_loop())

    async def _fetch_loop(self) -> None:
        """Fetch until the waiting subscribers joined (or once, to refresh the cache)."""
        refresh = not self.waiting
        while self.waiting or refresh:
            if not self.following:
                await self._await_sync()
                continue
            min_height = self.base
            try:
                header, levels = await self._fetch(min_height)
            except Exception as exc:  # QueryError, or a shard not live for this coin yet
                metrics.L4_SNAPSHOTS.labels("error").inc()
                log.info("l4Book %s snapshot: %s; retrying", self.coin, exc)
                await asyncio.sleep(RETRY_DELAY)
                continue
            if self._install(Snapshot(int(header["height"]), snapshot_message(header, levels))):
                metrics.L4_SNAPSHOTS.labels("ok").inc()
                refresh = False
            else:
                metrics.L4_SNAPSHOTS.labels("stale").inc()
        self.task = None

    async def _await_sync(self) -> None:
        """Wait for the shard's sync marker; subscribe again when it does not come."""
        try:
            await asyncio.wait_for(self.synced.wait(), SYNC_TIMEOUT)
        except TimeoutError:
            log.warning("l4Book %s: no sync from shard %d in %.0f s; subscribing again", self.coin, self.shard, SYNC_TIMEOUT)
            metrics.GAPS.labels("l4_sync").inc()
            self._resubscribe()

    def _install(self, snap: Snapshot) -> bool:
        """Cache ``snap`` and bring the waiting subscribers in; False if it cannot join the records."""
        if not self._joinable(snap.height):
            return False
        current = self.snapshot
        if current is None or snap.height >= current.height:
            self.snapshot = snap
            while self.records and self.records[0][0] <= snap.height:
                _, old = self.records.popleft()
                self.record_bytes -= len(old)
            self.base = max(self.base, min(snap.height, self.last_height))
        waiting, self.waiting = self.waiting, {}
        for session, ident in waiting.items():
            self._join(session, ident, snap)
        return True

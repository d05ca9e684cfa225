"""Ingest's blocks into the books, each in its two phases.

**Books**: a header (``H|``) opens a block and names the coins with a slice in
it; each owned coin's slice (``B|``) is applied as it comes and its BBO and L2
published at once. New orders get default details (their statuses come later).
The books phase is over once every owned coin's slice came, or when the next
header comes (the missing slices were lost: recovered).

**Details**: ``D|<coin>|`` gives the coin's new orders of that block their
details and sends its L4 update; ``E|`` ends the block: coins that changed in
it with no details get their L4 update with no statuses, details that should
have come and did not are recovered, and the block is finished (``S|<k>|``).

Every chain is checked (``common.chain``): ``H|`` and ``E|`` (dense), each
``B|<coin>|`` and ``D|<coin>|``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec

from hlbook.common import topics, wire
from hlbook.common.chain import Chain, Step
from hlbook.common.metrics import BAD_INPUT
from hlbook.common.wire import CoinState
from hlbook.services.book import metrics
from hlbook.services.book.book import BAD_VALUES, OutOfSync
from hlbook.services.book.publisher import Publisher
from hlbook.services.book.recovery import Recovery
from hlbook.services.book.state import Awaiting, Coin, ShardState

log = logging.getLogger(__name__)

BLOCK_WAIT = 0.25  # seconds a block's slices may trail its header (ingest sends them back to back)
LIVE = CoinState.LIVE
STREAM_PREFIXES = [topics.HEADER, topics.BOOK_PREFIX, topics.DETAILS_PREFIX, topics.BLOCK_END]  # what a shard replays


class Stream:
    def __init__(self, state: ShardState, publisher: Publisher, recovery: Recovery) -> None:
        self.state = state
        self.publisher = publisher
        self.recovery = recovery
        recovery.stream = self
        self.headers = Chain(dense=True)
        self.ends = Chain(dense=True)
        self.block: wire.BlockHeader | None = None  # the block whose books phase is open
        self.block_opened = 0.0
        self.pending: set[str] = set()  # owned coins whose slice of the open block is awaited
        self.books_done: dict[int, wire.BlockHeader] = {}  # blocks whose books phase is over, awaiting their end
        self.on_finished: list[Callable[[int], None]] = []

    def start_at(self, height: int) -> None:
        """The books hold every block up to ``height`` (a snapshot's, or the last finished)."""
        self.headers.from_snapshot(height)
        self.ends.from_snapshot(height)
        self.block, self.pending, self.books_done = None, set(), {}

    # ------------------------------------------------------------ messages

    def on_message(self, topic: bytes, payload: bytes) -> None:
        try:
            if topic == topics.HEADER:
                self.on_header(wire.decode(payload, wire.BlockHeader))
            elif topic.startswith(topics.BOOK_PREFIX):
                coin = self.state.owned(topic)
                if coin is not None:
                    self.on_slice(coin, wire.decode(payload, wire.BookSlice))
            elif topic.startswith(topics.DETAILS_PREFIX):
                coin = self.state.owned(topic)
                if coin is not None:
                    self.on_details(coin, wire.decode(payload, wire.BookDetails))
            elif topic == topics.BLOCK_END:
                self.on_end(wire.decode(payload, wire.BlockEnd))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            BAD_INPUT.labels("book", "bad_payload").inc()
            log.error("undecodable %r message: %s", topic[:40], exc)
        except Exception:  # a bug must not stop the shard; the coin is rebuilt
            BAD_INPUT.labels("book", "error").inc()
            log.exception("handling %r failed", topic[:40])
            coin = self.state.owned(topic) if topic.startswith((topics.BOOK_PREFIX, topics.DETAILS_PREFIX)) else None
            if coin is not None and coin in self.state.coins:
                self.recovery.resync([coin], "error")

    # ------------------------------------------------------------ books phase

    def on_header(self, h: wire.BlockHeader) -> None:
        if h.height <= self.state.height or h.height in self.books_done or (self.block is not None and h.height == self.block.height):
            return  # already applied (replayed), or the open block's header again
        if self.block is not None:
            self.close_block()  # a later header: the open block's slices came or were lost
        if self.headers.step(h.height, h.prev) is Step.GAP:
            log.warning("header chain broken at %d (prev %s, %r)", h.height, h.prev, self.headers)
            if self.header_gap() and (h.height <= self.state.height or h.height in self.books_done):
                return  # the replay held this header (and its slices) too
        self.headers.advance(h.height)
        if h.incomplete:
            self._incomplete(h)
        self.block, self.block_opened = h, time.monotonic()
        owns, awaits = self.state.owns, self._awaits
        self.pending = {c for c in h.book_coins if owns(c) and awaits(c, h.height)}
        if not self.pending:
            self.books_over()

    def header_gap(self) -> bool:
        """Messages were lost: replay every block after the last finished one (else resync all)."""
        metrics.GAPS.labels("header").inc()
        if not self.recovery.replaying:
            # the replay re-sends the open block and every later one (what was applied is skipped)
            self.start_at(self.state.height)
            if self.recovery.replay(self.state.height + 1, STREAM_PREFIXES):
                return True
        self.recovery.resync(list(self.state.coins), "gap")
        return False

    def _incomplete(self, h: wire.BlockHeader) -> None:
        """A diff line of this block never reached ingest: any book may be wrong."""
        if "raw_book_diffs" not in h.incomplete:
            return  # fills only: the books are whole
        coins = [coin for coin, c in self.state.coins.items() if c.state == LIVE]
        BAD_INPUT.labels("book", "incomplete_block").inc()
        log.error("block %d came without its raw book diffs: rebuilding %d coins from a fresh snapshot", h.height, len(coins))
        self.recovery.resync(coins, "incomplete_block")

    def _awaits(self, coin: str, height: int) -> bool:
        c = self.state.coins.get(coin)
        return c is None or (c.state == LIVE and c.book.height < height)

    def on_slice(self, coin: str, s: wire.BookSlice) -> None:
        block = self.block
        if s.height > self.state.height and s.height not in self.books_done and (block is None or block.height != s.height) \
                and not self.recovery.replaying:
            log.warning("%s: slice of block %d before its header: header lost", coin, s.height)
            if self.header_gap():
                return  # the replay held this slice
        c = self.state.coin(coin)
        if c.state == LIVE and s.height > c.book.height:  # else resyncing (covered later) or applied
            step = c.chain.step(s.height, s.prev)
            if step is Step.NEXT:
                self.apply(c, s)
            elif step is Step.GAP:
                metrics.GAPS.labels("slice").inc()
                log.warning("%s: chain broken at %d (prev %s, %r)", coin, s.height, s.prev, c.chain)
                self.recovery.recover([coin])  # the replay holds this slice too; or the coin resyncs
        self.slice_done(coin, s.height)

    def apply(self, c: Coin, s: wire.BookSlice) -> None:
        """Apply one slice to a live coin and publish its BBO and L2; its L4 update waits for the details."""
        try:
            created = c.book.apply(s.height, s.time, s.diffs)
        except OutOfSync as exc:
            metrics.OUT_OF_SYNC.labels(exc.reason).inc()
            if exc.reason in BAD_VALUES:
                BAD_INPUT.labels("book", exc.reason).inc()
            log.error("%s at block %d", exc, s.height)
            self.recovery.resync([c.book.coin], exc.reason)
            return
        c.chain.advance(s.height)
        c.awaiting[s.height] = Awaiting(s.time, s.diffs, created)
        self.state.awaiting.add(c.book.coin)
        metrics.DIFFS.inc(len(s.diffs))
        self.state.update_mid(c.book)
        self.publisher.coin_books(c.book, s.height, s.time, s.diffs)

    def tick(self, now: float, more_waiting: Callable[[], bool]) -> None:
        """Close an open block whose slices are overdue (no next header waits either: a quiet chain)."""
        if self.block is not None and now - self.block_opened > BLOCK_WAIT and not more_waiting():
            self.close_block()

    def close_block(self) -> None:
        """The next header came: slices still awaited were lost; recover them, end the books phase."""
        coins = self.state.coins
        lost = sorted(c for c in self.pending if c in coins and coins[c].state == LIVE)
        if lost:
            metrics.GAPS.labels("slice").inc(len(lost))
            log.warning("slices of block %d lost: %s", self.block.height if self.block else -1, lost)
            self.recovery.recover(lost)
        self.pending.clear()
        self.books_over()

    def slice_done(self, coin: str, height: int) -> None:
        """The coin's book reached ``height`` (or resyncs): end the open books phase once nothing is awaited."""
        block = self.block
        if block is None:
            return
        c = self.state.coins.get(coin)
        if height >= block.height or (c is not None and c.state != LIVE):
            self.pending.discard(coin)
        if not self.pending:
            self.books_over()

    def forget(self, coin: str) -> None:
        """The coin resyncs: no block waits for it any more."""
        self.pending.discard(coin)
        self.state.awaiting.discard(coin)

    def books_over(self) -> None:
        h = self.block
        if h is None:
            return
        self.block = None
        self.books_done[h.height] = h

    # ------------------------------------------------------------ details phase

    def on_details(self, coin: str, d: wire.BookDetails) -> None:
        c = self.state.coins.get(coin)
        if c is None or c.state != LIVE or d.height not in c.awaiting:
            return  # resyncing (rebuilt with its details), or given them already
        step = c.details_chain.step(d.height, d.prev)
        if step is Step.SEEN:
            return
        if step is Step.GAP:  # lost details of earlier blocks are recovered at their end (E|); these are good
            metrics.GAPS.labels("details").inc()
            log.warning("%s: details chain broken at %d (prev %s, %r)", coin, d.height, d.prev, c.details_chain)
        c.details_chain.advance(d.height)
        self._detail(c, d.height, d.time, d.statuses)

    def _detail(self, c: Coin, height: int, time: int, statuses: list) -> None:
        """The coin's block ``height`` has its details: the orders it created get them, its L4 update goes out."""
        awaiting = c.awaiting.pop(height)
        if not c.awaiting:
            self.state.awaiting.discard(c.book.coin)
        if statuses:
            c.book.detail(awaiting.created, statuses)
        self.publisher.coin_details(c.book.coin, height, time, statuses, awaiting.diffs)

    def on_end(self, e: wire.BlockEnd) -> None:
        if e.height <= self.state.height:
            return  # finished (replayed)
        step = self.ends.step(e.height, e.prev)
        if step is Step.GAP:
            log.warning("block end chain broken at %d (prev %s, %r)", e.height, e.prev, self.ends)
            if self.header_gap() or e.height <= self.state.height:
                return  # the replay held this end too
        if self.block is not None and self.block.height <= e.height:
            self.close_block()  # its slices were lost: the end says the books phase is long over
        self.ends.advance(e.height)
        self.end_block(e)

    def end_block(self, e: wire.BlockEnd) -> None:
        """The block's details are all out: coins it changed without details get their L4 update
        with none; details that did not come are recovered; the block is finished."""
        header = self.books_done.pop(e.height, None)
        coins = self.state.coins
        detail_coins = set(e.detail_coins)
        lost = []
        for coin in header.book_coins if header is not None else ():
            c = coins.get(coin)
            if c is None or e.height not in c.awaiting:
                continue
            if coin in detail_coins:
                lost.append(coin)
            else:
                self._detail(c, e.height, e.time, [])
        if lost:
            metrics.GAPS.labels("details").inc(len(lost))
            log.warning("details of block %d lost: %s", e.height, lost)
            self.recovery.recover_details(lost, e.height)
        if e.incomplete:  # its status line never reached ingest: the new orders of its coins have no details
            owned = [coin for coin in (header.book_coins if header is not None else ()) if self.state.owns(coin)]
            BAD_INPUT.labels("book", "incomplete_block").inc()
            log.error("block %d came without its order statuses: rebuilding %d coins from a fresh snapshot", e.height, len(owned))
            self.recovery.resync(owned, "incomplete_block")
        self.finish_block(e.height, e.time)

    def settle(self, coins: list[str]) -> None:
        """After a replay of ``coins``' messages: blocks that ended with no details for them
        (none came, or none was held any more) send their L4 update without."""
        for coin in coins:
            c = self.state.coins.get(coin)
            if c is None:
                continue
            for height in sorted(h for h in c.awaiting if h <= self.state.height):
                self._detail(c, height, c.awaiting[height].time, [])

    def finish_block(self, height: int, time: int) -> None:
        state = self.state
        state.height = max(state.height, height)
        state.time = max(state.time, time)
        self.publisher.shard_block(height, time, dict(state.mids), state.states())
        metrics.BLOCKS.inc()
        metrics.HEIGHT.set(state.height)
        for callback in self.on_finished:
            callback(state.height)

"""Ingest's ``H|`` and ``B|`` messages into the books, one block at a time.

A header opens a block and names the coins with a slice in it; the block is
finished (``S|<k>|`` published) once every owned coin's slice came, or when
the next header comes (the missing slices were lost: recovered). Every chain
is checked (``common.chain``): ``H|`` (dense) and each ``B|<coin>|``.
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
from hlbook.services.book.state import Coin, ShardState

log = logging.getLogger(__name__)

BLOCK_WAIT = 0.25  # seconds a block's slices may trail its header (ingest sends them back to back)
LIVE = CoinState.LIVE


class Stream:
    def __init__(self, state: ShardState, publisher: Publisher, recovery: Recovery) -> None:
        self.state = state
        self.publisher = publisher
        self.recovery = recovery
        recovery.stream = self
        self.headers = Chain(dense=True)
        self.block: wire.BlockHeader | None = None  # the open block
        self.block_opened = 0.0
        self.pending: set[str] = set()  # owned coins whose slice of the open block is awaited
        self.on_finished: list[Callable[[int], None]] = []

    def start_at(self, height: int) -> None:
        """The books now hold every block up to ``height`` (a snapshot's)."""
        self.headers.from_snapshot(height)
        self.block, self.pending = None, set()

    # ------------------------------------------------------------ messages

    def on_message(self, topic: bytes, payload: bytes) -> None:
        try:
            if topic == topics.HEADER:
                self.on_header(wire.decode(payload, wire.BlockHeader))
            elif topic.startswith(topics.BOOK_PREFIX):
                coin = self.state.owned(topic)
                if coin is not None:
                    self.on_slice(coin, wire.decode(payload, wire.BookSlice))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            BAD_INPUT.labels("book", "bad_payload").inc()
            log.error("undecodable %r message: %s", topic[:40], exc)
        except Exception:  # a bug must not stop the shard; the coin is rebuilt
            BAD_INPUT.labels("book", "error").inc()
            log.exception("handling %r failed", topic[:40])
            coin = self.state.owned(topic) if topic.startswith(topics.BOOK_PREFIX) else None
            if coin is not None and coin in self.state.coins:
                self.recovery.resync([coin], "error")

    def on_header(self, h: wire.BlockHeader) -> None:
        if h.height <= self.state.height or (self.block is not None and h.height == self.block.height):
            return  # already finished (replayed), or the open block's header again
        if self.block is not None:
            self.close_block()  # a later header: the open block's slices came or were lost
        if self.headers.step(h.height, h.prev) is Step.GAP:
            log.warning("header chain broken at %d (prev %s, %r)", h.height, h.prev, self.headers)
            if self.header_gap() and h.height <= self.state.height:
                return  # the replay held this header (and its slices) too
        self.headers.advance(h.height)
        if h.incomplete:
            self._incomplete(h)
        self.block, self.block_opened = h, time.monotonic()
        owns, awaits = self.state.owns, self._awaits
        self.pending = {c for c in h.book_coins if owns(c) and awaits(c, h.height)}
        if not self.pending:
            self.finish_block()

    def header_gap(self) -> bool:
        """Headers were lost: replay every block after the last finished one (else resync all)."""
        metrics.GAPS.labels("header").inc()
        if not self.recovery.replaying:
            # the replay re-sends the open block (its header and slices) and every later one
            self.start_at(self.state.height)
            if self.recovery.replay(self.state.height + 1, [topics.HEADER, topics.BOOK_PREFIX]):
                return True
        self.recovery.resync(list(self.state.coins), "gap")
        return False

    def _incomplete(self, h: wire.BlockHeader) -> None:
        """A stream's line of this block never reached ingest: without its diffs any book
        may be wrong, without its statuses the new orders of its coins lack their details."""
        if "raw_book_diffs" in h.incomplete:
            coins = [coin for coin, c in self.state.coins.items() if c.state == LIVE]
        elif "order_statuses" in h.incomplete:
            coins = [coin for coin in h.book_coins if self.state.owns(coin)]
        else:
            return  # fills only: the books are whole
        BAD_INPUT.labels("book", "incomplete_block").inc()
        log.error("block %d came without its %s: rebuilding %d coins from a fresh snapshot",
                  h.height, " and ".join(h.incomplete), len(coins))
        self.recovery.resync(coins, "incomplete_block")

    def _awaits(self, coin: str, height: int) -> bool:
        c = self.state.coins.get(coin)
        return c is None or (c.state == LIVE and c.book.height < height)

    def on_slice(self, coin: str, s: wire.BookSlice) -> None:
        block = self.block
        if s.height > self.state.height and (block is None or block.height != s.height) and not self.recovery.replaying:
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
        """Apply one slice to a live coin and publish what changed."""
        try:
            c.book.apply(s.height, s.time, s.diffs, s.statuses)
        except OutOfSync as exc:
            metrics.OUT_OF_SYNC.labels(exc.reason).inc()
            if exc.reason in BAD_VALUES:
                BAD_INPUT.labels("book", exc.reason).inc()
            log.error("%s at block %d", exc, s.height)
            self.recovery.resync([c.book.coin], exc.reason)
            return
        c.chain.advance(s.height)
        metrics.DIFFS.inc(len(s.diffs))
        self.state.update_mid(c.book)
        self.publisher.coin_block(c.book, s.height, s.time, s.statuses, s.diffs)

    # ------------------------------------------------------------ blocks

    def tick(self, now: float, more_waiting: Callable[[], bool]) -> None:
        """Finish an open block whose slices are overdue (no next header waits either: a quiet chain)."""
        if self.block is not None and now - self.block_opened > BLOCK_WAIT and not more_waiting():
            self.close_block()

    def close_block(self) -> None:
        """The next header came: slices still awaited were lost; recover them, finish the block."""
        coins = self.state.coins
        lost = sorted(c for c in self.pending if c in coins and coins[c].state == LIVE)
        if lost:
            metrics.GAPS.labels("slice").inc(len(lost))
            log.warning("slices of block %d lost: %s", self.block.height if self.block else -1, lost)
            self.recovery.recover(lost)
        self.pending.clear()
        self.finish_block()

    def slice_done(self, coin: str, height: int) -> None:
        """The coin's book reached ``height`` (or resyncs): finish the open block once nothing is awaited."""
        block = self.block
        if block is None:
            return
        c = self.state.coins.get(coin)
        if height >= block.height or (c is not None and c.state != LIVE):
            self.pending.discard(coin)
        if not self.pending:
            self.finish_block()

    def forget(self, coin: str) -> None:
        """The coin resyncs: the open block no longer waits for it."""
        self.pending.discard(coin)

    def finish_block(self) -> None:
        h = self.block
        if h is None:
            return
        self.block = None
        state = self.state
        state.height = max(state.height, h.height)
        state.time = max(state.time, h.time)
        self.publisher.shard_block(h.height, h.time, dict(state.mids), state.states())
        metrics.BLOCKS.inc()
        metrics.HEIGHT.set(state.height)
        state.gauges()
        for callback in self.on_finished:
            callback(state.height)

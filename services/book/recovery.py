"""Getting a coin's book right again after a lost message or a bad diff.

A gap on a coin → replay its slices from ingest's ROUTER (it keeps the last
blocks); if ingest no longer holds them, or a diff does not fit the book, the
coin *resyncs*: it is not served until a fresh node snapshot replaced its
book (``--info-url``), after which the blocks since are replayed and
``RESET|<coin>|`` tells the gateways to fetch new l4 snapshots.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import zmq

from hlbook.common import topics, wire
from hlbook.common.security import Curve
from hlbook.common.wire import CoinState
from hlbook.services.book import metrics
from hlbook.services.book.book import Book
from hlbook.services.book.publisher import RELEASE_AFTER, Publisher
from hlbook.services.book.snapshot import Fetched, Fetcher
from hlbook.services.book.state import Coin, ShardState

if TYPE_CHECKING:
    from hlbook.services.book.stream import Stream

log = logging.getLogger(__name__)


class Replayer:
    """Asks ingest's ROUTER for its stored messages (a REQ socket, recreated after a timeout)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, timeout: float, curve: Curve | None = None) -> None:
        self.ctx, self.endpoint, self.timeout, self.curve = ctx, endpoint, timeout, curve
        self.req = self._new_req()

    def _new_req(self) -> zmq.Socket:
        req = self.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.connect(req)
        req.connect(self.endpoint)
        return req

    def fetch(self, from_height: int, prefixes: list[bytes], partial: bool = False) -> list[bytes] | None:
        """Stored ``topic, payload`` frames from ``from_height`` (None: timeout or refused;
        ``partial``: what ingest holds when it no longer holds ``from_height``)."""
        self.req.send(wire.encode(wire.ReplayRequest(from_height, prefixes, partial=partial)))
        if not self.req.poll(int(self.timeout * 1000)):
            metrics.REPLAYS.labels("timeout").inc()
            log.warning("replay from %d: no answer from %s", from_height, self.endpoint)
            self.req.close()
            self.req = self._new_req()
            return None
        frames = self.req.recv_multipart()
        reply = wire.decode(frames[0], wire.ReplayReply)
        if not reply.ok:
            metrics.REPLAYS.labels("refused").inc()
            log.warning("replay from %d refused: %s", from_height, reply.error)
            return None
        metrics.REPLAYS.labels("ok").inc()
        return frames[1:]

    def close(self) -> None:
        self.req.close(linger=0)


def coin_prefixes(coins: Iterable[str]) -> list[bytes]:
    """The topics of ``coins``' blocks: slices and details."""
    return [topic for coin in coins for topic in (topics.book(coin), topics.details(coin))]


class Recovery:
    """Replays, resyncs and repairs of one shard's coins."""

    def __init__(self, state: ShardState, publisher: Publisher, replayer: Replayer, fetcher: Fetcher | None,
                 retry_every: float) -> None:
        self.state = state
        self.publisher = publisher
        self.replayer = replayer
        self.fetcher = fetcher
        self.retry_every = retry_every
        self.stream: Stream  # set by Stream (replays go through its on_message)
        self.replaying = False
        self.resync_after: float | None = None  # when to fetch a snapshot for resyncing coins

    def replay(self, from_height: int, prefixes: list[bytes], partial: bool = False) -> bool:
        """Ask ingest for the stored messages from ``from_height`` and apply them (with
        ``partial``, what it holds: the chains of the coins tell whether it was enough)."""
        self.publisher.release_due(0)  # what is held goes out before the wait for ingest's answer
        frames = self.replayer.fetch(from_height, prefixes, partial)
        if frames is None:
            return False
        self.replaying = True
        try:
            for i in range(0, len(frames) - 1, 2):
                self.stream.on_message(frames[i], frames[i + 1])
                self.publisher.release_due(RELEASE_AFTER)  # a long replay goes out in bursts too
        finally:
            self.replaying = False
        return True

    def recover(self, coins: list[str]) -> None:
        """Lost slices of ``coins``: replay them (and their details) from ingest, else resync from a snapshot."""
        all_coins = self.state.coins
        coins = [c for c in coins if all_coins[c].state == CoinState.LIVE]
        if not coins:
            return
        if not self.replaying:
            start = min(all_coins[c].book.height for c in coins) + 1
            # a coin's slices are sparse: ingest may no longer hold ``start`` and still hold all that is missing
            if self.replay(start, coin_prefixes(coins), partial=True):
                self.stream.settle(coins)
                return
        self.resync(coins, "gap")

    def recover_details(self, coins: list[str], height: int) -> None:
        """Lost details of ``coins`` in block ``height``: replay them, else resync the coins (their
        new orders would keep default details)."""
        if not self.replaying:
            self.replay(height, [topics.details(c) for c in coins], partial=True)
        missing = [coin for coin in coins if height in self.state.coins[coin].awaiting]
        if missing:
            self.resync(missing, "gap")

    def resync(self, coins: Iterable[str], reason: str) -> None:
        """Stop serving ``coins``; they are rebuilt from the next node snapshot."""
        coins = list(coins)
        for coin in coins:
            c = self.state.coins.get(coin)
            if c is None or c.state == CoinState.RESYNCING:
                continue
            c.state = CoinState.RESYNCING
            self.state.mids.pop(coin, None)
            self.stream.forget(coin)
            self.publisher.reset(coin, self.state.coin_height(c.book), reason, CoinState.RESYNCING)
        if self.fetcher is None:
            log.error("coins %s need a fresh snapshot but no --info-url was given", coins)
            return
        if self.resync_after is None:
            self.resync_after = time.monotonic()  # tick() starts the fetch

    def resyncing(self) -> list[str]:
        return [coin for coin, c in self.state.coins.items() if c.state == CoinState.RESYNCING]

    def tick(self, now: float) -> None:
        if self.fetcher is not None and self.resync_after is not None and now >= self.resync_after:
            if self.fetcher.start("resync"):
                self.resync_after = None

    def on_fetched(self, fetched: Fetched) -> None:
        """A snapshot fetched while live: rebuild the resyncing coins from it."""
        if fetched.error is not None:
            if self.resyncing():
                self.resync_after = time.monotonic() + self.retry_every
            return
        coins = self.resyncing()
        if not coins:
            return
        for coin in coins:
            self.revive(self.install(coin, fetched.books.get(coin) or Book(coin, fetched.height)), "resync")
        self.resync_after = None
        if not self.replay(fetched.height + 1, coin_prefixes(coins)):
            self.resync(coins, "replay_failed")
            self.resync_after = time.monotonic() + self.retry_every
            return
        self.stream.settle(coins)

    def install(self, coin: str, book: Book, state: CoinState = CoinState.LIVE) -> Coin:
        """Replace ``coin``'s book."""
        c = self.state.coins[coin] = Coin(book, state)
        self.state.awaiting.discard(coin)
        self.publisher.forget(coin)
        return c

    def revive(self, c: Coin, reason: str) -> None:
        """A rebuilt coin is live again: RESET, then its current BBO and subscribed L2."""
        book = c.book
        self.state.update_mid(book)
        self.publisher.reset(book.coin, book.height, reason, CoinState.LIVE)
        self.publisher.refresh(book, self.state.coin_height(book), self.state.coin_time(book))

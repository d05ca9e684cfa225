"""What a shard holds: its coins (book, state, ``B|`` chain), mids, and the
height of the last block it finished."""

from __future__ import annotations

import logging

from typing import NamedTuple

from hlbook.common import fixed, topics
from hlbook.common.chain import Chain
from hlbook.common.models import BookDiff
from hlbook.common.wire import CoinState
from hlbook.services.book import metrics
from hlbook.services.book.book import Book, Order

log = logging.getLogger(__name__)


class Awaiting(NamedTuple):
    """A block applied to a coin's book whose details (``D|``) have not come yet."""

    time: int  # the block's time (ms)
    diffs: list[BookDiff]  # what the block applied (its L4 update goes out with the details)
    created: list[Order]  # the orders it created, still with default details


class Coin:
    """A coin's book, its state, where its ``B|<coin>|`` and ``D|<coin>|`` chains stand (a
    fresh book from a snapshot at height H takes any message whose ``prev`` is at most H),
    and the blocks applied to it whose details have not come yet."""

    __slots__ = ("book", "state", "chain", "details_chain", "awaiting")

    def __init__(self, book: Book, state: CoinState = CoinState.LIVE) -> None:
        self.book = book
        self.state = state
        self.chain = Chain()
        self.chain.from_snapshot(book.height)
        self.details_chain = Chain()
        self.details_chain.from_snapshot(book.height)
        self.awaiting: dict[int, Awaiting] = {}


class ShardState:
    """The coins of shard ``shard`` of ``shards`` and the shard's progress."""

    def __init__(self, shard: int, shards: int, only: frozenset[str] | None = None) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not in 0..{shards - 1}")
        self.shard = shard
        self.shards = shards
        self.only = only  # these coins alone (a replay's --coins); None: every coin the shard owns
        self.name = f"shard {shard} of {shards}"
        self.coins: dict[str, Coin] = {}
        self.mids: dict[str, str] = {}
        self.phase = CoinState.INITIALISING  # LIVE once the snapshot is loaded and replayed
        self.height = 0  # last block finished
        self.time = 0  # its block time (ms)
        self.base = 0  # height of the last full snapshot (coins absent from it were empty)
        self.awaiting: set[str] = set()  # coins with blocks applied whose details have not come yet
        self._owned: dict[bytes, str | None] = {}

    def owns(self, coin: str) -> bool:
        return topics.shard_of(coin, self.shards) == self.shard and (self.only is None or coin in self.only)

    def owned(self, topic: bytes) -> str | None:
        """The coin of a ``B|<coin>|`` topic if this shard owns it (cached per topic)."""
        try:
            return self._owned[topic]
        except KeyError:
            coin = topics.coin_of(topic)
            owned = self._owned[topic] = coin if self.owns(coin) else None
            return owned

    def coin(self, coin: str) -> Coin:
        """The coin's entry; a coin absent from the snapshot had no orders then (a new listing)."""
        c = self.coins.get(coin)
        if c is None:
            c = self.coins[coin] = Coin(Book(coin, self.base))
            metrics.COINS_ADDED.inc()
            log.info("%s: first orders of a coin absent from the snapshot at %d", coin, self.base)
        return c

    def coin_state(self, coin: str) -> CoinState | None:
        c = self.coins.get(coin)
        if c is not None:
            return c.state
        if self.phase == CoinState.INITIALISING and self.owns(coin):
            return CoinState.INITIALISING
        return None

    def live_book(self, coin: str) -> Book | None:
        c = self.coins.get(coin)
        return c.book if c is not None and c.state == CoinState.LIVE else None

    def live_books(self) -> dict[str, Book]:
        return {coin: c.book for coin, c in self.coins.items() if c.state == CoinState.LIVE}

    def coin_height(self, book: Book) -> int:
        """Height of the book's state: the shard's last block, or later when the open
        block's slice was already applied."""
        return max(self.height, book.height)

    def awaiting_details(self) -> bool:
        """Some book holds orders whose details have not come yet (what reads them waits)."""
        return bool(self.awaiting)

    def l4_height(self, c: Coin) -> int:
        """Where the coin's l4 stream stands: its last block whose details were published."""
        return self.height if c.awaiting else self.coin_height(c.book)

    def coin_time(self, book: Book) -> int:
        """Block time (ms) of the book's state (a snapshot book has none: the last block's)."""
        return max(self.time, book.time)

    def states(self) -> dict[str, str]:
        return {coin: c.state for coin, c in self.coins.items()}

    def update_mid(self, book: Book) -> None:
        mid = book.mid()
        if mid is None:
            self.mids.pop(book.coin, None)
        else:
            self.mids[book.coin] = fixed.fmt(mid)

    def gauges(self) -> None:
        counts = dict.fromkeys(CoinState, 0)
        orders = 0
        for c in self.coins.values():
            counts[c.state] += 1
            orders += len(c.book)
        for state, n in counts.items():
            metrics.COINS.labels(state).set(n)
        metrics.ORDERS.set(orders)

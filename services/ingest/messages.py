"""Turn a joined block into wire messages (docs/ARCHITECTURE.md, ingest XPUB), phase by
phase: its books (``H|``, ``B|``, ``T|``: diffs and fills only), then its details
(``D|``, ``E|``, ``U|``, ``HIST|``: what needs its statuses).

Work per status is a few attribute reads: statuses are routed to a coin's
BookDetails only when their oid has a diff of that coin in the block, and to a
user's topic only while that user is subscribed downstream. Rejections (~95 %)
of users nobody follows are not even decoded past their status (``StatusHead``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from hlbook.common import topics, wire
from hlbook.common.models import ASSISTANCE_FUND_USER, HIP2_USER, DiffBody, block_time_ms
from hlbook.common.fills import trades_of
from hlbook.services.ingest import metrics
from hlbook.services.ingest.joiner import Block

log = logging.getLogger(__name__)

STATUSLESS_USERS = frozenset({HIP2_USER, ASSISTANCE_FUND_USER})  # their orders come with diffs only


class Subscriptions:
    """The topics ingest builds only on demand, from XPUB events: per-user topics
    and the history service's ``HIST|``.

    XPUB (not verbose) reports a topic's first subscribe and last unsubscribe,
    so a set is enough. A prefix covering every user (``b""``, ``b"U|"``)
    turns on all users."""

    def __init__(self, users: Iterable[str] = (), keep_for: float = 0.0) -> None:
        """With ``keep_for``, ``users`` (followed before a restart) are kept that many seconds
        without a subscription of theirs (the subscribers reconnect and confirm them meanwhile)."""
        self.users: set[str] = set(users)
        self.unconfirmed: set[str] = set(self.users) if keep_for > 0 else set()
        self.confirm_by = time.monotonic() + keep_for
        self.all_users = 0
        self.history = 0  # subscriptions covering HIST|

    @property
    def active(self) -> bool:
        return bool(self.users) or self.all_users > 0

    @property
    def wants(self) -> Callable[[str], bool] | None:
        """Whether a user's events are wanted downstream (None: nobody's are)."""
        if self.all_users > 0:
            return lambda user: True
        return self.users.__contains__ if self.users else None

    def handle(self, event: bytes) -> None:
        """Apply one XPUB event (``\\x01topic`` subscribe, ``\\x00topic`` unsubscribe)."""
        if not event:
            return
        subscribe, topic = event[0] == 1, event[1:]
        if topics.HISTORY.startswith(topic):
            self.history += 1 if subscribe else -1
        if topics.USER_PREFIX.startswith(topic):
            self.all_users += 1 if subscribe else -1
        elif topic.startswith(topics.USER_PREFIX) and topic.endswith(topics.SEP):
            user = topics.coin_of(topic)
            (self.users.add if subscribe else self.users.discard)(user)
            self.unconfirmed.discard(user)
        metrics.USER_SUBSCRIPTIONS.set(len(self.users) + (1 if self.all_users else 0))

    def expire(self) -> None:
        """Stop building the messages of users followed before a restart that nobody followed again."""
        if self.unconfirmed and time.monotonic() >= self.confirm_by:
            self.users -= self.unconfirmed
            self.unconfirmed.clear()
            metrics.USER_SUBSCRIPTIONS.set(len(self.users) + (1 if self.all_users else 0))

Message = tuple[bytes, bytes]


class MessageBuilder:
    """Builds the messages of each block, keeping the per-topic ``prev`` chain. With
    ``trades_apart`` (streaming mode) a block's trades are a phase of their own after its
    books (``trades``): its header names none, its ``E|`` names them."""

    def __init__(self, subs: Subscriptions, trades_apart: bool = False) -> None:
        self.prev = wire.PrevTracker()
        self.subs = subs
        self.trades_apart = trades_apart

    def books(self, block: Block) -> list[Message]:
        """The books phase: header, book slices and (unless ``trades_apart``) trades."""
        ms = block_time_ms(block.block_time)
        slices = self._book_slices(block, ms)
        trades = [] if self.trades_apart else self._trades(block, ms)
        out = [self._header(block, ms, [s.coin for s in slices], [t.coin for t in trades])]
        out += [self._pack(topics.book(s.coin), s) for s in slices]
        out += [self._pack(topics.trades(t.coin), t) for t in trades]
        return out

    def trades(self, block: Block) -> list[Message]:
        """The trades phase (``trades_apart``): the block's trades, per coin; noted in
        ``block.trade_coins`` for its ``E|``."""
        trades = self._trades(block, block_time_ms(block.block_time))
        block.trade_coins = [t.coin for t in trades]
        return [self._pack(topics.trades(t.coin), t) for t in trades]

    @staticmethod
    def note_trade_coins(block: Block) -> None:
        """``block.trade_coins`` for its ``E|`` without building the trades (an ingest before
        this one published them)."""
        block.trade_coins = list(dict.fromkeys(trade.coin for _, trade in trades_of(block.fills)[0]))

    def details(self, block: Block) -> tuple[list[Message], list[Message]]:
        """The details phase (its statuses decoded): (book details and the block's end; per-user
        messages), kept apart because per-user messages exist only for users someone follows."""
        ms = block_time_ms(block.block_time)
        details = self._book_details(block, ms)
        out = [self._pack(topics.details(d.coin), d) for d in details]
        per_user = self._user_events(block, ms)
        end = wire.BlockEnd(block.height, self.prev.next(topics.BLOCK_END, block.height), ms, block.n_statuses,
                            [d.coin for d in details], ["order_statuses"] if block.statuses_missing else [],
                            [e.user for e in per_user], block.trade_coins, block.dropped)
        out.append((topics.BLOCK_END, wire.encode(end)))
        return out, [self._pack(topics.user(e.user), e) for e in per_user]

    def history(self, block: Block) -> Message | None:
        """``HIST|``, while the history service subscribes (built after the live messages went out)."""
        if self.subs.history <= 0:
            return None
        statuses = [s for s in block.statuses if not s.rejected]
        missing = block.missing + (["order_statuses"] if block.statuses_missing else [])
        return self._pack(topics.HISTORY, wire.HistoryBlock(block.height, None, block_time_ms(block.block_time), statuses,
                                                            block.fills, missing))

    def _pack(self, topic: bytes, message: wire.BookSlice | wire.BookDetails | wire.Trades | wire.UserEvents | wire.HistoryBlock
              ) -> Message:
        message.prev = self.prev.next(topic, message.height)
        return topic, wire.encode(message)

    def _header(self, block: Block, ms: int, coins: list[str], trade_coins: list[str]) -> Message:
        header = wire.BlockHeader(
            height=block.height,
            prev=self.prev.next(topics.HEADER, block.height),
            time=ms,
            block_time=block.block_time,
            local_time=block.local_time,
            n_diffs=len(block.diffs),
            n_fills=0 if self.trades_apart else len(block.fills),
            book_coins=coins,
            incomplete=block.missing,
            trade_coins=trade_coins,
        )
        return topics.HEADER, wire.encode(header)

    @staticmethod
    def _book_slices(block: Block, ms: int) -> list[wire.BookSlice]:
        """Per coin: its diffs, in node order."""
        by_coin: dict[str, wire.BookSlice] = {}
        for diff in block.diffs:
            s = by_coin.get(diff.coin)
            if s is None:
                s = by_coin[diff.coin] = wire.BookSlice(block.height, None, ms, diff.coin, [])
            s.diffs.append(diff)
        return list(by_coin.values())

    @staticmethod
    def _book_details(block: Block, ms: int) -> list[wire.BookDetails]:
        """Per coin: the statuses of the oids its diffs touched. A ``new`` diff with no status
        (other than HIP-2/assistance-fund orders) is counted: its details would be defaults."""
        oid_coin = {diff.oid: diff.coin for diff in block.diffs}
        if not oid_coin:
            return []
        by_coin: dict[str, wire.BookDetails] = {}
        detailed = set()
        for status in block.statuses:
            coin = oid_coin.get(status.order.oid)
            if coin is not None:
                d = by_coin.get(coin)
                if d is None:
                    d = by_coin[coin] = wire.BookDetails(block.height, None, ms, coin, [])
                d.statuses.append(status)
                detailed.add(status.order.oid)
        if not block.statuses_missing:
            for diff in block.diffs:
                if isinstance(diff.raw_book_diff, DiffBody) and diff.raw_book_diff.new is not None \
                        and diff.oid not in detailed and diff.user not in STATUSLESS_USERS:
                    metrics.BLOCK_ANOMALIES.labels("new_without_status").inc()
                    log.warning("block %d: new order %d of %s has no status (its details default)", block.height, diff.oid, diff.user)
        return list(by_coin.values())

    @staticmethod
    def _trades(block: Block, ms: int) -> list[wire.Trades]:
        trades, unpaired = trades_of(block.fills)
        metrics.UNPAIRED_FILLS.inc(unpaired)
        by_coin: dict[str, wire.Trades] = {}
        for _, trade in trades:
            t = by_coin.get(trade.coin)
            if t is None:
                t = by_coin[trade.coin] = wire.Trades(block.height, None, ms, trade.coin, [])
            t.trades.append(trade)
        return list(by_coin.values())

    def _user_events(self, block: Block, ms: int) -> list[wire.UserEvents]:
        if not self.subs.active:
            return []
        events: dict[str, wire.UserEvents] = {}

        def slot(user: str) -> wire.UserEvents:
            e = events.get(user)
            if e is None:
                e = events[user] = wire.UserEvents(block.height, None, ms, user, [], [])
            return e

        wanted = self.subs.users
        every = self.subs.all_users > 0
        for status in block.statuses:
            if every or status.user in wanted:
                slot(status.user).statuses.append(status)
        for user, fill in block.fills:
            if every or user in wanted:
                slot(user).fills.append(fill)
        return list(events.values())

"""The shard's XPUB side: what to publish after a block, and who wants it.

XPUB reports subscriptions (``\\x01topic``) and last unsubscriptions
(``\\x00topic``); with ``XPUB_VERBOSE`` every subscribe is reported, so a new
subscriber to an exact ``L2``/``BBO`` topic gets the current value at once.
L2 is computed only for aggregations someone subscribed to: an exact topic
``L2|<coin>|<nsf>|<man>|`` turns that aggregation on; a broader prefix
(``L2|``, ``L2|BTC|``, ``""``) turns on full precision for the coins it covers.
``L4`` and ``BBO`` are encoded only while some subscription covers them;
``S|<k>|``, ``HB|<k>|`` and ``RESET|`` always.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from hlbook.common import l2rules, topics, wire
from hlbook.services.book import l2, metrics
from hlbook.services.book.book import Book

log = logging.getLogger(__name__)

_PARTS = {topics.L2_PREFIX: 4, topics.BBO_PREFIX: 2, topics.L4_PREFIX: 2, topics.RESET_PREFIX: 2, topics.SHARD_PREFIX: 2}
L2_DEPTH = l2rules.MAX_LEVELS


def parse_l2_topic(topic: bytes) -> tuple[str, l2.Agg] | None:
    """``(coin, (nsf, man))`` of an exact, valid L2 topic; None otherwise."""
    try:
        kind, coin, nsf, man = topics.split(topic)
        agg = (None if nsf == "-" else int(nsf), None if man == "-" else int(man))
        l2rules.validate(*agg)
    except (ValueError, UnicodeDecodeError):
        return None
    return (coin, agg) if kind == "L2" else None


def is_exact(topic: bytes) -> bool:
    """Whether ``topic`` names one stream (as opposed to a prefix of several)."""
    if not topic.endswith(topics.SEP):
        return False
    prefix = topic[: topic.index(topics.SEP) + 1]
    return topic.count(topics.SEP) == _PARTS.get(prefix, -1)


class Subscriptions:
    """Exact topics and broader prefixes subscribed on the XPUB socket."""

    def __init__(self) -> None:
        self.exact: set[bytes] = set()
        self.prefixes: set[bytes] = set()
        self.l2: dict[str, set[l2.Agg]] = {}

    def handle(self, event: bytes) -> bytes | None:
        """Apply one XPUB event; returns the topic when it is a subscription."""
        if not event:
            return None
        subscribe, topic = event[0] == 1, event[1:]
        target = self.exact if is_exact(topic) else self.prefixes
        if subscribe:
            target.add(topic)
        else:
            target.discard(topic)
        parsed = parse_l2_topic(topic) if topic.startswith(topics.L2_PREFIX) else None
        if parsed is not None:
            coin, agg = parsed
            aggs = self.l2.setdefault(coin, set())
            (aggs.add if subscribe else aggs.discard)(agg)
            if not aggs:
                del self.l2[coin]
        return topic if subscribe else None

    def wanted(self, topic: bytes) -> bool:
        if topic in self.exact:
            return True
        return any(topic.startswith(p) for p in self.prefixes)

    def aggregations(self, coin: str) -> set[l2.Agg]:
        aggs = set(self.l2.get(coin, ()))
        if self.prefixes and any(topics.l2(coin).startswith(p) for p in self.prefixes):
            aggs.add((None, None))
        return aggs


class Publisher:
    """Encodes and sends the shard's stream messages, keeping ``prev`` chains."""

    def __init__(self, sock: zmq.Socket, shard: int) -> None:
        self.sock = sock
        self.shard = shard
        self.subs = Subscriptions()
        self.prev = wire.PrevTracker()
        self.last_bbo: dict[str, Any] = {}
        self.last_l2: dict[bytes, Any] = {}
        self.shard_topic = topics.shard_block(shard)
        self.heartbeat_topic = topics.heartbeat(shard)
        self.held: list[tuple[bytes, bytes]] | None = None  # messages of the coin being published

    def send(self, kind: str, topic: bytes, message: Any) -> None:
        if hasattr(message, "prev"):
            message.prev = self.prev.next(topic, message.height)
        payload = wire.encode(message)
        if self.held is not None:
            self.held.append((topic, payload))
        else:
            self.sock.send_multipart((topic, payload), copy=False)
        metrics.PUBLISHED.labels(kind).inc()

    def coin_block(self, book: Book, height: int, time: int, statuses: list, diffs: list) -> None:
        """After a block changed ``book``: L4 updates, BBO if changed, subscribed L2, sent
        back to back once all are built (a gateway then gets them in one read, and writes
        them to each client at once)."""
        coin = book.coin
        topic = topics.l4(coin)
        self.held = []
        try:
            if self.subs.wanted(topic):
                self.send("l4", topic, wire.L4Updates(height, None, time, coin, statuses, diffs))
            else:  # the chain advances unsent: ``prev`` is the coin's previous changed block
                self.prev.next(topic, height)
            self.bbo(book, height, time)
            aggs = self.subs.aggregations(coin)
            if aggs or book.views:
                l2.sync_views(book, aggs)
            for agg in aggs:
                self.l2(book, agg, height, time)
        finally:
            held, self.held = self.held, None
            for frames in held:
                self.sock.send_multipart(frames, copy=False)

    def l4_sync(self, coin: str, height: int) -> None:
        """Someone just subscribed ``L4|<coin>|``: tell where the coin's chain stands (``wire.L4Sync``)."""
        topic = topics.l4(coin)
        self.sock.send_multipart((topic, wire.encode(wire.L4Sync(height, self.prev.peek(topic), coin))))
        metrics.PUBLISHED.labels("l4_sync").inc()

    def bbo(self, book: Book, height: int, time: int, force: bool = False) -> None:
        topic = topics.bbo(book.coin)
        if not self.subs.wanted(topic):
            self.last_bbo.pop(book.coin, None)
            return
        bbo = l2.bbo(book)
        if force or self.last_bbo.get(book.coin) != bbo:
            self.last_bbo[book.coin] = bbo
            self.send("bbo", topic, wire.Bbo(height, None, time, book.coin, bbo))

    def l2(self, book: Book, agg: l2.Agg, height: int, time: int, force: bool = False) -> None:
        topic = topics.l2(book.coin, *agg)
        levels = l2.levels(book, L2_DEPTH, *agg)
        if force or self.last_l2.get(topic) != levels:
            self.last_l2[topic] = levels
            self.send("l2", topic, wire.L2Levels(height, None, time, book.coin, agg[0], agg[1], levels))

    def initial(self, topic: bytes, books: dict[str, Book], height: int, time: int) -> None:
        """A subscriber just subscribed to ``topic``: send the current value of an exact L2/BBO topic."""
        if topic.startswith(topics.L2_PREFIX):
            parsed = parse_l2_topic(topic)
            if parsed and parsed[0] in books:
                book = books[parsed[0]]
                self.l2(book, parsed[1], max(height, book.height), max(time, book.time), force=True)
        elif topic.startswith(topics.BBO_PREFIX) and is_exact(topic):
            found = books.get(topics.coin_of(topic))
            if found is not None:
                self.bbo(found, max(height, found.height), max(time, found.time), force=True)

    def refresh(self, book: Book, height: int, time: int) -> None:
        """Send the current BBO and subscribed L2 of ``book`` (after it was rebuilt)."""
        self.bbo(book, height, time, force=True)
        for agg in self.subs.aggregations(book.coin):
            self.l2(book, agg, height, time, force=True)

    def forget(self, coin: str) -> None:
        """Drop what was last sent for ``coin`` (its book was replaced)."""
        self.last_bbo.pop(coin, None)
        for topic in [t for t in self.last_l2 if topics.coin_of(t) == coin]:
            del self.last_l2[topic]

    def heartbeat(self, status: wire.ShardStatus) -> None:
        self.sock.send_multipart((self.heartbeat_topic, wire.encode(status)))
        metrics.PUBLISHED.labels("heartbeat").inc()

    def shard_block(self, height: int, time: int, mids: dict[str, str], states: dict[str, str]) -> None:
        self.send("shard", self.shard_topic, wire.ShardBlock(height, None, time, self.shard, mids, states))

    def reset(self, coin: str, height: int, reason: str, state: str) -> None:
        self.send("reset", topics.reset(coin), wire.Reset(height, coin, reason, state))
        metrics.RESETS.labels(reason).inc()

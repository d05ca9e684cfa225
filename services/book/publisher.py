"""The shard's XPUB side: what to publish after a block, and who wants it.

XPUB reports subscriptions (``\\x01topic``) and last unsubscriptions
(``\\x00topic``); with ``XPUB_VERBOSE`` every subscribe is reported, so a new
subscriber to an exact ``L2``/``BBO`` topic gets the current value at once.
L2 is computed only for topics someone subscribed to: an exact topic
``L2|<coin>|<nsf>|<man>|<nLevels>|`` turns on that aggregation at that depth; a
broader prefix (``L2|``, ``L2|BTC|``, ``""``) turns on full precision at the
greatest depth for the coins it covers. A block recomputes a topic's levels only
when one of its diffs lies within the levels that topic last showed (or the side
showed fewer than its depth): most diffs of a deep book are further out.
``L4`` and ``BBO`` are encoded only while some subscription covers them;
``S|<k>|``, ``HB|<k>|`` and ``RESET|`` always.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import zmq

from hlbook.common import l2rules, topics, wire
from hlbook.common.models import BookDiff, OrderStatus
from hlbook.services.book import l2, metrics
from hlbook.services.book.book import BID, Book, parse_px

log = logging.getLogger(__name__)

RELEASE_AFTER = 0.002  # seconds what a batch of ingest's messages publishes is held at most (``Publisher.hold``)

_PARTS = {topics.L2_PREFIX: 5, topics.BBO_PREFIX: 2, topics.L4_PREFIX: 2, topics.RESET_PREFIX: 2, topics.SHARD_PREFIX: 2}
_SHARD_KINDS = (*_PARTS, topics.HEARTBEAT_PREFIX)  # every kind of topic a shard publishes
L2_DEPTH = l2rules.MAX_LEVELS  # levels a side for prefix subscribers
L2Spec = tuple[l2.Agg, int]  # an L2 topic's aggregation and depth


@functools.cache
def _published(kind: str) -> Any:
    return metrics.PUBLISHED.labels(kind)  # labelled once: ~1 µs a message


def parse_l2_topic(topic: bytes) -> tuple[str, L2Spec] | None:
    """``(coin, ((nsf, man), nLevels))`` of an exact, valid L2 topic; None otherwise."""
    try:
        kind, coin, nsf, man, depth = topics.split(topic)
        agg = (None if nsf == "-" else int(nsf), None if man == "-" else int(man))
        n = int(depth)
        l2rules.validate(*agg)
    except (ValueError, UnicodeDecodeError):
        return None
    return (coin, (agg, n)) if kind == "L2" and 1 <= n <= L2_DEPTH else None


def shard_may_publish(topic: bytes) -> bool:
    """Whether a subscription to ``topic`` can match something a shard sends."""
    return any(topic.startswith(kind) or kind.startswith(topic) for kind in _SHARD_KINDS)


def is_exact(topic: bytes) -> bool:
    """Whether ``topic`` names one stream (as opposed to a prefix of several)."""
    if not topic.endswith(topics.SEP):
        return False
    prefix = topic[: topic.index(topics.SEP) + 1]
    return topic.count(topics.SEP) == _PARTS.get(prefix, -1)


def touched(diffs: Iterable[BookDiff]) -> tuple[int | None, int | None]:
    """The best bid and the best ask price a block's diffs touched (None: that side untouched)."""
    bid = ask = None
    for diff in diffs:
        px = parse_px(diff.px)
        if diff.side == BID:
            if bid is None or px > bid:
                bid = px
        elif ask is None or px < ask:
            ask = px
    return bid, ask


class Subscriptions:
    """Exact topics and broader prefixes subscribed on the XPUB socket."""

    def __init__(self) -> None:
        self.exact: set[bytes] = set()
        self.prefixes: set[bytes] = set()
        self.l2: dict[str, dict[bytes, L2Spec]] = {}  # coin -> its exact L2 topics

    def handle(self, event: bytes) -> bytes | None:
        """Apply one XPUB event; returns the topic when it is a subscription. Topics no shard
        publishes are ignored: a gateway's one SUB socket subscribes every publisher to every
        topic (a user's ``U|``, a coin's trades), and each prefix kept would be tried on every
        message the shard sends."""
        if not event:
            return None
        subscribe, topic = event[0] == 1, event[1:]
        if not shard_may_publish(topic):
            return None
        target = self.exact if is_exact(topic) else self.prefixes
        if subscribe:
            target.add(topic)
        else:
            target.discard(topic)
        parsed = parse_l2_topic(topic) if topic.startswith(topics.L2_PREFIX) else None
        if parsed is not None:
            coin, spec = parsed
            specs = self.l2.setdefault(coin, {})
            if subscribe:
                specs[topic] = spec
            else:
                specs.pop(topic, None)
            if not specs:
                del self.l2[coin]
        return topic if subscribe else None

    def wanted(self, topic: bytes) -> bool:
        if topic in self.exact:
            return True
        return any(topic.startswith(p) for p in self.prefixes)

    def watches(self, book_topic: bytes) -> bool:
        """Whether someone reads the l2Book or bbo of the coin of a ``B|<coin>|`` topic."""
        coin_part = book_topic[len(topics.BOOK_PREFIX):]
        return coin_part.decode() in self.l2 or (topics.BBO_PREFIX + coin_part) in self.exact or bool(self.prefixes)

    def l2_topics(self, coin: str) -> dict[bytes, L2Spec]:
        """The coin's L2 topics to publish and their specs."""
        specs = self.l2.get(coin, {})
        if self.prefixes:
            full = topics.l2(coin, None, None, L2_DEPTH)
            if any(full.startswith(p) for p in self.prefixes):
                specs = {**specs, full: ((None, None), L2_DEPTH)}
        return specs


class Publisher:
    """Encodes and sends the shard's stream messages, keeping ``prev`` chains."""

    def __init__(self, sock: zmq.Socket, shard: int) -> None:
        self.sock = sock
        self.shard = shard
        self.subs = Subscriptions()
        self.prev = wire.PrevTracker()
        self.last_bbo: dict[str, tuple[bytes | None, bytes | None]] = {}
        self.shown: dict[bytes, l2.Top] = {}  # L2 topic -> the levels it last published
        self.coin_json: dict[str, bytes] = {}
        self.shard_topic = topics.shard_block(shard)
        self.heartbeat_topic = topics.heartbeat(shard)
        self.held: list[tuple[bytes, bytes]] | None = None  # messages built but not sent yet (``hold``)
        self.held_since = 0.0

    def send(self, kind: str, topic: bytes, message: Any) -> None:
        if hasattr(message, "prev"):
            message.prev = self.prev.next(topic, message.height)
        payload = wire.encode(message)
        if self.held is not None:
            self.held.append((topic, payload))
        else:
            wire.send(self.sock, topic, payload)
        _published(kind).inc()

    def _coin_json(self, coin: str) -> bytes:
        text = self.coin_json.get(coin)
        if text is None:
            text = self.coin_json[coin] = msgspec.json.encode(coin)
        return text

    def hold(self) -> None:
        """Keep what is published from now on until ``release`` (or ``release_due``): a gateway
        then gets a burst of coins in one read instead of waking up for each coin."""
        if self.held is None:
            self.held, self.held_since = [], time.monotonic()

    def release_due(self, after: float) -> None:
        """Send what is held if it was held ``after`` seconds or more (and go on holding)."""
        if self.held and time.monotonic() - self.held_since >= after:
            self.release()
            self.hold()

    def release(self) -> None:
        """Send what is held, in the order it was built; stop holding."""
        held, self.held = self.held, None
        for topic, payload in held or ():
            wire.send(self.sock, topic, payload)

    def coin_books(self, book: Book, height: int, time: int, diffs: list[BookDiff]) -> None:
        """After a block's diffs changed ``book``: BBO if changed, subscribed L2 if changed, sent
        back to back once all are built (a gateway then gets them in one read, and writes them
        to each client at once), or kept with what is held."""
        holding = self.held is not None
        self.hold()
        try:
            self.bbo(book, height, time)
            specs = self.views(book)
            if specs:
                self.l2(book, specs, height, time, touched(diffs))
        finally:
            if not holding:
                self.release()

    def coin_details(self, coin: str, height: int, time: int, statuses: list[OrderStatus], diffs: list[BookDiff]) -> None:
        """Once a block's details came: the coin's L4 update (statuses and diffs of the block)."""
        topic = topics.l4(coin)
        if self.subs.wanted(topic):
            self.send("l4", topic, wire.L4Updates(height, None, time, coin, statuses, diffs))
        else:  # the chain advances unsent: ``prev`` is the coin's previous changed block
            self.prev.next(topic, height)

    def views(self, book: Book) -> dict[bytes, L2Spec]:
        """The book's subscribed L2 topics, with the aggregated views they read attached (and no other)."""
        specs = self.subs.l2_topics(book.coin)
        if specs or book.views:
            l2.sync_views(book, {agg for agg, _ in specs.values()})
        return specs

    def l4_sync(self, coin: str, height: int) -> None:
        """Someone just subscribed ``L4|<coin>|``: tell where the coin's chain stands (``wire.L4Sync``)."""
        topic = topics.l4(coin)
        wire.send(self.sock, topic, wire.encode(wire.L4Sync(height, self.prev.peek(topic), coin)))
        metrics.PUBLISHED.labels("l4_sync").inc()

    def bbo(self, book: Book, height: int, time: int, force: bool = False) -> None:
        topic = topics.bbo(book.coin)
        if not self.subs.wanted(topic):
            self.last_bbo.pop(book.coin, None)
            return
        bid, ask = book.bbo()
        bbo = (bid.fragment() if bid else None, ask.fragment() if ask else None)
        if force or self.last_bbo.get(book.coin) != bbo:
            self.last_bbo[book.coin] = bbo
            self.send("bbo", topic, wire.Bbo(height, None, time, book.coin, l2.render_bbo(self._coin_json(book.coin), time, *bbo)))

    def l2(self, book: Book, specs: dict[bytes, L2Spec], height: int, time: int,
           touched: tuple[int | None, int | None] | None = None) -> None:
        """Publish the topics of ``specs`` whose levels changed (``touched``: the best prices the
        block's diffs touched, to skip topics they cannot have changed; None: compute them all)."""
        shown = self.shown
        if touched is not None:
            specs = {t: spec for t, spec in specs.items() if t not in shown or shown[t].may_change(spec[1], *touched)}
            if not specs:
                return
        depth: dict[l2.Agg, int] = {}
        for agg, n in specs.values():
            depth[agg] = max(depth.get(agg, 0), n)
        tops = {agg: l2.top(book, n, *agg) for agg, n in depth.items()}
        for topic, (agg, n) in specs.items():
            levels = tops[agg].first(n) if n < depth[agg] else tops[agg]
            last = shown.get(topic)
            shown[topic] = levels
            if touched is None or last is None or last.bids != levels.bids or last.asks != levels.asks:
                self.send("l2", topic, wire.L2Book(height, None, time, book.coin, l2.render_l2(self._coin_json(book.coin), time, levels)))

    def initial(self, topic: bytes, books: dict[str, Book], height: int, time: int) -> None:
        """A subscriber just subscribed to ``topic``: send the current value of an exact L2/BBO topic."""
        if topic.startswith(topics.L2_PREFIX):
            parsed = parse_l2_topic(topic)
            if parsed and parsed[0] in books:
                book = books[parsed[0]]
                self.views(book)
                self.l2(book, {topic: parsed[1]}, max(height, book.height), max(time, book.time))
        elif topic.startswith(topics.BBO_PREFIX) and is_exact(topic):
            found = books.get(topics.coin_of(topic))
            if found is not None:
                self.bbo(found, max(height, found.height), max(time, found.time), force=True)

    def refresh(self, book: Book, height: int, time: int) -> None:
        """Send the current BBO and subscribed L2 of ``book`` (after it was rebuilt)."""
        self.bbo(book, height, time, force=True)
        specs = self.views(book)
        if specs:
            self.l2(book, specs, height, time)

    def forget(self, coin: str) -> None:
        """Drop what was last sent for ``coin`` (its book was replaced)."""
        self.last_bbo.pop(coin, None)
        for topic in [t for t in self.shown if topics.coin_of(t) == coin]:
            del self.shown[topic]

    def heartbeat(self, status: wire.ShardStatus) -> None:
        wire.send(self.sock, self.heartbeat_topic, wire.encode(status))
        metrics.PUBLISHED.labels("heartbeat").inc()

    def shard_block(self, height: int, time: int, mids: dict[str, str], states: dict[str, str]) -> None:
        self.send("shard", self.shard_topic, wire.ShardBlock(height, None, time, self.shard, mids, states))

    def reset(self, coin: str, height: int, reason: str, state: str) -> None:
        self.send("reset", topics.reset(coin), wire.Reset(height, coin, reason, state))
        metrics.RESETS.labels(reason).inc()

"""The gateway's state: feeds by key and by upstream topic, what the shards
report (coins and their states, mids, heights), recent trades; and the
dispatch of every upstream message to the feeds that want it."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec

from hlbook.common import topics, wire
from hlbook.common.chain import Chains, Step
from hlbook.common.metrics import BAD_INPUT
from hlbook.common.models import block_time_ms
from hlbook.common.wire import CoinState
from hlbook.services.gateway import metrics
from hlbook.services.gateway.feeds import Feed, L4Feed
from hlbook.services.gateway.kinds import KINDS, AllMidsKey
from hlbook.services.gateway.polled import Polls
from hlbook.services.gateway.protocol import CoinKey, FeedKey, RequestError, UserKey, message
from hlbook.services.gateway.session import Session
from hlbook.services.gateway.upstream import QueryError, Upstream
from hlbook.services.gateway.users import Users

log = logging.getLogger(__name__)

RECENT_TRADES = 100  # per coin, for recentTrades
REPLAY_TRIES = 3  # a replay request that gets no answer is sent again this many times in all
REPLAYED = ("trades", "user", "header", "end")  # sources (labels) whose lost messages are recovered from ingest's replay
TRADES_HOLD = 0.02  # seconds a block's trades wait at most for their coin's book messages of that block
WRITTEN_KEPT = 64  # blocks whose node write time (H|) is kept, for ``delay``
SHARD_SILENT = 5.0  # seconds without a message (block or heartbeat) after which a shard counts as down
BOOK_FEEDS = ("l2Book", "bbo", "l4Book")  # kinds that show a shard's book: said stale when it is silent
BOOK_SOURCES = (topics.L2_PREFIX, topics.BBO_PREFIX)  # the shard's book messages, published as soon as a block's diffs are applied
DROPPED_FEEDS = {  # node stream -> the kinds made of it (told when ingest drops some of it)
    "fills": ("trades", "userFills", "userTwapSliceFills", "userEvents"),
    "order_statuses": ("orderUpdates", "l4Book"),  # l4Book: new orders' details (the shards rebuild the coins)
    "raw_book_diffs": ("l2Book", "bbo", "l4Book"),  # the shards rebuild the coins from a fresh snapshot
}


class ShardView:
    """What one shard last said about itself."""

    def __init__(self) -> None:
        self.height = 0
        self.time = 0
        self.seen = time.monotonic()  # its last message (a block or a heartbeat); never heard: silent since the gateway started
        self.block_seen = 0.0  # monotonic: its last block
        self.phase = CoinState.INITIALISING
        self.known = False  # it has been live (its coins are known) since this gateway started
        self.silent = False  # said to its coins' book subscribers: nothing heard for SHARD_SILENT
        self.mids: dict[str, str] = {}
        self.states: dict[str, str] = {}

    def silence(self, now: float) -> float | None:
        """Seconds since its last message when over ``SHARD_SILENT`` (stopped, hung, cut off: its
        books cannot be called current); None while it talks. The one rule for a silent shard."""
        quiet = now - self.seen
        return quiet if quiet > SHARD_SILENT else None

    def live(self, now: float) -> bool:
        """It talks and its books are live."""
        return self.phase == CoinState.LIVE and self.silence(now) is None


BlockHook = Callable[["Hub", Any, wire.ShardBlock], None]
Handler = tuple[str, Any, Callable[["Hub", bytes, Any], None]]  # (metrics label, wire type, method)


@functools.cache
def _upstream_counter(label: str) -> Any:
    return metrics.UPSTREAM.labels(label)


def tell_stale(session: Session, key: CoinKey, quiet: float) -> None:
    """One ``error`` message to a book subscriber of a silent shard's coin: its feed pauses."""
    metrics.ERRORS.labels("stale_book").inc()
    session.reply(message("error", f"{key.kind} {key.coin}: no update for {quiet:.0f} s, its book shard is silent; "
                                   "what you hold may be stale; updates resume when it is back"))


def tell_stale_mids(session: Session, coins: list[str], quiet: float) -> None:
    """One ``error`` message to an allMids subscriber: the mids of a silent shard's coins stay
    in its data (as the public API has no stale flag) but are not current."""
    metrics.ERRORS.labels("stale_mids").inc()
    named = ", ".join(coins[:10]) + (f" and {len(coins) - 10} more" if len(coins) > 10 else "")
    session.reply(message("error", f"allMids: the mids of {len(coins)} coins ({named}) are not updated for {quiet:.0f} s, "
                                   "their book shard is silent; they resume when it is back"))


def concerns(dropped: wire.Dropped, key: FeedKey) -> bool:
    """Whether node data ingest dropped may have held messages of the feed ``key``."""
    if key.kind not in DROPPED_FEEDS.get(dropped.stream, ()):
        return False
    if isinstance(key, CoinKey):
        return dropped.coins is None or key.coin in dropped.coins
    return isinstance(key, UserKey) and (dropped.users is None or key.user in dropped.users)


def tell_gap(feed: Feed, reason: str, what: str) -> None:
    """One ``error`` message to each subscriber of a feed that lost messages: a gap, never data."""
    key = feed.key
    name = key.coin if isinstance(key, CoinKey) else key.user if isinstance(key, UserKey) else ""
    for session in feed.members():
        metrics.ERRORS.labels(reason).inc()
        session.reply(message("error", f"{key.kind} {name}: {what}; {key.kind} messages it held are missing here"))


def tell_dropped(feed: Feed, dropped: wire.Dropped) -> None:
    """Node data ingest dropped (``wire.Dropped``), said to a feed it concerned."""
    block = "an unknown block" if dropped.height is None else f"block {dropped.height}"
    tell_gap(feed, "dropped_data", f"the node's {dropped.stream} data of {block} was dropped ({dropped.reason})")


def dex_of(coin: str) -> str:
    """HIP-3 coins are ``dex:COIN``; the rest belong to the default dex ``""``."""
    return coin.split(":", 1)[0] if ":" in coin else ""


class Hub:
    def __init__(self, upstream: Upstream, users: Users | None = None) -> None:
        self.upstream = upstream
        self.users = users or Users()
        self.shards = [ShardView() for _ in range(upstream.shards)]
        self.feeds: dict[FeedKey, Feed] = {}
        self.by_topic: dict[bytes, list[Feed]] = {}
        self.trades: dict[str, deque[wire.Trade]] = {}
        self.chains = Chains(dense_prefixes=(topics.SHARD_PREFIX, topics.HEADER, topics.BLOCK_END))  # every upstream topic but L4| (its feed keeps that)
        self.repairing: dict[bytes, list[Any]] = {}  # topic -> messages held while its lost ones are replayed
        self.announced: deque[tuple[int, list[bytes]]] = deque()  # (height, T| and U| topics its H| or E| named)
        self.block_feeds: list[dict[Feed, BlockHook]] = [{} for _ in self.shards]  # kinds with block="owner", by owner shard
        self.every_block_feeds: dict[Feed, BlockHook] = {}  # kinds with block="every" (allMids)
        self.held_trades: dict[str, deque[tuple[float, bytes, wire.Trades]]] = {}  # by coin
        self.book_feeds: dict[str, int] = {}  # coin -> its feeds made of the shard's book messages (l2Book, bbo)
        self.book_height: dict[str, int] = {}  # coin -> height of its last book message (while it has book feeds)
        self.release_scheduled = False
        self.written: dict[int, str] = {}  # height -> the node's local_time of it (its H|), the last WRITTEN_KEPT
        self.every_height = 0
        self.heard_height = 0  # newest block of any upstream message: history queries wait for it (read your feeds)
        self.header_time = 0  # block time (ms) of ingest's newest H|: how current a shard's answer is
        self.first_end: int | None = None  # the first E| heard: every T| published after it is heard (upstream.ALWAYS)
        self.polls: Polls | None = None  # node state polled from the info server (polled.py)

    # ------------------------------------------------------------ what the shards hold

    def owner(self, coin: str) -> int:
        return topics.shard_of(coin, len(self.shards))

    def coin_state(self, coin: str) -> str | None:
        return self.shards[self.owner(coin)].states.get(coin)

    def coin_exists(self, coin: str) -> bool:
        return self.coin_state(coin) is not None

    def coins(self) -> dict[str, str]:
        return {coin: state for view in self.shards for coin, state in view.states.items()}

    def live_shards(self) -> int:
        """Shards heard from lately (blocks, or heartbeats while the node is silent) with their books live."""
        now = time.monotonic()
        return sum(1 for v in self.shards if v.live(now))

    def knows_coins(self) -> bool:
        """Every shard has said which coins it holds (once live since this gateway started;
        a shard restarting later keeps its coins known)."""
        return all(view.known for view in self.shards)

    def ready(self) -> bool:
        """This gateway serves: every shard has said which coins it holds, and one at least is
        live. A silent or restarting shard of several leaves it ready, its coins stale
        (``stale_coins``): the others' are served. True also while the node is silent (every
        gateway is as stale then: a load balancer should keep them)."""
        return self.knows_coins() and self.live_shards() > 0

    def whole(self) -> bool:
        """Every shard is live and talking to this gateway."""
        return self.live_shards() == len(self.shards)

    def coin_live(self, coin: str, now: float) -> bool:
        """The coin's book is current here: its shard live and talking, the coin live in it."""
        view = self.shards[self.owner(coin)]
        return view.live(now) and view.states.get(coin) == CoinState.LIVE

    def stale_coins(self) -> list[str]:
        """Coins whose book is not current here: their shard silent or restarting, or the coin
        itself initialising or resyncing."""
        now = time.monotonic()
        return sorted(coin for coin in self.coins() if not self.coin_live(coin, now))

    def silent_for(self, coin: str) -> float | None:
        """``ShardView.silence`` of the shard owning ``coin``."""
        return self.shards[self.owner(coin)].silence(time.monotonic())

    def say_silent_shards(self) -> None:
        """Tell the book subscribers of a shard's coins, once, when it falls silent (stopped,
        hung, cut off): their feed pauses, the book they hold may be stale. Called every second."""
        now = time.monotonic()
        for k, view in enumerate(self.shards):
            quiet = view.silence(now) if view.known else None
            if (quiet is not None) == view.silent:
                continue
            view.silent = quiet is not None
            if quiet is None:
                log.info("shard %d talks again", k)
                continue
            log.warning("shard %d silent for %.0f s: telling its coins' book and allMids subscribers", k, quiet)
            for key, feed in list(self.feeds.items()):
                if key.kind in BOOK_FEEDS and isinstance(key, CoinKey) and self.owner(key.coin) == k:
                    for session in feed.members():
                        tell_stale(session, key, quiet)
                elif isinstance(key, AllMidsKey):
                    coins = self._stale_mids(view, key)
                    for session in feed.members() if coins else ():
                        tell_stale_mids(session, coins, quiet)

    def lag(self) -> float | None:
        """Seconds from the block time of the newest block a shard finished to now (None: none
        yet): how far behind the node the books are, the node's own ~0.4 s included."""
        newest = max(view.time for view in self.shards)
        return time.time() - newest / 1000 if newest else None

    def delay(self) -> float | None:
        """Seconds from the node's write of the newest block a shard finished (its header's
        ``local_time``) to now (None: not known): hlbook's own part of ``lag``."""
        written = self.written.get(max(view.height for view in self.shards))
        try:
            return time.time() - block_time_ms(written) / 1000 if written else None
        except ValueError:  # not a node timestamp
            return None

    def block_age(self) -> float | None:
        """Seconds since the last block reached this gateway (None: none yet): a stalled node."""
        last = max(view.block_seen for view in self.shards)
        return time.monotonic() - last if last else None

    def all_mids(self, dex: str = "") -> dict[str, str]:
        return {coin: px for view in self.shards for coin, px in view.mids.items() if dex_of(coin) == dex}

    # ------------------------------------------------------------ subscriptions

    def check(self, key: FeedKey) -> None:
        """RequestError when a new feed for ``key`` cannot be opened (cap of followed users, no history service)."""
        if isinstance(key, UserKey) and not self.users.can_follow(key.user):
            raise RequestError(f"Cannot follow more than {self.users.max_users} users on this server.", "too_many_users")
        if KINDS[key.kind].history and not self.upstream.has_history:
            raise RequestError(f"{key.kind[0].upper()}{key.kind[1:]}s need the history service; this server runs without one.", "no_history")

    def attach(self, session: Session, ident: str, key: FeedKey) -> None:
        feed = self.feeds.get(key)
        if feed is None:
            kind = KINDS[key.kind]
            if isinstance(key, UserKey):
                self.users.follow(key.user)
            feed = self.feeds[key] = kind.feed(self, key)
            metrics.FEEDS.set(len(self.feeds))
            if kind.on_block is not None:
                self._block_index(kind.block, key)[feed] = kind.on_block
            if feed.topic is not None:
                self.by_topic.setdefault(feed.topic, []).append(feed)
                if kind.subscribe:
                    self.upstream.subscribe(feed.topic)
            if kind.source.prefix in BOOK_SOURCES:
                assert isinstance(key, CoinKey)
                self.book_feeds[key.coin] = self.book_feeds.get(key.coin, 0) + 1
            if kind.prime is not None:
                kind.prime(self, feed)
        stats = session.subs.get(ident)
        if stats is not None and feed.shared_count:
            stats.follow(feed.counted)
        if (key.kind in BOOK_FEEDS and isinstance(key, CoinKey)) or isinstance(key, AllMidsKey):
            self._tell_if_silent(session, key)  # before any book or mids it may get
        feed.add(session, ident)
        metrics.SUBSCRIPTIONS.labels(key.kind).inc()

    def detach(self, session: Session, key: FeedKey) -> None:
        feed = self.feeds.get(key)
        if feed is None:
            return
        feed.remove(session)
        metrics.SUBSCRIPTIONS.labels(key.kind).dec()
        if len(feed):
            return
        del self.feeds[key]
        metrics.FEEDS.set(len(self.feeds))
        kind = KINDS[key.kind]
        if kind.on_block is not None:
            self._block_index(kind.block, key).pop(feed, None)
        if kind.source.prefix in BOOK_SOURCES:
            assert isinstance(key, CoinKey)
            self.book_feeds[key.coin] -= 1
            if not self.book_feeds[key.coin]:
                del self.book_feeds[key.coin]
                self.book_height.pop(key.coin, None)
        if isinstance(key, UserKey):
            self.users.unfollow(key.user)
        if feed.topic is not None:
            siblings = self.by_topic[feed.topic]
            siblings.remove(feed)
            if not siblings:
                del self.by_topic[feed.topic]
                if kind.subscribe:
                    self.chains.pop(feed.topic)
            if kind.subscribe:
                self.upstream.unsubscribe(feed.topic)

    def _tell_if_silent(self, session: Session, key: CoinKey | AllMidsKey) -> None:
        """A new book or allMids subscriber of a shard said silent is told at once, as the others
        were (``say_silent_shards`` tells it with them when the shard falls silent later)."""
        now = time.monotonic()
        if isinstance(key, AllMidsKey):
            for view in self.shards:
                quiet = view.silence(now)
                coins = self._stale_mids(view, key)
                if view.silent and quiet is not None and coins:
                    tell_stale_mids(session, coins, quiet)
            return
        view = self.shards[self.owner(key.coin)]
        quiet = view.silence(now)
        if view.silent and quiet is not None:
            tell_stale(session, key, quiet)

    @staticmethod
    def _stale_mids(view: ShardView, key: AllMidsKey) -> list[str]:
        """The coins of a silent shard whose mids an allMids feed of ``key.dex`` shows."""
        return sorted(coin for coin in view.mids if dex_of(coin) == key.dex)

    def _block_index(self, block: str | None, key: FeedKey) -> dict[Feed, BlockHook]:
        """Where the feeds driven by shard blocks are: by the coin's owner shard, or every block."""
        if block == "owner":
            assert isinstance(key, CoinKey)
            return self.block_feeds[self.owner(key.coin)]
        return self.every_block_feeds

    # ------------------------------------------------------------ upstream messages

    def on_message(self, topic: bytes, payload: bytes) -> None:
        handler = self._handlers.get(topic[: topic.find(topics.SEP) + 1])
        if handler is None:
            BAD_INPUT.labels("gateway", "unknown_topic").inc()
            return
        label, message_type, handle = handler
        _upstream_counter(label).inc()
        try:
            message = wire.decode(payload, message_type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            BAD_INPUT.labels("gateway", "bad_payload").inc()
            log.error("undecodable %r message: %s", topic[:40], exc)
            return
        if label == "l4" or not hasattr(message, "prev"):
            handle(self, topic, message)
            return
        held = self.repairing.get(topic)
        if held is not None:
            held.append(message)  # after the lost ones being replayed
            return
        chain = self.chains[topic]
        if chain.last is None and label == "trades" and self.first_end is not None:
            chain.from_snapshot(self.first_end)  # a coin's first T| here: a later one before it was lost
        step = chain.step(message.height, message.prev)
        if step is Step.SEEN:
            return
        if step is Step.GAP:
            metrics.GAPS.labels(label).inc()
            if label in REPLAYED:
                self.repairing[topic] = [message]
                asyncio.create_task(self._repair(topic, label, handle))
                return
            # L2, BBO, S: each message is the whole current state, so this one repairs the loss
        chain.advance(message.height)
        if message.height > self.heard_height:
            self.heard_height = message.height
        handle(self, topic, message)

    async def _repair(self, topic: bytes, label: str, handle: Any, from_height: int | None = None,
                      expected: int | None = None) -> None:
        """Deliver the lost messages of ``topic`` from ingest's replay (``expected``: the block of
        one that must be there), then those held meanwhile; the topic's subscribers are told of
        what could not be recovered."""
        chain = self.chains[topic]
        from_height = from_height or (chain.last or 0) + 1
        try:
            replayed = await self._replayed(topic, from_height)
        finally:
            held = self.repairing.pop(topic, [])
        lost = replayed is None
        if lost:
            self._say_lost(topic, f"its messages from block {from_height} on could not be replayed (ingest did not answer)")
        for message in [*(replayed or []), *held]:
            step = chain.check(message.height, message.prev)
            if step is Step.GAP and not lost:
                lost = True
                log.error("%r: messages between %s and %d lost for good (ingest no longer holds them)",
                          topic[:60], message.prev, message.height)
                self._say_lost(topic, f"its messages between blocks {message.prev} and {message.height} were lost upstream "
                                      "(ingest no longer holds them)")
            if step is not Step.SEEN:
                try:
                    handle(self, topic, message)
                except Exception:  # as in Upstream._read: one bad message must not stop the rest
                    BAD_INPUT.labels("gateway", "error").inc()
                    log.exception("handling %r failed", topic[:40])
        if not lost and expected is not None and (chain.last is None or chain.last < expected):
            lost = True
            log.error("%r: the message of block %d lost for good (ingest no longer holds it)", topic[:60], expected)
            self._say_lost(topic, f"its message of block {expected} was lost upstream (ingest no longer holds it)")
        metrics.REPAIRS.labels(label, "failed" if lost else "replayed").inc()

    async def _replayed(self, topic: bytes, from_height: int) -> list[Any] | None:
        """``topic``'s messages from ``from_height`` in ingest's replay (None: no answer, or undecodable)."""
        message_type = self._handlers[topic[: topic.find(topics.SEP) + 1]][1]
        for attempt in range(1, REPLAY_TRIES + 1):  # an ingest that just restarted may be busy catching up
            try:
                answer = await self.upstream.replay(from_height, topic)
            except QueryError as exc:
                log.log(logging.ERROR if attempt == REPLAY_TRIES else logging.WARNING, "%r: no replay from %d (try %d of %d): %s",
                        topic[:60], from_height, attempt, REPLAY_TRIES, exc)
                continue
            try:
                return [wire.decode(payload, message_type) for t, payload in answer if t == topic]
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("%r: undecodable replay from %d: %s", topic[:60], from_height, exc)
                return None
        return None

    def _say_lost(self, topic: bytes, what: str) -> None:
        for feed in self.by_topic.get(topic, ()):
            tell_gap(feed, "lost_upstream", what)

    def on_shard_block(self, topic: bytes, m: wire.ShardBlock) -> None:
        if not 0 <= m.shard < len(self.shards):
            BAD_INPUT.labels("gateway", "unknown_shard").inc()
            return
        view = self.shards[m.shard]
        view.height, view.time, view.seen = m.height, m.time, time.monotonic()
        view.block_seen, view.phase, view.known = view.seen, CoinState.LIVE, True
        for coin in [coin for coin in self.held_trades if self.owner(coin) == m.shard]:  # coins whose book did not change
            self._release_trades(coin, m.height)
        view.mids, view.states = m.mids, m.states
        metrics.SHARDS_LIVE.set(self.live_shards())
        for feed, on_block in self.block_feeds[m.shard].items():
            on_block(self, feed, m)
        self._every_block(m)
        metrics.LAG.set(time.time() - m.time / 1000)

    def on_heartbeat(self, topic: bytes, m: wire.ShardStatus) -> None:
        if not 0 <= m.shard < len(self.shards):
            BAD_INPUT.labels("gateway", "unknown_shard").inc()
            return
        view = self.shards[m.shard]
        view.seen, view.phase = time.monotonic(), m.phase
        if m.height > view.height:  # a block's S| message was lost: catch up on its state
            view.height, view.time, view.states = m.height, m.time, m.states
        elif m.phase == CoinState.LIVE and not view.block_seen:
            view.states = m.states  # the node is silent: the coins are known all the same
        view.known = view.known or m.phase == CoinState.LIVE
        metrics.SHARDS_LIVE.set(self.live_shards())

    def _every_block(self, m: wire.ShardBlock) -> None:
        """Feeds of every block (allMids): once per block, when every live shard has finished it."""
        now = time.monotonic()
        height = m.height
        if height <= self.every_height or any(v.height < height for v in self.shards if v.silence(now) is None):
            return
        self.every_height = height
        for feed, on_block in self.every_block_feeds.items():
            on_block(self, feed, m)

    def on_header(self, topic: bytes, m: wire.BlockHeader) -> None:
        self.header_time = max(self.header_time, m.time)
        self.written[m.height] = m.local_time
        if len(self.written) > WRITTEN_KEPT:
            del self.written[next(iter(self.written))]
        self._announce(m.height, [topics.trades(coin) for coin in m.trade_coins])

    def on_block_end(self, topic: bytes, m: wire.BlockEnd) -> None:
        if self.first_end is None:  # a T| of a block up to it went out before it (its block's trades precede it)
            self.first_end = m.height
        users = [t for t in map(topics.user, m.users) if t in self.by_topic]  # the users followed here
        self._announce(m.height, [*map(topics.trades, m.trade_coins), *users])
        if m.dropped:
            self.say_dropped(m.height, m.dropped)

    def say_dropped(self, height: int, dropped: list[wire.Dropped]) -> None:
        """Tell the subscribers of every feed that node data ingest dropped concerned, once per
        feed and ``E|`` (the first drop that concerned it)."""
        told: dict[FeedKey, wire.Dropped] = {}
        for d in dropped:
            for key in self.feeds:
                if key not in told and concerns(d, key):
                    told[key] = d
        log.warning("block %d: ingest dropped node data (%s): telling %d feeds", height,
                    ", ".join(f"{d.stream} {d.reason} at {d.height}" for d in dropped[:5]), len(told))
        for key, d in told.items():
            tell_dropped(self.feeds[key], d)

    def _announce(self, height: int, expected: list[bytes]) -> None:
        """A block's ``H|`` names its trades' topics (streaming mode: its ``E|``, sent after
        them), its ``E|`` its users' (sent before those messages, on the same socket): when a
        later block's comes, every message named before must have come. One that did not was
        lost: it is replayed now, whether or not its topic ever has another message (a quiet
        coin, a user who stopped trading)."""
        lost: list[bytes] = []
        while self.announced and self.announced[0][0] < height:
            block, named = self.announced.popleft()
            for topic in named:
                last = self.chains[topic].last
                if topic not in self.repairing and (last is None or last < block):
                    label, _, handle = self._handlers[topic[: topic.find(topics.SEP) + 1]]
                    metrics.GAPS.labels(label).inc()
                    lost.append(topic)
                    self.repairing[topic] = []
                    asyncio.create_task(self._repair(topic, label, handle, block if last is None else None, block))
        if lost:
            log.warning("%d announced messages before block %d never came (%s); replaying them",
                        len(lost), height, b" ".join(lost[:10]).decode(errors="replace"))
        if expected:
            self.announced.append((height, expected))

    def on_reset(self, topic: bytes, m: wire.Reset) -> None:
        for feed in self.by_topic.get(topics.l4(m.coin), ()):
            if isinstance(feed, L4Feed):
                feed.on_reset(m.height, m.reason)

    def on_trades(self, topic: bytes, m: wire.Trades) -> None:
        """Trades come from ingest before the owner shard has applied the block's diffs: when
        the coin has l2Book or bbo feeds they wait (at most ``TRADES_HOLD``) for its book
        messages of that block, so each client gets a block's trades, bbo and l2Book in one
        write, and this fan-out does not take the CPU the shard needs meanwhile."""
        recent = self.trades.get(m.coin)
        if recent is None:
            recent = self.trades[m.coin] = deque(maxlen=RECENT_TRADES)
        recent.extend(m.trades)
        held = self.held_trades.get(m.coin)
        if not held and not self._holds(m.coin, m.height):
            self.on_feeds(topic, m)
            return
        if held is None:
            held = self.held_trades[m.coin] = deque()
        held.append((time.monotonic(), topic, m))
        if not self.release_scheduled:
            self.release_scheduled = True
            asyncio.get_running_loop().call_later(TRADES_HOLD, self._release_late_trades)

    def _holds(self, coin: str, height: int) -> bool:
        """Whether the coin's trades of block ``height`` wait for its book messages of that block."""
        if coin not in self.book_feeds or self.book_height.get(coin, 0) >= height:
            return False
        return self.shards[self.owner(coin)].height < height and self.live_shards() > 0

    def on_book(self, topic: bytes, m: wire.L2Book | wire.Bbo) -> None:
        """An l2Book or bbo message: to its feeds, then the coin's trades it was waited for."""
        self.book_height[m.coin] = max(self.book_height.get(m.coin, 0), m.height)
        self.on_feeds(topic, m)
        self._release_trades(m.coin, m.height)

    def _release_trades(self, coin: str, height: int) -> None:
        held = self.held_trades.get(coin)
        while held and held[0][2].height <= height:
            _, topic, m = held.popleft()
            self.on_feeds(topic, m)
        if held is not None and not held:
            del self.held_trades[coin]

    def _release_late_trades(self) -> None:
        self.release_scheduled = False
        due = time.monotonic() - TRADES_HOLD
        for coin, held in list(self.held_trades.items()):
            while held and held[0][0] <= due:
                _, topic, m = held.popleft()
                self.on_feeds(topic, m)
            if not held:
                del self.held_trades[coin]
        if self.held_trades:
            self.release_scheduled = True
            asyncio.get_running_loop().call_later(TRADES_HOLD / 2, self._release_late_trades)

    def on_feeds(self, topic: bytes, m: Any) -> None:
        """A message of a feed topic (l2Book, bbo, l4Book, trades, user feeds, candles) to its feeds."""
        for feed in self.by_topic.get(topic, ()):
            feed.on_upstream(m)

    _handlers: ClassVar[dict[bytes, Handler]] = {
        topics.SHARD_PREFIX: ("shard", wire.ShardBlock, on_shard_block),
        topics.HEARTBEAT_PREFIX: ("heartbeat", wire.ShardStatus, on_heartbeat),
        topics.RESET_PREFIX: ("reset", wire.Reset, on_reset),
        topics.HEADER: ("header", wire.BlockHeader, on_header),  # which trades a block has: a lost one is replayed
        topics.BLOCK_END: ("end", wire.BlockEnd, on_block_end),  # which users' events: likewise
        topics.TRADES_PREFIX: ("trades", wire.Trades, on_trades),  # held for the coin's book messages, then on_feeds
        topics.L2_PREFIX: ("l2", wire.L2Book, on_book),
        topics.BBO_PREFIX: ("bbo", wire.Bbo, on_book),
    }
    for _kind in KINDS.values():  # every other upstream message of a feed kind goes to the feeds of its topic
        _handlers.setdefault(_kind.source.prefix, (_kind.source.label, _kind.source.type, on_feeds))
    del _kind

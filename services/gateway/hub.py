"""The gateway's state: feeds by key and by upstream topic, what the shards
report (coins and their states, mids, heights), recent trades; and the
dispatch of every upstream message to the feeds that want it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import msgspec

from hlbook.common import topics, wire
from hlbook.common.fills import aggregate_by_time
from hlbook.common.models import Fill, twap_id
from hlbook.common.chain import Chains, Step
from hlbook.common.metrics import BAD_INPUT
from hlbook.common.wire import CoinState
from hlbook.services.gateway import metrics
from hlbook.services.gateway import users as user_streams
from hlbook.services.gateway.ctx import active_asset_ctx, active_asset_ctx_channel
from hlbook.services.gateway.feeds import Feed, JoinedFeed, L4Feed
from hlbook.services.gateway.protocol import CHANNELS, CONFLATED, USER_FEEDS, FeedKey, RequestError, message
from hlbook.services.gateway.session import Session
from hlbook.services.gateway.upstream import QueryError, Upstream
from hlbook.services.gateway.users import Users

log = logging.getLogger(__name__)

RECENT_TRADES = 100  # per coin, for recentTrades
REPLAYED = ("trades", "user")  # kinds whose lost messages are recovered from ingest's replay
TRADES_HOLD = 0.02  # seconds a block's trades wait at most for the owner shard to finish that block
SHARD_SILENT = 5.0  # seconds without a message (block or heartbeat) after which a shard counts as down
STALE = 5.0  # seconds without a block after which the data is stale (the node stalled)
SUBSCRIBE_SETTLE = 0.05  # seconds for a new U| subscription to reach ingest (later blocks come live)


class ShardView:
    """What one shard last said about itself."""

    def __init__(self) -> None:
        self.height = 0
        self.time = 0
        self.seen = 0.0  # monotonic: its last message (a block or a heartbeat)
        self.block_seen = 0.0  # monotonic: its last block
        self.phase = CoinState.INITIALISING
        self.known = False  # it has been live (its coins are known) since this gateway started
        self.mids: dict[str, str] = {}
        self.states: dict[str, str] = {}


def level_dicts(side: list[wire.Level], n: int | None = None) -> list[dict[str, Any]]:
    return [{"px": px, "sz": sz, "n": count} for px, sz, count in side[:n]]


def level_dict(level: wire.Level | None) -> dict[str, Any] | None:
    return None if level is None else {"px": level[0], "sz": level[1], "n": level[2]}


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
        self.l2_last: dict[bytes, wire.L2Levels] = {}  # subscribed L2 topics: last levels (new nLevels feeds start from it)
        self.trades: dict[str, deque[wire.Trade]] = {}
        self.chains = Chains(dense_prefixes=(topics.SHARD_PREFIX,))  # every upstream topic but L4| (its feed keeps that)
        self.repairing: dict[bytes, list[Any]] = {}  # topic -> messages held while its lost ones are replayed
        self.block_feeds: list[set[Feed]] = [set() for _ in self.shards]  # l4Book/activeAssetCtx feeds by owner shard
        self.mids_feeds: set[Feed] = set()  # allMids feeds (one per dex asked for)
        self.held_trades: list[deque[tuple[float, wire.Trades]]] = [deque() for _ in self.shards]  # by owner shard
        self.release_scheduled = False
        self.mids_height = 0

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
        return sum(1 for v in self.shards if v.phase == CoinState.LIVE and now - v.seen < SHARD_SILENT)

    def knows_coins(self) -> bool:
        """Every shard has said which coins it holds (once live since this gateway started;
        a shard restarting later keeps its coins known)."""
        return all(view.known for view in self.shards)

    def ready(self) -> bool:
        """This gateway works: every shard is up, live and talking to it. True also while the
        node is silent (every gateway is as stale then: a load balancer should keep them)."""
        return self.live_shards() == len(self.shards)

    def block_age(self) -> float | None:
        """Seconds since the last block reached this gateway (None: none yet): a stalled node."""
        last = max(view.block_seen for view in self.shards)
        return time.monotonic() - last if last else None

    def all_mids(self, dex: str = "") -> dict[str, str]:
        return {coin: px for view in self.shards for coin, px in view.mids.items() if dex_of(coin) == dex}

    # ------------------------------------------------------------ subscriptions

    def check(self, key: FeedKey) -> None:
        """RequestError when a new feed for ``key`` cannot be opened (cap of followed users)."""
        if key[0] in USER_FEEDS and not self.users.can_follow(key[1]):
            raise RequestError(f"Cannot follow more than {self.users.max_users} users on this server.", "too_many_users")
        if key[0] == "candle" and not self.upstream.has_history:
            raise RequestError("Candles need the history service; this server runs without one.", "no_history")

    def attach(self, session: Session, ident: str, key: FeedKey) -> None:
        feed = self.feeds.get(key)
        if feed is None:
            if key[0] in USER_FEEDS:
                self.users.follow(key[1])
            feed = self.feeds[key] = self._new_feed(key)
            metrics.FEEDS.set(len(self.feeds))
            self._per_block(feed).add(feed)
            if feed.topic is not None:
                self.by_topic.setdefault(feed.topic, []).append(feed)
                self.upstream.subscribe(feed.topic)
            self._prime(feed)
        stats = session.subs.get(ident)
        if stats is not None and not isinstance(feed, L4Feed):  # l4Book counts per subscriber (snapshot, catch-up)
            stats.follow(feed.counted)
        feed.add(session, ident)
        metrics.SUBSCRIPTIONS.labels(key[0]).inc()

    def detach(self, session: Session, key: FeedKey) -> None:
        feed = self.feeds.get(key)
        if feed is None:
            return
        feed.remove(session)
        metrics.SUBSCRIPTIONS.labels(key[0]).dec()
        if len(feed):
            return
        del self.feeds[key]
        metrics.FEEDS.set(len(self.feeds))
        self._per_block(feed).discard(feed)
        if key[0] in USER_FEEDS:
            self.users.unfollow(key[1])
        if feed.topic is not None:
            siblings = self.by_topic[feed.topic]
            siblings.remove(feed)
            if not siblings:
                del self.by_topic[feed.topic]
                self.l2_last.pop(feed.topic, None)
                self.chains.pop(feed.topic)
            self.upstream.unsubscribe(feed.topic)

    def _per_block(self, feed: Feed) -> set[Feed]:
        """The index of feeds driven by shard blocks that ``feed`` belongs in (an empty set when none)."""
        kind = feed.key[0]
        if kind in ("l4Book", "activeAssetCtx"):
            return self.block_feeds[self.owner(feed.key[1])]
        return self.mids_feeds if kind == "allMids" else set()

    def _new_feed(self, key: FeedKey) -> Feed:
        kind = key[0]
        if kind == "l4Book":
            coin = key[1]
            shard, topic = self.owner(coin), topics.l4(coin)
            return L4Feed(key, topic, shard, lambda min_height: self.upstream.query_parts(shard, wire.Query("l4", coin=coin, min_height=min_height)),
                          lambda: self.upstream.resubscribe(topic))
        if kind in ("userFills", "userTwapSliceFills"):
            return JoinedFeed(key, kind, topics.user(key[1]), lambda: self._fills_snapshot(key))
        if kind in USER_FEEDS:
            return Feed(key, CHANNELS.get(kind, kind), False, topics.user(key[1]))
        if kind == "candle":
            return Feed(key, kind, True, topics.candle(key[1], key[2]))  # the history service sends the newest at once
        if kind == "activeAssetCtx":
            return Feed(key, active_asset_ctx_channel(key[1]), True, None)
        topic = {"l2Book": lambda: topics.l2(key[1], key[2], key[3]), "bbo": lambda: topics.bbo(key[1])}.get(kind)
        return Feed(key, kind, kind in CONFLATED, topic() if topic else None)

    def _prime(self, feed: Feed) -> None:
        """A new feed starts from what is already known (later updates replace it)."""
        kind = feed.key[0]
        if kind == "allMids":
            feed.publish({"mids": self.all_mids(feed.key[1])})
        elif kind == "l2Book" and feed.topic in self.l2_last:
            self._publish_l2(feed, self.l2_last[feed.topic])
        elif kind == "activeAssetCtx":
            self._publish_ctx(feed)

    def newest_height(self) -> int:
        """The newest block some shard finished."""
        return max(view.height for view in self.shards)

    async def _fills_snapshot(self, key: FeedKey) -> tuple[int | None, str]:
        """userFills / userTwapSliceFills start with ``isSnapshot: true`` and the user's fills
        so far (the history service's, once it holds every block this gateway has seen)."""
        kind, user = key[0], key[1]
        height, fills = None, b"[]"
        if self.upstream.has_history:
            await asyncio.sleep(SUBSCRIBE_SETTLE)
            query = wire.HistoryQuery("user_fills", user=user, aggregate=kind == "userFills" and bool(key[2]),
                                      min_height=self.newest_height())
            try:
                reply, fills = await self.upstream.history(query)
                height = reply.height
            except QueryError as exc:
                metrics.ERRORS.labels("no_history").inc()
                log.warning("%s snapshot of %s: %s; sent empty", kind, user, exc)
        if kind == "userFills":
            return height, message(kind, {"isSnapshot": True, "user": user, "fills": msgspec.Raw(fills)})
        twap = [{"fill": f, "twapId": twap_id(f)} for f in msgspec.json.decode(fills, type=list[Fill]) if twap_id(f) is not None]
        return height, message(kind, {"isSnapshot": True, "user": user, "twapSliceFills": twap})

    # ------------------------------------------------------------ upstream messages

    def on_message(self, topic: bytes, payload: bytes) -> None:
        handler = self._handlers.get(topic[: topic.find(topics.SEP) + 1])
        if handler is None:
            BAD_INPUT.labels("gateway", "unknown_topic").inc()
            return
        kind, message_type, handle = handler
        metrics.UPSTREAM.labels(kind).inc()
        try:
            message = wire.decode(payload, message_type)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            BAD_INPUT.labels("gateway", "bad_payload").inc()
            log.error("undecodable %r message: %s", topic[:40], exc)
            return
        if kind == "l4" or not hasattr(message, "prev"):
            handle(self, topic, message)
            return
        held = self.repairing.get(topic)
        if held is not None:
            held.append(message)  # after the lost ones being replayed
            return
        chain = self.chains[topic]
        step = chain.step(message.height, message.prev)
        if step is Step.SEEN:
            return
        if step is Step.GAP:
            metrics.GAPS.labels(kind).inc()
            if kind in REPLAYED:
                self.repairing[topic] = [message]
                asyncio.create_task(self._repair(topic, kind, handle))
                return
            # L2, BBO, S: each message is the whole current state, so this one repairs the loss
        chain.advance(message.height)
        handle(self, topic, message)

    async def _repair(self, topic: bytes, kind: str, handle: Any) -> None:
        """Deliver the lost messages of ``topic`` from ingest's replay, then those held meanwhile."""
        chain = self.chains[topic]
        from_height = (chain.last or 0) + 1
        message_type = self._handlers[topic[: topic.find(topics.SEP) + 1]][1]
        replayed: list[Any] = []
        try:
            replayed = [wire.decode(payload, message_type) for t, payload in await self.upstream.replay(from_height, topic) if t == topic]
        except (QueryError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("%r: no replay from %d: %s", topic[:60], from_height, exc)
        finally:
            held = self.repairing.pop(topic, [])
        lost = False
        for message in [*replayed, *held]:
            step = chain.check(message.height, message.prev)
            if step is Step.GAP:
                lost = True
                log.error("%r: messages between %s and %d lost for good (ingest no longer holds them)",
                          topic[:60], message.prev, message.height)
            if step is not Step.SEEN:
                try:
                    handle(self, topic, message)
                except Exception:  # as in Upstream._read: one bad message must not stop the rest
                    BAD_INPUT.labels("gateway", "error").inc()
                    log.exception("handling %r failed", topic[:40])
        metrics.REPAIRS.labels(kind, "failed" if lost else "replayed").inc()

    def on_shard_block(self, topic: bytes, m: wire.ShardBlock) -> None:
        if not 0 <= m.shard < len(self.shards):
            BAD_INPUT.labels("gateway", "unknown_shard").inc()
            return
        view = self.shards[m.shard]
        view.height, view.time, view.seen = m.height, m.time, time.monotonic()
        view.block_seen, view.phase, view.known = view.seen, CoinState.LIVE, True
        self._release_trades(m.shard, m.height)
        view.mids, view.states = m.mids, m.states
        metrics.SHARDS_LIVE.set(self.live_shards())
        for feed in self.block_feeds[m.shard]:
            if isinstance(feed, L4Feed):
                feed.on_block(m.height, m.time)
            else:
                self._publish_ctx(feed)
        self._maybe_mids(m.height)

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

    def _publish_ctx(self, feed: Feed) -> None:
        """activeAssetCtx: the coin's context, when it changed (the mid)."""
        coin = feed.key[1]
        text = message(feed.channel, active_asset_ctx(coin, self.shards[self.owner(coin)].mids.get(coin)))
        if text != feed.last:
            feed.publish_text(text)

    def _maybe_mids(self, height: int) -> None:
        """allMids once per block: when every live shard has finished ``height``."""
        now = time.monotonic()
        if height <= self.mids_height or any(v.height < height for v in self.shards if now - v.seen < SHARD_SILENT):
            return
        self.mids_height = height
        for feed in self.mids_feeds:
            feed.publish({"mids": self.all_mids(feed.key[1])})

    def on_reset(self, topic: bytes, m: wire.Reset) -> None:
        feed = self.feeds.get(("l4Book", m.coin))
        if isinstance(feed, L4Feed):
            feed.on_reset(m.height, m.reason)

    def on_trades(self, topic: bytes, m: wire.Trades) -> None:
        """Trades come from ingest before the owner shard has the block's books: they wait
        (at most ``TRADES_HOLD``) for its ``S|``, so each client gets a block's trades, bbo and
        l2Book in one write, and this fan-out does not take the CPU the shard needs meanwhile."""
        recent = self.trades.get(m.coin)
        if recent is None:
            recent = self.trades[m.coin] = deque(maxlen=RECENT_TRADES)
        recent.extend(m.trades)
        shard = self.owner(m.coin)
        held = self.held_trades[shard]
        if not held and (self.shards[shard].height >= m.height or not self.live_shards()):
            self._publish_trades(m)
            return
        held.append((time.monotonic(), m))
        if not self.release_scheduled:
            self.release_scheduled = True
            asyncio.get_running_loop().call_later(TRADES_HOLD, self._release_late_trades)

    def _release_trades(self, shard: int, height: int) -> None:
        held = self.held_trades[shard]
        while held and held[0][1].height <= height:
            self._publish_trades(held.popleft()[1])

    def _release_late_trades(self) -> None:
        self.release_scheduled = False
        due = time.monotonic() - TRADES_HOLD
        for held in self.held_trades:
            while held and held[0][0] <= due:
                self._publish_trades(held.popleft()[1])
        if any(self.held_trades):
            self.release_scheduled = True
            asyncio.get_running_loop().call_later(TRADES_HOLD / 2, self._release_late_trades)

    def _publish_trades(self, m: wire.Trades) -> None:
        feed = self.feeds.get(("trades", m.coin))
        if feed is not None:
            feed.publish(m.trades)

    def on_user(self, topic: bytes, m: wire.UserEvents) -> None:
        for feed in self.by_topic.get(topic, ()):
            data = self._user_data(feed.key, m)
            if data:
                feed.publish_at(m.height, data)

    def on_candle(self, topic: bytes, m: wire.CandleUpdate) -> None:
        for feed in self.by_topic.get(topic, ()):
            feed.publish(m)

    @staticmethod
    def _user_data(key: FeedKey, m: wire.UserEvents) -> Any:
        """The message of one user feed for one block's events (None when it has nothing)."""
        kind = key[0]
        if kind == "orderUpdates":
            return [user_streams.order_update(s) for s in m.statuses] or None
        if kind == "userFills":
            return {"user": m.user, "fills": aggregate_by_time(m.fills) if key[2] else m.fills} if m.fills else None
        if kind == "userTwapSliceFills":
            twap = [{"fill": f, "twapId": twap_id(f)} for f in m.fills if twap_id(f) is not None]
            return {"user": m.user, "twapSliceFills": twap} if twap else None
        cancels = [{"coin": s.order.coin, "oid": s.order.oid} for s in m.statuses if s.status in user_streams.NON_USER_CANCELS]
        if m.fills and cancels:
            return {"fills": m.fills, "nonUserCancel": cancels}
        return {"fills": m.fills} if m.fills else {"nonUserCancel": cancels} if cancels else None

    def on_l2(self, topic: bytes, m: wire.L2Levels) -> None:
        feeds = self.by_topic.get(topic)
        if not feeds:
            return
        self.l2_last[topic] = m
        for feed in feeds:
            self._publish_l2(feed, m)

    @staticmethod
    def _publish_l2(feed: Feed, m: wire.L2Levels) -> None:
        n = feed.key[4]
        feed.publish({"coin": m.coin, "time": m.time, "levels": [level_dicts(m.levels[0], n), level_dicts(m.levels[1], n)]})

    def on_bbo(self, topic: bytes, m: wire.Bbo) -> None:
        for feed in self.by_topic.get(topic, ()):
            feed.publish({"coin": m.coin, "time": m.time, "bbo": [level_dict(m.bbo[0]), level_dict(m.bbo[1])]})

    def on_l4(self, topic: bytes, m: wire.L4Updates | wire.L4Sync) -> None:
        for feed in self.by_topic.get(topic, ()):
            if not isinstance(feed, L4Feed):
                continue
            if isinstance(m, wire.L4Sync):
                feed.on_sync(m)
            else:
                feed.on_update(m)

    _handlers = {
        topics.SHARD_PREFIX: ("shard", wire.ShardBlock, on_shard_block),
        topics.HEARTBEAT_PREFIX: ("heartbeat", wire.ShardStatus, on_heartbeat),
        topics.RESET_PREFIX: ("reset", wire.Reset, on_reset),
        topics.TRADES_PREFIX: ("trades", wire.Trades, on_trades),
        topics.L2_PREFIX: ("l2", wire.L2Levels, on_l2),
        topics.BBO_PREFIX: ("bbo", wire.Bbo, on_bbo),
        topics.L4_PREFIX: ("l4", wire.L4Message, on_l4),
        topics.USER_PREFIX: ("user", wire.UserEvents, on_user),
        topics.CANDLE_PREFIX: ("candle", wire.CandleUpdate, on_candle),
    }

"""The feeds the gateway serves: one ``Kind`` per subscription type, in ``KINDS``.

A kind says, declaratively, everything the gateway does for its subscription type:

- ``key``: its feed key, a frozen msgspec Struct (``protocol.FeedKey``): the
  subscriptions that share one encoded stream have equal keys. ``CoinKey`` /
  ``UserKey`` subclasses are coin / user feeds (a user key is counted against
  ``--max-followed-users`` and follows ``U|<user>|``).
- ``parse``: the subscription as acks echo it; ``Invalid subscription`` when
  the public API would refuse it. ``key_of`` turns that into the key.
- ``source``: the upstream messages it is made from (prefix, metrics label,
  wire type); ``topic(key)``: the one upstream topic routed to the feed,
  subscribed while the feed has subscribers (unless ``Upstream`` always takes
  it: ``subscribe=False``), None for feeds driven by shard blocks alone.
- ``render(key, message)``: an upstream message of the topic as the data of
  the client message (None: nothing to send), encoded once for every
  subscriber; ``channel(key)``: the client channel; ``conflate``: a slow
  client gets the latest only.
- ``prime(hub, feed)``: what a new feed starts from (the snapshot every
  subscriber gets at once, later updates replace it; l2Book and bbo need none:
  the shard sends a new subscriber of their topic the current value). Kinds whose every subscriber needs
  a snapshot of its own (userFills, l4Book) have a feed class that does it
  (``new_feed``).
- ``on_block(hub, feed, block)`` with ``block``: ``"owner"`` (each block of
  the coin's shard) or ``"every"`` (once every live shard finished the block).

Adding a feed: its key class, its parse/render functions and one ``Kind`` in
``KINDS``, here; ``Hub`` routes by the table, ``app`` validates by it. A new
upstream message type also needs its ``Source`` (and, in the shard or ingest,
its publisher).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import msgspec

from hlbook.common import l2rules, topics, wire
from hlbook.common.candles import INTERVALS
from hlbook.common.fills import aggregate_by_time
from hlbook.common.models import Fill, twap_id
from hlbook.services.gateway import metrics
from hlbook.services.gateway import users as user_streams
from hlbook.services.gateway.ctx import active_asset_ctx, active_asset_ctx_channel
from hlbook.services.gateway.feeds import Feed, JoinedFeed, L4Feed, NoSnapshot, Render, Several, no_render
from hlbook.services.gateway import polled
from hlbook.services.gateway.protocol import USER, CoinKey, FeedKey, UserKey, invalid, is_int, message
from hlbook.services.gateway.upstream import QueryError

if TYPE_CHECKING:
    from hlbook.services.gateway.hub import Hub

log = logging.getLogger(__name__)

DEFAULT_LEVELS = 20  # l2Book levels a side when nLevels is not given
FAST_LEVELS = 5  # ... and with fast: true
SUBSCRIBE_SETTLE = 0.05  # seconds for a new U| subscription to reach ingest (later blocks come live)

CoinExists = Callable[[str], bool]
Parse = Callable[[dict[str, Any], CoinExists], dict[str, Any]]


class Source(NamedTuple):
    """Upstream messages of one topic prefix."""

    prefix: bytes
    label: str  # metrics label (hlbook_gateway_upstream_total, gaps, repairs)
    type: Any  # the wire Struct (or union) they decode to


L2 = Source(topics.L2_PREFIX, "l2", wire.L2Book)
BBO = Source(topics.BBO_PREFIX, "bbo", wire.Bbo)
L4 = Source(topics.L4_PREFIX, "l4", wire.L4Message)
TRADES = Source(topics.TRADES_PREFIX, "trades", wire.Trades)  # the hub holds them for the owner shard's block first
USER_EVENTS = Source(topics.USER_PREFIX, "user", wire.UserEvents)
CANDLES = Source(topics.CANDLE_PREFIX, "candle", wire.CandleUpdate)
BLOCKS = Source(topics.SHARD_PREFIX, "shard", wire.ShardBlock)  # the hub's own: coins, mids, heights


# ------------------------------------------------------------------ keys


class L2BookKey(CoinKey, frozen=True):
    kind: ClassVar[str] = "l2Book"
    n_sig_figs: int | None
    mantissa: int | None
    n_levels: int
    fast: bool = False  # ``fast: true``: 5 levels unless nLevels says otherwise, ``"fast": true`` in the data


class TradesKey(CoinKey, frozen=True):
    kind: ClassVar[str] = "trades"


class BboKey(CoinKey, frozen=True):
    kind: ClassVar[str] = "bbo"


class AllMidsKey(FeedKey, frozen=True):
    kind: ClassVar[str] = "allMids"
    dex: str


class L4BookKey(CoinKey, frozen=True):
    kind: ClassVar[str] = "l4Book"


class CandleKey(CoinKey, frozen=True):
    kind: ClassVar[str] = "candle"
    interval: str


class ActiveAssetCtxKey(CoinKey, frozen=True):
    kind: ClassVar[str] = "activeAssetCtx"


class OrderUpdatesKey(UserKey, frozen=True):
    kind: ClassVar[str] = "orderUpdates"


class UserFillsKey(UserKey, frozen=True):
    kind: ClassVar[str] = "userFills"
    aggregate_by_time: bool


class UserEventsKey(UserKey, frozen=True):
    kind: ClassVar[str] = "userEvents"


class UserTwapSliceFillsKey(UserKey, frozen=True):
    kind: ClassVar[str] = "userTwapSliceFills"


class OpenOrdersKey(UserKey, frozen=True):
    kind: ClassVar[str] = "openOrders"
    dex: str


# ------------------------------------------------------------------ the table


def _none(key: Any) -> None:
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Kind:
    """Everything the gateway does for one subscription type (see the module docstring)."""

    name: str
    key: type[FeedKey]
    parse: Parse
    key_of: Callable[[dict[str, Any]], FeedKey]
    source: Source
    topic: Callable[[Any], bytes | None] = _none
    subscribe: bool = True  # subscribe ``topic`` upstream while the feed lives (False: Upstream.ALWAYS takes it)
    render: Render = no_render
    channel: Callable[[Any], str] | None = None  # None: the name
    conflate: bool = False
    prime: Callable[[Hub, Any], None] | None = None
    block: Literal["owner", "every"] | None = None
    on_block: Callable[[Hub, Any, wire.ShardBlock], None] | None = None
    history: bool = False  # needs the history service (refused without one)
    new_feed: Callable[[Hub, Any, Kind], Feed] | None = None  # None: a plain Feed

    def channel_of(self, key: FeedKey) -> str:
        return self.name if self.channel is None else self.channel(key)

    def feed(self, hub: Hub, key: FeedKey) -> Feed:
        """A new feed for ``key`` (no subscriber yet)."""
        if self.new_feed is not None:
            return self.new_feed(hub, key, self)
        return Feed(key, self.channel_of(key), self.conflate, self.topic(key), self.render)


# ------------------------------------------------------------------ rendering


FAST = b',"fast":true}'


def render_l2(key: L2BookKey, m: wire.L2Book) -> msgspec.Raw:
    """The shard rendered it for this topic's depth (a JSON object); ``fast`` feeds say so in it."""
    return msgspec.Raw(m.data[:-1] + FAST if key.fast and m.data.endswith(b"}") else m.data)


def render_bbo(key: BboKey, m: wire.Bbo) -> msgspec.Raw:
    return msgspec.Raw(m.data)


def render_trades(key: TradesKey, m: wire.Trades) -> list[wire.Trade]:
    return m.trades


def render_candle(key: CandleKey, m: wire.CandleUpdate) -> wire.CandleUpdate:
    return m


def render_order_updates(key: OrderUpdatesKey, m: wire.UserEvents) -> list[dict[str, Any]] | None:
    return [user_streams.order_update(s) for s in m.statuses] or None


def render_user_fills(key: UserFillsKey, m: wire.UserEvents) -> dict[str, Any] | None:
    return {"user": m.user, "fills": aggregate_by_time(m.fills) if key.aggregate_by_time else m.fills} if m.fills else None


def _twap_fills(fills: list[Fill]) -> list[dict[str, Any]]:
    return [{"fill": f, "twapId": twap_id(f)} for f in fills if twap_id(f) is not None]


def render_twap_slice_fills(key: UserTwapSliceFillsKey, m: wire.UserEvents) -> dict[str, Any] | None:
    twap = _twap_fills(m.fills)
    return {"user": m.user, "twapSliceFills": twap} if twap else None


def render_user_events(key: UserEventsKey, m: wire.UserEvents) -> Several | None:
    """One message a key, as the public API's userEvents union: ``fills``, then ``nonUserCancel``."""
    cancels = [{"coin": s.order.coin, "oid": s.order.oid} for s in m.statuses if s.status in user_streams.NON_USER_CANCELS]
    messages = Several([{"fills": m.fills}] if m.fills else [])
    if cancels:
        messages.append({"nonUserCancel": cancels})
    return messages or None


# ------------------------------------------------------------------ snapshots and blocks


def prime_l2(hub: Hub, feed: Feed) -> None:
    """A new l2Book feed on a topic another feed already reads (``fast: true`` and ``nLevels: 5``
    share one): the shard sent that topic's current book when it was first subscribed, so the
    new feed starts from its sibling's last one (the shard's next change follows)."""
    key = feed.key
    assert isinstance(key, L2BookKey)
    for sibling in hub.by_topic.get(feed.topic or b"", ()):
        if sibling is not feed and sibling.last is not None:
            data = msgspec.json.decode(sibling.last.encode())["data"]
            data.pop("fast", None)
            feed.publish({**data, "fast": True} if key.fast else data)
            return


def publish_mids(hub: Hub, feed: Feed, block: wire.ShardBlock | None = None) -> None:
    """``{"mids"}``, and ``"dex"`` for a HIP-3 dex's (as the public API: clients match the data by it)."""
    key = feed.key
    assert isinstance(key, AllMidsKey)
    feed.publish({"mids": hub.all_mids(key.dex), "dex": key.dex} if key.dex else {"mids": hub.all_mids(key.dex)})


def publish_ctx(hub: Hub, feed: Feed, block: wire.ShardBlock | None = None) -> None:
    """activeAssetCtx: the coin's context, when it changed (the mid)."""
    key = feed.key
    assert isinstance(key, CoinKey)
    coin = key.coin
    text = message(feed.channel, active_asset_ctx(coin, hub.shards[hub.owner(coin)].mids.get(coin)))
    if text != feed.last:
        feed.publish_text(text)


def l4_block(hub: Hub, feed: L4Feed, block: wire.ShardBlock) -> None:
    feed.on_block(block.height, block.time)


def new_l4_feed(hub: Hub, key: L4BookKey, kind: Kind) -> Feed:
    coin = key.coin
    shard, topic = hub.owner(coin), topics.l4(coin)
    return L4Feed(key, topic, shard,
                  lambda min_height: hub.upstream.query_parts(shard, wire.L4Query(coin=coin, min_height=min_height)),
                  lambda: hub.upstream.resubscribe(topic))


def new_fills_feed(hub: Hub, key: UserFillsKey | UserTwapSliceFillsKey, kind: Kind) -> Feed:
    return JoinedFeed(key, kind.channel_of(key), kind.topic(key), lambda: fills_snapshot(hub, key), kind.render)


async def fills_snapshot(hub: Hub, key: UserFillsKey | UserTwapSliceFillsKey) -> tuple[int | None, str]:
    """userFills / userTwapSliceFills start with ``isSnapshot: true`` and the user's fills
    so far (the history service's, once it holds every block this gateway has heard of)."""
    kind, user = key.kind, key.user
    if not hub.upstream.has_history:
        raise NoSnapshot(f"{kind} of {user}: no history service here, so no snapshot of earlier fills; "
                         "new fills follow", retry=False)
    await asyncio.sleep(SUBSCRIBE_SETTLE)
    query = wire.UserFillsQuery(user=user, aggregate=isinstance(key, UserFillsKey) and key.aggregate_by_time,
                                min_height=hub.heard_height)
    try:
        reply, fills = await hub.upstream.history(query)
        if query.min_height and (reply.height is None or reply.height < query.min_height):  # it would miss fills
            raise QueryError(f"the history service holds blocks up to {reply.height}, not yet {query.min_height}")
    except QueryError as exc:
        log.warning("%s snapshot of %s: %s; retrying", kind, user, exc)
        raise NoSnapshot(f"{kind} snapshot of {user} not available yet ({exc}); retrying, "
                         "new fills are held until it comes", retry=True) from None
    if isinstance(key, UserFillsKey):
        return reply.height, message(kind, {"isSnapshot": True, "user": user, "fills": msgspec.Raw(fills)})
    twap = _twap_fills(msgspec.json.decode(fills, type=list[Fill]))
    return reply.height, message(kind, {"isSnapshot": True, "user": user, "twapSliceFills": twap})


class OpenOrdersFeed(Feed):
    """openOrders: ``{"dex", "user", "orders"}``, every resting order of the user (frontendOpenOrders'
    shape), first at once, then again whenever a block changed them. A block of the user's
    (``U|<user>|``: a status or a fill) marks the feed; once every shard has finished that block
    (``block="every"``) the shards are asked for the user's orders, and the list goes out when it
    differs from the last one sent (conflated: a slow client gets the latest). One query at a time;
    a block marked meanwhile asks again after it."""

    def __init__(self, hub: Hub, key: OpenOrdersKey) -> None:
        super().__init__(key, "openOrders", True, topics.user(key.user))
        self.hub = hub
        self.due = 0  # the height whose orders are owed (0: none)
        self.asking = False

    def on_upstream(self, m: wire.UserEvents) -> None:
        if m.statuses or m.fills:
            self.due = max(self.due, m.height)

    def on_block(self, height: int) -> None:
        if self.due and height >= self.due and not self.asking:
            self.ask()

    def ask(self) -> None:
        self.due, self.asking = 0, True
        asyncio.create_task(self._refresh())

    async def _refresh(self) -> None:
        from hlbook.services.gateway.info import frontend_order, resting_orders  # info imports this module

        key = self.key
        assert isinstance(key, OpenOrdersKey)
        try:
            orders = await resting_orders(self.hub, key.user, key.dex)
        except QueryError as exc:
            log.warning("openOrders of %s: %s; asked again at the next block", key.user, exc)
            self.due = self.due or 1
            return
        finally:
            self.asking = False
        text = message(self.channel, {"dex": key.dex, "user": key.user, "orders": [frontend_order(o) for o in orders]})
        if text != self.last:
            self.publish_text(text)


def new_open_orders_feed(hub: Hub, key: OpenOrdersKey, kind: Kind) -> Feed:
    return OpenOrdersFeed(hub, key)


def prime_open_orders(hub: Hub, feed: Feed) -> None:
    assert isinstance(feed, OpenOrdersFeed)
    feed.ask()


def open_orders_block(hub: Hub, feed: OpenOrdersFeed, block: wire.ShardBlock) -> None:
    feed.on_block(block.height)


# ------------------------------------------------------------------ subscriptions


def parse_coin(sub: dict[str, Any], coin_exists: CoinExists) -> dict[str, Any]:
    coin = sub.get("coin")
    if not isinstance(coin, str) or not coin_exists(coin):
        raise invalid(sub)
    return {"type": sub["type"], "coin": coin}


def parse_l2(sub: dict[str, Any], coin_exists: CoinExists) -> dict[str, Any]:
    """``nSigFigs``/``mantissa`` null when absent; ``nLevels`` and ``fast`` only when given (the
    ack echoes what the client sent, so a client matching acks to requests finds its own)."""
    out = parse_coin(sub, coin_exists)
    nsf, man, n_levels, fast = sub.get("nSigFigs"), sub.get("mantissa"), sub.get("nLevels"), sub.get("fast")
    try:
        if (nsf is not None and not is_int(nsf)) or (man is not None and not is_int(man)):
            raise ValueError("not an integer")
        l2rules.validate(nsf, man)
    except ValueError:
        raise invalid(sub) from None
    out["nSigFigs"], out["mantissa"] = nsf, man
    if n_levels is not None:
        if not is_int(n_levels) or not 1 <= n_levels <= l2rules.MAX_LEVELS:
            raise invalid(sub)
        out["nLevels"] = n_levels
    if fast is not None:
        if not isinstance(fast, bool):
            raise invalid(sub)
        out["fast"] = fast
    return out


def l2_key(s: dict[str, Any]) -> L2BookKey:
    fast = bool(s.get("fast"))
    return L2BookKey(s["coin"], s["nSigFigs"], s["mantissa"], s.get("nLevels", FAST_LEVELS if fast else DEFAULT_LEVELS), fast)


def parse_candle(sub: dict[str, Any], coin_exists: CoinExists) -> dict[str, Any]:
    out = parse_coin(sub, coin_exists)
    if sub.get("interval") not in INTERVALS:
        raise invalid(sub)
    out["interval"] = sub["interval"]
    return out


def parse_all_mids(sub: dict[str, Any], coin_exists: CoinExists) -> dict[str, Any]:
    dex = sub.get("dex")
    if dex is not None and not isinstance(dex, str):
        raise invalid(sub)
    return {"type": sub["type"], "dex": dex} if dex else {"type": sub["type"]}


def parse_user(sub: dict[str, Any], coin_exists: CoinExists) -> dict[str, Any]:
    user = sub.get("user")
    if not isinstance(user, str) or not USER.fullmatch(user):
        raise invalid(sub)
    return {"type": sub["type"], "user": user.lower()}


def parse_open_orders(sub: dict[str, Any], coin_exists: CoinExists) -> dict[str, Any]:
    """``dex`` always echoed ("" for the default dex), as the data carries it."""
    out = parse_user(sub, coin_exists)
    dex = sub.get("dex")
    if dex is not None and not isinstance(dex, str):
        raise invalid(sub)
    out["dex"] = dex or ""
    return out


def parse_user_fills(sub: dict[str, Any], coin_exists: CoinExists) -> dict[str, Any]:
    out = parse_user(sub, coin_exists)
    if sub.get("aggregateByTime") is not None:
        if not isinstance(sub["aggregateByTime"], bool):
            raise invalid(sub)
        out["aggregateByTime"] = sub["aggregateByTime"]
    return out


def _user_topic(key: UserKey) -> bytes:
    return topics.user(key.user)


KINDS: dict[str, Kind] = {kind.name: kind for kind in (
    Kind(name="l2Book", key=L2BookKey, parse=parse_l2, source=L2, conflate=True, key_of=l2_key, prime=prime_l2,
         topic=lambda k: topics.l2(k.coin, k.n_sig_figs, k.mantissa, k.n_levels), render=render_l2),
    Kind(name="trades", key=TradesKey, parse=parse_coin, key_of=lambda s: TradesKey(s["coin"]), source=TRADES,
         topic=lambda k: topics.trades(k.coin), subscribe=False, render=render_trades),
    Kind(name="bbo", key=BboKey, parse=parse_coin, key_of=lambda s: BboKey(s["coin"]), source=BBO, conflate=True,
         topic=lambda k: topics.bbo(k.coin), render=render_bbo),
    Kind(name="allMids", key=AllMidsKey, parse=parse_all_mids, key_of=lambda s: AllMidsKey(s.get("dex", "")), source=BLOCKS,
         conflate=True, prime=publish_mids, block="every", on_block=publish_mids),
    Kind(name="l4Book", key=L4BookKey, parse=parse_coin, key_of=lambda s: L4BookKey(s["coin"]), source=L4,
         new_feed=new_l4_feed, block="owner", on_block=l4_block),
    Kind(name="candle", key=CandleKey, parse=parse_candle, key_of=lambda s: CandleKey(s["coin"], s["interval"]), source=CANDLES,
         conflate=True, topic=lambda k: topics.candle(k.coin, k.interval), render=render_candle, history=True),
         # the history service sends the newest candle at once
    Kind(name="activeAssetCtx", key=ActiveAssetCtxKey, parse=parse_coin, key_of=lambda s: ActiveAssetCtxKey(s["coin"]),
         source=BLOCKS, conflate=True, channel=lambda k: active_asset_ctx_channel(k.coin), prime=publish_ctx,
         block="owner", on_block=publish_ctx),
    Kind(name="orderUpdates", key=OrderUpdatesKey, parse=parse_user, key_of=lambda s: OrderUpdatesKey(s["user"]),
         render=render_order_updates, source=USER_EVENTS, topic=_user_topic),
    Kind(name="userFills", key=UserFillsKey, parse=parse_user_fills, new_feed=new_fills_feed, render=render_user_fills,
         key_of=lambda s: UserFillsKey(s["user"], bool(s.get("aggregateByTime"))), source=USER_EVENTS, topic=_user_topic),
    Kind(name="userEvents", key=UserEventsKey, parse=parse_user, key_of=lambda s: UserEventsKey(s["user"]),
         channel=lambda k: "user", render=render_user_events, source=USER_EVENTS, topic=_user_topic),
    Kind(name="userTwapSliceFills", key=UserTwapSliceFillsKey, parse=parse_user, new_feed=new_fills_feed,
         key_of=lambda s: UserTwapSliceFillsKey(s["user"]), render=render_twap_slice_fills, source=USER_EVENTS, topic=_user_topic),
    Kind(name="openOrders", key=OpenOrdersKey, parse=parse_open_orders, key_of=lambda s: OpenOrdersKey(s["user"], s["dex"]),
         source=USER_EVENTS, topic=_user_topic, new_feed=new_open_orders_feed, conflate=True, prime=prime_open_orders,
         block="every", on_block=open_orders_block),
    # node state, polled from the node's info server (polled.py)
    Kind(name="clearinghouseState", key=polled.ClearinghouseStateKey, parse=polled.parse_user_dex, source=BLOCKS,
         key_of=lambda s: polled.ClearinghouseStateKey(s["user"], s.get("dex", "")), new_feed=polled.new_polled_feed),
    Kind(name="spotState", key=polled.SpotStateKey, parse=polled.parse_user, source=BLOCKS,
         key_of=lambda s: polled.SpotStateKey(s["user"]), new_feed=polled.new_polled_feed),
    Kind(name="activeAssetData", key=polled.ActiveAssetDataKey, parse=polled.parse_user_coin, source=BLOCKS,
         key_of=lambda s: polled.ActiveAssetDataKey(s["user"], s["coin"]), new_feed=polled.new_polled_feed),
    Kind(name="webData2", key=polled.WebData2Key, parse=polled.parse_user, source=BLOCKS,
         key_of=lambda s: polled.WebData2Key(s["user"]), new_feed=polled.new_polled_feed),
    Kind(name="userHistoricalOrders", key=polled.UserHistoricalOrdersKey, parse=polled.parse_user, source=BLOCKS,
         key_of=lambda s: polled.UserHistoricalOrdersKey(s["user"]), new_feed=polled.new_polled_feed, history=True),
    Kind(name="allDexsClearinghouseState", key=polled.AllDexsClearinghouseStateKey, parse=polled.parse_user, source=BLOCKS,
         key_of=lambda s: polled.AllDexsClearinghouseStateKey(s["user"]), new_feed=polled.new_polled_feed),
    Kind(name="allDexsAssetCtxs", key=polled.AllDexsAssetCtxsKey, parse=polled.parse_type, source=BLOCKS,
         key_of=lambda s: polled.AllDexsAssetCtxsKey(), new_feed=polled.new_polled_feed),
    Kind(name="assetCtxs", key=polled.AssetCtxsKey, parse=polled.parse_dex, source=BLOCKS,
         key_of=lambda s: polled.AssetCtxsKey(s.get("dex", "")), new_feed=polled.new_polled_feed),
)}


def kind_of(key: FeedKey) -> Kind:
    return KINDS[key.kind]


def normalise(sub: Any, coin_exists: CoinExists) -> dict[str, Any]:
    """The subscription as acks echo it; RequestError ``Invalid subscription`` when the public API would refuse it."""
    name = sub.get("type") if isinstance(sub, dict) else None
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise invalid(sub)
    return kind.parse(sub, coin_exists)


def feed_key(normalised: dict[str, Any]) -> FeedKey:
    """The feed (one encoded stream shared by every subscriber) a normalised subscription reads."""
    return KINDS[normalised["type"]].key_of(normalised)

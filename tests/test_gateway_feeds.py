"""The gateway's table of feeds (``services/gateway/kinds.py``): every subscription
type of the public API is in it, consistent with the hub's routing, and each kind
works through the table in a hub with a stub upstream; then a representative set
of subscriptions on a real gateway (``hlbook up --simulate``: simulator, ingest,
two shards, history, gateway)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import msgspec
import pytest

from hlbook.common import topics, wire
from hlbook.services.gateway.feeds import JoinedFeed, L4Feed
from hlbook.services.gateway.hub import Hub
from hlbook.services.gateway.info import HANDLERS
from hlbook.services.gateway.kinds import KINDS, feed_key, normalise
from hlbook.services.gateway.polled import POLLED
from hlbook.services.gateway.protocol import CoinKey, FeedKey, RequestError, UserKey, identity
from hlbook.services.gateway.session import Session, SubscriptionStats
from pipeline import Up, running
from test_gateway import connect, receive, send, sub
from test_gateway_users import active_users

USER = "0x" + "ab" * 20

# One subscription of every type this server serves: the public API's WebSocket subscriptions
# that node files can feed (a kind added to the table needs its sample here).
SAMPLES: dict[str, dict[str, Any]] = {
    "l2Book": {"type": "l2Book", "coin": "BTC", "nSigFigs": 5, "nLevels": 7},
    "trades": {"type": "trades", "coin": "BTC"},
    "bbo": {"type": "bbo", "coin": "BTC"},
    "allMids": {"type": "allMids"},
    "l4Book": {"type": "l4Book", "coin": "BTC"},
    "candle": {"type": "candle", "coin": "BTC", "interval": "1m"},
    "activeAssetCtx": {"type": "activeAssetCtx", "coin": "BTC"},
    "orderUpdates": {"type": "orderUpdates", "user": USER},
    "userFills": {"type": "userFills", "user": USER, "aggregateByTime": True},
    "userEvents": {"type": "userEvents", "user": USER},
    "userTwapSliceFills": {"type": "userTwapSliceFills", "user": USER},
    "openOrders": {"type": "openOrders", "user": USER},
    # node state, polled from the node's info server (test_gateway_polled.py)
    "clearinghouseState": {"type": "clearinghouseState", "user": USER, "dex": ""},
    "spotState": {"type": "spotState", "user": USER},
    "activeAssetData": {"type": "activeAssetData", "user": USER, "coin": "BTC"},
    "webData2": {"type": "webData2", "user": USER},
    "assetCtxs": {"type": "assetCtxs"},
    "userHistoricalOrders": {"type": "userHistoricalOrders", "user": USER},
    "allDexsClearinghouseState": {"type": "allDexsClearinghouseState", "user": USER},
    "allDexsAssetCtxs": {"type": "allDexsAssetCtxs"},
}

INFO_TYPES = {"l2Book", "allMids", "meta", "spotMeta", "perpDexs", "metaAndAssetCtxs", "spotMetaAndAssetCtxs", "recentTrades",
              "openOrders", "frontendOpenOrders", "orderStatus", "userFills", "userFillsByTime", "historicalOrders", "candleSnapshot",
              "userTwapSliceFills", "userTwapSliceFillsByTime", "l4Snapshot"}


# ---------------------------------------------------------------- the table


def test_every_subscription_type_is_in_the_table() -> None:
    assert set(KINDS) == set(SAMPLES)
    assert set(HANDLERS) == INFO_TYPES


@pytest.mark.parametrize("name", sorted(KINDS))
def test_kind_is_consistent(name: str) -> None:
    kind = KINDS[name]
    assert kind.name == name and kind.key.kind == name and issubclass(kind.key, FeedKey)
    norm = normalise(SAMPLES[name], lambda coin: coin == "BTC")
    key = feed_key(norm)
    assert type(key) is kind.key and hash(key) == hash(feed_key(dict(norm)))
    with pytest.raises(AttributeError):
        key.kind = "x"  # type: ignore[misc]  # a ClassVar of a frozen Struct
    topic = kind.topic(key)
    # the hub routes the kind's upstream messages (its own handler or the generic one) as their wire type
    label, message_type, _ = Hub._handlers[kind.source.prefix]
    assert (label, message_type) == (kind.source.label, kind.source.type)
    if topic is not None:
        assert topic.startswith(kind.source.prefix)
    else:
        assert kind.on_block is not None or kind.new_feed is not None
    assert (kind.block is None) == (kind.on_block is None)
    assert isinstance(key, UserKey) == (kind.source.prefix == topics.USER_PREFIX) or name in POLLED
    if kind.block == "owner":
        assert isinstance(key, CoinKey)


def test_keys_of_different_kinds_never_collide() -> None:
    keys = [KINDS[name].key_of({"type": name, "coin": "BTC"}) for name in ("trades", "bbo", "l4Book", "activeAssetCtx")]
    keys += [KINDS[name].key_of({"type": name, "user": USER}) for name in ("orderUpdates", "userEvents", "userTwapSliceFills")]
    assert len(set(keys)) == len(keys)
    assert keys[0] == KINDS["trades"].key_of({"type": "trades", "coin": "BTC"})


def test_invalid_subscriptions_keep_the_public_texts() -> None:
    for bad in [{"type": "nope"}, {"type": ["l2Book"]}, [1], {"type": "trades", "coin": "NOPE"}, {"type": "userFills", "user": "0x1"},
                {"type": "candle", "coin": "BTC", "interval": "7m"}, {"type": "l2Book", "coin": "BTC", "nSigFigs": 9}]:
        with pytest.raises(RequestError) as exc:
            normalise(bad, lambda coin: coin == "BTC")
        assert exc.value.text == "Invalid subscription: " + msgspec.json.encode(bad).decode()
    assert normalise({"type": "l2Book", "coin": "BTC"}, lambda c: True) == {"type": "l2Book", "coin": "BTC", "nSigFigs": None, "mantissa": None}
    assert normalise({"type": "allMids", "dex": ""}, lambda c: True) == {"type": "allMids"}


class StubUpstream:
    shards = 2
    has_history = False

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}

    def subscribe(self, topic: bytes) -> None:
        self.counts[topic] = self.counts.get(topic, 0) + 1

    def unsubscribe(self, topic: bytes) -> None:
        self.counts[topic] -= 1
        if not self.counts[topic]:
            del self.counts[topic]

    def resubscribe(self, topic: bytes) -> None:
        pass

    async def query_parts(self, shard: int, query: Any) -> Any:
        await asyncio.Event().wait()

    async def query(self, shard: int, query: Any) -> Any:
        assert isinstance(query, wire.OpenOrdersQuery)
        return {"height": 1, "orders": []}


def _send_nothing(text: str) -> Any:
    raise AssertionError("no writes in this test")


def test_every_kind_through_a_hub() -> None:
    """Subscribe every sample in one hub: the upstream topic, the block index and the priming
    follow the table; upstream messages reach the right feeds; unsubscribing undoes it all."""

    async def run() -> None:
        upstream = StubUpstream()
        hub = Hub(upstream)  # type: ignore[arg-type]
        owner = hub.owner("BTC")
        hub.shards[owner].states = {"BTC": "live"}
        hub.shards[owner].mids = {"BTC": "100.5"}
        for view in hub.shards:  # the other shard has been silent for long: allMids does not wait for it
            if view is not hub.shards[owner]:
                view.seen = 0.0
        session = Session("test", _send_nothing, queue_size=100, max_per_minute=2000)
        keys = {}
        for name, subscription in SAMPLES.items():
            if name in POLLED:  # needs the node's info server (test_gateway_polled.py)
                continue
            if KINDS[name].history:
                with pytest.raises(RequestError, match="need the history service"):
                    hub.check(feed_key(normalise(subscription, hub.coin_exists)))
                continue
            norm = normalise(subscription, hub.coin_exists)
            ident, key = identity(norm), feed_key(norm)
            hub.check(key)
            session.subs[ident] = SubscriptionStats(norm, key)
            hub.attach(session, ident, key)
            keys[name] = key
        feeds = {name: hub.feeds[key] for name, key in keys.items()}
        assert isinstance(feeds["l4Book"], L4Feed) and isinstance(feeds["userFills"], JoinedFeed)
        assert set(upstream.counts) == {topics.l2("BTC", 5, None, 7), topics.bbo("BTC"), topics.l4("BTC"), topics.user(USER)}
        assert upstream.counts[topics.user(USER)] == 5
        assert set(hub.block_feeds[owner]) == {feeds["l4Book"], feeds["activeAssetCtx"]}
        assert set(hub.every_block_feeds) == {feeds["allMids"], feeds["openOrders"]}
        assert hub.users.followers == {USER: 5}
        for _ in range(10):  # openOrders asks the shards for the user's orders first
            await asyncio.sleep(0)
        assert json.loads(session.latest[keys["openOrders"]]) == {"channel": "openOrders", "data": {"dex": "", "user": USER, "orders": []}}
        # primed at once: allMids, activeAssetCtx (conflated: their keys are queued)
        assert keys["allMids"] in session.latest and keys["activeAssetCtx"] in session.latest
        assert json.loads(session.latest[keys["activeAssetCtx"]])["data"]["ctx"]["midPx"] == "100.5"

        levels = [[{"px": "100", "sz": "1", "n": 1}] * 7, [{"px": "101", "sz": "2", "n": 1}] * 7]
        data = json.dumps({"coin": "BTC", "time": 5, "levels": levels}).encode()  # the shard renders the client's data
        hub.on_message(topics.l2("BTC", 5, None, 7), wire.encode(wire.L2Book(height=1, prev=None, time=5, coin="BTC", data=data)))
        bbo = json.dumps({"coin": "BTC", "time": 5, "bbo": [{"px": "100", "sz": "1", "n": 1}, None]}).encode()
        hub.on_message(topics.bbo("BTC"), wire.encode(wire.Bbo(height=1, prev=None, time=5, coin="BTC", data=bbo)))
        hub.on_message(topics.shard_block(owner), wire.encode(wire.ShardBlock(height=1, prev=None, time=5, shard=owner,
                                                                               mids={"BTC": "101"}, states={"BTC": "live"})))
        l2 = json.loads(session.latest[keys["l2Book"]])
        assert l2 == {"channel": "l2Book", "data": {"coin": "BTC", "time": 5, "levels": levels}}
        assert json.loads(session.latest[keys["bbo"]])["data"] == {"coin": "BTC", "time": 5, "bbo": [{"px": "100", "sz": "1", "n": 1}, None]}
        # the shard's block: activeAssetCtx and allMids follow the new mid
        assert json.loads(session.latest[keys["activeAssetCtx"]])["data"]["ctx"]["midPx"] == "101"
        assert json.loads(session.latest[keys["allMids"]]) == {"channel": "allMids", "data": {"mids": {"BTC": "101"}}}
        # another depth is another topic (the shard renders each depth it is asked for)
        other = feed_key(normalise({"type": "l2Book", "coin": "BTC", "nSigFigs": 5, "nLevels": 2}, hub.coin_exists))
        hub.attach(session, "other", other)
        assert upstream.counts[topics.l2("BTC", 5, None, 2)] == 1 and upstream.counts[topics.l2("BTC", 5, None, 7)] == 1
        hub.detach(session, other)
        assert topics.l2("BTC", 5, None, 2) not in upstream.counts

        for ident, stats in list(session.subs.items()):
            hub.detach(session, stats.feed)
        assert not hub.feeds and not hub.by_topic and not upstream.counts
        assert not any(hub.block_feeds) and not hub.every_block_feeds and not hub.users.followers

    asyncio.run(run())


# ---------------------------------------------------------------- a real gateway


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(tmp_path_factory.mktemp("feeds"), shards=2, coins=6, seed=7) as up:
        yield up


def _check_first(name: str, sample: dict[str, Any], message: dict[str, Any]) -> None:
    data, coin = message["data"], sample.get("coin")
    if name == "l2Book":
        assert data["coin"] == coin and all(0 < len(side) <= sample["nLevels"] for side in data["levels"])
    elif name == "bbo":
        assert data["coin"] == coin and len(data["bbo"]) == 2
    elif name == "trades":
        assert data and all(t["coin"] == coin for t in data)
    elif name == "allMids":
        assert coin is None and "BTC" in data["mids"]
    elif name == "l4Book":
        assert data["Snapshot"]["coin"] == coin and len(data["Snapshot"]["levels"]) == 2
    elif name == "candle":
        assert data["s"] == coin and data["i"] == sample["interval"]
    elif name == "activeAssetCtx":
        assert data["coin"] == coin and "midPx" in data["ctx"]
    elif name == "userFills":
        assert data["isSnapshot"] is True and data["user"] == sample["user"] and isinstance(data["fills"], list)
    elif name == "userTwapSliceFills":
        assert data["isSnapshot"] is True and data["user"] == sample["user"] and isinstance(data["twapSliceFills"], list)
    elif name == "orderUpdates":
        assert data and all(u["order"]["oid"] > 0 and "status" in u for u in data)
    elif name == "userEvents":
        assert "fills" in data or "nonUserCancel" in data
    elif name == "openOrders":
        assert data["dex"] == "" and data["user"] == sample["user"] and all("orderType" in o for o in data["orders"])
    elif name == "clearinghouseState":
        assert data["dex"] == "" and data["user"] == sample["user"] and "marginSummary" in data["clearinghouseState"]
    elif name == "spotState":
        assert data["user"] == sample["user"] and isinstance(data["spotState"]["balances"], list)
    elif name == "activeAssetData":
        assert data["user"] == sample["user"] and data["coin"] == coin and "leverage" in data
    elif name == "allDexsClearinghouseState":
        assert data["user"] == sample["user"] and data["clearinghouseStates"][0][0] == ""
        assert "marginSummary" in data["clearinghouseStates"][0][1]
    elif name == "allDexsAssetCtxs":
        assert data["ctxs"][0][0] == "" and "markPx" in data["ctxs"][0][1][0]
    elif name == "userHistoricalOrders":
        assert data["isSnapshot"] is True and data["user"] == sample["user"] and isinstance(data["orderHistory"], list)
    elif name == "assetCtxs":
        assert data["dex"] == "" and data["ctxs"] and "markPx" in data["ctxs"][0]
    else:
        raise AssertionError(f"no check for {name}")


def test_subscribing_through_a_real_gateway(up: Up) -> None:
    """Each representative subscription is acknowledged with its normalised form and
    its first message arrives on its channel in the public shape; unsubscribing is acknowledged."""
    user = active_users(up.data, 1)[0]
    samples = {name: dict(sample, user=user) if "user" in sample else sample for name, sample in SAMPLES.items()}
    samples.pop("userEvents")  # rare in the simulator (fills or system cancels of one user); its shapes are checked above
    samples.pop("webData2")  # the simulator's info server refuses it, as a stock node may (test_gateway_polled.py)
    channels = {"userEvents": "user"}

    async def run() -> None:
        ws = await connect(up.ws)
        for sample in samples.values():
            await send(ws, sub("subscribe", sample))
        acks, first = [], {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(acks) < len(samples) or set(first) != set(samples)):
            message = await receive(ws, timeout=max(0.1, deadline - time.monotonic()))
            if message["channel"] == "subscriptionResponse":
                acks.append(message["data"])
                continue
            for name in samples:
                if message["channel"] == channels.get(name, name) and name not in first:
                    first[name] = message
        assert [a["subscription"] for a in acks] == [normalise(s, lambda c: True) for s in samples.values()]
        assert set(first) == set(samples), f"no message of {set(samples) - set(first)}"
        for name, message in first.items():
            _check_first(name, samples[name], message)
        for sample in samples.values():
            await send(ws, sub("unsubscribe", sample))
        acks = [(await receive(ws, "subscriptionResponse"))["data"] for _ in samples]
        assert all(a["method"] == "unsubscribe" for a in acks)
        await ws.close()

    asyncio.run(run())


def test_user_events_send_one_key_a_message() -> None:
    """A block with a user's fills and a system cancel of its orders gives two userEvents
    messages, ``fills`` then ``nonUserCancel`` (the public API's union: one key each)."""
    from hlbook.common.models import Fill, OrderStatus
    from hlbook.services.gateway.feeds import Feed
    from hlbook.services.gateway.kinds import render_user_events

    order = {"coin": "BTC", "side": "B", "limitPx": "100.0", "sz": "0.0", "oid": 7, "timestamp": 5, "triggerCondition": "N/A",
             "isTrigger": False, "triggerPx": "0.0", "children": [], "isPositionTpsl": False, "reduceOnly": True,
             "orderType": "Limit", "origSz": "1.0", "tif": "Gtc", "cloid": None}
    cancel = msgspec.convert({"time": "2026-11-22T10:00:00.1", "user": USER, "hash": None, "builder": None,
                              "status": "reduceOnlyCanceled", "order": order}, OrderStatus)
    fill = msgspec.convert({"coin": "BTC", "px": "100.0", "sz": "1.0", "side": "B", "time": 5, "startPosition": "0.0",
                            "dir": "Open Long", "closedPnl": "0.0", "hash": "0x" + "0" * 64, "oid": 6, "crossed": True,
                            "fee": "0.0", "tid": 9}, Fill)
    events = wire.UserEvents(height=1, prev=None, time=5, user=USER, statuses=[cancel], fills=[fill])
    key = KINDS["userEvents"].key_of({"type": "userEvents", "user": USER})
    published: list[Any] = []
    feed = Feed(key, "user", False, topics.user(USER), render_user_events)
    feed.publish = published.append  # type: ignore[method-assign]
    feed.on_upstream(events)
    assert published == [{"fills": [fill]}, {"nonUserCancel": [{"coin": "BTC", "oid": 7}]}]
    feed.on_upstream(wire.UserEvents(height=2, prev=1, time=6, user=USER, statuses=[cancel], fills=[]))
    assert published[2:] == [{"nonUserCancel": [{"coin": "BTC", "oid": 7}]}]
    feed.on_upstream(wire.UserEvents(height=3, prev=2, time=7, user=USER, statuses=[], fills=[]))
    assert len(published) == 3


def test_dropped_node_data_concerns_the_feeds_made_of_it() -> None:
    """Which feeds are told of node data ingest dropped: fills -> trades and user fills, statuses
    -> orderUpdates and l4Book (details), book diffs -> l2Book, bbo and l4Book; by coin or user
    when named, all of them when not."""
    from hlbook.services.gateway.hub import concerns

    exists = lambda coin: True  # noqa: E731
    key = lambda s: feed_key(normalise(s, exists))  # noqa: E731
    l2, bbo, l4 = key({"type": "l2Book", "coin": "BTC"}), key({"type": "bbo", "coin": "BTC"}), key({"type": "l4Book", "coin": "BTC"})
    trades, updates = key({"type": "trades", "coin": "BTC"}), key({"type": "orderUpdates", "user": "0x" + "a" * 40})
    diffs = wire.Dropped("raw_book_diffs", "malformed", 7, ["BTC"], None)
    assert [concerns(diffs, k) for k in (l2, bbo, l4, trades, updates)] == [True, True, True, False, False]
    assert not concerns(wire.Dropped("raw_book_diffs", "malformed", 7, ["ETH"], None), l2)
    statuses = wire.Dropped("order_statuses", "incomplete", 7, None, None)
    assert [concerns(statuses, k) for k in (l2, bbo, l4, trades, updates)] == [False, False, True, False, True]

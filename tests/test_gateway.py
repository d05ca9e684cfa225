"""The gateway in the real pipeline (`hlbook up --simulate`: simulator, ingest,
two shards, gateway), with real WebSocket clients: protocol acks and error
texts, every feed and info type, l2Book aggregations and l4Book checked against
independent computations and the simulator's own fileSnapshot, bad input,
limits and slow clients."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import tempfile
import time
import urllib.request
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import free_port, metric
from hlbook.services.book import snapshot
from pipeline import Up, get_from, http_get, post_info, running

Orders = dict[int, tuple[str, Decimal, Decimal, str]]  # oid -> (side, px, sz, user)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(tmp_path_factory.mktemp("gateway"), shards=2, coins=10) as up:
        yield up


@pytest.fixture(scope="module")
def limited(up: Up) -> str:
    """A second gateway on the same shards with small limits, a token and compression
    (its clients take the ASGI send path; the main gateway's write pre-built frames)."""
    port = free_port()
    up.start_gateway(port, "--per-message-deflate", "--token", "secret", "--max-connections-per-ip", "6", "--max-messages-per-minute", "300",
                     "--queue-size", "40", "--max-frame-bytes", "4096", "--idle-timeout", "3")
    return f"127.0.0.1:{port}"


def canonical(text: str) -> bool:
    """Shortest decimal form with at least one decimal: 81307.0, 0.00014."""
    return bool(re.fullmatch(r"\d+\.\d+", text)) and (text.endswith(".0") or not text.endswith("0"))


def canon(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


async def connect(url: str, **kwargs: Any) -> Any:
    return await websockets.connect(url, max_size=None, max_queue=None, **kwargs)


async def send(ws: Any, request: Any) -> None:
    await ws.send(request if isinstance(request, (str, bytes)) else json.dumps(request))


async def receive(ws: Any, channel: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """The next message (on ``channel`` when given)."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic())))
        if channel is None or message["channel"] == channel:
            return message


def sub(method: str, subscription: dict[str, Any]) -> dict[str, Any]:
    return {"method": method, "subscription": subscription}


# ---------------------------------------------------------------- protocol


def test_acks_errors_pong_and_post(up: Up) -> None:
    async def run() -> None:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "l2Book", "coin": "BTC"}))
        normalised = {"type": "l2Book", "coin": "BTC", "nSigFigs": None, "mantissa": None}
        ack = await receive(ws, "subscriptionResponse")
        assert ack["data"] == {"method": "subscribe", "subscription": normalised}
        await send(ws, sub("subscribe", {"type": "l2Book", "coin": "BTC", "nSigFigs": None}))
        assert (await receive(ws, "error"))["data"] == "Already subscribed: " + json.dumps(normalised, separators=(",", ":"))
        await send(ws, sub("unsubscribe", {"type": "l2Book", "coin": "BTC"}))
        assert (await receive(ws, "subscriptionResponse"))["data"] == {"method": "unsubscribe", "subscription": normalised}
        await send(ws, sub("unsubscribe", {"type": "l2Book", "coin": "BTC"}))
        assert (await receive(ws, "error"))["data"].startswith("Already unsubscribed: ")

        for raw in ["not json", '{"method":"fly"}', "[1,2]", b"\xff\x00garbage"]:
            await send(ws, raw)
            assert (await receive(ws, "error"))["data"].startswith("Error parsing JSON into valid websocket request: ")
        invalid = [{"type": "l2Book", "coin": "NOPE"}, {"type": "l2Book", "coin": "BTC", "nSigFigs": 6},
                   {"type": "l2Book", "coin": "BTC", "nSigFigs": 4, "mantissa": 2}, {"type": "l2Book", "coin": "BTC", "nLevels": 101},
                   {"type": "bogus"}, {"type": "trades"}, "l2Book"]
        for subscription in invalid:
            await send(ws, sub("subscribe", subscription))
            assert (await receive(ws, "error"))["data"] == "Invalid subscription: " + json.dumps(subscription, separators=(",", ":"))

        await send(ws, {"method": "ping"})
        assert await receive(ws, "pong") == {"channel": "pong"}
        await send(ws, {"method": "post", "id": 7, "request": {"type": "info", "payload": {"type": "l2Book", "coin": "ETH", "nSigFigs": 3}}})
        post = (await receive(ws, "post"))["data"]
        assert post["id"] == 7 and post["response"]["type"] == "info"
        assert post["response"]["payload"]["type"] == "l2Book" and post["response"]["payload"]["data"]["coin"] == "ETH"
        await send(ws, {"method": "post", "id": 8, "request": {"type": "action", "payload": {}}})
        assert (await receive(ws, "post"))["data"]["response"]["type"] == "error"
        await send(ws, {"method": "post", "id": 9, "request": {"type": "info", "payload": {"type": "nope"}}})
        assert (await receive(ws, "post"))["data"] == {"id": 9, "response": {"type": "error", "payload": (await _unknown_info_text(up))}}
        await send(ws, {"method": "ping"})
        await receive(ws, "pong")  # the connection survived all of it
        await ws.close()

    asyncio.run(run())


async def _unknown_info_text(up: Up) -> str:
    status, body = post_info(up.http, {"type": "nope"})  # not a public type: refused without asking the node
    assert status == 422 and body.startswith("Failed to deserialize the JSON body into the target type: ")
    return body


def test_feeds_trades_bbo_allmids_l2(up: Up) -> None:
    async def run() -> None:
        # the coins simulated: the node's meta lists mainnet's others delisted, its spot pairs without a price
        coins = {u["name"] for u in post_info(up.http, {"type": "meta"})[1]["universe"] if not u.get("isDelisted")}
        spot, spot_ctxs = post_info(up.http, {"type": "spotMetaAndAssetCtxs"})[1]
        coins |= {p["name"] for p, ctx in zip(spot["universe"], spot_ctxs) if ctx["markPx"] != "0.0"}
        ws = await connect(up.ws)
        for subscription in [{"type": "l2Book", "coin": "BTC", "nLevels": 5}, {"type": "trades", "coin": "BTC"},
                             {"type": "bbo", "coin": "BTC"}, {"type": "allMids"}]:
            await send(ws, sub("subscribe", subscription))
        got: dict[str, list[Any]] = {}
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not all(len(got.get(c, [])) >= 3 for c in ("l2Book", "trades", "bbo", "allMids")):
            message = await receive(ws)
            got.setdefault(message["channel"], []).append(message["data"])
        await ws.close()
        for book in got["l2Book"]:
            bids, asks = book["levels"]
            assert book["coin"] == "BTC" and isinstance(book["time"], int)
            assert 0 < len(bids) <= 5 and 0 < len(asks) <= 5
            assert [Decimal(b["px"]) for b in bids] == sorted((Decimal(b["px"]) for b in bids), reverse=True)
            assert [Decimal(a["px"]) for a in asks] == sorted(Decimal(a["px"]) for a in asks)
            assert Decimal(bids[0]["px"]) < Decimal(asks[0]["px"])
            assert all(canonical(lv["px"]) and canonical(lv["sz"]) and lv["n"] >= 1 for lv in bids + asks)
        tids = set()
        for trades in got["trades"]:
            for trade in trades:
                assert set(trade) == {"coin", "side", "px", "sz", "hash", "time", "tid", "users"}
                assert trade["coin"] == "BTC" and trade["side"] in "AB" and len(trade["users"]) == 2
                assert canonical(trade["px"]) and canonical(trade["sz"]) and trade["tid"] not in tids
                tids.add(trade["tid"])
        for bbo in got["bbo"]:
            bid, ask = bbo["bbo"]
            assert bbo["coin"] == "BTC" and Decimal(bid["px"]) < Decimal(ask["px"])
        assert [b["bbo"] for b in got["bbo"]] != [got["bbo"][0]["bbo"]] * len(got["bbo"]) or len(got["bbo"]) == 1
        for mids in got["allMids"]:
            # a coin has a mid while both of its sides hold orders
            assert set(mids["mids"]) <= coins and len(mids["mids"]) >= len(coins) - 2
            assert all(canonical(px) for px in mids["mids"].values())

    asyncio.run(run())


# ---------------------------------------------------------------- books against independent computations


def apply_updates(orders: Orders, updates: dict[str, Any]) -> None:
    for diff in updates["book_diffs"]:
        oid, body = diff["oid"], diff["raw_book_diff"]
        if body == "remove":
            del orders[oid]
        elif "new" in body:
            assert oid not in orders
            orders[oid] = (diff["side"], Decimal(diff["px"]), Decimal(body["new"]["sz"]), diff["user"])
        else:
            side, px, sz, user = orders[oid]
            assert sz == Decimal(body["update"]["origSz"])
            orders[oid] = (side, px, Decimal(body["update"]["newSz"]), user)


def from_snapshot(levels: list[list[dict[str, Any]]]) -> Orders:
    return {o["oid"]: (o["side"], Decimal(o["limitPx"]), Decimal(o["sz"]), o["user"]) for side in levels for o in side}


def aggregate(orders: Orders, n_sig_figs: int | None, mantissa: int | None, depth: int = 20) -> list[list[dict[str, Any]]]:
    """The public API's l2 buckets, computed directly: bids down, asks up, to mantissa*10**(e+1-nSigFigs)."""
    out = []
    for side, rounding, descending in (("B", ROUND_FLOOR, True), ("A", ROUND_CEILING, False)):
        buckets: dict[Decimal, list[Any]] = {}
        for o_side, px, sz, _ in orders.values():
            if o_side != side:
                continue
            if n_sig_figs is not None:
                step = Decimal(mantissa or 1).scaleb(px.adjusted() + 1 - n_sig_figs)
                px = (px / step).to_integral_value(rounding) * step
            level = buckets.setdefault(px, [Decimal(0), 0])
            level[0] += sz
            level[1] += 1
        ordered = sorted(buckets.items(), reverse=descending)[:depth]
        out.append([{"px": canon(px), "sz": canon(sz), "n": n} for px, (sz, n) in ordered])
    return out


@pytest.mark.parametrize("agg", [(None, None), (5, 2), (4, None), (2, None)])
def test_l2_aggregations_equal_direct_computation_from_l4(up: Up, agg: tuple[int | None, int | None]) -> None:
    """On one connection: l4Book BTC rebuilds the book; every l2Book of a block equals the
    buckets computed from it once its l4 update came."""

    async def run() -> int:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "l4Book", "coin": "BTC"}))
        await send(ws, sub("subscribe", {"type": "l2Book", "coin": "BTC", "nSigFigs": agg[0], "mantissa": agg[1]}))
        orders: Orders | None = None
        block_time, height, compared = 0, 0, 0
        l2_by_time: dict[int, list] = {}  # a block's l2Book comes before its l4 update (its diffs before its statuses)
        deadline = time.monotonic() + 20
        while compared < 8 and time.monotonic() < deadline:
            message = await receive(ws)
            data = message["data"]
            levels = None
            if message["channel"] == "l4Book":
                if "Snapshot" in data:
                    orders, height, block_time = from_snapshot(data["Snapshot"]["levels"]), data["Snapshot"]["height"], data["Snapshot"]["time"]
                else:
                    updates = data["Updates"]
                    assert updates["height"] == height + 1, "l4Book heights must be contiguous"
                    apply_updates(orders, updates)
                    height, block_time = updates["height"], updates["time"]
                levels = l2_by_time.pop(block_time, None)
            elif message["channel"] == "l2Book":
                l2_by_time[data["time"]] = data["levels"]
                if data["time"] == block_time:  # the l4 book is at this block already (a new subscriber's first l2Book)
                    levels = l2_by_time.pop(block_time)
            if levels is not None and orders is not None:
                assert levels == aggregate(orders, *agg), f"l2Book {agg} differs at block {height}"
                compared += 1
        await ws.close()
        return compared

    assert asyncio.run(run()) >= 8


def test_l4_book_rebuilds_the_simulators_book(up: Up) -> None:
    """l4Book snapshot + updates, applied up to the height of a fileSnapshot the
    simulator writes later, equal that snapshot exactly."""

    async def run() -> None:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "l4Book", "coin": "BTC"}))
        await receive(ws, "subscriptionResponse")
        first = (await receive(ws, "l4Book"))["data"]["Snapshot"]
        orders, height = from_snapshot(first["levels"]), first["height"]
        with tempfile.TemporaryDirectory() as tmp:
            truth_height, books = await asyncio.to_thread(lambda: snapshot.load(snapshot.fetch(up.sim_info, timeout=10, directory=tmp)))
        assert truth_height >= height  # the simulator writes a block before the shards apply it
        while height < truth_height:
            updates = (await receive(ws, "l4Book"))["data"]["Updates"]
            assert updates["height"] == height + 1
            apply_updates(orders, updates)
            height = updates["height"]
        await ws.close()
        truth = books["BTC"]
        expected = {o["oid"]: (o["side"], Decimal(o["limitPx"]), Decimal(o["sz"]), o["user"]) for side in truth.l4_levels() for o in side}
        assert len(expected) > 50
        assert orders == expected

    asyncio.run(run())


# ---------------------------------------------------------------- /info


def test_info_types(up: Up) -> None:
    status, book = post_info(up.http, {"type": "l2Book", "coin": "BTC"})
    assert status == 200 and book["coin"] == "BTC" and len(book["levels"][0]) == 20
    coarse = post_info(up.http, {"type": "l2Book", "coin": "BTC", "nSigFigs": 2})[1]
    assert len(coarse["levels"][0]) < 20 and Decimal(coarse["levels"][0][0]["px"]) % 1000 == 0
    assert post_info(up.http, {"type": "l2Book", "coin": "NOPE"}) == (200, None)  # the public API: null for a market that does not exist
    assert post_info(up.http, {"type": "nope"})[0] == 422
    deadline = time.monotonic() + 10  # just after start a thin book may lack a side (no mid) for a block or two
    while len(mids := post_info(up.http, {"type": "allMids"})[1]) < 9 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(mids) >= 9 and all(canonical(px) for px in mids.values())
    meta = post_info(up.http, {"type": "meta"})[1]
    perps = [u["name"] for u in meta["universe"]]
    assert perps[:2] == ["BTC", "ETH"] and all(not c.startswith("@") for c in perps)  # the node's meta: mainnet's asset ids
    assert next(u for u in meta["universe"] if u["name"] == "BTC")["szDecimals"] == 5
    spot = post_info(up.http, {"type": "spotMeta"})[1]
    assert set(mids) <= {p["name"] for p in spot["universe"]} | {u["name"] for u in meta["universe"] if not u.get("isDelisted")}
    for pair in spot["universe"]:
        assert spot["tokens"][pair["tokens"][0]]["index"] == pair["tokens"][0] and pair["tokens"][1] == 0
    meta_ctxs, ctxs = post_info(up.http, {"type": "metaAndAssetCtxs"})[1]
    assert len(ctxs) == len(meta_ctxs["universe"]) and ctxs[perps.index("BTC")]["midPx"] is not None
    spot_meta, spot_ctxs = post_info(up.http, {"type": "spotMetaAndAssetCtxs"})[1]
    assert [c["coin"] for c in spot_ctxs] == [p["name"] for p in spot_meta["universe"]]
    trades = post_info(up.http, {"type": "recentTrades", "coin": "BTC"})[1]
    assert trades and all(t["coin"] == "BTC" for t in trades)


def test_open_orders_and_order_status_from_the_books(up: Up) -> None:
    async def snapshot_orders() -> list[dict[str, Any]]:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "l4Book", "coin": "ETH"}))
        levels = (await receive(ws, "l4Book"))["data"]["Snapshot"]["levels"]
        await ws.close()
        return levels[0] + levels[1]

    resting = asyncio.run(snapshot_orders())
    by_user: dict[str, set[int]] = {}
    for order in resting:
        by_user.setdefault(order["user"], set()).add(order["oid"])
    user = max(by_user, key=lambda u: len(by_user[u]))
    status, open_orders = post_info(up.http, {"type": "openOrders", "user": user})
    assert status == 200 and by_user[user] & {o["oid"] for o in open_orders}
    assert all(set(o) >= {"coin", "side", "limitPx", "sz", "oid", "timestamp"} for o in open_orders)
    frontend = post_info(up.http, {"type": "frontendOpenOrders", "user": user})[1]
    assert {o["oid"] for o in frontend} >= {o["oid"] for o in open_orders} - {o["oid"] for o in frontend} and "orderType" in frontend[0]
    order = open_orders[0]
    found = post_info(up.http, {"type": "orderStatus", "user": user, "oid": order["oid"]})[1]
    if found["status"] == "order":  # it may have been filled or canceled in between
        assert found["order"]["order"]["limitPx"] == order["limitPx"] and found["order"]["status"] == "open"
    assert post_info(up.http, {"type": "orderStatus", "user": user, "oid": 1})[1] == {"status": "unknownOid"}
    assert post_info(up.http, {"type": "openOrders", "user": "0x" + "12" * 20})[1] == []
    assert post_info(up.http, {"type": "openOrders", "user": "bob"})[0] == 422


def test_health_ready_metrics_debug(up: Up) -> None:
    assert http_get(f"{up.http}/health") == (200, {"status": "ok"})
    status, ready = http_get(f"{up.http}/ready")
    assert status == 200 and ready["ready"] and len(ready["shards"]) == 2 and all(s["live"] for s in ready["shards"])
    with urllib.request.urlopen(f"{up.http}/metrics") as r:
        text = r.read().decode()
    assert "hlbook_gateway_connections" in text and "hlbook_gateway_upstream_messages_total" in text

    async def run() -> None:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "bbo", "coin": "ETH"}))
        await receive(ws, "bbo")
        await receive(ws, "bbo", timeout=15)
        debug = http_get(f"{up.http}/debug/connections")[1]
        mine = [c for c in debug["connections"] if c["subscriptions"] and c["subscriptions"][0]["subscription"] == {"type": "bbo", "coin": "ETH"}]
        assert len(mine) == 1
        stats = mine[0]["subscriptions"][0]
        assert stats["message_count"] >= 2 and stats["last_message_at"] >= stats["subscribed_at"]
        assert stats["uptime_seconds"] > 0 and stats["messages_per_minute"] >= 2
        assert "queue_depth" in mine[0] and mine[0]["direct_frames"] is True  # no compression: pre-built frames
        await ws.close()

    asyncio.run(run())


# ---------------------------------------------------------------- limits and bad clients


def test_subscription_limit(up: Up) -> None:
    async def run() -> None:
        ws = await connect(up.ws)
        coins = sorted(post_info(up.http, {"type": "allMids"})[1])[:10]
        subs = [{"type": "l2Book", "coin": c, "nLevels": n} for c in coins for n in range(1, 101)][:1000]
        for subscription in subs:
            await send(ws, sub("subscribe", subscription))
        await send(ws, sub("subscribe", {"type": "trades", "coin": "BTC"}))
        assert (await receive(ws, "error", timeout=30))["data"] == "Cannot subscribe to more than 1000 channels."
        await ws.close()

    asyncio.run(run())


def test_token_and_connections_per_ip(limited: str) -> None:
    async def run() -> None:
        with pytest.raises(InvalidStatus):
            await connect(f"ws://{limited}/ws")
        assert post_info(f"http://{limited}", {"type": "allMids"})[0] == 401
        assert post_info(f"http://{limited}", {"type": "allMids"}, {"Authorization": "Bearer secret"})[0] == 200
        open_ = [await connect(f"ws://{limited}/ws", additional_headers={"Authorization": "Bearer secret"})]
        open_ += [await connect(f"ws://{limited}/ws?token=secret") for _ in range(5)]
        with pytest.raises(InvalidStatus):
            await connect(f"ws://{limited}/ws?token=secret")
        # the cap counts TCP connections from the accept: a plain HTTP request from this address is refused too
        assert post_info(f"http://{limited}", {"type": "allMids"}, {"Authorization": "Bearer secret"})[0] == 429
        await open_.pop().close()
        await asyncio.sleep(0.2)
        open_.append(await connect(f"ws://{limited}/ws?token=secret"))  # a slot again
        status, body = get_from("127.0.0.2", f"http://{limited}/debug/connections?token=secret")  # another address
        debug = json.loads(body)["connections"]
        assert status == 200 and len(debug) == 6 and not any(c["direct_frames"] for c in debug)  # compression: ASGI sends
        for ws in open_:
            await ws.close()

    asyncio.run(run())


def test_flood_oversize_frame_and_idle_timeout(limited: str) -> None:
    url = f"ws://{limited}/ws?token=secret"

    async def run() -> None:
        flood = await connect(url)
        for _ in range(400):
            await send(flood, {"method": "ping"})
        pongs, error = 0, None
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                message = await receive(flood)
                if message["channel"] == "pong":
                    pongs += 1
                else:
                    error = message["data"]
        assert 250 <= pongs <= 300 and error.startswith("Too many messages") and closed.value.rcvd.code == 1008

        big = await connect(url)
        await send(big, json.dumps({"method": "ping", "pad": "x" * 10_000}))
        with pytest.raises(ConnectionClosed) as closed:
            await receive(big)
        assert closed.value.rcvd.code == 1009

        idle = await connect(url)
        started = time.monotonic()
        message = await receive(idle, timeout=10)
        assert message["channel"] == "error" and "nothing received" in message["data"]
        with pytest.raises(ConnectionClosed):
            await receive(idle)
        assert 2.5 < time.monotonic() - started < 8

    asyncio.run(run())


class RawClient:
    """A WebSocket client that completes the handshake and then never reads (a tiny receive buffer)."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect((host, port))
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def send(self, request: dict[str, Any]) -> None:
        payload, mask = json.dumps(request).encode(), os.urandom(4)
        assert len(payload) < 126
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def test_client_that_never_reads_is_cut_off_and_others_are_not_slowed(limited: str) -> None:
    url = f"ws://{limited}/ws?token=secret"
    host, port = limited.split(":")

    async def run() -> None:
        good = await connect(url)
        await send(good, sub("subscribe", {"type": "trades", "coin": "ETH"}))
        await send(good, sub("subscribe", {"type": "l2Book", "coin": "BTC"}))
        await receive(good, "l2Book")

        slow = RawClient(host, int(port), "/ws?token=secret")
        async def flood() -> None:
            for _ in range(100):  # each subscribe brings a ~300 kB l4Book snapshot
                slow.send(sub("subscribe", {"type": "l4Book", "coin": "BTC"}))
                await asyncio.sleep(0.1)
                slow.send(sub("unsubscribe", {"type": "l4Book", "coin": "BTC"}))

        flooding = asyncio.create_task(flood())

        gaps, last = [], time.monotonic()
        deadline = last + 25
        while time.monotonic() < deadline:
            await send(good, {"method": "ping"})
            await receive(good, "l2Book")
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            if metric(limited, "hlbook_gateway_closed_total", reason="slow_client") >= 1:
                break
        else:
            pytest.fail("the client that never reads was not cut off")
        assert max(gaps) < 2.0, f"a slow client slowed another one: {max(gaps):.2f} s between l2Book messages"
        flooding.cancel()
        await good.close()
        slow.sock.close()

    asyncio.run(run())


def test_active_asset_ctx_perp_and_spot(up: Up) -> None:
    async def run() -> None:
        spot = post_info(up.http, {"type": "spotMeta"})[1]["universe"][0]["name"]
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "activeAssetCtx", "coin": "BTC"}))
        await send(ws, sub("subscribe", {"type": "activeAssetCtx", "coin": spot}))
        perp_ctx = (await receive(ws, "activeAssetCtx"))["data"]
        spot_ctx = (await receive(ws, "activeSpotAssetCtx"))["data"]
        await ws.close()
        assert perp_ctx["coin"] == "BTC" and canonical(perp_ctx["ctx"]["midPx"]) and "funding" in perp_ctx["ctx"]
        assert spot_ctx["coin"] == spot and spot_ctx["ctx"]["coin"] == spot and "circulatingSupply" in spot_ctx["ctx"]
        mids = post_info(up.http, {"type": "allMids"})[1]
        assert abs(Decimal(perp_ctx["ctx"]["midPx"]) / Decimal(mids["BTC"]) - 1) < Decimal("0.01")

    asyncio.run(run())

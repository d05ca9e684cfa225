"""Issue 4, compatibility: the official ``hyperliquid-python-sdk`` and ``ccxt``
(versions pinned in pyproject's ``test`` extras) talk to a running hlbook
gateway unmodified, only their base URLs pointed at it, and what they receive
matches the gateway's own answers (``POST /info``) on the simulated pipeline."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from typing import Any

import ccxt.pro as ccxtpro
import httpx
import pytest
from hyperliquid.info import Info

from hlbook.services.nodesim.universe import universe
from pipeline import running

READY_TIMEOUT = 60.0
COINS, SEED = 12, 3
SIMULATED = {c.name for c in universe(COINS, SEED)}  # the node's meta lists mainnet's others too (delisted, no book)
WAIT = 10.0  # seconds a client may take to deliver a message
DECIMAL = re.compile(r"\d+\.\d+")
ADDRESS = re.compile(r"0x[0-9a-f]{40}")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``hlbook up --simulate`` (2 shards, 12 coins) as its own process group; yields the base URL."""
    with running(tmp_path_factory.mktemp("compat"), READY_TIMEOUT, shards=2, coins=COINS, seed=SEED) as up:
        yield up.http


def post(base: str, payload: dict[str, Any]) -> Any:
    response = httpx.post(f"{base}/info", json=payload, timeout=5.0)
    assert response.status_code == 200, response.text
    return response.json()


def top(levels: list[list[dict[str, Any]]], n: int = 20) -> list[list[tuple[str, str]]]:
    return [[(lv["px"], lv["sz"]) for lv in side[:n]] for side in levels]


def as_floats(levels: list[list[tuple[str, str]]]) -> list[list[tuple[float, float]]]:
    return [[(float(px), float(sz)) for px, sz in side] for side in levels]


def check_levels(levels: Any) -> None:
    bids, asks = levels
    assert bids and asks
    for side in (bids, asks):
        for lv in side:
            assert set(lv) == {"px", "sz", "n"} and DECIMAL.fullmatch(lv["px"]) and DECIMAL.fullmatch(lv["sz"])
            assert isinstance(lv["n"], int) and lv["n"] >= 1
    bid_px, ask_px = [float(lv["px"]) for lv in bids], [float(lv["px"]) for lv in asks]
    assert bid_px == sorted(bid_px, reverse=True) and ask_px == sorted(ask_px) and bid_px[0] < ask_px[0]


def check_trade(trade: dict[str, Any], coin: str) -> None:
    assert trade["coin"] == coin and trade["side"] in ("A", "B")
    assert DECIMAL.fullmatch(trade["px"]) and DECIMAL.fullmatch(trade["sz"]) and float(trade["sz"]) > 0
    assert isinstance(trade["tid"], int) and isinstance(trade["time"], int)
    assert re.fullmatch(r"0x[0-9a-f]{64}", trade["hash"])
    assert len(trade["users"]) == 2 and all(ADDRESS.fullmatch(u) for u in trade["users"])


# ---------------------------------------------------------------- hyperliquid-python-sdk


class Collector:
    """SDK callbacks (run on the SDK's WebSocket thread) gathered per feed."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: dict[str, list[dict[str, Any]]] = {}
        self.arrived = threading.Condition(self.lock)

    def callback(self, name: str) -> Any:
        def on_message(message: dict[str, Any]) -> None:
            with self.arrived:
                self.messages.setdefault(name, []).append(message)
                self.arrived.notify_all()
        return on_message

    def wait(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages.get(name, ())) >= count, WAIT), f"no {name} messages"
            return list(self.messages[name])


def test_sdk(gateway: str) -> None:
    info = Info(base_url=gateway, skip_ws=False)  # meta and spotMeta over /info
    try:
        meta, spot = post(gateway, {"type": "meta"}), post(gateway, {"type": "spotMeta"})
        for asset, entry in enumerate(meta["universe"]):
            assert info.coin_to_asset[entry["name"]] == asset
            assert info.asset_to_sz_decimals[asset] == entry["szDecimals"]
        for pair in spot["universe"]:
            assert info.coin_to_asset[pair["name"]] == 10000 + pair["index"]
        assert "BTC" in info.coin_to_asset and "PURR/USDC" in info.name_to_coin

        got = Collector()
        for sub in ({"type": "l2Book", "coin": "BTC"}, {"type": "trades", "coin": "BTC"},
                    {"type": "bbo", "coin": "BTC"}, {"type": "allMids"}):
            info.subscribe(sub, got.callback(sub["type"]))

        books = got.wait("l2Book", 3)
        for message in books:
            assert message["channel"] == "l2Book" and message["data"]["coin"] == "BTC"
            check_levels(message["data"]["levels"])
        bbos = got.wait("bbo", 2)
        for message in bbos:
            data = message["data"]
            assert message["channel"] == "bbo" and data["coin"] == "BTC"
            assert all(set(lv) == {"px", "sz", "n"} for lv in data["bbo"])
        # a bbo and an l2Book of the same block agree on the top of the book
        by_time = {m["data"]["time"]: m["data"]["levels"] for m in got.wait("l2Book")}
        same = [m["data"] for m in got.wait("bbo") if m["data"]["time"] in by_time]
        assert same, "no bbo and l2Book of the same block"
        for data in same:
            levels = by_time[data["time"]]
            assert data["bbo"] == [levels[0][0], levels[1][0]]

        trades = got.wait("trades")
        for message in trades:
            assert message["channel"] == "trades" and message["data"]
            for trade in message["data"]:
                check_trade(trade, "BTC")
        last = got.wait("trades")[-1]["data"][-1]
        assert last["tid"] in {t["tid"] for t in post(gateway, {"type": "recentTrades", "coin": "BTC"})}

        expected = SIMULATED
        assert expected <= {e["name"] for e in meta["universe"]} | {p["name"] for p in spot["universe"]}
        for count in range(2, 40):  # a coin has a mid while both sides of its book rest (a thin one may lack one a block)
            mids = got.wait("allMids", count)[-1]
            if set(mids["data"]["mids"]) == expected:
                break
        assert mids["channel"] == "allMids"
        assert set(mids["data"]["mids"]) == expected
        assert all(DECIMAL.fullmatch(px) for px in mids["data"]["mids"].values())

        # REST through the SDK equals the gateway's own answer (retried across block moves)
        for _ in range(50):
            snapshot = info.l2_snapshot("BTC")
            direct = post(gateway, {"type": "l2Book", "coin": "BTC"})
            if snapshot == direct:
                break
        else:
            raise AssertionError(f"SDK l2_snapshot never matched POST /info l2Book: {snapshot} != {direct}")
        assert snapshot["coin"] == "BTC" and len(snapshot["levels"][0]) == 20
        check_levels(snapshot["levels"])
        for _ in range(50):
            all_mids = info.all_mids()
            if set(all_mids) == expected:
                break
            time.sleep(0.05)
        assert set(all_mids) == expected
        bid, ask = float(snapshot["levels"][0][0]["px"]), float(snapshot["levels"][1][0]["px"])
        assert bid * 0.99 < float(all_mids["BTC"]) < ask * 1.01

        assert post(gateway, {"type": "perpDexs"}) == [None]  # the simulator has no HIP-3 coins
        dexes = Info(base_url=gateway, skip_ws=True, spot_meta=spot, perp_dexs=[""])  # also asks perpDexs
        assert dexes.coin_to_asset["BTC"] == info.coin_to_asset["BTC"]
    finally:
        info.disconnect_websocket()


# ---------------------------------------------------------------- ccxt


def hyperliquid(base: str) -> Any:
    exchange = ccxtpro.hyperliquid({"enableRateLimit": False})
    ws = "ws" + base[len("http"):] + "/ws"
    exchange.urls["api"] = {"public": base, "private": base, "ws": {"public": ws}}
    return exchange


async def ccxt_checks(base: str) -> None:
    exchange = hyperliquid(base)
    try:
        markets = await asyncio.wait_for(exchange.load_markets(), WAIT)
        meta = post(base, {"type": "meta"})
        spot = post(base, {"type": "spotMeta"})
        swaps = {m["baseName"]: m for m in markets.values() if m["swap"]}
        assert set(swaps) == {e["name"] for e in meta["universe"]}
        for asset, entry in enumerate(meta["universe"]):
            market = swaps[entry["name"]]
            assert market["id"] == str(asset) and market["settle"] == "USDC"
            assert market["precision"]["amount"] == 10.0 ** -entry["szDecimals"]
        assert {m["id"] for m in markets.values() if m["spot"]} == {p["name"] for p in spot["universe"]}
        assert markets["BTC/USDC:USDC"]["baseName"] == "BTC" and markets["PURR/USDC"]["id"] == "PURR/USDC"

        # watch_order_book: the book equals the gateway's l2Book (retried across block moves)
        ours = direct = None
        for _ in range(50):
            book = await asyncio.wait_for(exchange.watch_order_book("BTC/USDC:USDC"), WAIT)
            ours = [[tuple(lv[:2]) for lv in book["bids"][:20]], [tuple(lv[:2]) for lv in book["asks"][:20]]]
            stamp = book["timestamp"]
            reply = post(base, {"type": "l2Book", "coin": "BTC"})
            direct = as_floats(top(reply["levels"]))
            if ours == direct:
                break
        else:
            raise AssertionError(f"ccxt order book never matched POST /info l2Book: {ours} != {direct}")
        # the simulated book can be thinner than 20 levels a side for a block: equal to l2Book is the test
        assert ours[0] and ours[1] and ours[0][0][0] < ours[1][0][0]
        assert book["symbol"] == "BTC/USDC:USDC" and isinstance(stamp, int)

        trades = await asyncio.wait_for(exchange.watch_trades("BTC/USDC:USDC"), WAIT)
        assert trades
        recent = {str(t["tid"]): t for t in post(base, {"type": "recentTrades", "coin": "BTC"})}
        last = trades[-1]
        assert last["symbol"] == "BTC/USDC:USDC" and last["side"] in ("buy", "sell")
        assert last["id"] in recent, "the newest trade ccxt got is not in recentTrades"
        raw = recent[last["id"]]
        assert last["price"] == float(raw["px"]) and last["amount"] == float(raw["sz"])
        assert last["side"] == ("buy" if raw["side"] == "B" else "sell") and last["timestamp"] == raw["time"]

        tickers = await asyncio.wait_for(exchange.watch_tickers(), WAIT)
        traded = {symbol: m for symbol, m in markets.items() if (m["baseName"] if m["swap"] else m["id"]) in SIMULATED}
        assert set(tickers) == set(traded) and len(traded) == len(SIMULATED)
        assert not any(m["active"] for m in markets.values() if m["swap"] and m["baseName"] not in SIMULATED)  # delisted
        mids = post(base, {"type": "allMids"})
        for symbol, market in traded.items():
            coin = market["baseName"] if market["swap"] else market["id"]
            assert abs(tickers[symbol]["last"] / float(mids[coin]) - 1) < 0.01, (symbol, tickers[symbol]["last"], mids[coin])

        rest_book = await asyncio.wait_for(exchange.fetch_order_book("ETH/USDC:USDC"), WAIT)  # REST l2Book
        assert rest_book["bids"] and rest_book["asks"] and rest_book["bids"][0][0] < rest_book["asks"][0][0]
    finally:
        await exchange.close()


def test_ccxt(gateway: str) -> None:
    asyncio.run(asyncio.wait_for(ccxt_checks(gateway), 45))

"""WebSocket subscriptions made of node state, polled from the node's info server (polled.py).

Real components: ``hlbook up --simulate`` (its gateway polls the simulator's info server),
one more gateway on the same shards polling a scripted info server (answers set by the
test, requests counted), and one without an info server; real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import websockets

from conftest import free_port
from hlbook.common.models import ASSISTANCE_FUND_USER, HIP2_USER
from pipeline import Up, running, wait_until
from scripted import JsonHandler, ScriptedInfo

WAIT = 10.0
ALICE, BOB, CAROL, DAVE = ("0x" + c * 40 for c in "abcd")


class Node(JsonHandler):
    """A node's info server whose clearinghouseState answers the test sets (``state``);
    users in ``failing`` get a 500. Every request is recorded."""

    server: Scripted

    def do_POST(self) -> None:  # noqa: N802
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        self.server.seen.append(req)
        user = req.get("user", "")
        if user in self.server.failing:
            self._send(500, b"node exploded", "text/plain")
        elif req.get("type") == "clearinghouseState":
            self._send(200, json.dumps(self.server.state.get(user, {"assetPositions": [], "v": 0})).encode())
        else:
            self._send(422, b"Failed to deserialize the JSON body into the target type", "text/plain")


class Scripted(ScriptedInfo):
    def __init__(self) -> None:
        super().__init__(Node)
        self.state: dict[str, Any] = {}
        self.failing: set[str] = set()

    def polls_of(self, user: str) -> int:
        return sum(1 for req in list(self.seen) if req.get("user") == user)


@dataclass
class Setup:
    up: Up
    node: Scripted
    scripted_ws: str  # a gateway polling ``node`` every 0.1 s, at most 3 keys, 2 a connection
    bare_ws: str  # a gateway without an info server


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with Scripted().serving() as node, running(tmp_path_factory.mktemp("polled"), shards=1, coins=6, seed=4) as up:
        assert isinstance(node, Scripted)
        scripted, bare = free_port(), free_port()
        up.start_gateway(scripted, "--info-upstream", node.url,
                         "--node-poll-interval", "0.1", "--node-poll-max-keys", "3", "--node-poll-max-per-connection", "2",
                         "--node-poll-max-per-ip", "4")
        up.start_gateway(bare)
        yield Setup(up, node, f"ws://127.0.0.1:{scripted}/ws", f"ws://127.0.0.1:{bare}/ws")


async def _connect(url: str) -> Any:
    return await websockets.connect(url, max_size=None)


async def _next(ws: Any, *channels: str, timeout: float = WAIT) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            message = json.loads(await ws.recv())
            if message["channel"] in channels:
                return message


async def _subscribe(ws: Any, sub: dict[str, Any]) -> dict[str, Any]:
    """The ack, or the error the subscribe got."""
    await ws.send(json.dumps({"method": "subscribe", "subscription": sub}))
    return await _next(ws, "subscriptionResponse", "error")


async def _quiet(ws: Any, channel: str, seconds: float) -> bool:
    """No ``channel`` message for ``seconds``."""
    try:
        await _next(ws, channel, timeout=seconds)
    except TimeoutError:
        return True
    return False


def _post(base: str, payload: dict[str, Any]) -> Any:
    response = httpx.post(f"{base}/info", json=payload, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_state_first_then_its_changes_one_poll_per_key(setup: Setup) -> None:
    node, sub = setup.node, {"type": "clearinghouseState", "user": ALICE}
    node.state[ALICE] = {"assetPositions": [{"position": {"coin": "BTC", "szi": "1.0"}}], "v": 1}

    async def run() -> None:
        one, two = await _connect(setup.scripted_ws), await _connect(setup.scripted_ws)
        for ws in (one, two):
            assert (await _subscribe(ws, sub))["data"] == {"method": "subscribe", "subscription": sub}
            first = (await _next(ws, "clearinghouseState"))["data"]
            assert first == {"dex": "", "user": ALICE, "clearinghouseState": node.state[ALICE]}
        node.state[ALICE] = {"assetPositions": [], "v": 2}
        for ws in (one, two):
            assert (await _next(ws, "clearinghouseState"))["data"]["clearinghouseState"] == {"assetPositions": [], "v": 2}
        assert await _quiet(one, "clearinghouseState", 0.5)  # unchanged: nothing pushed
        before = node.polls_of(ALICE)
        await asyncio.sleep(1.0)
        polls = node.polls_of(ALICE) - before
        assert 1 <= polls <= 13, polls  # every 0.1 s, once for both subscribers (twice would be ~20)
        await one.close()
        await two.close()
        deadline = time.monotonic() + 10  # no subscriber left: the poll stops (a loaded machine may take a while to see the closes)
        while True:
            before = node.polls_of(ALICE)
            await asyncio.sleep(0.5)
            if node.polls_of(ALICE) == before:
                break
            assert time.monotonic() < deadline, "the poll goes on with no subscriber"

    asyncio.run(run())


def test_an_upstream_error_is_told_never_sent_as_data(setup: Setup) -> None:
    node, sub = setup.node, {"type": "clearinghouseState", "user": BOB, "dex": ""}
    node.failing.add(BOB)

    async def run() -> None:
        ws = await _connect(setup.scripted_ws)
        assert (await _subscribe(ws, sub))["channel"] == "subscriptionResponse"
        message = await _next(ws, "error", "clearinghouseState")
        assert message["channel"] == "error" and "500" in message["data"] and "node exploded" in message["data"]
        assert await _quiet(ws, "error", 0.5)  # told once a streak
        node.state[BOB] = {"assetPositions": [], "v": 7}
        node.failing.discard(BOB)
        data = (await _next(ws, "clearinghouseState"))["data"]
        assert data == {"dex": "", "user": BOB, "clearinghouseState": {"assetPositions": [], "v": 7}}
        await ws.close()

    asyncio.run(run())


def test_budgets_per_connection_and_gateway_wide(setup: Setup) -> None:
    async def run() -> None:
        one, two = await _connect(setup.scripted_ws), await _connect(setup.scripted_ws)
        for user in (ALICE, BOB):
            assert (await _subscribe(one, {"type": "clearinghouseState", "user": user}))["channel"] == "subscriptionResponse"
        refused = await _subscribe(one, {"type": "clearinghouseState", "user": CAROL})
        assert refused["channel"] == "error" and "on one connection" in refused["data"]
        assert (await _subscribe(two, {"type": "clearinghouseState", "user": CAROL}))["channel"] == "subscriptionResponse"
        refused = await _subscribe(two, {"type": "clearinghouseState", "user": DAVE})  # a 4th key: over 3
        assert refused["channel"] == "error" and "distinct" in refused["data"]
        shared = await _subscribe(two, {"type": "clearinghouseState", "user": ALICE})  # a key already polled: no new poll
        assert shared["channel"] == "subscriptionResponse"
        three = await _connect(setup.scripted_ws)  # the address holds 4 already (2 + 2)
        refused = await _subscribe(three, {"type": "clearinghouseState", "user": BOB})
        assert refused["channel"] == "error" and "from one address" in refused["data"]
        same = await _subscribe(two, {"type": "clearinghouseState", "user": ALICE, "dex": ""})  # the same feed spelt otherwise
        assert same["channel"] == "error" and "Already subscribed" in same["data"]
        await one.close()
        await two.close()
        three_free = await _subscribe(three, {"type": "clearinghouseState", "user": BOB})  # the others' share freed
        assert three_free["channel"] == "subscriptionResponse"
        await three.close()

    asyncio.run(run())


def test_without_an_info_server_the_subscribe_is_refused(setup: Setup) -> None:
    async def run() -> None:
        ws = await _connect(setup.bare_ws)
        for sub in ({"type": "clearinghouseState", "user": ALICE}, {"type": "assetCtxs"}):
            refused = await _subscribe(ws, sub)
            assert refused["channel"] == "error" and "--info-upstream" in refused["data"], refused
        await ws.close()

    asyncio.run(run())


def _trader_with_position(up: Up) -> str:
    sim = up.sim_info[: -len("/info")]

    def find() -> str | None:
        for trade in _post(up.http, {"type": "recentTrades", "coin": "BTC"}):
            for user in trade["users"]:
                if user not in (ASSISTANCE_FUND_USER, HIP2_USER) and \
                        _post(sim, {"type": "clearinghouseState", "user": user})["assetPositions"]:
                    return str(user)
        return None

    return str(wait_until(find, WAIT, "a trader with a position"))


def test_clearinghouse_and_spot_state_from_the_simulated_node(setup: Setup) -> None:
    up = setup.up
    user = _trader_with_position(up)
    sim = up.sim_info[: -len("/info")]

    async def run() -> None:
        ws = await _connect(up.ws)
        await _subscribe(ws, {"type": "clearinghouseState", "user": user})
        first = (await _next(ws, "clearinghouseState"))["data"]
        theirs = _post(sim, {"type": "clearinghouseState", "user": user})
        assert first["user"] == user and first["dex"] == ""
        assert set(first["clearinghouseState"]) == set(theirs)
        coins = {p["position"]["coin"] for p in first["clearinghouseState"]["assetPositions"]}
        assert coins and coins <= {c["name"] for c in _post(sim, {"type": "meta"})["universe"]}
        later = (await _next(ws, "clearinghouseState"))["data"]  # marks move: the state changes
        assert later["clearinghouseState"] != first["clearinghouseState"]
        await _subscribe(ws, {"type": "spotState", "user": user})
        spot = (await _next(ws, "spotState"))["data"]
        assert spot["user"] == user and spot["spotState"] == _post(sim, {"type": "spotClearinghouseState", "user": user}) \
            or isinstance(spot["spotState"]["balances"], list)
        await ws.close()

    asyncio.run(run())


def test_every_dex_at_once(setup: Setup) -> None:
    """allDexsClearinghouseState / allDexsAssetCtxs: the answer of every dex perpDexs lists, as ``[dex, …]``."""
    up = setup.up
    sim = up.sim_info[: -len("/info")]
    user = _trader_with_position(up)
    dexs = [d["name"] if d else "" for d in _post(sim, {"type": "perpDexs"})]

    async def run() -> None:
        ws = await _connect(up.ws)
        await _subscribe(ws, {"type": "allDexsClearinghouseState", "user": user})
        states = (await _next(ws, "allDexsClearinghouseState"))["data"]
        assert states["user"] == user and [dex for dex, _ in states["clearinghouseStates"]] == dexs
        theirs = _post(sim, {"type": "clearinghouseState", "user": user})
        assert all(set(state) == set(theirs) for _, state in states["clearinghouseStates"])
        await _subscribe(ws, {"type": "allDexsAssetCtxs"})
        ctxs = (await _next(ws, "allDexsAssetCtxs"))["data"]["ctxs"]
        assert [dex for dex, _ in ctxs] == dexs
        universe = _post(sim, {"type": "meta"})["universe"]
        assert len(ctxs[0][1]) == len(universe) and "markPx" in ctxs[0][1][0]
        await ws.close()

    asyncio.run(run())


def test_user_historical_orders_snapshot_then_increments(setup: Setup) -> None:
    """From hlbook's own historicalOrders (the history service): the whole list with
    ``isSnapshot`` first, then only new orders and status changes."""
    up = setup.up
    user = _trader_with_position(up)

    async def run() -> None:
        ws = await _connect(up.ws)
        ack = await _subscribe(ws, {"type": "userHistoricalOrders", "user": user})
        assert ack["channel"] == "subscriptionResponse", ack
        first = (await _next(ws, "userHistoricalOrders"))["data"]
        listed = _post(up.http, {"type": "historicalOrders", "user": user})
        assert first["isSnapshot"] is True and first["user"] == user and first["orderHistory"]
        assert all(set(e) == {"order", "status", "statusTimestamp"} for e in first["orderHistory"])
        assert {e["order"]["oid"] for e in first["orderHistory"]} & {e["order"]["oid"] for e in listed}
        later = (await _next(ws, "userHistoricalOrders", timeout=30))["data"]  # an active trader's orders change
        assert "isSnapshot" not in later and later["user"] == user and later["orderHistory"]
        assert not [e for e in later["orderHistory"] if e in first["orderHistory"]]
        await ws.close()

    asyncio.run(run())


def test_the_polls_are_counted(setup: Setup) -> None:
    text = httpx.get(f"{setup.up.http}/metrics", timeout=5).text
    assert 'hlbook_gateway_polls_total{kind="clearinghouseState",outcome="changed"}' in text



"""Per-user streams, order lookups and candles in the real pipeline, checked
against the node files the simulator wrote and the simulator's fileSnapshot."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from hlbook.common.models import block_time_ms
from hlbook.common.topics import shard_of
from hlbook.services.book import snapshot
from hlbook.services.book.book import Book
from pipeline import Up, http_get, post_info, running
from test_book_sim import advance, node_lines
from test_gateway import connect, receive, send, sub


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(tmp_path_factory.mktemp("users"), shards=2, coins=8, seed=11) as up:
        yield up


def active_users(data: Path, n: int) -> list[str]:
    counts = Counter(st.user for line in node_lines(data, "order_statuses") for st in line.events
                     if st.user.startswith("0x") and not st.user.startswith(("0xffff", "0xfefe")))
    return [user for user, _ in counts.most_common(n)]


def contiguous_in(got: list[Any], written: list[Any]) -> None:
    """``got`` is a run of consecutive elements of ``written``."""
    assert got, "nothing received"
    start = written.index(got[0])
    assert written[start : start + len(got)] == got


async def follow(up: Up, user: str, seconds: float) -> tuple[list[Any], list[Any]]:
    """orderUpdates and userFills of ``user`` over WS: (status messages, fill messages)."""
    ws = await connect(up.ws)
    await send(ws, sub("subscribe", {"type": "orderUpdates", "user": user}))
    await send(ws, sub("subscribe", {"type": "userFills", "user": user}))
    updates, fills = [], []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            message = await receive(ws, timeout=deadline - time.monotonic())
        except TimeoutError:
            break
        if message["channel"] == "orderUpdates":
            updates.append(message["data"])
        elif message["channel"] == "userFills":
            fills.append(message["data"])
    await ws.close()
    return updates, fills


def test_order_updates_and_user_fills_equal_the_node_files(up: Up) -> None:
    users = active_users(up.data, 3)

    async def run() -> list[tuple[list[Any], list[Any]]]:
        return await asyncio.gather(*(follow(up, user, 8) for user in users))

    results = asyncio.run(run())
    time.sleep(0.5)  # the files hold every block the clients saw
    for user, (updates, fill_messages) in zip(users, results):
        written = [(st.order.oid, st.status, block_time_ms(st.time), st.order.limitPx, st.order.sz)
                   for line in node_lines(up.data, "order_statuses") for st in line.events if st.user == user]
        got = [(u["order"]["oid"], u["status"], u["statusTimestamp"], u["order"]["limitPx"], u["order"]["sz"]) for m in updates for u in m]
        assert len(got) >= 3, f"{user}: only {len(got)} statuses in 8 s"
        contiguous_in(got, written)  # in node order, nothing missing or doubled
        for message in updates:  # one message per block
            times = {u["statusTimestamp"] for u in message}
            assert len({t // 1000 for t in times}) <= 2
        assert fill_messages[0]["isSnapshot"] is True and fill_messages[0]["user"] == user
        written_fills = [fill.tid for line in node_lines(up.data, "fills") for who, fill in line.events if who == user]
        got_fills = [f["tid"] for m in fill_messages[1:] for f in m["fills"]]
        if got_fills:
            contiguous_in(got_fills, written_fills)
            assert len(set(got_fills)) == len(got_fills)


def test_order_status_by_cloid_after_a_modify_returns_the_replacement(up: Up) -> None:
    """Followed users: the first modify seen (canceled old oid + open new oid, same cloid,
    one message) makes ``orderStatus`` by cloid answer with the new oid."""
    users = active_users(up.data, 12)

    async def watch(user: str, found: asyncio.Future[tuple[str, str, int, int]]) -> None:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "orderUpdates", "user": user}))
        try:
            while not found.done():
                message = await receive(ws, "orderUpdates", timeout=30)
                canceled = {u["order"].get("cloid"): u["order"]["oid"] for u in message["data"] if u["status"] == "canceled"}
                for u in message["data"]:
                    cloid = u["order"].get("cloid")
                    if u["status"] == "open" and cloid and cloid in canceled and not found.done():
                        found.set_result((user, cloid, canceled[cloid], u["order"]["oid"]))
                        status = post_info(up.http, {"type": "orderStatus", "user": user, "oid": cloid})[1]
                        assert status["status"] == "order" and status["order"]["order"]["oid"] == u["order"]["oid"]
                        assert status["order"]["order"]["cloid"] == cloid
                        old = post_info(up.http, {"type": "orderStatus", "user": user, "oid": canceled[cloid]})[1]
                        assert old["order"]["status"] == "canceled"
        finally:
            await ws.close()

    async def run() -> tuple[str, str, int, int]:
        found: asyncio.Future[tuple[str, str, int, int]] = asyncio.get_running_loop().create_future()
        tasks = [asyncio.create_task(watch(user, found)) for user in users]
        try:
            return await asyncio.wait_for(asyncio.shield(found), 40)
        finally:
            await asyncio.gather(*tasks, return_exceptions=False)

    user, cloid, old, new = asyncio.run(run())
    assert old != new


def test_open_orders_equal_the_simulators_book(up: Up) -> None:
    """openOrders of a user equals the simulator's fileSnapshot moved forward with
    the node files to the shards' height, filtered by that user."""
    with tempfile.TemporaryDirectory() as tmp:
        base, books = snapshot.load(snapshot.fetch(up.sim_info, timeout=10, directory=tmp))
    users = Counter(o.user for book in books.values() for o in book.orders.values() if not o.user.startswith(("0xffff", "0xfefe")))
    user = users.most_common(1)[0][0]
    for _ in range(50):
        before = [s["height"] for s in http_get(f"{up.http}/ready")[1]["shards"]]
        orders = post_info(up.http, {"type": "openOrders", "user": user})[1]
        after = [s["height"] for s in http_get(f"{up.http}/ready")[1]["shards"]]
        if before == after and min(before) >= base:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the shards never stood still at a height past the snapshot")
    heights = dict(enumerate(after))
    expected = set()
    for coin in sorted({*books, *(d.coin for line in node_lines(up.data, "raw_book_diffs", base) for d in line.events)}):
        book = advance(up.data, books.get(coin) or Book(coin, base), base, heights[shard_of(coin, up.shards)])
        expected |= {(coin, o.oid, o.to_dict(coin)["limitPx"], o.to_dict(coin)["sz"]) for o in book.orders.values() if o.user == user}
    got = {(o["coin"], o["oid"], o["limitPx"], o["sz"]) for o in orders}
    assert len(expected) >= 2 and got == expected


def test_candles_follow_the_trades(up: Up) -> None:
    """On one connection, each candle message after a trades message moves by exactly
    those trades (volume, count, high/low/close); candleSnapshot returns the same candle."""

    async def run() -> tuple[int, dict[str, Any]]:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "trades", "coin": "BTC"}))
        await send(ws, sub("subscribe", {"type": "candle", "coin": "BTC", "interval": "1m"}))
        last: dict[str, Any] | None = None
        pending: list[dict[str, Any]] = []
        checked = 0
        deadline = time.monotonic() + 20
        while checked < 5 and time.monotonic() < deadline:
            message = await receive(ws)
            if message["channel"] == "trades":
                pending = message["data"]
            elif message["channel"] == "candle":
                candle = message["data"]
                if last is not None and pending and candle["t"] == last["t"]:
                    mine = [t for t in pending if candle["t"] <= t["time"] <= candle["T"]]
                    assert candle["n"] - last["n"] == len(mine)
                    assert Decimal(candle["v"]) - Decimal(last["v"]) == sum(Decimal(t["sz"]) for t in mine)
                    assert Decimal(candle["h"]) == max([Decimal(last["h"]), *(Decimal(t["px"]) for t in mine)])
                    assert Decimal(candle["l"]) == min([Decimal(last["l"]), *(Decimal(t["px"]) for t in mine)])
                    assert candle["c"] == mine[-1]["px"] and candle["o"] == last["o"]
                    checked += 1
                last, pending = candle, []
        await ws.close()
        return checked, last

    checked, last = asyncio.run(run())
    assert checked >= 5
    snap = post_info(up.http, {"type": "candleSnapshot", "req": {"coin": "BTC", "interval": "1m", "startTime": last["t"], "endTime": last["T"]}})[1]
    assert snap[-1]["t"] == last["t"] and snap[-1]["n"] >= last["n"]
    assert post_info(up.http, {"type": "candleSnapshot", "req": {"coin": "BTC", "interval": "7m", "startTime": 0}})[0] == 400

"""Per-user streams, order lookups and candles in the real pipeline, checked
against the node files the simulator wrote and the simulator's fileSnapshot."""

from __future__ import annotations

import asyncio
import os
import signal
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
from pipeline import Up, http_get, post_info, running, wait_until
from test_book_sim import advance, node_lines
from test_faults import child_pid
from test_gateway import connect, receive, send, sub
from test_history import ask_history, canonical, expected, read_blocks


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
                    # (an order placed and canceled in one block has both statuses under one oid: not a modify)
                    if u["status"] == "open" and cloid and canceled.get(cloid, u["order"]["oid"]) != u["order"]["oid"] and not found.done():
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
    """On one connection, the candle messages of one minute move by exactly the trades
    received of that minute (count, volume, high/low/close), chunk after chunk, and
    candleSnapshot returns the same candle. Candles (history) and trades (the gateway's
    hold) are separate feeds, so a block's candle may come before or after its trades: the
    trades are matched to the candles' steps in arrival order, whichever came first."""

    async def run() -> tuple[int, dict[str, Any]]:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "trades", "coin": "BTC"}))
        await send(ws, sub("subscribe", {"type": "candle", "coin": "BTC", "interval": "1m"}))
        candles: list[dict[str, Any]] = []  # of the newest minute
        trades: list[dict[str, Any]] = []  # received since the subscription, in order
        checked = 0
        deadline = time.monotonic() + 20
        while checked < 5 and time.monotonic() < deadline:
            message = await receive(ws)
            if message["channel"] == "trades":
                trades += message["data"]
            elif message["channel"] == "candle":
                if candles and message["data"]["t"] != candles[0]["t"]:
                    candles = []
                candles.append(message["data"])
                checked = max(checked, matched_steps(candles, trades))
        await ws.close()
        return checked, candles[-1]

    checked, last = asyncio.run(run())
    assert checked >= 5
    snap = post_info(up.http, {"type": "candleSnapshot", "req": {"coin": "BTC", "interval": "1m", "startTime": last["t"], "endTime": last["T"]}})[1]
    assert post_info(up.http, {"type": "candleSnapshot", "req": {"coin": "BTC", "interval": "1m", "startTime": last["t"], "endTime": None}})[1]
    assert snap[-1]["t"] == last["t"] and snap[-1]["n"] >= last["n"]
    assert post_info(up.http, {"type": "candleSnapshot", "req": {"coin": "BTC", "interval": "7m", "startTime": 0}})[0] == 422


def matched_steps(candles: list[dict[str, Any]], trades: list[dict[str, Any]]) -> int:
    """How many steps between consecutive ``candles`` (one minute's messages) equal the next
    chunk of that minute's ``trades``, for the first offset into the trades (those the first
    candle already held) at which every complete step matches; 0 when none does."""
    t, end = candles[0]["t"], candles[0]["T"]
    mine = [x for x in trades if t <= x["time"] <= end]
    for offset in range(len(mine) + 1):
        steps, at = 0, offset
        for last, candle in zip(candles, candles[1:]):
            if candle["n"] == last["n"]:  # sent again unchanged (to a new subscriber, say)
                if candle != last:
                    steps = -1
                    break
                continue
            chunk = mine[at : at + candle["n"] - last["n"]]
            if len(chunk) < candle["n"] - last["n"]:
                break  # its trades are still on their way
            if (Decimal(candle["v"]) - Decimal(last["v"]) != sum(Decimal(x["sz"]) for x in chunk)
                    or Decimal(candle["h"]) != max([Decimal(last["h"]), *(Decimal(x["px"]) for x in chunk)])
                    or Decimal(candle["l"]) != min([Decimal(last["l"]), *(Decimal(x["px"]) for x in chunk)])
                    or candle["c"] != chunk[-1]["px"] or candle["o"] != last["o"]):
                steps = -1
                break
            steps, at = steps + 1, at + len(chunk)
        if steps > 0:
            return steps
    return 0


# ---------------------------------------------------------------- aggregateByTime, TWAP slices, historicalOrders
# Expected values from the node files (orjson and Decimal: test_history's reader), none of hlbook's code.


def file_fills(up: Up) -> dict[str, list[tuple[int, dict[str, Any]]]]:
    """user -> (height, fill) of the user in the node files, in node order."""
    blocks = read_blocks(up.data)
    out: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for height in sorted(blocks):
        for who, f in blocks[height]["fills"]:
            out.setdefault(who, []).append((height, f))
    return out


def aggregated(fills: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Hyperliquid's aggregateByTime: a crossing order's fills at one time in one (sizes, fees and
    PnL summed, price size-weighted, the rest from its first fill); a resting order's fills stay apart."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for place, f in enumerate(fills):
        groups.setdefault((f["oid"], f["time"]) if f["crossed"] else place, []).append(f)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        size = sum(Decimal(f["sz"]) for f in group)
        px = sum(Decimal(f["px"]) * Decimal(f["sz"]) for f in group) / size
        out.append({**group[0], "sz": canonical(size), "px": px,
                    "fee": canonical(sum(Decimal(f["fee"]) for f in group)),
                    "closedPnl": canonical(sum(Decimal(f["closedPnl"]) for f in group))})
    return out


def same_fills(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Equal as multisets; a merged price (a Decimal in ``want``) to within hlbook's 10 decimals."""
    def key(f: dict[str, Any]) -> Any:
        return (f["oid"], f["crossed"], f["tid"] if not f["crossed"] else 0)
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert [key(f) for f in got] == [key(f) for f in want]
    for g, w in zip(got, want):
        if isinstance(w["px"], Decimal):
            assert abs(Decimal(g["px"]) - w["px"]) < Decimal("1e-10"), (g, w)
            w = {**w, "px": g["px"]}
        assert {k: v for k, v in g.items() if v is not None} == {k: v for k, v in w.items() if v is not None}


def history_height(up: Up) -> int:
    answer = ask_history(f"ipc://{up.sockets}/history-query", op="status")
    return answer[1]["height"] if answer and answer[1] else 0


def test_aggregate_by_time_merges_a_crossing_orders_fills(up: Up) -> None:
    """userFillsByTime and the userFills WS feed with ``aggregateByTime``: a taker's fills of
    one block in one, equal to what the node files give; resting orders' fills stay apart."""

    def merged_groups() -> list[tuple[str, int]]:
        """(user, time) of crossing orders with several fills in one block, up to the history's height."""
        height = history_height(up)
        fills = file_fills(up)
        out = []
        for user in active_users(up.data, 20):
            counts = Counter((f["oid"], f["time"]) for h, f in fills.get(user, []) if f["crossed"] and h <= height)
            out += [(user, t) for (_, t), n in counts.items() if n > 1]
        return out[:6] if len(out) >= 3 else []

    groups = wait_until(merged_groups, 20, "crossing orders filled by several resting orders in one block", every=0.5)
    fills = file_fills(up)
    for user, at in groups:
        want = [f for _, f in fills[user] if f["time"] == at]
        assert len(post_info(up.http, {"type": "userFillsByTime", "user": user, "startTime": at, "endTime": at})[1]) == len(want)
        got = post_info(up.http, {"type": "userFillsByTime", "user": user, "startTime": at, "endTime": at, "aggregateByTime": True})[1]
        assert len(got) < len(want)
        same_fills(got, aggregated(want))
        # the official SDK sends endTime null when it is not given: now
        assert len(post_info(up.http, {"type": "userFillsByTime", "user": user, "startTime": at, "endTime": None})[1]) >= len(want)

    users = active_users(up.data, 8)

    async def live(user: str) -> list[Any]:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "userFills", "user": user, "aggregateByTime": True}))
        messages = []
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                messages.append((await receive(ws, "userFills", timeout=deadline - time.monotonic()))["data"])
            except TimeoutError:
                break
        await ws.close()
        return messages

    async def run() -> list[list[Any]]:
        return await asyncio.gather(*(live(u) for u in users))

    results = asyncio.run(run())
    time.sleep(0.5)
    checked = 0
    every = file_fills(up)
    for user, messages in zip(users, results):
        assert messages and messages[0]["isSnapshot"] is True
        fills = [f for _, f in every.get(user, [])]
        snapshot = messages[0]["fills"]  # the user's fills so far, aggregated
        if snapshot and len(fills) <= 2000:
            newest = max(f["time"] for f in snapshot)
            same_fills(snapshot, aggregated([f for f in fills if f["time"] <= newest]))
        for message in messages[1:]:  # one per block
            at = {f["time"] for f in message["fills"]}
            assert len(at) == 1
            same_fills(message["fills"], aggregated([f for f in fills if f["time"] in at]))
            checked += 1
    assert checked >= 3


def test_twap_slice_fills_carry_their_twap_id(up: Up) -> None:
    """userTwapSliceFills: first the snapshot (isSnapshot, the user's slice fills so far), then each
    block's slice fills; every entry is ``{"fill", "twapId"}`` of a fill with that twapId in the files."""
    users = active_users(up.data, 30)

    async def watch(user: str, found: asyncio.Future[tuple[str, list[Any], dict[str, Any]]]) -> None:
        ws = await connect(up.ws)
        await send(ws, sub("subscribe", {"type": "userTwapSliceFills", "user": user}))
        try:
            first = (await receive(ws, "userTwapSliceFills", timeout=10))["data"]
            assert first["isSnapshot"] is True and first["user"] == user
            while not found.done():
                try:
                    data = (await receive(ws, "userTwapSliceFills", timeout=0.5))["data"]
                except TimeoutError:
                    continue
                assert "isSnapshot" not in data or data["isSnapshot"] is False
                if not found.done():
                    found.set_result((user, first["twapSliceFills"], data))
        finally:
            await ws.close()

    async def run() -> tuple[str, list[Any], dict[str, Any]]:
        found: asyncio.Future[tuple[str, list[Any], dict[str, Any]]] = asyncio.get_running_loop().create_future()
        tasks = [asyncio.create_task(watch(u, found)) for u in users]
        try:
            return await asyncio.wait_for(asyncio.shield(found), 20)
        finally:
            await asyncio.gather(*tasks)

    user, snapshot_entries, live = asyncio.run(run())
    time.sleep(0.5)
    slices = [{"fill": f, "twapId": f["twapId"]} for _, f in file_fills(up)[user] if f.get("twapId") is not None]
    assert live["user"] == user and live["twapSliceFills"]
    for entry in live["twapSliceFills"]:
        assert isinstance(entry["twapId"], int) and entry["fill"]["twapId"] == entry["twapId"]
        assert entry in slices, entry
        assert entry["fill"]["crossed"] is True and entry["fill"]["hash"] == "0x" + "0" * 64
    for entry in snapshot_entries:
        assert entry in slices
    newest = max((e["fill"]["time"] for e in snapshot_entries), default=0)
    assert sorted(snapshot_entries, key=repr) == sorted((s for s in slices if s["fill"]["time"] <= newest), key=repr)


def test_historical_orders_are_each_orders_last_status_newest_first(up: Up) -> None:
    """historicalOrders of the busiest users: each order's last status, newest first, at most
    2000, as the node files have them up to the height the history service held."""
    answers = []

    def complete() -> bool:  # no backfill running, no hole (a block it lost is read from the files: a while)
        status = (ask_history(f"ipc://{up.sockets}/history-query", op="status") or ({}, {"backfilling": 1}))[1]
        return not status["backfilling"] and len(status["spans"]) == 1

    for user in active_users(up.data, 3):
        wait_until(complete, 30, "the history service holds every block, without a hole")
        before = history_height(up)
        got = post_info(up.http, {"type": "historicalOrders", "user": user})[1]
        answers.append((user, before, got, history_height(up)))
    blocks = {h: {"statuses": b["statuses"], "fills": []} for h, b in read_blocks(up.data).items()}  # orders only
    for user, before, got, after in answers:
        candidates = [before] + [h for h in range(before + 1, after + 1)
                                 if h in blocks and any(s["user"] == user for s in blocks[h]["statuses"])]
        wants = []
        for height in candidates:
            orders = expected({h: b for h, b in blocks.items() if h <= height})["orders"]
            mine = sorted(((at, entry) for at, who, entry in orders.values() if who == user), key=lambda x: x[0], reverse=True)
            wants.append([entry for _, entry in mine][:2000])
        assert len(got) >= 10
        status = ask_history(f"ipc://{up.sockets}/history-query", op="status")
        assert got in wants, (f"{user} between heights {before} and {after}: {len(got)} answered, {len(wants[-1])} in the files; "
                              f"only in the answer {[g for g in got if g not in wants[-1]][:3]}, only in the files "
                              f"{[w for w in wants[-1] if w not in got][:3]}; the history's status now {status}")
        assert len({e["order"]["oid"] for e in got}) == len(got)


def test_a_fills_snapshot_the_history_cannot_give_is_said_and_retried_never_sent_empty(up: Up) -> None:
    """History stopped (SIGSTOP, its sockets open): a new userFills subscriber gets an ``error``
    saying the snapshot is not available yet, never ``isSnapshot: true`` with ``[]``; once history
    runs again the snapshot comes, holding the user's fills."""
    every = file_fills(up)
    user = max(every, key=lambda u: len(every[u]) if u.startswith("0x") and not u.startswith(("0xffff", "0xfefe")) else 0)
    history = child_pid(up, "history")

    async def run() -> tuple[list[Any], list[Any]]:
        ws = await connect(up.ws)
        errors, fills = [], []
        os.kill(history, signal.SIGSTOP)
        try:
            await send(ws, sub("subscribe", {"type": "userFills", "user": user}))
            deadline = time.monotonic() + 8
            while not errors and time.monotonic() < deadline:
                message = await receive(ws, timeout=deadline - time.monotonic())
                {"error": errors, "userFills": fills}.get(message["channel"], []).append(message["data"])
        finally:
            os.kill(history, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while not any(f.get("isSnapshot") for f in fills) and time.monotonic() < deadline:
            message = await receive(ws, "userFills", timeout=deadline - time.monotonic())
            fills.append(message["data"])
        await ws.close()
        return errors, fills

    errors, fills = asyncio.run(run())
    assert len(errors) == 1 and errors[0].startswith(f"userFills snapshot of {user} not available yet") and "retrying" in errors[0]
    snapshots = [f for f in fills if f.get("isSnapshot")]
    assert len(snapshots) == 1 and fills[0] is snapshots[0]  # the snapshot first, and only once
    assert snapshots[0]["user"] == user and len(snapshots[0]["fills"]) > 0

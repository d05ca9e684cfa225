"""Client books and order tracker on the node simulator's data (its engine is the truth)."""

from __future__ import annotations

from collections import Counter, defaultdict
from decimal import Decimal
from typing import Any

from hlbook.client import HLClient, L4Book, OrderEvent, OrderTracker
from hlbook.client.books import canon
from hlbook.client.testing import FakeConnection, FakeServer
from hlbook.services.nodesim.engine import Block, Simulator
from test_client import FAST, run, until


def sim_snapshot(sim: Simulator, coin: str) -> dict[str, Any]:
    """The l4Book Snapshot of the simulator's true book (order + user, best first)."""
    height, body = sim.snapshot()
    levels = next(lv for name, lv in body if name == coin)
    orders = [[{**order, "user": user} for user, order in side] for side in levels]
    return {"Snapshot": {"coin": coin, "time": 0, "height": height, "levels": orders}}


def sim_updates(block: Block, coin: str) -> dict[str, Any]:
    """The block's Updates for one coin, as order_book_server builds them."""
    return {"Updates": {
        "time": block.time_ns // 1_000_000, "height": block.height,
        "order_statuses": [s for s in block.statuses if s["order"]["coin"] == coin],
        "book_diffs": [d for d in block.diffs if d["coin"] == coin],
    }}


def truth(sim: Simulator, coin: str) -> tuple[list[tuple[int, str, str, str]], ...]:
    levels = sim_snapshot(sim, coin)["Snapshot"]["levels"]
    return tuple([(o["oid"], o["user"], canon(Decimal(o["limitPx"])), canon(Decimal(o["sz"]))) for o in side] for side in levels)


def test_l4_book_follows_the_simulator_and_repairs_a_gap() -> None:
    async def main() -> None:
        sim = Simulator(seed=5, coins=4)
        coin = "ETH"
        sub = {"type": "l4Book", "coin": coin}
        snapshots = 0

        async def on_subscribe(conn: FakeConnection, s: dict[str, Any]) -> None:
            nonlocal snapshots
            snapshots += 1
            await conn.send({"channel": "l4Book", "data": sim_snapshot(sim, coin)})

        server = await FakeServer(on_subscribe=on_subscribe).start()
        async with HLClient(server.url, **FAST) as client:
            book = L4Book(coin)
            await book.subscribe(client)
            await until(lambda: book.synced)
            for _ in range(60):
                await server.publish(sub, sim_updates(sim.step(), coin))
            await until(lambda: book.height == sim.height)
            assert book.fingerprint() == truth(sim, coin) and book.resyncs == 0
            while not sim_updates(block := sim.step(), coin)["Updates"]["book_diffs"]:
                await server.publish(sub, sim_updates(block, coin))
            # ``block`` changed the book and is lost on the way
            for _ in range(3):
                await server.publish(sub, sim_updates(sim.step(), coin))
            await until(lambda: book.resyncs == 1 and snapshots == 2 and book.synced, what="repair")
            for _ in range(60):
                await server.publish(sub, sim_updates(sim.step(), coin))
            await until(lambda: book.height == sim.height)
            assert book.fingerprint() == truth(sim, coin)
            assert len(book.orders) == sum(len(side) for side in truth(sim, coin))
        await server.stop()

    run(main())


def test_order_tracker_on_simulated_modifies_fills_and_replays() -> None:
    sim = Simulator(seed=11, coins=4)
    blocks = [sim.step() for _ in range(400)]
    modifies: Counter[str] = Counter()
    for b in blocks:
        for i, s in enumerate(b.statuses):
            cloid = s["order"]["cloid"]
            if s["status"] == "canceled" and cloid and any(  # a modify: the cancel, then the replacement's open
                o["status"] == "open" and o["order"]["cloid"] == cloid and o["user"] == s["user"] and o["order"]["oid"] != s["order"]["oid"]
                for o in b.statuses[i + 1 :]
            ):
                modifies[s["user"]] += 1
    users = [u for u, _ in modifies.most_common(5)]
    assert sum(modifies[u] for u in users) >= 5
    for user in users:
        now = [0.0]
        events: list[OrderEvent] = []
        t = OrderTracker(events.append, hold_seconds=1.0, clock=lambda: now[0])
        all_fills: list[dict[str, Any]] = []
        introduced: dict[int, int] = {}  # oid -> index of its first status event in the stream
        replaced: set[int] = set()
        for b in blocks:
            fills = [f for u, f in b.fills if u == user]
            all_fills += fills
            if fills:  # the fill races ahead of the statuses of its block
                t.on_user_fills({"user": user, "fills": fills})
                t.on_user_fills({"user": user, "fills": fills[:1]})  # and a duplicate
            updates = [{"order": s["order"], "status": s["status"], "statusTimestamp": 0} for s in b.statuses if s["user"] == user]
            if updates:
                t.on_order_updates(updates)
            now[0] += 0.1
            t.flush_expired()
        t.on_user_fills({"isSnapshot": True, "user": user, "fills": all_fills})  # replay after a reconnect
        now[0] += 5
        t.flush_expired()
        for i, e in enumerate(events):
            if e.kind != "fill":
                introduced.setdefault(e.oid, i)
            if e.kind == "modified":
                replaced.add(e.prev_oid)  # type: ignore[arg-type]
        assert sum(e.kind == "modified" for e in events) == modifies[user]
        assert not any(e.kind == "canceled" and e.oid in replaced for e in events)  # no spurious cancel
        emitted = [(e.fill["tid"], e.fill["oid"]) for e in events if e.kind == "fill"]  # type: ignore[index]
        assert sorted(emitted) == sorted((f["tid"], f["oid"]) for f in all_fills)  # each exactly once
        assert len(set(emitted)) == len(emitted)
        statuses = defaultdict(list)
        for i, e in enumerate(events):
            statuses[e.oid].append((i, e.kind))
        for i, e in enumerate(events):
            if e.kind == "fill" and e.oid in introduced:
                first = introduced[e.oid]
                if events[first].kind in ("open", "modified", "triggered"):
                    assert first < i, f"fill of {e.oid} before its {events[first].kind}"

"""Order tracker: cancel-replace folding, fills before their open, dedup across reconnects."""

from __future__ import annotations

import asyncio
from typing import Any

from hlbook.client import HLClient, OrderEvent, OrderTracker
from hlbook.client.orders import FifoSet
from hlbook.client.testing import FakeConnection, FakeServer
from test_client import FAST, run, until

USER = "0x" + "cd" * 20


def status(oid: int, st: str, cloid: str | None = None, sz: str = "1.0", ts: int = 1) -> dict[str, Any]:
    order = {"coin": "BTC", "side": "B", "limitPx": "100.0", "sz": sz, "oid": oid, "timestamp": ts, "origSz": "1.0"}
    if cloid:
        order["cloid"] = cloid
    return {"order": order, "status": st, "statusTimestamp": ts}


def fill(oid: int, tid: int, sz: str = "0.5") -> dict[str, Any]:
    return {"coin": "BTC", "px": "100.0", "sz": sz, "side": "B", "time": 1, "oid": oid, "tid": tid, "hash": "0x0", "crossed": False}


def tracker(clock: list[float] | None = None) -> tuple[OrderTracker, list[OrderEvent]]:
    events: list[OrderEvent] = []
    now = clock if clock is not None else [0.0]
    return OrderTracker(events.append, hold_seconds=2.0, clock=lambda: now[0]), events


def kinds(events: list[OrderEvent]) -> list[tuple[str, int]]:
    return [(e.kind, e.oid) for e in events]


def test_modify_is_one_modified_event() -> None:
    t, events = tracker()
    t.on_order_updates([status(1, "open", "0xc1")])
    t.on_order_updates([status(1, "canceled", "0xc1"), status(2, "open", "0xc1", sz="2.0"), status(3, "canceled", "0xc3")])
    assert kinds(events) == [("open", 1), ("modified", 2), ("canceled", 3)]
    modified = events[1]
    assert modified.prev_oid == 1 and modified.cloid == "0xc1" and modified.order["sz"] == "2.0"
    assert set(t.open_orders) == {2}
    # open before canceled in the message: still one event; no cloid: a cancel and an open
    t.on_order_updates([status(4, "open", "0xc1"), status(2, "canceled", "0xc1")])
    t.on_order_updates([status(5, "canceled"), status(6, "open")])
    assert kinds(events)[3:] == [("modified", 4), ("canceled", 5), ("open", 6)]
    assert events[3].prev_oid == 2 and set(t.open_orders) == {4, 6}


def test_fill_before_open_is_delivered_after_it() -> None:
    t, events = tracker()
    t.on_order_updates([status(1, "open", "0xc1")])
    t.on_user_fills({"user": USER, "fills": [fill(2, 10)]})  # replacement's fill races ahead
    assert events == [events[0]]  # held
    t.on_order_updates([status(1, "canceled", "0xc1"), status(2, "open", "0xc1")])
    assert kinds(events) == [("open", 1), ("modified", 2), ("fill", 2)]
    # an IOC taker: fill first, then its final status; the fill comes before "filled"
    t.on_user_fills({"user": USER, "fills": [fill(7, 11)]})
    t.on_order_updates([status(7, "filled")])
    assert kinds(events)[3:] == [("fill", 7), ("filled", 7)]


def test_held_fill_of_an_older_order_is_released_after_the_hold() -> None:
    clock = [0.0]
    t, events = tracker(clock)
    t.on_user_fills({"user": USER, "fills": [fill(42, 1)]})
    t.flush_expired()
    assert events == []
    clock[0] = 2.5
    t.flush_expired()
    assert kinds(events) == [("fill", 42)]
    t.on_user_fills({"user": USER, "fills": [fill(42, 2)]})  # now known: straight through
    assert kinds(events) == [("fill", 42), ("fill", 42)]


def test_duplicate_fills_emitted_once_and_fifo_bound() -> None:
    t, events = tracker()
    t.on_order_updates([status(1, "open")])
    t.on_user_fills({"isSnapshot": True, "user": USER, "fills": [fill(1, 1)]})  # initial snapshot: history, recorded only
    t.on_user_fills({"user": USER, "fills": [fill(1, 2), fill(1, 3)]})
    t.on_user_fills({"isSnapshot": True, "user": USER, "fills": [fill(1, 1), fill(1, 2), fill(1, 3), fill(1, 4)]})  # after a reconnect
    assert [e.fill["tid"] for e in events if e.kind == "fill"] == [2, 3, 4]
    assert t.duplicates == 3
    fifo = FifoSet(3)
    assert all(fifo.add(k) for k in range(5)) and len(fifo) == 3 and 0 not in fifo and 4 in fifo
    assert not fifo.add(4)


def test_tracker_over_websocket_reconnect_emits_each_fill_once() -> None:
    async def main() -> None:
        history: list[dict[str, Any]] = [fill(1, 100)]

        async def on_subscribe(conn: FakeConnection, s: dict[str, Any]) -> None:
            if s["type"] == "userFills":  # like the public API: a snapshot of recent fills first
                await conn.send({"channel": "userFills", "data": {"isSnapshot": True, "user": USER, "fills": list(history)}})

        server = await FakeServer(on_subscribe=on_subscribe).start()
        events: list[OrderEvent] = []
        t = OrderTracker(events.append, hold_seconds=0.5)
        async with HLClient(server.url, **FAST) as client:
            ids = await t.subscribe(client, USER)
            for sid in ids:
                await client.wait_active(sid, 5)
            await server.publish({"type": "orderUpdates", "user": USER}, [status(1, "open", "0xa")])
            await server.publish({"type": "orderUpdates", "user": USER}, [status(1, "canceled", "0xa"), status(2, "open", "0xa")])
            history.append(fill(2, 101))
            await server.publish({"type": "userFills", "user": USER}, {"user": USER, "fills": [fill(2, 101)]})
            await until(lambda: len(events) == 3)
            await server.stop(abort=True)
            history.append(fill(2, 102))  # happens while we are away
            await server.start()
            await until(lambda: all(client.get_subscription(i)["state"] == "active" for i in ids), what="resubscribed")
            await until(lambda: len(events) == 4)
            await asyncio.sleep(0.2)
            assert kinds(events) == [("open", 1), ("modified", 2), ("fill", 2), ("fill", 2)]
            assert [e.fill["tid"] for e in events if e.fill] == [101, 102]
            assert t.duplicates == 2  # 100 and 101 again in the second snapshot
            assert client.get_subscription(ids[1])["reconnects"] == 1
            await t.close()
        await server.stop()

    run(main())

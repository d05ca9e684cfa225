"""Order tracker: cancel-replace folding, fills before their open, dedup across reconnects."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hlbook.client import HLClient, OrderEvent, OrderTracker
from hlbook.client.orders import RECONCILED_CLOSED, RECONCILED_OPEN, FifoSet
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


def tracker(clock: list[float] | None = None, **options: Any) -> tuple[OrderTracker, list[OrderEvent]]:
    events: list[OrderEvent] = []
    now = clock if clock is not None else [0.0]
    return OrderTracker(events.append, **{"hold_seconds": 2.0, "clock": lambda: now[0], **options}), events


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


def test_orders_placed_and_modified_in_one_block() -> None:
    """One message: an order placed then modified (open X, canceled X, open Y), and a chain of two
    modifies (canceled A, open B, canceled B, open C): each cancel goes with the open after it."""
    t, events = tracker()
    t.on_order_updates([status(1, "open", "0xc1"), status(1, "canceled", "0xc1"), status(2, "open", "0xc1")])
    assert kinds(events) == [("open", 1), ("modified", 2)] and events[1].prev_oid == 1
    t.on_order_updates([status(2, "canceled", "0xc1"), status(3, "open", "0xc1"), status(3, "canceled", "0xc1"),
                        status(4, "open", "0xc1")])
    assert kinds(events)[2:] == [("modified", 3), ("modified", 4)] and [e.prev_oid for e in events[2:]] == [2, 3]
    assert set(t.open_orders) == {4}


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
    assert t.counts.duplicates == 3
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
            assert t.counts.duplicates == 2  # 100 and 101 again in the second snapshot
            assert client.subscription_metrics(ids[1])["reconnects"] == 1
            await t.close()
        await server.stop()

    run(main())


def test_known_orders_are_the_resting_ones_not_a_fifo_of_the_last_oids() -> None:
    t, events = tracker(dedup_size=3)
    t.on_order_updates([status(1, "open")])
    for oid in range(100, 110):  # ten newer orders, more than dedup_size
        t.on_order_updates([status(oid, "open")])
        t.on_order_updates([status(oid, "canceled")])
    t.on_user_fills({"user": USER, "fills": [fill(1, 50)]})
    assert kinds(events)[-1] == ("fill", 1) and t.metrics()["holding"] == 0  # still resting: not held


def test_resting_orders_from_frontend_open_orders_are_known() -> None:
    t, events = tracker()
    t.on_user_fills({"user": USER, "fills": [fill(5, 1)]})  # before the load: held
    t.on_order_updates([status(6, "open")])
    t.on_order_updates([status(6, "canceled")])  # closed before the load answered
    resting = [status(oid, "open")["order"] for oid in (5, 6, 7)]
    t.add_open_orders(resting)
    assert sorted(t.open_orders) == [5, 7]  # 6 closed meanwhile
    t.on_user_fills({"user": USER, "fills": [fill(7, 2)]})  # an order older than the tracker: at once
    assert kinds(events) == [("open", 6), ("canceled", 6), ("fill", 5), ("fill", 7)]
    m = t.metrics()
    assert (m["held"], m["released_on_status"], m["released_on_expiry"], m["open_orders_loaded"], m["open_orders"]) == (1, 1, 0, 3, 2)


def test_hold_metrics_status_expiry_overflow() -> None:
    clock = [0.0]
    t, events = tracker(clock, hold_seconds=1.0, max_held=2)
    t.on_user_fills({"user": USER, "fills": [fill(1, 1), fill(2, 2)]})
    t.on_order_updates([status(1, "open")])
    clock[0] = 0.5
    t.on_user_fills({"user": USER, "fills": [fill(3, 3), fill(4, 4)]})  # 3 held pushes 2 out
    clock[0] = 1.6
    t.flush_expired()  # 3 and 4 waited 1.1 s
    assert [e.oid for e in events if e.kind == "fill"] == [1, 2, 3, 4]
    m = t.metrics()
    assert (m["held"], m["released_on_status"], m["released_on_overflow"], m["released_on_expiry"], m["holding"], m["fills"]) == (4, 1, 1, 2, 0, 4)
    t.on_user_fills({"user": USER, "fills": [fill(3, 5)]})  # its hold expired once: not held again
    assert t.metrics()["holding"] == 0 and events[-1].oid == 3


def test_modify_legs_in_separate_messages() -> None:
    clock = [0.0]
    t, events = tracker(clock)
    t.on_order_updates([status(1, "open", "0xa"), status(10, "open"), status(20, "open"), status(30, "open", "0xd")])
    # open first, with a cloid: recognised without a marker; the late cancel is stale
    t.on_order_updates([status(2, "open", "0xa")])
    t.on_order_updates([status(1, "canceled", "0xa")])
    # cancel first: only a marked order's cancel waits for its replacement (cloid, else the declared oid)
    t.expect_modify(10, new_oid=11)
    t.on_order_updates([status(10, "canceled")])
    t.on_order_updates([status(11, "open")])
    t.expect_modify(20, new_oid=21)
    t.on_order_updates([status(20, "canceled"), status(21, "open")])  # no cloid, one message
    assert kinds(events)[4:] == [("modified", 2), ("modified", 11), ("modified", 21)]
    assert [e.prev_oid for e in events[4:]] == [1, 10, 20] and sorted(t.open_orders) == [2, 11, 21, 30]
    # a marked order whose replacement never comes is canceled after the hold
    t.expect_modify(30)
    t.on_order_updates([status(30, "canceled", "0xd")])
    assert kinds(events)[-1] == ("modified", 21)
    clock[0] = 2.5
    t.flush_expired()
    assert kinds(events)[-1] == ("canceled", 30)
    # unmarked, cancel first: a cancel and an open (documented)
    t.on_order_updates([status(2, "canceled", "0xa")])
    t.on_order_updates([status(3, "open", "0xa")])
    assert kinds(events)[-2:] == [("canceled", 2), ("open", 3)]
    m = t.metrics()
    assert (m["modifies"], m["suppressed_cancels"], m["pending_modifies"], m["held_cancels"]) == (3, 3, 0, 0)


def test_self_trade_fills_share_a_tid_and_dedup_is_bounded() -> None:
    t, events = tracker(dedup_size=2)
    t.on_order_updates([status(1, "open"), status(2, "open")])
    t.on_user_fills({"user": USER, "fills": [fill(1, 7), fill(2, 7), fill(1, 7)]})  # both sides, then a duplicate
    assert [(e.oid, e.fill["tid"]) for e in events if e.fill] == [(1, 7), (2, 7)] and t.counts.duplicates == 1
    t.on_user_fills({"user": USER, "fills": [fill(1, 8), fill(1, 9), fill(1, 7)]})  # (7, 1) forgotten: only 2 remembered
    assert [e.fill["tid"] for e in events if e.fill][2:] == [8, 9, 7]


def test_second_tracker_of_a_user_gets_its_own_snapshot_and_the_outage_fill() -> None:
    async def main() -> None:
        history: list[dict[str, Any]] = [fill(1, 100)]

        async def on_subscribe(conn: FakeConnection, s: dict[str, Any]) -> None:
            if s["type"] == "userFills":
                await conn.send({"channel": "userFills", "data": {"isSnapshot": True, "user": USER, "fills": list(history)}})

        server = await FakeServer(on_subscribe=on_subscribe, on_info=lambda p: [status(1, "open")["order"]]).start()
        first: list[OrderEvent] = []
        second: list[OrderEvent] = []
        a = OrderTracker(first.append, hold_seconds=0.5)
        b = OrderTracker(second.append, hold_seconds=0.5)
        async with HLClient(server.url, **FAST) as client:
            await a.subscribe(client, USER)
            await a.wait_ready(5)
            history.append(fill(1, 101))
            await server.publish({"type": "userFills", "user": USER}, {"user": USER, "fills": [fill(1, 101)]})
            await until(lambda: len(first) == 1)
            await b.subscribe(client, USER)
            await b.wait_ready(5)
            await until(lambda: b.counts.snapshots == 1, what="the second tracker's own snapshot")
            assert second == [] and a.counts.duplicates == 2  # history for b; already seen by a
            await server.stop(abort=True)
            history.append(fill(1, 102))  # while both are away
            await server.start()
            await until(lambda: len(first) == 2 and len(second) == 1)
            await asyncio.sleep(0.2)
            assert [e.fill["tid"] for e in first] == [101, 102] and [e.fill["tid"] for e in second] == [102]
            assert client.get_subscription(a.sub_ids[1])["connection"] == client.get_subscription(a.sub_ids[0])["connection"]
            await a.close()
            await b.close()
        await server.stop()

    run(main())


def test_tracker_over_websocket_loads_resting_orders_and_folds_a_split_modify() -> None:
    async def main() -> None:
        resting = [status(1, "open", "0xa")["order"]]
        server = await FakeServer(on_info=lambda p: resting if p == {"type": "frontendOpenOrders", "user": USER} else None).start()
        events: list[OrderEvent] = []
        t = OrderTracker(events.append, hold_seconds=5.0)
        async with HLClient(server.url, **FAST) as client:
            await t.subscribe(client, USER)
            await t.wait_ready(5)
            assert t.counts.open_orders_loaded == 1 and t.load_error is None
            updates = {"type": "orderUpdates", "user": USER}
            await server.publish({"type": "userFills", "user": USER}, {"user": USER, "fills": [fill(1, 1)]})
            t.expect_modify(1)
            await server.publish(updates, [status(1, "canceled", "0xa")])
            await server.publish(updates, [status(2, "open", "0xa")])
            await until(lambda: len(events) == 2)
            await asyncio.sleep(0.1)
            assert kinds(events) == [("fill", 1), ("modified", 2)] and t.metrics()["held"] == 0
            assert len(client.connection_info()) == 1  # the info request went over the user's connection
            await t.close()
        await server.stop()

    run(main())


def test_tracker_without_info_support_says_so() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        t = OrderTracker()
        async with HLClient(server.url, **FAST) as client:
            await t.subscribe(client, USER)
            await t.wait_ready(5)
            assert "answers no info requests" in (t.load_error or "") and t.counts.open_orders_loaded is None
            await t.close()
        await server.stop()

    run(main())


def test_a_raising_handler_is_counted_and_loses_nothing() -> None:
    """``on_event`` raising on the first of three opens left the other two unapplied, and
    the hold timer died with the handler's exception (a held fill stayed held)."""
    t, events = tracker()
    calls: list[OrderEvent] = []

    def flaky(event: OrderEvent) -> None:
        calls.append(event)
        if len(calls) == 1:
            raise RuntimeError("a bug in the program")
        events.append(event)

    t.on_event = flaky
    t.on_order_updates([status(1, "open"), status(2, "open"), status(3, "open")])
    assert set(t.open_orders) == {1, 2, 3} and kinds(events) == [("open", 2), ("open", 3)]
    assert t.metrics()["handler_errors"] == 1

    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            live = OrderTracker(lambda e: 1 / 0, hold_seconds=0.2, load_open_orders=False)
            fills_sub = {"type": "userFills", "user": USER}
            ids = await live.subscribe(client, USER)
            await client.wait_active(ids[1], 5)
            await server.publish(fills_sub, {"user": USER, "isSnapshot": True, "fills": []})
            await server.publish(fills_sub, {"user": USER, "fills": [fill(70, 1), fill(71, 2)]})  # two unknown orders: held
            await until(lambda: live.counts.held == 2, what="both fills held")
            await until(lambda: live.counts.released_on_expiry == 2, what="both released by the timer")
            assert live.metrics()["handler_errors"] == 2
            got: list[Any] = []
            bad = await client.subscribe({"type": "trades", "coin": "BTC"}, lambda m: got.append(m) or 1 / 0)
            await client.wait_active(bad, 5)
            for tid in range(2):
                await server.publish({"type": "trades", "coin": "BTC"}, [{"coin": "BTC", "tid": tid}])
            await until(lambda: len(got) == 2)
            assert client.subscription_metrics(bad)["callback_errors"] == 2
            await live.close()
        await server.stop()

    run(main())


def test_any_awaitable_result_of_a_handler_is_awaited() -> None:
    """A lambda returning a coroutine, or an object with an async ``__call__``, was never
    awaited (7 messages delivered, the handler ran 0 times)."""
    ran: list[Any] = []

    async def record(item: Any) -> None:
        await asyncio.sleep(0)
        ran.append(item)

    class AsyncCall:
        async def __call__(self, message: dict[str, Any]) -> None:
            await record(("call", message["data"][0]["tid"]))

    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            subs = [{"type": "trades", "coin": c} for c in ("BTC", "ETH")]
            ids = [await client.subscribe(subs[0], lambda m: record(("lambda", m["data"][0]["tid"]))),
                   await client.subscribe(subs[1], AsyncCall())]
            for sid in ids:
                await client.wait_active(sid, 5)
            for tid in range(3):
                for sub in subs:
                    await server.publish(sub, [{"coin": sub["coin"], "tid": tid}])
            t = OrderTracker(lambda e: record(("tracker", e.oid)))
            t.on_order_updates([status(1, "open"), status(2, "open")])
            await until(lambda: len(ran) == 8, what="every handler awaited")
        await server.stop()
        assert [x for x in ran if x[0] == "lambda"] == [("lambda", i) for i in range(3)]  # in order
        assert [x for x in ran if x[0] == "call"] == [("call", i) for i in range(3)]
        assert [x for x in ran if x[0] == "tracker"] == [("tracker", 1), ("tracker", 2)]

    run(main())


def test_reconcile_after_a_gap_closes_and_opens_what_changed_unseen() -> None:
    """What rests after a gap (frontendOpenOrders) against what the tracker holds: closed and
    opened orders are emitted with a reason; an order with a status since the gap is left as it says."""
    t, events = tracker()
    t.on_order_updates([status(1, "open"), status(2, "open"), status(3, "open")])
    t._since_gap = set()  # as after a gap: statuses from here on are fresher than any reload
    t.on_order_updates([status(4, "open"), status(3, "canceled")])
    del events[:]
    t.reconcile([status(2, "open")["order"], status(3, "open")["order"], status(5, "open")["order"]])
    assert [(e.kind, e.oid, e.reason) for e in events] == [("closed", 1, RECONCILED_CLOSED), ("open", 5, RECONCILED_OPEN)]
    assert set(t.open_orders) == {2, 4, 5} and t.counts.reconciles == 1 and t.counts.reconciled == 2


def test_expect_modify_pairs_by_identity_never_by_coin_and_side() -> None:
    """Without a cloid the oldest marked order of the coin and side was taken: a rejected modify
    of 10 plus a new quote 11 gave ``modified 11<-10``; a modify 10->12 whose new quote 11
    opened first reported 11 as the replacement and 12 as new."""
    clock = [0.0]
    t, events = tracker(clock)
    t.on_order_updates([status(10, "open")])
    with pytest.raises(ValueError, match="new_oid"):
        t.expect_modify(10)  # no identity: refused rather than guessed
    t.expect_modify(10, new_oid=12)
    t.on_order_updates([status(10, "canceled")])
    t.on_order_updates([status(11, "open")])  # another quote of the same coin and side
    t.on_order_updates([status(12, "open")])
    assert [(e.kind, e.oid, e.prev_oid) for e in events[1:]] == [("open", 11, None), ("modified", 12, 10)]

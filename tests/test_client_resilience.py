"""Client resilience against FakeServer: giving up is not forever, no reconnect
storm, reuse after close, and every per-subscription and per-connection metric."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

import orjson
import pytest

from hlbook.client import ClientClosed, ConnectionLost, HLClient, OrderTracker, SubscriptionError
from hlbook.client.metrics import SubscriptionMetrics
from hlbook.client.testing import FakeServer
from test_client import FAST, run, until

TRADES = {"type": "trades", "coin": "BTC"}


async def free_url() -> tuple[str, int]:
    probe = await FakeServer().start()
    await probe.stop()
    return probe.url, probe.port


def test_same_feed_after_max_attempts_works_once_the_server_is_back() -> None:
    async def main() -> None:
        url, port = await free_url()
        async with HLClient(url, **{**FAST, "max_attempts": 3}) as client:
            old = await client.subscribe(TRADES)
            with pytest.raises(SubscriptionError, match="connection failed"):
                await client.wait_active(old, 5)
            server = await FakeServer(port).start()
            got: list[dict] = []
            again = await client.subscribe(TRADES, got.append)
            await client.wait_active(again, 5)
            await server.publish(TRADES, [{"coin": "BTC", "tid": 1}])
            await until(lambda: len(got) == 1)
            assert client.get_subscription(old)["state"] == "failed"  # the old one keeps its error
            assert [(c["state"], c["subscriptions"]) for c in client.connection_info()] == [("open", 1)]  # the failed one is gone
        await server.stop()

    run(main())


def test_same_feed_after_refused_retries_works_once_the_server_takes_it() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **{**FAST, "ack_timeout": 0.2, "refused_retries": 2}) as client:
            first = await client.subscribe(TRADES)
            await client.wait_active(first, 5)
            server.refused_coins.add("BTC")  # a restarted server that does not know BTC yet
            await server.stop(abort=True)
            await server.start()
            await until(lambda: client.get_subscription(first)["state"] == "failed", what="refused for good")
            assert server.subscribe_requests == 1 + 3  # the first, then refused once and retried twice
            server.refused_coins.discard("BTC")
            got: list[dict] = []
            again = await client.subscribe(TRADES, got.append)
            await client.wait_active(again, 5)
            await server.publish(TRADES, [{"coin": "BTC", "tid": 1}])
            await until(lambda: len(got) == 1)
        await server.stop()

    run(main())


def test_a_server_that_drops_each_upgrade_is_backed_off_and_given_up() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        server.drop_new = True
        async with HLClient(server.url, **{**FAST, "max_attempts": 3}) as client:
            sid = await client.subscribe(TRADES)
            with pytest.raises(SubscriptionError, match="closed after"):
                await client.wait_active(sid, 5)
            assert server.total_connections == 3 and client.connection_info()[0]["state"] == "failed"
        async with HLClient(server.url, **{**FAST, "backoff_base": 0.05, "backoff_cap": 10.0}) as client:
            await client.subscribe(TRADES)
            await asyncio.sleep(1.5)
            upgrades = server.total_connections - 3
            assert 2 <= upgrades <= 9  # growing waits (the fixed 0-50 ms wait made ~60)
            assert client.connection_metrics(1)["attempt"] >= upgrades - 1  # short sessions count as failed attempts
        await server.stop()

    run(main())


def test_reuse_after_close() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        client = HLClient(server.url, **FAST)
        sid = await client.subscribe(TRADES)
        await client.wait_active(sid, 5)
        await client.close()
        assert client.get_subscription(sid) is None and client.connection_info() == []
        got: list[dict] = []
        again = await client.subscribe(TRADES, got.append)
        await client.wait_active(again, 5)
        await server.publish(TRADES, [{"coin": "BTC", "tid": 7}])
        await until(lambda: len(got) == 1)
        await client.close()
        await server.stop()

    run(main())


def test_subscription_metrics_each_field() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            await client.connect(5)
            before = time.time()
            sid = await client.subscribe(TRADES, queue_size=2)
            after = time.time()
            await client.wait_active(sid, 5)
            sent = time.time()
            for tid in range(3):
                await server.publish(TRADES, [{"coin": "BTC", "tid": tid}])
            await until(lambda: client.subscription_metrics(sid)["message_count"] == 3)
            m = client.subscription_metrics(sid)
            assert before <= m["subscribed_at"] <= after
            assert sent <= m["last_message_at"] <= time.time()
            assert m["messages_per_minute"] == 3.0  # not 3·60/uptime: a young subscription is not extrapolated
            assert m["messages_last_minute"] == 3
            assert 0 < m["uptime_seconds"] < time.time() - before + 0.01
            assert m["reconnects"] == 0 and m["dropped"] == 1  # queue of 2, nobody reading
            assert client.subscription_metrics(999) is None
        await server.stop()

    run(main())


def test_rates_over_time_with_a_clock() -> None:
    now = [1000.0]
    m = SubscriptionMetrics(clock=lambda: now[0])
    m.record()
    now[0] += 0.05
    assert m.messages_per_minute() == 1.0 and m.uptime_seconds() == pytest.approx(0.05)
    for _ in range(59):
        now[0] += 2.0  # one message every 2 s for ~2 minutes
        m.record()
    assert m.messages_per_minute() == pytest.approx(60 * 60 / (0.05 + 118))  # the lifetime average: ~30/min
    assert m.messages_last_minute() == 30
    now[0] += 61
    assert m.messages_last_minute() == 0 and m.message_count == 60


def test_connection_metrics_each_field() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            sid = await client.subscribe(TRADES, lambda m: None)
            await client.wait_active(sid, 5)
            await server.publish(TRADES, [{"coin": "BTC", "tid": 1}])
            await server.connections[0].send({"channel": "trades", "data": [{"coin": "ETH", "tid": 1}]})  # nobody's
            await until(lambda: client.connection_metrics(1)["ping_rtt"] is not None, what="a pong")
            m = client.connection_metrics(1)
            assert m["connects"] == 1 and m["reconnects"] == 0 and m["attempt"] == 0
            assert 0 < m["uptime_seconds"] < 5 and 0 <= m["last_message_age"] < 1 and 0 < m["ping_rtt"] < 1
            assert m["messages_received"] >= 4  # ack, two trades, a pong
            assert m["unrouted_messages"] == 1
            await server.stop(abort=True)
            await server.start()
            await client.wait_active(sid, 5)
            await until(lambda: client.connection_metrics(1)["attempt"] == 0)
            m = client.connection_metrics(1)
            assert m["connects"] == 2 and m["reconnects"] == 1 and m["uptime_seconds"] < 5
            info = client.connection_info()[0]
            assert info["strategy"] == "shared" and info["state"] == "open" and info["subscriptions"] == info["active_subscriptions"] == 1
            assert client.connection_metrics(999) is None
        await server.stop()

    run(main())


def test_close_ends_every_waiter_with_a_clear_error() -> None:
    """3 s after ``close()``, ``wait_active()`` and ``tracker.wait_ready()`` were still pending;
    closing while ``frontendOpenOrders`` was in flight killed the load task with a KeyError."""
    user = "0x" + "ef" * 20

    async def main() -> None:
        url, _ = await free_url()  # nobody listens: nothing is ever acknowledged
        client = HLClient(url, **FAST)
        sid = await client.subscribe(TRADES)
        tracker = OrderTracker()
        await tracker.subscribe(client, user)
        waiters = [asyncio.create_task(client.wait_active(sid)), asyncio.create_task(tracker.wait_ready())]
        await asyncio.sleep(0.2)
        await client.close()
        for waiter in waiters:
            with pytest.raises(ClientClosed, match="client closed"):
                await asyncio.wait_for(waiter, 1)
        await tracker.close()

        server = await FakeServer(on_info=lambda payload: []).start()
        client = HLClient(server.url, **FAST)
        tracker = OrderTracker()
        await tracker.subscribe(client, user)
        await client.wait_active(tracker.sub_ids[0], 5)
        server.silence_current()  # the open-orders request stays in flight
        await asyncio.sleep(0.3)
        assert not tracker.ready.is_set()
        waiter = asyncio.create_task(tracker.wait_ready())
        await client.close()
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(waiter, 1)
        assert all(t.done() and t.exception() is None for t in tracker._tasks[1:])  # the load task ended cleanly
        await tracker.close()
        closing = OrderTracker()
        waiting = asyncio.create_task(closing.wait_ready())
        await asyncio.sleep(0)
        await closing.close()
        with pytest.raises(ClientClosed, match="order tracker closed"):
            await asyncio.wait_for(waiting, 1)
        await server.stop()

    run(main())


def test_a_big_message_on_a_slow_link_is_traffic_not_a_dead_connection() -> None:
    """A 2 MB message through a link of ~250 kB/s takes ~8 s; the pong queued behind it comes
    late. The bytes arriving meanwhile say the link lives: one connection throughout (before,
    the pong timeout cut it again and again and the message never arrived)."""

    async def main() -> None:
        server = await FakeServer().start()
        port = int(server.url.rsplit(":", 1)[1].split("/")[0])

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, slow: bool) -> None:
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                while data := await reader.read(25_000 if slow else 65_536):
                    writer.write(data)
                    await writer.drain()
                    if slow:
                        await asyncio.sleep(0.1)  # ~250 kB/s towards the client
            writer.close()

        async def link(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
            await asyncio.gather(pipe(client_r, server_w, False), pipe(server_r, client_w, True))

        proxy = await asyncio.start_server(link, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{proxy.sockets[0].getsockname()[1]}/ws"
        sub = {"type": "trades", "coin": "ETH"}
        got: list[Any] = []
        async with HLClient(url, **{**FAST, "ping_interval": 0.3, "pong_timeout": 1.0}) as client:
            sid = await client.subscribe(sub, lambda m: got.append(m))
            await client.wait_active(sid, 5)
            big = [{"coin": "ETH", "side": "B", "px": "1.0", "sz": "1.0", "hash": "0x" + os.urandom(32).hex(), "time": i, "tid": i,
                    "users": ["0x" + os.urandom(20).hex(), "0x" + os.urandom(20).hex()]} for i in range(12_000)]  # ~2 MB, ~1 MB deflated
            await server.publish(sub, big)
            await until(lambda: bool(got), 20, "the big message")
            conn = client.connection_info()[0]
            assert client.connection_metrics(conn["id"])["connects"] == 1, "the connection was declared dead"
        proxy.close()
        await server.stop()

    run(main(), timeout=40)


def test_a_connect_answered_429_is_said_counted_and_given_up(caplog: pytest.LogCaptureFixture) -> None:
    """Following more users than the server's per-address cap: those past it stayed pending
    forever on HTTP 429. Now each 429 is logged and counted, and after ``limited_retries``
    the connection gives up: its subscriptions fail with the reason, ``connect()`` says it."""
    users = [f"0x{n:040x}" for n in range(1, 5)]

    async def main() -> None:
        server = await FakeServer().start()
        server.max_connections = 2
        async with HLClient(server.url, **{**FAST, "limited_retries": 1}) as client:
            ids = [await client.subscribe({"type": "orderUpdates", "user": u}, strategy="user_grouped") for u in users]
            results = await asyncio.gather(*(client.wait_active(s, 5) for s in ids), return_exceptions=True)
            failed = [r for r in results if r is not None]
            assert len(failed) == 2 and all(isinstance(r, SubscriptionError) and "HTTP 429" in str(r) for r in failed)
            states = sorted(c["state"] for c in client.connection_info())
            assert states == ["failed", "failed", "open", "open"]
            limited = [client.connection_metrics(c["id"])["limited"] for c in client.connection_info() if c["state"] == "failed"]
            assert limited == [2, 2] and client.stats["connections_limited"] == 4 == server.limited
            async with HLClient(server.url, **FAST) as other:
                with pytest.raises(ConnectionError, match="HTTP 429"):
                    await other.connect(timeout=5)
        await server.stop()

    with caplog.at_level("WARNING", logger="hlbook.client"):
        run(main())
    said = [r.getMessage() for r in caplog.records if "HTTP 429" in r.getMessage()]
    assert len([m for m in said if "per-address cap" in m]) >= 4


def test_next_message_fails_on_disconnect_when_asked() -> None:
    """A waiter for a subscription's next message waited across the reconnect. With
    ``fail_on_disconnect=True`` it gets ``ConnectionLost`` at the drop (and at once while the
    connection is down), as ccxt.pro's ``watch*`` calls do; without, it gets the next message
    after the reconnect. Unsubscribe and close end waiters too."""
    trade = lambda tid: [{"coin": "BTC", "tid": tid}]  # noqa: E731

    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            sid = await client.subscribe(TRADES, lambda m: None)  # with a callback too
            await client.wait_active(sid, 5)
            waiter = asyncio.create_task(client.next_message(sid, fail_on_disconnect=True))
            await asyncio.sleep(0.05)
            await server.publish(TRADES, trade(1))
            assert (await asyncio.wait_for(waiter, 2))["data"] == trade(1)

            failing = asyncio.create_task(client.next_message(sid, fail_on_disconnect=True))
            patient = asyncio.create_task(client.next_message(sid))
            await asyncio.sleep(0.05)
            await server.stop(abort=True)
            with pytest.raises(ConnectionLost, match="connection 1 lost"):
                await asyncio.wait_for(failing, 3)
            with pytest.raises(ConnectionLost, match="not back yet"):
                await client.next_message(sid, fail_on_disconnect=True)
            assert not patient.done()
            await server.start()
            await client.wait_active(sid, 5)
            await server.publish(TRADES, trade(2))
            assert (await asyncio.wait_for(patient, 3))["data"] == trade(2)
            with pytest.raises(TimeoutError):
                await client.next_message(sid, timeout=0.1)

            gone = asyncio.create_task(client.next_message(sid))
            await asyncio.sleep(0.05)
            await client.unsubscribe(sid)
            with pytest.raises(SubscriptionError, match="unsubscribed"):
                await asyncio.wait_for(gone, 1)
            other = await client.subscribe({"type": "trades", "coin": "ETH"})
            last = asyncio.create_task(client.next_message(other))
            await asyncio.sleep(0.05)
        with pytest.raises(ClientClosed):
            await asyncio.wait_for(last, 1)
        await server.stop()

    run(main())


def test_metrics_lists_every_subscription_and_connection_in_one_call() -> None:
    """One call for every subscription's metrics (with what it is) and every connection's,
    plus the client's own counters; plain data (JSON as it is)."""
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            assert client.metrics()["subscriptions"] == [] and client.metrics()["connections"] == []
            a = await client.subscribe(TRADES, lambda m: None)
            b = await client.subscribe({"type": "bbo", "coin": "ETH"})
            d = await client.subscribe({"type": "l4Book", "coin": "BTC"}, lambda m: None, strategy="dedicated")
            for sid in (a, b, d):
                await client.wait_active(sid, 5)
            for tid in range(3):
                await server.publish(TRADES, [{"coin": "BTC", "tid": tid}])
            await server.publish({"type": "bbo", "coin": "ETH"}, {"coin": "ETH", "time": 1, "bbo": [None, None]})
            await until(lambda: client.subscription_metrics(b)["message_count"] == 1 and client.subscription_metrics(a)["message_count"] == 3)
            metrics = client.metrics()
            subs = {s["id"]: s for s in metrics["subscriptions"]}
            assert [subs[s]["message_count"] for s in (a, b, d)] == [3, 1, 0]
            assert (subs[d]["strategy"], subs[d]["subscription"], subs[a]["state"]) == ("dedicated", {"type": "l4Book", "coin": "BTC"}, "active")
            assert set(subs[a]) == set(client.subscription_metrics(a)) | set(client.get_subscription(a))
            conns = {c["id"]: c for c in metrics["connections"]}
            shared, dedicated = conns[subs[a]["connection"]], conns[subs[d]["connection"]]
            assert (shared["strategy"], shared["subscriptions"], dedicated["strategy"]) == ("shared", 2, "dedicated")
            assert shared["messages_received"] >= 4 and dedicated["connects"] == 1
            assert set(shared) == set(client.connection_metrics(shared["id"])) | set(client.connection_info()[0])
            assert metrics["client"] == {"subscriptions": 3, "connections": 2, "max_connections": 90, "connections_limited": 0,
                                         "users_past_cap": 0, "refused_past_cap": 0}
            assert orjson.loads(orjson.dumps(metrics))["client"] == metrics["client"]
        await server.stop()

    run(main())

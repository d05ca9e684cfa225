"""Client connection manager and registry against a real WebSocket server (FakeServer)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hlbook.client import HLClient, SubscriptionError, backoff_delay
from hlbook.client.connection import RateLimiter
from hlbook.client.registry import identity, message_route_key, route_key
from hlbook.client.testing import FakeServer

FAST = {"ping_interval": 0.2, "pong_timeout": 1.5, "ack_timeout": 1.0, "backoff_base": 0.02, "backoff_cap": 0.2, "open_timeout": 2.0, "stable_after": 0.3}


def run(coro: Awaitable[Any], timeout: float = 20) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def l2(coin: str, px: str = "100.0") -> dict[str, Any]:
    return {"coin": coin, "time": 1, "levels": [[{"px": px, "sz": "1.0", "n": 1}], [{"px": "101.0", "sz": "2.0", "n": 1}]]}


def test_route_keys_of_every_channel() -> None:
    assert message_route_key("l2Book", l2("BTC")) == route_key({"type": "l2Book", "coin": "BTC", "nSigFigs": 5})
    assert message_route_key("trades", [{"coin": "ETH"}]) == route_key({"type": "trades", "coin": "ETH"})
    assert message_route_key("trades", []) is None
    assert message_route_key("bbo", {"coin": "@1"}) == route_key({"type": "bbo", "coin": "@1"}) != route_key({"type": "bbo", "coin": "@10"})
    assert message_route_key("candle", {"s": "BTC", "i": "1m"}) == route_key({"type": "candle", "coin": "BTC", "interval": "1m"})
    assert message_route_key("userFills", {"user": "0xAB"}) == route_key({"type": "userFills", "user": "0xab"})
    assert message_route_key("user", {"fills": []}) == route_key({"type": "userEvents", "user": "0x1"})
    assert message_route_key("l4Book", {"Updates": {}}) == route_key({"type": "l4Book", "coin": "BTC"})
    assert identity({"type": "l2Book", "coin": "BTC", "nSigFigs": None}) == identity({"coin": "BTC", "type": "l2Book"})


def test_backoff_full_jitter_bounds() -> None:
    rng = random.Random(1)
    for attempt, high in [(0, 0.25), (1, 0.5), (3, 2.0), (7, 30.0), (50, 30.0)]:
        delays = [backoff_delay(attempt, 0.25, 30.0, rng) for _ in range(200)]
        assert all(0 <= d <= high for d in delays)
        assert max(delays) > high * 0.8  # full jitter spans the range
        assert min(delays) < high * 0.2


def test_rate_limiter_paces_a_burst() -> None:
    async def main() -> float:
        limiter = RateLimiter(5, window=0.3)
        start = time.monotonic()
        for _ in range(11):
            await limiter.acquire()
        return time.monotonic() - start

    assert run(main()) >= 0.6


def test_routes_by_key_shares_duplicates_and_counts() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        got: dict[str, list[Any]] = {"a": [], "b": [], "c": [], "t": []}
        async with HLClient(server.url, **FAST) as client:
            a = await client.subscribe({"type": "l2Book", "coin": "BTC"}, got["a"].append)
            b = await client.subscribe({"type": "l2Book", "coin": "BTC", "nSigFigs": None}, got["b"].append)
            c = await client.subscribe({"type": "l2Book", "coin": "ETH"}, got["c"].append)
            t = await client.subscribe({"type": "trades", "coin": "BTC"}, got["t"].append)
            for sid in (a, b, c, t):
                await client.wait_active(sid, 5)
            assert server.subscribe_requests == 3  # the duplicate shares the server subscription
            await server.publish({"type": "l2Book", "coin": "BTC"}, l2("BTC"))
            await server.publish({"type": "l2Book", "coin": "ETH"}, l2("ETH"))
            await server.publish({"type": "trades", "coin": "BTC"}, [{"coin": "BTC", "tid": 1}])
            await until(lambda: len(got["t"]) == 1 and len(got["c"]) == 1 and len(got["a"]) == 1)
            assert got["a"] == got["b"] == [{"channel": "l2Book", "data": l2("BTC")}]
            assert got["c"][0]["data"]["coin"] == "ETH"
            info, metrics = client.get_subscription(a), client.subscription_metrics(a)
            assert metrics is not None and metrics["message_count"] == 1 and metrics["messages_last_minute"] == 1
            assert info is not None and metrics["reconnects"] == 0 and info["state"] == "active" and info["shared_with"] == [b]
            assert {s["id"] for s in client.list_subscriptions()} == {a, b, c, t}
            assert await client.unsubscribe(a)
            assert len(server.connections[0].subscriptions) == 3  # b still holds it
            assert await client.unsubscribe(b)
            await until(lambda: len(server.connections[0].subscriptions) == 2, what="unsubscribe")
            assert client.get_subscription(a) is None
        await server.stop()

    run(main())


def test_iterator_and_refused_subscription() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            sid = await client.subscribe({"type": "trades", "coin": "SOL"})
            await client.wait_active(sid, 5)
            for tid in range(3):
                await server.publish({"type": "trades", "coin": "SOL"}, [{"coin": "SOL", "tid": tid}])
            received = []
            async for message in client.messages(sid):
                received.append(message["data"][0]["tid"])
                if len(received) == 3:
                    break
            assert received == [0, 1, 2]
            bad = await client.subscribe({"type": "trades", "coin": "INVALID"})
            with pytest.raises(SubscriptionError, match="Invalid subscription"):
                await client.wait_active(bad, 5)
            with pytest.raises(SubscriptionError):
                async for _ in client.messages(bad):
                    pass
        await server.stop()

    run(main())


def test_server_restart_reconnects_resubscribes_and_counts_one_reconnect() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        got: list[Any] = []
        async with HLClient(server.url, **FAST) as client:
            sid = await client.subscribe({"type": "bbo", "coin": "BTC"}, got.append)
            other = await client.subscribe({"type": "trades", "coin": "ETH"}, lambda m: None)
            await client.wait_active(sid, 5)
            await client.wait_active(other, 5)
            await server.publish({"type": "bbo", "coin": "BTC"}, {"coin": "BTC", "time": 1, "bbo": [None, None]})
            await until(lambda: len(got) == 1)
            await server.stop(abort=True)  # like kill -9
            await until(lambda: client.connection_info()[0]["state"] != "open", what="drop noticed")
            assert client.get_subscription(sid)["state"] == "pending"
            await asyncio.sleep(0.3)  # a few failed attempts while it is down
            assert client.connection_metrics(1)["attempt"] >= 1
            await server.start()
            await client.wait_active(sid, 5)
            await client.wait_active(other, 5)
            await server.publish({"type": "bbo", "coin": "BTC"}, {"coin": "BTC", "time": 2, "bbo": [None, None]})
            await until(lambda: len(got) == 2)
            assert [m["data"]["time"] for m in got] == [1, 2]
            metrics = client.subscription_metrics(sid)
            assert metrics["reconnects"] == 1 and metrics["message_count"] == 2
            assert client.connection_info()[0]["state"] == "open" and client.connection_metrics(1)["reconnects"] == 1
            await until(lambda: client.connection_metrics(1)["attempt"] == 0, what="the count reset by a stable session")
            assert len(server.connections) == 1 and len(server.connections[0].subscriptions) == 2
        await server.stop()

    run(main())


def test_missing_pong_triggers_reconnect() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            sid = await client.subscribe({"type": "allMids"}, lambda m: None)
            await client.wait_active(sid, 5)
            server.silence_current()  # stops answering, pings included; the socket stays open
            await until(lambda: server.total_connections >= 2, timeout=8, what="reconnect after missing pong")
            assert "pong" in (client.connection_info()[0]["last_error"] or "")
            await until(lambda: client.get_subscription(sid)["state"] == "active", what="resubscribed")
            assert client.subscription_metrics(sid)["reconnects"] == 1
            await until(lambda: client.connection_metrics(1)["ping_rtt"] is not None, what="pong answered")
        await server.stop()

    run(main())


def test_1500_subscriptions_over_two_connections() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        got: list[str] = []
        async with HLClient(server.url, **{**FAST, "ping_interval": 5}) as client:
            ids = [await client.subscribe({"type": "trades", "coin": f"C{i}"}, lambda m: got.append(m["data"][0]["coin"])) for i in range(1500)]
            await asyncio.gather(*(client.wait_active(i, 15) for i in ids))
            conns = client.connection_info()
            assert sorted(c["subscriptions"] for c in conns) == [500, 1000]
            assert sorted(len(c.subscriptions) for c in server.connections) == [500, 1000]
            for coin in ("C0", "C999", "C1000", "C1499"):
                await server.publish({"type": "trades", "coin": coin}, [{"coin": coin, "tid": 1}])
            await until(lambda: len(got) == 4)
            assert sorted(got) == sorted(["C0", "C999", "C1000", "C1499"])
        await server.stop()

    run(main(), timeout=40)


def test_aggregations_of_one_coin_use_separate_connections() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        full: list[Any] = []
        agg: list[Any] = []
        async with HLClient(server.url, **FAST) as client:
            a = await client.subscribe({"type": "l2Book", "coin": "BTC"}, full.append)
            b = await client.subscribe({"type": "l2Book", "coin": "BTC", "nSigFigs": 2}, agg.append)
            await client.wait_active(a, 5)
            await client.wait_active(b, 5)
            assert len(client.connection_info()) == 2
            await server.publish({"type": "l2Book", "coin": "BTC", "nSigFigs": 2}, l2("BTC", "1000.0"))
            await server.publish({"type": "l2Book", "coin": "BTC"}, l2("BTC", "100.5"))
            await until(lambda: len(full) == 1 and len(agg) == 1)
            assert agg[0]["data"]["levels"][0][0]["px"] == "1000.0"
            assert full[0]["data"]["levels"][0][0]["px"] == "100.5"
            await client.unsubscribe(b)
            assert len(client.connection_info()) == 1  # the emptied extra connection is closed
        await server.stop()

    run(main())


def test_refused_connect_is_a_connection_error_at_once_and_a_stable_session_resets_the_count() -> None:
    async def main() -> None:
        probe = await FakeServer().start()
        port = probe.port
        await probe.stop()
        async with HLClient(f"ws://127.0.0.1:{port}/ws", **{**FAST, "open_timeout": 10.0}) as client:
            start = time.monotonic()
            with pytest.raises(ConnectionError, match="Connect"):  # ConnectionRefusedError, not a bare timeout
                await client.connect()
            assert time.monotonic() - start < 1.0
            await until(lambda: client.connection_metrics(1)["attempt"] >= 2, what="failed attempts")
            server = await FakeServer(port).start()
            await client.connect(timeout=5)
            assert client.connection_metrics(1)["attempt"] >= 2  # not yet: the session has to prove stable
            await until(lambda: client.connection_metrics(1)["attempt"] == 0, what="the count reset by a stable session")
            assert client.connection_metrics(1)["reconnects"] == 0
            await server.stop()

    run(main())


def test_max_attempts_gives_up() -> None:
    async def main() -> None:
        probe = await FakeServer().start()
        url = probe.url
        await probe.stop()
        async with HLClient(url, **{**FAST, "max_attempts": 3}) as client:
            sid = await client.subscribe({"type": "allMids"})
            with pytest.raises(SubscriptionError, match="connection failed"):
                await client.wait_active(sid, 5)
            assert client.connection_info()[0]["state"] == "failed"

    run(main())


def test_unacknowledged_subscribe_is_sent_again() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            await client.connect(5)
            server.connections[0].silent = True  # swallows the first subscribe
            sid = await client.subscribe({"type": "trades", "coin": "BTC"}, lambda m: None)
            await asyncio.sleep(0.1)
            server.connections[0].silent = False
            await client.wait_active(sid, 5)
            assert server.subscribe_requests == 1 and server.connections[0].received >= 2
            assert client.connection_metrics(1)["reconnects"] == 0
        await server.stop()

    run(main())


def test_invalid_url_fails_fast() -> None:
    async def main() -> None:
        async with HLClient("http://nowhere", **FAST) as client:
            sid = await client.subscribe({"type": "allMids"})
            with pytest.raises(SubscriptionError, match="invalid URL"):
                await client.wait_active(sid, 5)

    run(main())


def test_info_post_over_the_websocket() -> None:
    def on_info(payload: dict[str, Any]) -> Any:
        if payload["type"] == "allMids":
            return {"BTC": "81307.0"}
        raise ValueError(f"unknown info type {payload['type']}")

    async def main() -> None:
        server = await FakeServer(on_info=on_info).start()
        async with HLClient(server.url, **FAST) as client:
            answer = await client.info({"type": "allMids"})
            assert answer == {"type": "allMids", "data": {"BTC": "81307.0"}}
            with pytest.raises(RuntimeError, match="unknown info type"):
                await client.info({"type": "nope"})
        await server.stop()

    run(main())


def test_async_callback_in_order_and_bounded_iterator_drops_oldest() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        seen: list[int] = []

        async def slow(message: dict[str, Any]) -> None:
            await asyncio.sleep(0.01)
            seen.append(message["data"][0]["tid"])

        async with HLClient(server.url, **FAST) as client:
            a = await client.subscribe({"type": "trades", "coin": "A"}, slow)
            b = await client.subscribe({"type": "trades", "coin": "B"}, queue_size=3)
            await client.wait_active(a, 5)
            await client.wait_active(b, 5)
            for tid in range(10):
                await server.publish({"type": "trades", "coin": "A"}, [{"coin": "A", "tid": tid}])
                await server.publish({"type": "trades", "coin": "B"}, [{"coin": "B", "tid": tid}])
            await until(lambda: len(seen) == 10)
            assert seen == list(range(10))
            assert client.subscription_metrics(b)["dropped"] == 7
            got = []
            async for message in client.messages(b):
                got.append(message["data"][0]["tid"])
                if len(got) == 3:
                    break
            assert got == [7, 8, 9]
            assert await client.unsubscribe(b) and client.get_subscription(b) is None
            assert not await client.unsubscribe(b)
        await server.stop()

    run(main())


def test_resubscription_after_restart_is_paced_under_the_message_limit() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        limit, window = 10, 0.5
        async with HLClient(server.url, **{**FAST, "ping_interval": 5, "max_messages_per_minute": limit, "rate_window": window}) as client:
            ids = [await client.subscribe({"type": "trades", "coin": f"C{i}"}, lambda m: None) for i in range(25)]
            await asyncio.gather(*(client.wait_active(i, 10) for i in ids))
            await server.stop(abort=True)
            await server.start()
            start = time.monotonic()
            await asyncio.gather(*(client.wait_active(i, 10) for i in ids))
            assert time.monotonic() - start >= 2 * window  # 25 subscribes at 10 per window
            stamps = server.connections[0].received_at
            assert len(stamps) >= 25
            for i in range(len(stamps) - limit):
                assert stamps[i + limit] - stamps[i] >= window * 0.8, "more than the limit in one window"
        await server.stop()

    run(main())

"""One stream of typed events (``HLClient.events()``) and the feed models, against FakeServer."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from hlbook.client import Ack, Connected, Data, Disconnected, Dropped, Error, Event, Gap, HLClient
from hlbook.client.models import (
    AllMids,
    Bbo,
    Candle,
    L2Book,
    L4Snapshot,
    L4Updates,
    Level,
    OrderUpdate,
    Trade,
    UserFills,
    typed,
)
from hlbook.client.testing import FakeServer
from test_client import FAST, l2, run, until

BOOK = {"type": "l2Book", "coin": "BTC"}


async def take(stream: Any, n: int, timeout: float = 5.0) -> list[Event]:
    return [await asyncio.wait_for(anext(stream), timeout) for _ in range(n)]


def test_events_of_a_session_a_restart_and_a_refusal() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            stream = client.events()
            sid = await client.subscribe(BOOK, queue_size=0)  # read through events() only
            await client.wait_active(sid, 5)
            await server.publish(BOOK, l2("BTC"))
            connected, ack, data = await take(stream, 3)
            assert connected == Connected(1, reconnect=False) and ack == Ack(sid, 1, resumed=False)
            assert isinstance(data, Data) and data.sub_id == sid and data.channel == "l2Book"
            assert data.data == L2Book("BTC", 1, ((Level("100.0", "1.0", 1),), (Level("101.0", "2.0", 1),)))
            assert data.raw == {"channel": "l2Book", "data": l2("BTC")}  # the raw dict still there

            await server.stop(abort=True)
            await server.start()
            await client.wait_active(sid, 5)
            events = [await asyncio.wait_for(anext(stream), 5)]
            while not isinstance(events[-1], Gap):
                events.append(await asyncio.wait_for(anext(stream), 5))
            assert isinstance(events[0], Disconnected) and events[0].retrying and events[0].connection == 1
            *back, gap = [e for e in events if not isinstance(e, Disconnected)]  # one per failed attempt
            assert back == [Connected(1, reconnect=True), Ack(sid, 1, resumed=True)]
            assert gap.sub_id == sid and gap.connection == 1 and 0 < gap.until - gap.since < 5

            bad = await client.subscribe({"type": "trades", "coin": "INVALID"}, queue_size=0)
            (refused,) = await take(stream, 1)
            assert refused == Error(refused.text, 1, bad) and refused.text.startswith("Invalid subscription")
            await server.connections[0].send({"channel": "error", "data": "something went wrong"})
            (text,) = await take(stream, 1)
            assert text == Error("something went wrong", 1, None)
            with pytest.raises(ValueError, match="without a callback and with a queue"):
                async for _ in client.messages(sid):
                    pass
        assert [e async for e in stream] == []  # ends when the client closes
        await server.stop()

    run(main())


def test_a_bounded_stream_reports_what_it_dropped_and_streams_can_be_closed() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            sid = await client.subscribe({"type": "trades", "coin": "BTC"}, lambda m: None)
            await client.wait_active(sid, 5)
            async with client.events(size=2) as small:
                for tid in range(5):
                    await server.publish({"type": "trades", "coin": "BTC"}, [{"coin": "BTC", "side": "B", "px": "1.0", "sz": "1.0", "time": 1, "tid": tid}])
                await until(lambda: client.subscription_metrics(sid)["message_count"] == 5)
                first, *rest = await take(small, 3)
                assert first == Dropped(3)
                assert [e.data[0].tid for e in rest] == [3, 4] and isinstance(rest[0].data[0], Trade)
            assert [e async for e in small] == []  # closed on leaving ``async with``
            assert not client.bus.active
            forgotten = client.events()
            assert client.bus.active
            del forgotten
            gc.collect()
            assert not client.bus.active  # a stream its program dropped costs nothing
        await server.stop()

    run(main())


def test_typed_models_of_each_feed() -> None:
    level = {"px": "81307.0", "sz": "0.5", "n": 2}
    assert typed("bbo", {"coin": "BTC", "time": 5, "bbo": [None, level]}) == Bbo("BTC", 5, (None, Level("81307.0", "0.5", 2)))
    assert typed("allMids", {"mids": {"BTC": "81307.0"}}) == AllMids({"BTC": "81307.0"})
    candle = {"t": 1, "T": 2, "s": "BTC", "i": "1m", "o": "1.0", "c": "2.0", "h": "3.0", "l": "0.5", "v": "10.0", "n": 4}
    assert typed("candle", candle) == Candle(**candle)
    fill = {"coin": "BTC", "px": "1.0", "sz": "2.0", "side": "B", "time": 3, "oid": 7, "tid": 9, "hash": "0x0", "crossed": True, "fee": "0.1", "feeToken": "USDC", "builderFee": "0"}
    fills = typed("userFills", {"isSnapshot": True, "user": "0xab", "fills": [fill]})
    assert isinstance(fills, UserFills) and fills.isSnapshot and fills.fills[0].tid == 9 and fills.fills[0].crossed
    order = {"coin": "BTC", "side": "A", "limitPx": "2.0", "sz": "1.0", "oid": 7, "timestamp": 3, "origSz": "1.0", "cloid": "0xc"}
    (update,) = typed("orderUpdates", [{"order": order, "status": "open", "statusTimestamp": 4}])
    assert isinstance(update, OrderUpdate) and update.order.cloid == "0xc" and update.status == "open"
    snap = typed("l4Book", {"Snapshot": {"coin": "BTC", "time": 1, "height": 10, "levels": [[{**order, "user": "0xab"}], []]}})
    assert isinstance(snap, L4Snapshot) and snap.height == 10 and snap.levels[0][0].user == "0xab"
    updates = typed("l4Book", {"Updates": {"time": 1, "height": 11, "order_statuses": [], "book_diffs": [{"oid": 7, "raw_book_diff": "remove"}]}})
    assert isinstance(updates, L4Updates) and updates.book_diffs[0]["raw_book_diff"] == "remove"
    # no model, or a message that does not fit its model: as received
    assert typed("webData2", {"x": 1}) == {"x": 1}
    assert typed("l2Book", {"coin": "BTC"}) == {"coin": "BTC"}


def test_invalid_sizes_are_refused_at_the_call_and_a_failing_stream_kills_nothing() -> None:
    """``events(size=0)`` used to kill the connection's task for good (IndexError in the publish path)."""
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            for size in (0, -1, 1.5):
                with pytest.raises(ValueError, match="size"):
                    client.events(size=size)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="queue_size"):
                await client.subscribe(BOOK, queue_size=-1)
            got: list[Any] = []
            sid = await client.subscribe(BOOK, got.append)
            await client.wait_active(sid, 5)
            broken = client.events()
            broken.put = lambda event: 1 / 0  # type: ignore[method-assignment]
            for _ in range(2):
                await server.publish(BOOK, l2("BTC"))
            await until(lambda: len(got) == 2, what="both messages despite a failing stream")
            assert client.connection_info()[0]["state"] == "open"
            del broken.put  # mended, so that it ends with the client
        await server.stop()

    run(main())

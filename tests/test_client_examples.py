"""The examples in examples/ run against a real WebSocket server."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from hlbook.client.testing import FakeConnection, FakeServer
from test_client import run
from test_client_books import TruthBook
from test_client_orders import USER, fill, status

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def feed(server: FakeServer, sub: dict[str, Any], make: Any, n: int) -> None:
    for _ in range(n):
        await server.publish(sub, make())
        await asyncio.sleep(0.05)


def test_subscribe_metrics_example(capsys: Any) -> None:
    async def main() -> list[dict]:
        server = await FakeServer().start()
        task = asyncio.create_task(load("subscribe_metrics").main(server.url, ["BTC"], 1.0, every=0.5))
        await asyncio.sleep(0.2)
        await feed(server, {"type": "trades", "coin": "BTC"}, lambda: [{"coin": "BTC", "tid": 1}], 5)
        subs = await task
        await server.stop()
        return subs

    subs = run(main())
    counts = {s["subscription"]["type"]: s["message_count"] for s in subs}
    assert counts == {"l2Book": 0, "trades": 5, "bbo": 0}
    assert "reconnects=0" in capsys.readouterr().out


def test_local_l4_book_example(capsys: Any) -> None:
    truth = TruthBook("BTC")

    async def on_subscribe(conn: FakeConnection, s: dict[str, Any]) -> None:
        await conn.send({"channel": "l4Book", "data": truth.snapshot()})

    async def main() -> Any:
        server = await FakeServer(on_subscribe=on_subscribe).start()
        task = asyncio.create_task(load("local_l4_book").main(server.url, "BTC", 1.0))
        await asyncio.sleep(0.2)
        await feed(server, {"type": "l4Book", "coin": "BTC"}, truth.block, 10)
        book = await task
        await server.stop()
        return book

    book = run(main())
    assert book.height == truth.height and book.fingerprint() == truth.fingerprint()
    assert "first in queue" in capsys.readouterr().out


def test_order_tracker_example(capsys: Any) -> None:
    async def main() -> Any:
        server = await FakeServer().start()
        task = asyncio.create_task(load("order_tracker").main(server.url, USER, 1.0))
        await asyncio.sleep(0.3)
        await server.publish({"type": "orderUpdates", "user": USER}, [status(1, "open", "0xa")])
        await server.publish({"type": "userFills", "user": USER}, {"user": USER, "fills": [fill(2, 5)]})
        await server.publish({"type": "orderUpdates", "user": USER}, [status(1, "canceled", "0xa"), status(2, "open", "0xa")])
        tracker = await task
        await server.stop()
        return tracker

    tracker = run(main())
    out = capsys.readouterr().out
    assert "modified  oid=1 -> 2" in out and out.index("modified") < out.index("fill ")
    assert "canceled" not in out and sorted(tracker.open_orders) == [2]

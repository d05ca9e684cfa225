"""``hlbook client``: JSON lines and tables, across a server restart."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from pathlib import Path

import pytest

from hlbook.client.cli import parse_params, url_problem, watch
from hlbook.client.testing import FakeServer
from test_client import run, until

HLBOOK = str(Path(sys.executable).with_name("hlbook"))


def test_parse_params() -> None:
    assert parse_params("l2Book", ["coin=BTC", "nSigFigs=5", "mantissa=2"]) == {"type": "l2Book", "coin": "BTC", "nSigFigs": 5, "mantissa": 2}
    assert parse_params("userFills", ["user=0xAB", "aggregateByTime=true"]) == {"type": "userFills", "user": "0xAB", "aggregateByTime": True}
    assert parse_params("trades", ["coin=@107"]) == {"type": "trades", "coin": "@107"}
    assert parse_params("l2Book", ["BTC", "nSigFigs=5"]) == {"type": "l2Book", "coin": "BTC", "nSigFigs": 5}  # a bare coin
    assert parse_params("orderUpdates", ["0xab"]) == {"type": "orderUpdates", "user": "0xab"}
    with pytest.raises(ValueError):
        parse_params("trades", ["coin=BTC", "ETH"])


def test_l2_table_output() -> None:
    async def main() -> str:
        server = await FakeServer().start()
        out = io.StringIO()
        task = asyncio.create_task(watch({"type": "l2Book", "coin": "BTC"}, server.url, count=1, out=out))
        sub = {"type": "l2Book", "coin": "BTC"}
        await until(lambda: bool(server.subscribers(sub)))
        levels = [[{"px": "81307.0", "sz": "0.5", "n": 2}], [{"px": "81308.0", "sz": "1.25", "n": 1}]]
        await server.publish(sub, {"coin": "BTC", "time": 7, "levels": levels})
        assert await task == 1
        await server.stop()
        return out.getvalue()

    table = run(main())
    assert "BTC" in table and "81307.0" in table and "81308.0" in table and "1.25" in table


def test_cli_json_lines_survive_a_server_restart() -> None:
    async def main() -> list[dict]:
        server = await FakeServer().start()
        sub = {"type": "trades", "coin": "ETH"}
        proc = await asyncio.create_subprocess_exec(
            HLBOOK, "client", "trades", "coin=ETH", "--json", "--count", "4", "--url", server.url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        sent = 0

        async def feed(n: int) -> None:
            nonlocal sent
            while n:
                if await server.publish(sub, [{"coin": "ETH", "side": "B", "px": "1.0", "sz": "1.0", "hash": "0x0", "time": sent, "tid": sent, "users": ["a", "b"]}]):
                    sent += 1
                    n -= 1
                await asyncio.sleep(0.05)

        await feed(2)
        await server.stop(abort=True)
        await asyncio.sleep(0.3)
        await server.start()
        await feed(2)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
        await server.stop()
        assert proc.returncode == 0, err.decode()
        assert b"reconnecting" in err
        return [json.loads(line) for line in out.decode().splitlines()]

    lines = run(main(), timeout=30)
    assert [m["data"][0]["tid"] for m in lines] == [0, 1, 2, 3]
    assert all(m["channel"] == "trades" for m in lines)


def test_wrong_urls_and_counts_are_refused_before_connecting() -> None:
    assert url_problem("ws://127.0.0.1:8000/ws") is None and url_problem("wss://api.hyperliquid.xyz/ws") is None
    assert "ws://127.0.0.1:8000/ws" in (url_problem("http://127.0.0.1:8000/") or "")
    assert "wss://h/ws" in (url_problem("https://h") or "")
    assert "/ws" in (url_problem("ws://127.0.0.1:8000") or "") and url_problem("127.0.0.1:8000")
    assert "integer" in (url_problem("ws://127.0.0.1:notaport/ws") or "")
    import subprocess

    for flags, said in ((["--url", "ws://127.0.0.1:8000"], "no path"), (["--url", "http://127.0.0.1:8000/ws"], "HTTP URL"),
                        (["--count", "0"], "--count")):
        proc = subprocess.run([HLBOOK, "client", "trades", "BTC", *flags], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and said in proc.stderr, (flags, proc.stderr)


def test_a_connection_that_gives_up_ends_the_watch() -> None:
    from hlbook.client.cli import WatchError

    with pytest.raises(WatchError, match="gave up"):  # the port is no number: the connection gives up at once
        run(watch({"type": "trades", "coin": "BTC"}, "ws://127.0.0.1:notaport/ws", out=io.StringIO()), timeout=10)

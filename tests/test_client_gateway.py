"""The client against the real gateway (`hlbook up --simulate`: simulator, ingest,
two shards, gateway as real processes), not FakeServer: a SIGKILLed and
restarted gateway, a SIGSTOPped one (pong timeout), 1,500 subscriptions over
two connections, and an L4Book repairing a forced gap and ending equal to the
simulator's own fileSnapshot."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from conftest import free_port
from hlbook.client import HLClient, L4Book
from hlbook.client.books import canon
from hlbook.services.book import snapshot
from pipeline import Up, http_get, post_info, running, stop_group
from test_client import FAST, run, until

Fingerprint = tuple[list[tuple[int, str, str, str]], ...]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(tmp_path_factory.mktemp("client_gateway"), shards=2, coins=16) as up:
        yield up


def recorder(store: dict[int, list[dict[str, Any]]], key: int) -> Callable[[dict[str, Any]], None]:
    store[key] = []
    return store[key].append


def test_gateway_killed_and_restarted_on_the_same_port(up: Up) -> None:
    """SIGKILL the gateway, start it again on the same port: the client reconnects,
    resubscribes, delivers again, and counts exactly one reconnect."""
    port = free_port()
    gateway = up.start_gateway(port)

    async def main() -> None:
        async with HLClient(f"ws://127.0.0.1:{port}/ws", **FAST) as client:
            got: dict[int, list[dict[str, Any]]] = {}
            subs = [{"type": "l2Book", "coin": "BTC"}, {"type": "trades", "coin": "BTC"}, {"type": "l2Book", "coin": "ETH"}]
            ids = [await client.subscribe(sub, recorder(got, i)) for i, sub in enumerate(subs)]
            for sub_id in ids:
                await client.wait_active(sub_id, 5)
            await until(lambda: all(got[i] for i in range(len(subs))), 10, "messages before the kill")

            os.kill(gateway.pid, signal.SIGKILL)
            await asyncio.to_thread(gateway.wait, 5)
            await until(lambda: client.connection_info()[0]["state"] != "open", 5, "the drop to be noticed")
            before = [len(got[i]) for i in range(len(subs))]
            restarted = await asyncio.to_thread(up.start_gateway, port)
            await until(lambda: all(len(got[i]) > before[i] for i in range(len(subs))), 15, "messages after the restart")

            assert [client.get_subscription(s)["state"] for s in ids] == ["active"] * len(ids)
            assert [client.get_subscription(s)["reconnects"] for s in ids] == [1] * len(ids)
            (conn,) = client.connection_info()
            assert conn["connects"] == 2 and conn["reconnects"] == 1 and conn["unrouted_messages"] == 0
            assert got[0][-1]["channel"] == "l2Book" and got[0][-1]["data"]["coin"] == "BTC"
            assert got[1][-1]["channel"] == "trades" and {t["coin"] for t in got[1][-1]["data"]} == {"BTC"}
            assert got[2][-1]["data"]["coin"] == "ETH"
        stop_group(restarted)

    run(main(), timeout=40)


def start_blind_gateway(up: Up, port: int) -> subprocess.Popen[bytes]:
    """A gateway whose shards never answer: it serves WebSockets but knows no coin
    yet, like a restarted gateway before the shards' first block reaches it."""
    nowhere = up.tmp / "nowhere"
    args = ["--shards", "2", "--ingest-pub", f"ipc://{nowhere}/ingest-pub"]
    for k in range(2):
        args += ["--book-pub", f"ipc://{nowhere}/book-{k}-pub", "--book-query", f"ipc://{nowhere}/book-{k}-query"]
    proc = subprocess.Popen([sys.executable, "-m", "hlbook.cli", "gateway", "--port", str(port), *args],
                            stdout=up.log, stderr=subprocess.STDOUT, start_new_session=True)
    up.extra.append(proc)
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, f"blind gateway exited with {proc.returncode}"
        try:
            if http_get(f"http://127.0.0.1:{port}/health")[0] == 200:
                return proc
        except OSError:
            pass
        assert time.monotonic() < deadline, "blind gateway never answered /health"
        time.sleep(0.1)


def test_restarted_gateway_refuses_connections_until_it_knows_its_coins(up: Up) -> None:
    """A restarted gateway that has not heard from its shards yet refuses the
    handshake (it would refuse valid subscriptions); the client keeps the
    subscription pending, retries, and resumes once a gateway that knows the coin answers."""
    port = free_port()
    gateway = up.start_gateway(port)

    async def main() -> None:
        async with HLClient(f"ws://127.0.0.1:{port}/ws", **FAST) as client:
            got: list[dict[str, Any]] = []
            sub_id = await client.subscribe({"type": "l2Book", "coin": "BTC"}, got.append)
            await client.wait_active(sub_id, 5)
            await until(lambda: bool(got), 10, "messages before the kill")
            os.kill(gateway.pid, signal.SIGKILL)
            await asyncio.to_thread(gateway.wait, 5)

            blind = await asyncio.to_thread(start_blind_gateway, up, port)
            await until(lambda: "503" in (client.connection_info()[0]["last_error"] or ""), 10, "the refused handshake")
            assert not client.connection_info()[0]["recent_server_errors"]
            assert client.get_subscription(sub_id)["state"] == "pending" and client.get_subscription(sub_id)["error"] is None
            before = len(got)
            os.kill(blind.pid, signal.SIGKILL)
            await asyncio.to_thread(blind.wait, 5)

            restarted = await asyncio.to_thread(up.start_gateway, port)
            await until(lambda: client.get_subscription(sub_id)["state"] == "active" and len(got) > before, 15, "messages after the restart")
            assert client.get_subscription(sub_id)["reconnects"] == 1
            assert client.connection_info()[0]["reconnects"] >= 1
            assert got[-1]["data"]["coin"] == "BTC"
        stop_group(restarted)

    run(main(), timeout=40)


def test_stopped_gateway_is_detected_by_the_pong_timeout(up: Up) -> None:
    """SIGSTOP the gateway (its sockets stay open, nothing answers) until the client
    declares the connection dead for want of a pong, then SIGCONT: it reconnects
    and delivers again."""
    port = free_port()
    gateway = up.start_gateway(port)
    settings = {**FAST, "ping_interval": 0.2, "pong_timeout": 1.0, "open_timeout": 1.0}

    async def main() -> None:
        async with HLClient(f"ws://127.0.0.1:{port}/ws", **settings) as client:
            got: list[dict[str, Any]] = []
            sub_id = await client.subscribe({"type": "l2Book", "coin": "BTC"}, got.append)
            await client.wait_active(sub_id, 5)
            await until(lambda: bool(got) and client.connection_info()[0]["ping_rtt"] is not None, 10, "messages and a pong")

            os.kill(gateway.pid, signal.SIGSTOP)
            try:
                await until(lambda: "no pong" in (client.connection_info()[0]["last_error"] or ""), 5, "the pong timeout")
                stalled = len(got)
            finally:
                os.kill(gateway.pid, signal.SIGCONT)
            await until(lambda: client.get_subscription(sub_id)["state"] == "active" and len(got) > stalled, 15, "messages after SIGCONT")
            (conn,) = client.connection_info()
            assert conn["reconnects"] >= 1 and conn["state"] == "open"
            assert client.get_subscription(sub_id)["reconnects"] >= 1
            assert got[-1]["data"]["coin"] == "BTC"

    try:
        run(main(), timeout=40)
    finally:
        os.kill(gateway.pid, signal.SIGCONT)
        stop_group(gateway)


def test_1500_subscriptions_over_two_connections(up: Up) -> None:
    """1,500 subscriptions (the gateway allows 1,000 per connection): the client opens
    a second connection, every one is acknowledged and messages reach the right one.

    Made of distinct route keys: every feed of every coin, every candle interval,
    and userFills of many users (a coin's l2Book with several ``nLevels`` would
    need a connection each, as the message does not echo the aggregation)."""
    status, mids = post_info(up.http, {"type": "allMids"})
    assert status == 200
    coins = sorted(mids)
    assert len(coins) == 16
    intervals = ["1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "8h", "12h", "1d", "3d", "1w", "1M"]
    with tempfile.TemporaryDirectory() as tmp:
        _, books = snapshot.load(snapshot.fetch(up.sim_info, timeout=10, directory=tmp))
    makers = Counter(o["user"] for book in books.values() for side in book.l4_levels() for o in side)
    active = [user for user, _ in makers.most_common(20)]  # these trade: their live fills arrive too
    subs: list[dict[str, Any]] = [{"type": kind, "coin": coin} for coin in coins for kind in ("l2Book", "trades", "bbo")]
    subs += [{"type": "candle", "coin": coin, "interval": i} for coin in coins for i in intervals]
    idle = (f"0x{n:040x}" for n in range(1, 10**6))
    while len(subs) < 1500 - len(active):
        user = next(idle)
        if user not in makers:
            subs.append({"type": "userFills", "user": user})
    subs += [{"type": "userFills", "user": user} for user in active]  # last: on the second connection
    assert len(subs) == 1500

    async def main() -> None:
        async with HLClient(up.ws, **{**FAST, "ping_interval": 5.0, "pong_timeout": 5.0}) as client:
            got: dict[int, list[dict[str, Any]]] = {}
            ids = [await client.subscribe(sub, recorder(got, i)) for i, sub in enumerate(subs)]
            await asyncio.gather(*(client.wait_active(s, 20) for s in ids))
            assert {client.get_subscription(s)["state"] for s in ids} == {"active"}
            conns = client.connection_info()
            assert [(c["subscriptions"], c["active_subscriptions"]) for c in conns] == [(1000, 1000), (500, 500)]
            assert [client.get_subscription(s)["connection"] for s in ids] == [conns[0]["id"]] * 1000 + [conns[1]["id"]] * 500

            users = [i for i, sub in enumerate(subs) if sub["type"] == "userFills"]
            await until(lambda: all(got[i] for i in users), 10, "every userFills snapshot")
            await until(lambda: any(len(got[i]) > 1 for i in users[-len(active):]), 15, "live fills of an active user")
            await until(lambda: all(got[i] for i, sub in enumerate(subs) if sub["type"] == "l2Book"), 10, "every coin's l2Book")

            for i, sub in enumerate(subs):
                for m in got[i]:
                    kind, data = sub["type"], m["data"]
                    assert m["channel"] == kind, (sub, m)
                    if kind in ("l2Book", "bbo"):
                        assert data["coin"] == sub["coin"], (sub, m)
                    elif kind == "trades":
                        assert {t["coin"] for t in data} == {sub["coin"]}, (sub, m)
                    elif kind == "candle":
                        assert (data["s"], data["i"]) == (sub["coin"], sub["interval"]), (sub, m)
                    else:
                        assert data["user"] == sub["user"], (sub, m)
                if sub["type"] == "userFills":
                    assert got[i][0]["data"]["isSnapshot"] is True and all(not m["data"].get("isSnapshot") for m in got[i][1:])
            assert sum(1 for i in users if len(got[i]) > 1) >= 1
            assert [c["unrouted_messages"] for c in client.connection_info()] == [0, 0]

    run(main(), timeout=60)


def test_l4_book_repairs_a_forced_gap_and_equals_the_simulator(up: Up) -> None:
    """One Updates message is lost on the way into the L4Book: the gap is detected,
    a fresh snapshot repairs it (one resync), and the book at the height of a
    fileSnapshot the simulator writes afterwards equals that snapshot order by order."""
    coin = "BTC"
    history: dict[int, Fingerprint] = {}
    lost: list[int] = []

    def record(book: L4Book) -> None:
        if book.resyncs == 1 and book.height is not None:  # the state after the repair
            history[book.height] = book.fingerprint()

    book = L4Book(coin, on_update=record)
    applied = 0

    def lossy(message: dict[str, Any]) -> bool:
        nonlocal applied
        updates = message["data"].get("Updates")
        if not lost and updates and updates["book_diffs"] and applied >= 5:
            lost.append(updates["height"])  # dropped: never reaches the book
            return False
        applied += 1
        return L4Book.handle(book, message)

    book.handle = lossy  # type: ignore[method-assign]  # L4Book.subscribe registers self.handle

    async def main() -> None:
        async with HLClient(up.ws, **FAST) as client:
            sub_id = await book.subscribe(client)
            await client.wait_active(sub_id, 5)
            await until(lambda: bool(lost), 10, "an Updates message to drop")
            await until(lambda: book.resyncs == 1 and book.synced, 10, "the repair")
            assert book.last_desync == f"height gap: {lost[0] - 1} -> {lost[0] + 1}"
            with tempfile.TemporaryDirectory() as tmp:
                truth_height, books = await asyncio.to_thread(lambda: snapshot.load(snapshot.fetch(up.sim_info, timeout=10, directory=tmp)))
            await until(lambda: book.height is not None and book.height >= truth_height, 10, "the snapshot's height")
            assert book.resyncs == 1 and min(history) <= truth_height  # repaired before the truth was taken
            levels = books[coin].l4_levels()
            truth = tuple([(o["oid"], o["user"], canon(Decimal(o["limitPx"])), canon(Decimal(o["sz"]))) for o in side] for side in levels)
            assert sum(map(len, truth)) > 50
            assert [o["side"] for o in levels[0]] == ["B"] * len(levels[0]) and [o["side"] for o in levels[1]] == ["A"] * len(levels[1])
            assert history[truth_height] == truth  # (oid, user, px, sz) per side, best level first, time priority within
            assert client.get_subscription(sub_id)["reconnects"] == 0

    run(main(), timeout=40)

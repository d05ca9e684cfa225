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
from hlbook.client import (
    Ack,
    Connected,
    Data,
    Disconnected,
    Event,
    EventStream,
    Gap,
    HLClient,
    L4Book,
    OrderEvent,
    OrderTracker,
    SubscriptionError,
)
from hlbook.client.books import canon
from hlbook.client.models import L2Book, Trade
from hlbook.client.orders import RECONCILED_CLOSED, RECONCILED_OPEN, is_terminal
from hlbook.services.book import snapshot
from pipeline import Up, http_get, post_info, running, stop_group
from test_client import FAST, run, until

Fingerprint = tuple[list[tuple[int, str, str, str]], ...]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(tmp_path_factory.mktemp("client_gateway"), shards=2, coins=16,  # 1,300 users from 127.0.0.1 below
                 env={"HLBOOK_MAX_FOLLOWED_USERS_PER_IP": "10000"}) as up:
        yield up


def recorder(store: dict[int, list[dict[str, Any]]], key: int) -> Callable[[dict[str, Any]], None]:
    store[key] = []
    return store[key].append


async def closed_events(stream: EventStream) -> list[Event]:
    """Every event ``stream`` holds, closing it first: later messages still reach the
    callbacks but no longer the stream (waiting for a quiet moment instead races
    with messages delivered while that wait is cancelled)."""
    stream.close()
    return [event async for event in stream]


def test_gateway_killed_and_restarted_on_the_same_port(up: Up) -> None:
    """SIGKILL the gateway, start it again on the same port: the client reconnects,
    resubscribes, delivers again, counts exactly one reconnect, and its event
    stream tells it all (typed data of the real gateway's messages included)."""
    port = free_port()
    gateway = up.start_gateway(port)

    async def main() -> None:
        async with HLClient(f"ws://127.0.0.1:{port}/ws", **FAST) as client:
            stream = client.events()
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
            assert [client.subscription_metrics(s)["reconnects"] for s in ids] == [1] * len(ids)
            conn = client.connection_metrics(1)
            assert conn["connects"] == 2 and conn["reconnects"] == 1 and conn["unrouted_messages"] == 0
            assert got[0][-1]["channel"] == "l2Book" and got[0][-1]["data"]["coin"] == "BTC"
            assert got[1][-1]["channel"] == "trades" and {t["coin"] for t in got[1][-1]["data"]} == {"BTC"}
            assert got[2][-1]["data"]["coin"] == "ETH"

            callbacks = sum(len(v) for v in got.values())
            events = await closed_events(stream)
            down = next(i for i, e in enumerate(events) if isinstance(e, Disconnected))
            control = lambda part: [e for e in part if not isinstance(e, (Data, Disconnected))]  # noqa: E731
            assert control(events[:down]) == [Connected(1, False), *(Ack(s, 1, False) for s in ids)]
            connected, *back = control(events[down:])
            assert connected == Connected(1, True) and back[::2] == [Ack(s, 1, True) for s in ids]
            assert [(type(e), e.sub_id, e.since < e.until) for e in back[1::2]] == [(Gap, s, True) for s in ids]
            assert all(isinstance(e, Disconnected) and e.retrying for e in events[down:] if not isinstance(e, (Data, Connected, Ack, Gap)))
            data = [e for e in events if isinstance(e, Data)]
            assert len(data) == callbacks
            assert all(isinstance(e.data, L2Book) for e in data if e.channel == "l2Book")
            assert all(isinstance(t, Trade) and t.coin == "BTC" for e in data if e.channel == "trades" for t in e.data)
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
            assert client.subscription_metrics(sub_id)["reconnects"] == 1
            assert client.connection_metrics(1)["reconnects"] >= 1
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
            await until(lambda: bool(got) and client.connection_metrics(1)["ping_rtt"] is not None, 10, "messages and a pong")

            os.kill(gateway.pid, signal.SIGSTOP)
            try:
                await until(lambda: "no pong" in (client.connection_info()[0]["last_error"] or ""), 5, "the pong timeout")
                stalled = len(got)
            finally:
                os.kill(gateway.pid, signal.SIGCONT)
            await until(lambda: client.get_subscription(sub_id)["state"] == "active" and len(got) > stalled, 15, "messages after SIGCONT")
            assert client.connection_metrics(1)["reconnects"] >= 1 and client.connection_info()[0]["state"] == "open"
            assert client.subscription_metrics(sub_id)["reconnects"] >= 1
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
            assert [client.connection_metrics(c["id"])["unrouted_messages"] for c in client.connection_info()] == [0, 0]

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
            assert client.subscription_metrics(sub_id)["reconnects"] == 0

    run(main(), timeout=40)


def test_refused_connect_and_a_given_up_feed_against_a_gateway_not_ready(up: Up) -> None:
    """A gateway that refuses handshakes (503 until it knows its coins): ``connect()``
    raises a ConnectionError naming it at once, a subscription gives up after
    ``max_attempts``, and the same feed subscribed again works once a ready
    gateway answers on that port."""
    port = free_port()
    blind = start_blind_gateway(up, port)
    book = {"type": "l2Book", "coin": "BTC"}

    async def main() -> None:
        async with HLClient(f"ws://127.0.0.1:{port}/ws", **{**FAST, "max_attempts": 3}) as client:
            start = time.monotonic()
            with pytest.raises(ConnectionError, match="503"):
                await client.connect(timeout=10)
            assert time.monotonic() - start < 2
            old = await client.subscribe(book)
            with pytest.raises(SubscriptionError, match="503"):
                await client.wait_active(old, 10)
            os.kill(blind.pid, signal.SIGKILL)
            await asyncio.to_thread(blind.wait, 5)
            gateway = await asyncio.to_thread(up.start_gateway, port)
            got: list[dict[str, Any]] = []
            again = await client.subscribe(book, got.append)
            await client.wait_active(again, 10)
            await until(lambda: bool(got), 10, "messages of the feed subscribed again")
            assert client.get_subscription(old)["state"] == "failed" and got[-1]["data"]["coin"] == "BTC"
        stop_group(gateway)

    run(main(), timeout=40)


def test_past_the_gateways_connection_cap_the_client_says_429_and_stays_within_its_own(up: Up) -> None:
    """A gateway taking 4 connections an address: following 6 users on a connection each,
    2 stayed pending forever on HTTP 429. Now they fail with the reason once ``limited_retries``
    429s came, counted; with ``max_connections`` 4 the 6 users share 4 connections, all active."""
    port = free_port()
    gateway = up.start_gateway(port, "--max-connections-per-ip", "4")
    url = f"ws://127.0.0.1:{port}/ws"
    users = [f"0x{n:040x}" for n in range(1, 7)]

    async def main() -> None:
        async with HLClient(url, **{**FAST, "limited_retries": 1}) as client:
            ids = [await client.subscribe({"type": "userFills", "user": u}, strategy="user_grouped") for u in users]
            results = await asyncio.gather(*(client.wait_active(s, 10) for s in ids), return_exceptions=True)
            failed = [r for r in results if r is not None]
            assert len(failed) == 2 and all(isinstance(r, SubscriptionError) and "HTTP 429" in str(r) for r in failed), results
            assert client.stats["connections_limited"] == 4
        async with HLClient(url, **{**FAST, "max_connections": 4}) as client:
            ids = [await client.subscribe({"type": kind, "user": u}, strategy="user_grouped")
                   for u in users for kind in ("userFills", "userTwapSliceFills")]
            await asyncio.gather(*(client.wait_active(s, 10) for s in ids))
            assert len(client.connection_info()) == 4 and client.stats["users_past_cap"] == 2
            for i in range(0, len(ids), 2):  # a user's two feeds on one connection
                assert client.get_subscription(ids[i])["connection"] == client.get_subscription(ids[i + 1])["connection"]

    try:
        run(main(), timeout=40)
    finally:
        stop_group(gateway)


SPECIAL_USERS = ("0xffff", "0xfefe")  # the simulator's special accounts: fills, no order statuses


def active_makers(up: Up, n: int) -> list[str]:
    """The ``n`` users with the most resting orders in the simulator now."""
    with tempfile.TemporaryDirectory() as tmp:
        _, books = snapshot.load(snapshot.fetch(up.sim_info, timeout=10, directory=tmp))
    makers = Counter(o["user"] for book in books.values() for side in book.l4_levels() for o in side if not o["user"].startswith(SPECIAL_USERS))
    return [user for user, _ in makers.most_common(n)]


def fill_keys(events: list[OrderEvent]) -> list[tuple[int, int]]:
    return [(e.fill["tid"], e.fill["oid"]) for e in events if e.fill is not None]


def test_trackers_know_resting_orders_from_the_start_on_user_grouped_connections(up: Up) -> None:
    """``frontendOpenOrders`` makes the orders resting when a tracker starts known: with
    a hold longer than the test, a partial fill of one (no status releases it) is
    emitted at once. A user's two feeds share one user_grouped connection; a
    dedicated l4Book has one of its own."""
    users = active_makers(up, 4)

    async def main() -> None:
        async with HLClient(up.ws, **FAST) as client, HLClient(up.ws, **FAST) as raw:
            events: dict[str, list[OrderEvent]] = {u: [] for u in users}
            trackers = {u: OrderTracker(events[u].append, hold_seconds=60.0) for u in users}
            for user, tracker in trackers.items():
                await tracker.subscribe(client, user)
            for tracker in trackers.values():
                await tracker.wait_ready(10)
            assert all(t.counts.open_orders_loaded and t.load_error is None for t in trackers.values())
            loaded = {}  # resting at the start: no status of theirs seen, known from frontendOpenOrders only
            for user in users:
                resting = (await client.info({"type": "frontendOpenOrders", "user": user}))["data"]
                loaded[user] = {o["oid"] for o in resting} - {e.oid for e in events[user]}
            fills: dict[str, list[dict[str, Any]]] = {u: [] for u in users}
            closed: dict[str, set[int]] = {u: set() for u in users}  # oids with a final status
            for user in users:
                await raw.subscribe({"type": "userFills", "user": user}, lambda m, u=user: fills[u].extend([] if m["data"].get("isSnapshot") else m["data"]["fills"]))
                await raw.subscribe({"type": "orderUpdates", "user": user}, lambda m, u=user: closed[u].update(s["order"]["oid"] for s in m["data"] if is_terminal(s["status"])))
            book = L4Book("BTC")
            await book.subscribe(client, strategy="dedicated")

            def partial() -> set[tuple[str, int, int]]:
                """Fills of orders resting at the start that still rest: nothing but being known lets them through."""
                return {(u, f["tid"], f["oid"]) for u in users for f in fills[u] if f["oid"] in loaded[u] and f["oid"] not in closed[u]}

            await until(lambda: bool(partial()), 20, "a partial fill of an order resting at the start")
            expected = partial()
            await until(lambda: all((tid, oid) in fill_keys(events[u]) for u, tid, oid in expected), 1.0, "those fills from the trackers at once")

            conns = {c["id"]: c for c in client.connection_info()}
            for user, tracker in trackers.items():
                (conn,) = {client.get_subscription(s)["connection"] for s in tracker.sub_ids}
                assert (conns[conn]["strategy"], conns[conn]["user"], conns[conn]["subscriptions"]) == ("user_grouped", user, 2)
            dedicated = conns[client.get_subscription(book.sub_id)["connection"]]
            assert (dedicated["strategy"], dedicated["subscriptions"]) == ("dedicated", 1)
            await until(lambda: book.synced, 10, "the dedicated l4Book")
            for tracker in trackers.values():
                await tracker.close()

    run(main(), timeout=60)


def test_a_second_tracker_of_a_user_misses_no_fill_of_an_outage(up: Up) -> None:
    """Two trackers of each of three users share the server subscriptions: the second
    gets a userFills snapshot of its own (its history), so after the gateway was
    killed and restarted both emit every fill made meanwhile, each once."""
    port = free_port()
    history = ["--history-pub", f"ipc://{up.sockets}/history-pub", "--history-query", f"ipc://{up.sockets}/history-query"]
    gateway = up.start_gateway(port, *history)  # userFills snapshots come from the history service
    users = active_makers(up, 3)

    async def main() -> None:
        async with HLClient(f"ws://127.0.0.1:{port}/ws", **FAST) as client:
            pairs = {u: [OrderTracker(hold_seconds=1.0), OrderTracker(hold_seconds=1.0)] for u in users}
            events: dict[OrderTracker, list[OrderEvent]] = {}
            for pair in pairs.values():
                for tracker in pair:
                    events[tracker] = []
                    tracker.on_event = events[tracker].append
            for user, (first, _) in pairs.items():
                await first.subscribe(client, user)
                await first.wait_ready(10)
            await asyncio.sleep(0.5)
            for user, (_, second) in pairs.items():
                await second.subscribe(client, user)
                await second.wait_ready(10)
            await until(lambda: all(t.counts.snapshots >= 1 for t in events), 10, "a snapshot for every tracker")
            for first, second in pairs.values():
                assert client.get_subscription(second.sub_ids[1])["shared_with"] == [first.sub_ids[1]]

            os.kill(gateway.pid, signal.SIGKILL)
            await asyncio.to_thread(gateway.wait, 5)
            known = {t: set(t.seen_fills) for t in events}
            done = {t: len(e) for t, e in events.items()}
            await asyncio.sleep(2.0)  # fills go on meanwhile
            restarted = await asyncio.to_thread(up.start_gateway, port, *history)
            await until(lambda: all(client.get_subscription(s)["state"] == "active" for t in events for s in t.sub_ids), 15, "resubscribed")

            missed_total = 0
            for user, pair in pairs.items():
                status, fills = await asyncio.to_thread(post_info, f"http://127.0.0.1:{port}", {"type": "userFills", "user": user})
                assert status == 200
                truth = {(f["tid"], f["oid"]) for f in fills}
                for tracker in pair:
                    missed = truth - known[tracker]
                    await until(lambda: missed <= set(fill_keys(events[tracker][done[tracker]:])), 5, "every fill made while away")
                    keys = fill_keys(events[tracker])
                    assert len(keys) == len(set(keys))  # each once
                missed_total += len(truth - known[pair[1]])
            assert missed_total > 0  # there were fills to miss
            for tracker in events:
                await tracker.close()
        stop_group(restarted)

    run(main(), timeout=60)


def simulator_pid(up: Up) -> int:
    """The simulator child of ``up``'s supervisor."""
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            parent = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == up.proc.pid and b"sim" in args:
            return int(entry)
    raise AssertionError("no simulator process")


def test_trackers_reconcile_what_changed_while_the_gateway_was_down(up: Up) -> None:
    """After an outage the tracker held orders canceled or filled meanwhile and missed those
    opened, without an event. Kill the gateway while orders open, cancel and fill, start it
    again: each tracker reloads the resting orders and emits what changed (``closed`` and
    ``open`` with a reason), then goes on; with the simulator paused (nothing changes any
    more) every tracker's resting orders equal the server's ``frontendOpenOrders``."""
    port = free_port()
    gateway = up.start_gateway(port)
    users = active_makers(up, 3)

    async def main() -> None:
        async with HLClient(f"ws://127.0.0.1:{port}/ws", **FAST) as client:
            events: dict[str, list[OrderEvent]] = {u: [] for u in users}
            trackers = {u: OrderTracker(events[u].append, hold_seconds=1.0) for u in users}
            for user, tracker in trackers.items():
                await tracker.subscribe(client, user)
            for tracker in trackers.values():
                await tracker.wait_ready(10)
            os.kill(gateway.pid, signal.SIGKILL)
            await asyncio.to_thread(gateway.wait, 5)
            await asyncio.sleep(4.0)  # orders open, cancel and fill meanwhile
            restarted = await asyncio.to_thread(up.start_gateway, port)
            await until(lambda: all(t.counts.reconciles == 1 for t in trackers.values()), 20, "one reconciliation per tracker")
            reconciled = [e for u in users for e in events[u] if e.reason is not None]
            assert {(e.kind, e.reason) for e in reconciled} == {("closed", RECONCILED_CLOSED), ("open", RECONCILED_OPEN)}
            assert sum(t.counts.reconciled for t in trackers.values()) == len(reconciled)
            sim = simulator_pid(up)
            os.kill(sim, signal.SIGSTOP)
            try:
                await asyncio.sleep(1.5)  # what the simulator wrote reaches the shards, the gateway and the trackers
                for user, tracker in trackers.items():
                    resting = (await client.info({"type": "frontendOpenOrders", "user": user}))["data"]
                    assert set(tracker.open_orders) == {o["oid"] for o in resting}, user
            finally:
                os.kill(sim, signal.SIGCONT)
            for tracker in trackers.values():
                await tracker.close()
        stop_group(restarted)

    run(main(), timeout=60)


def test_the_client_command_exits_with_one_line_on_a_refusal(up: Up) -> None:
    """``hlbook client`` against the real gateway: a refused subscription ends it (exit 1)
    with the server's refusal and what was likely wrong, not a silent wait."""
    hlbook = os.path.join(os.path.dirname(sys.executable), "hlbook")
    cases = {("l2Book", "btc"): "did you mean BTC?", ("l2Book", "NOPE"): "unknown coin NOPE",
             ("l2Book", "BTC", "nSigFigs=9"): "BTC exists: check the other parameters", ("candle", "BTC"): "BTC exists"}
    for args, hint in cases.items():
        proc = subprocess.run([hlbook, "client", *args, "--url", up.ws], capture_output=True, text=True, timeout=30)
        lines = [line for line in proc.stderr.splitlines() if "refused" in line]
        assert proc.returncode == 1 and len(lines) == 1, (args, proc.returncode, proc.stderr)
        assert "Invalid subscription" in lines[0] and hint in lines[0], (args, lines[0])
        assert "Traceback" not in proc.stderr and not proc.stdout

"""The history service against the node's files.

- Real mainnet blocks on disk before ``hlbook up`` starts: ``candleSnapshot``
  (all 14 intervals), ``userFills``, ``userFillsByTime``, ``recentTrades``,
  ``historicalOrders`` and ``orderStatus`` equal what this test computes from
  the files itself (orjson and ``Decimal``, none of hlbook's code).
- ``hlbook history`` SIGKILLed in the middle of a backfill and started again
  ends with a store equal, table by table, to one backfilled without a break:
  nothing stored twice, nothing skipped.
- After ``hlbook up`` is stopped and started again, ccxt ``fetch_ohlcv`` and the
  SDK's ``user_fills`` (unmodified) get what was there before the restart.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from calendar import timegm
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import orjson
import zmq
from hyperliquid.info import Info

from conftest import free_port
from hlbook.common import wire
from pipeline import Up, post_info, stop_group, wait_ready, wait_until
from test_gateway_compat import hyperliquid

DAYS = ["--history-days", "100000"]  # the fixture is months old: keep it
MINUTE = 60_000
WIDTHS = {"1m": 1, "3m": 3, "5m": 5, "15m": 15, "30m": 30, "1h": 60, "2h": 120, "4h": 240, "8h": 480, "12h": 720,
          "1d": 1440, "3d": 4320, "1w": 10080}


# ---------------------------------------------------------------- what the files say (computed here)


def canonical(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


def ms_of(node_time: str) -> int:
    whole, _, frac = node_time.partition(".")
    return timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) * 1000 + int((frac + "000")[:3])


def candle_start(interval: str, ms: int) -> int:
    if interval == "1M":
        day = datetime.fromtimestamp(ms / 1000, timezone.utc)
        return timegm((day.year, day.month, 1, 0, 0, 0)) * 1000
    width = WIDTHS[interval] * MINUTE  # 1w too: Hyperliquid's weeks start on Thursday 00:00 UTC, like the epoch
    return ms // width * width


def read_blocks(data: Path) -> dict[int, dict[str, Any]]:
    """height -> {"statuses": [non-rejected status dicts], "fills": [[user, fill]]} from the by-block files."""
    blocks: dict[int, dict[str, Any]] = {}
    for stream, key in (("order_statuses", "statuses"), ("fills", "fills")):
        for path in sorted((data / "hl" / "data" / f"node_{stream}_by_block").rglob("*")):
            if path.is_file():
                written = path.read_bytes()
                for line in written[: written.rfind(b"\n") + 1].splitlines():  # a line the node is still writing: not yet
                    row = orjson.loads(line)
                    events = row["events"] if key == "fills" else [e for e in row["events"] if not e["status"].endswith("Rejected")]
                    blocks.setdefault(row["block_number"], {"statuses": [], "fills": []})[key] = events
    return blocks


def expected(blocks: dict[int, dict[str, Any]]) -> dict[str, Any]:
    fills: dict[str, list[dict[str, Any]]] = {}
    trades: list[dict[str, Any]] = []
    orders: dict[int, tuple[tuple[int, int], str, dict[str, Any]]] = {}  # oid -> ((height, place), user, entry)
    for height in sorted(blocks):
        block = blocks[height]
        by_tid: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        for user, fill in block["fills"]:
            fills.setdefault(user, []).append(fill)
            by_tid.setdefault(fill["tid"], []).append((user, fill))
        for pair in by_tid.values():
            taker = next(f for _, f in pair if f["crossed"])
            trades.append({"coin": taker["coin"], "side": taker["side"], "px": taker["px"], "sz": taker["sz"], "hash": taker["hash"],
                           "time": taker["time"], "tid": taker["tid"],
                           "users": [next(u for u, f in pair if f["side"] == "B"), next(u for u, f in pair if f["side"] == "A")]})
        for place, status in enumerate(block["statuses"]):
            order = dict(status["order"])  # every key, nulls included (tif, cloid), as the public API sends them
            entry = {"order": order, "status": status["status"], "statusTimestamp": ms_of(status["time"])}
            orders[order["oid"]] = ((height, place), status["user"], entry)
    candles: dict[tuple[str, str, int], dict[str, Any]] = {}
    for trade in trades:  # node order: opens first, closes last
        for interval in [*WIDTHS, "1M"]:
            key = (trade["coin"], interval, candle_start(interval, trade["time"]))
            px, sz = Decimal(trade["px"]), Decimal(trade["sz"])
            c = candles.setdefault(key, {"o": px, "h": px, "l": px, "v": Decimal(0), "n": 0})
            c.update(c=px, h=max(c["h"], px), l=min(c["l"], px), v=c["v"] + sz, n=c["n"] + 1)
    return {"fills": fills, "trades": trades, "orders": orders, "candles": candles}


def candle_dicts(candles: dict[tuple[str, str, int], dict[str, Any]], coin: str, interval: str) -> list[dict[str, Any]]:
    out = []
    for (c_coin, c_interval, t), c in sorted(candles.items()):
        if (c_coin, c_interval) == (coin, interval):
            end = candle_start(interval, t + 32 * 1440 * MINUTE) if interval == "1M" else t + WIDTHS[interval] * MINUTE
            out.append({"t": t, "T": end - 1, "s": coin, "i": interval, "o": canonical(c["o"]), "c": canonical(c["c"]),
                        "h": canonical(c["h"]), "l": canonical(c["l"]), "v": canonical(c["v"]), "n": c["n"]})
    return out


# ---------------------------------------------------------------- helpers


def ask_history(endpoint: str, timeout: float = 2.0, **query: Any) -> tuple[dict[str, Any], Any] | None:
    """(reply header, answer) of one history query over its ROUTER (None: no answer in time)."""
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send(wire.encode(msgspec.convert(query, wire.HistoryQuery)))
        if not sock.poll(int(timeout * 1000)):
            return None
        frames = sock.recv_multipart()
        return msgspec.to_builtins(wire.decode(frames[0], wire.HistoryReply)), orjson.loads(frames[1]) if len(frames) > 1 else None
    finally:
        sock.close(0)


def dump(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of a store, rows sorted; user ids replaced by addresses (ids follow insertion order)."""
    conn = sqlite3.connect(db)
    try:
        users = dict(conn.execute("SELECT id, address FROM users"))
        out = {}
        for table, user_col in (("fills", 0), ("trades", None), ("orders", 1), ("candles", None), ("held", None)):
            rows = [tuple(users[v] if i == user_col else v for i, v in enumerate(r)) for r in conn.execute(f"SELECT * FROM {table}")]
            out[table] = sorted(rows, key=repr)
        return out
    finally:
        conn.close()


# ---------------------------------------------------------------- tests


def test_answers_from_node_files_written_before_start(btc_data: Path, tmp_path: Path) -> None:
    node = tmp_path / "node"
    shutil.copytree(btc_data / "hl", node / "hl")
    want = expected(read_blocks(node))
    port = free_port()
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "up", "--no-simulate", "--data-dir", str(node), "--snapshot-file",
         str(btc_data / "snapshot_985148181.json"), "--shards", "1", "--port", str(port), "--metrics-base-port", "0",
         "--sockets", str(tmp_path / "zmq"), *DAYS],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HLBOOK_FROM_HEIGHT": "985148182"})  # ingest publishes them too: the books get live
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, up, 90)
        query = f"ipc://{tmp_path}/zmq/history-query"
        last = max(read_blocks(node))
        wait_until(lambda: (ask_history(query, op="status") or ({}, {}))[1].get("height") == last, 30, "history holds every block")

        for interval in [*WIDTHS, "1M"]:
            status, got = post_info(base, {"type": "candleSnapshot", "req": {"coin": "BTC", "interval": interval, "startTime": 0}})
            assert status == 200 and got == candle_dicts(want["candles"], "BTC", interval), interval
            assert got and got[0]["n"] == len(want["trades"])  # the fixture's trades all fall into one candle of each

        newest = sorted(want["trades"], key=lambda t: (t["time"], t["tid"]))[-100:]
        assert post_info(base, {"type": "recentTrades", "coin": "BTC"})[1] == newest
        for user, fills in want["fills"].items():
            newest_first = sorted(fills, key=lambda f: (f["time"], f["tid"], f["oid"]), reverse=True)
            assert post_info(base, {"type": "userFills", "user": user})[1] == newest_first
            by_time = post_info(base, {"type": "userFillsByTime", "user": user, "startTime": fills[0]["time"]})[1]
            assert by_time == newest_first[::-1]
            assert post_info(base, {"type": "userFillsByTime", "user": user, "startTime": fills[-1]["time"] + 1})[1] == []

        users: dict[str, list[tuple[tuple[int, int], dict[str, Any]]]] = {}
        for at, user, entry in want["orders"].values():
            users.setdefault(user, []).append((at, entry))
        busiest = sorted(users, key=lambda u: -len(users[u]))[:5]
        for user in busiest:
            entries = [e for _, e in sorted(users[user], key=lambda x: x[0], reverse=True)][:2000]
            assert post_info(base, {"type": "historicalOrders", "user": user})[1] == entries
        canceled = next((oid, u, e) for oid, (_, u, e) in want["orders"].items() if e["status"] == "canceled")
        assert post_info(base, {"type": "orderStatus", "user": canceled[1], "oid": canceled[0]})[1] == {"status": "order", "order": canceled[2]}
        with_cloid = next(((u, e) for _, u, e in want["orders"].values() if e["order"]["cloid"] is not None), None)
        if with_cloid is not None:
            user, entry = with_cloid
            latest = max((at for at, u, e in want["orders"].values() if u == user and e["order"].get("cloid") == entry["order"]["cloid"]))
            entry = next(e for at, u, e in want["orders"].values() if at == latest)
            assert post_info(base, {"type": "orderStatus", "user": user, "oid": entry["order"]["cloid"]})[1] == {"status": "order", "order": entry}
        assert post_info(base, {"type": "orderStatus", "user": busiest[0], "oid": "0x" + "0" * 32})[1] == {"status": "unknownOid"}
    finally:
        stop_group(up)
        log.close()
    assert "Traceback" not in (tmp_path / "up.log").read_text()


def start_history(data: Path, db: Path, sockets: Path, log: Any) -> tuple[subprocess.Popen[bytes], str]:
    query = f"ipc://{sockets}/query"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "history", "--data-dir", str(data), "--db", str(db), "--niceness", "0", "--commit-every", "0.5",
         "--ingest-pub", f"ipc://{sockets}/no-ingest", "--pub", f"ipc://{sockets}/pub", "--query", query],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, query


def test_killed_mid_backfill_ends_equal_to_one_uninterrupted_backfill(tmp_path: Path) -> None:
    data = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "hlbook.cli", "sim", "--data-dir", str(data), "--blocks", "1200",
                    "--blocks-per-sec", "5000", "--coins", "20", "--info-port", "0", "--log-level", "WARNING"], check=True, timeout=120)
    log = open(tmp_path / "history.log", "wb")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        proc, query = start_history(data, tmp_path / "a" / "h.sqlite", tmp_path / "a", log)

        def partly_stored() -> bool:
            answer = ask_history(query, op="status")
            return answer is not None and answer[1]["height"] is not None and answer[1]["backfilling"]

        wait_until(partly_stored, 60, "a first commit of the backfill")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        held_at_kill = dump(tmp_path / "a" / "h.sqlite")["held"]
        assert held_at_kill and held_at_kill[-1][1] < 1001199, "the backfill was over before the kill"

        proc, query = start_history(data, tmp_path / "a" / "h.sqlite", tmp_path / "a", log)
        # meanwhile, the same files into another store (b/) in one uninterrupted backfill
        other, other_query = start_history(data, tmp_path / "b" / "h.sqlite", tmp_path / "b", log)

        def done(q: str) -> bool:
            answer = ask_history(q, op="status")
            return answer is not None and not answer[1]["backfilling"] and answer[1]["height"] == 1001199

        try:
            wait_until(lambda: done(query), 120, "the restarted backfill")
            wait_until(lambda: done(other_query), 120, "the uninterrupted backfill")
        finally:
            stop_group(proc)
            stop_group(other)
    finally:
        log.close()
    interrupted, whole = dump(tmp_path / "a" / "h.sqlite"), dump(tmp_path / "b" / "h.sqlite")
    assert whole["held"] == [(1000000, 1001199)]
    want = expected(read_blocks(data))
    assert len(whole["fills"]) == sum(map(len, want["fills"].values())) and len(whole["trades"]) == len(want["trades"])
    assert len(whole["orders"]) == len(want["orders"])
    for table in whole:
        assert interrupted[table] == whole[table], table


def test_ccxt_and_the_sdk_get_history_right_after_a_restart(tmp_path: Path) -> None:
    up = Up(tmp_path, shards=1, coins=8, seed=11)
    try:
        up.wait_ready()
        trades = wait_until(lambda: post_info(up.http, {"type": "recentTrades", "coin": "BTC"})[1], 30, "BTC trades")
        user = trades[-1]["users"][0]
        time.sleep(1.0)  # the history service has stored them (it commits every 0.2 s)
        fills_before = Info(base_url=up.http, skip_ws=True).user_fills(user)
        candles_before = post_info(up.http, {"type": "candleSnapshot", "req": {"coin": "BTC", "interval": "1m", "startTime": 0}})[1]
        assert fills_before and candles_before
    finally:
        up.stop()

    up = Up(tmp_path, shards=1, coins=8, seed=11)  # the same node files and state
    try:
        up.wait_ready()
        fills_after = Info(base_url=up.http, skip_ws=True).user_fills(user)
        after = {orjson.dumps(f, option=orjson.OPT_SORT_KEYS) for f in fills_after}
        assert all(orjson.dumps(f, option=orjson.OPT_SORT_KEYS) in after for f in fills_before)

        async def ohlcv() -> list[list[Any]]:
            exchange = hyperliquid(up.http)
            try:
                await exchange.load_markets()
                return await exchange.fetch_ohlcv("BTC/USDC:USDC", "1m", since=candles_before[0]["t"])
            finally:
                await exchange.close()

        got = asyncio.run(asyncio.wait_for(ohlcv(), 30))
        closed = [c for c in candles_before[:-1]]  # the last minute may have gone on
        by_start = {row[0]: row for row in got}
        for c in closed:
            assert by_start[c["t"]] == [c["t"], float(c["o"]), float(c["h"]), float(c["l"]), float(c["c"]), float(c["v"])]
    finally:
        up.stop()


def test_historical_orders_are_each_orders_last_status_capped_at_the_2000_newest(tmp_path: Path) -> None:
    """The history store (in process) over node-shaped status lines of one user with 2,100 orders,
    some of them later canceled or filled: ``historicalOrders`` is each order's last status, newest
    first, the 2,000 newest only (before and after retention removed the others)."""
    from hlbook.common.models import OrderStatus
    from hlbook.services.history.store import Store

    user, other = "0x" + "a1" * 20, "0x" + "b2" * 20
    blocks: dict[int, dict[str, Any]] = {}
    oid = 1000
    for i in range(30):
        height, when = 500 + i, f"2026-11-22T10:00:{i:02d}.250000123"
        statuses = []
        for k in range(70):
            oid += 1
            order = {"coin": "BTC", "side": "AB"[k % 2], "limitPx": f"{80000 + k}.5", "sz": "0.01", "oid": oid,
                     "timestamp": ms_of(when), "triggerCondition": "N/A", "isTrigger": False, "triggerPx": "0.0", "children": [],
                     "isPositionTpsl": False, "reduceOnly": False, "orderType": "Limit", "origSz": "0.01", "tif": "Gtc",
                     "cloid": f"0x{oid:032x}" if k % 3 == 0 else None}
            statuses.append({"time": when, "user": other if k == 69 else user, "hash": None, "builder": None, "status": "open", "order": order})
            if i and k % 10 == 0:  # an order of the previous block ends here
                old = {**blocks[height - 1]["statuses"][k]["order"], "sz": "0.0"}
                statuses.append({"time": when, "user": blocks[height - 1]["statuses"][k]["user"], "hash": None, "builder": None,
                                 "status": "filled" if k % 20 == 0 else "canceled", "order": old})
        blocks[height] = {"statuses": statuses, "fills": []}
    want_orders = expected(blocks)["orders"]
    mine = sorted(((at, entry) for at, who, entry in want_orders.values() if who == user), key=lambda x: x[0], reverse=True)
    want = [entry for _, entry in mine][:2000]
    assert len(mine) == 30 * 69 > 2000 and sum(e["status"] != "open" for e in want) >= 50

    store = Store(tmp_path / "history.db", days=100000)
    try:
        for height, block in sorted(blocks.items()):
            store.add_block(height, ms_of(block["statuses"][0]["time"]),
                            [msgspec.convert(s, OrderStatus) for s in block["statuses"]], [])
        store.commit()
        assert orjson.loads(store.historical_orders(user)) == want
        store.prune(now_ms=ms_of("2026-11-22T10:01:00"))
        assert orjson.loads(store.historical_orders(user)) == want
        assert store.db.execute("SELECT count(*) FROM orders WHERE user = ?", (store.user_id(user),)).fetchone()[0] == 2000
        assert len(orjson.loads(store.historical_orders(other))) == 30
    finally:
        store.close()


def test_weekly_candles_of_an_older_store_are_realigned_from_the_daily_ones(tmp_path: Path) -> None:
    """A store written when weeks started on Monday: opened again, its weekly candles are the
    ones a fresh store computes (Thursday 00:00 UTC), rebuilt from its daily candles."""
    from hlbook.common.models import Fill
    from hlbook.services.history.store import Store

    day = 86_400_000
    start = ms_of("2026-11-16T12:00:00")  # a Monday
    blocks = []
    for i in range(40):  # every 9 hours for 15 days: three Thursday boundaries
        ms = start + i * 9 * 3_600_000
        fill = {"coin": "BTC", "px": f"{80000 + (i * 37) % 500}.0", "sz": f"0.{i + 1:03d}", "side": "AB"[i % 2], "time": ms,
                "startPosition": "0.0", "dir": "Open Long", "closedPnl": "0.0", "hash": "0x" + "0" * 64, "oid": 10 + i,
                "crossed": True, "fee": "0.0", "tid": 1000 + i, "feeToken": "USDC"}
        maker = {**fill, "side": "BA"[i % 2], "crossed": False, "oid": 500 + i}
        blocks.append((900 + i, ms, [("0x" + "a1" * 20, msgspec.convert(fill, Fill)), ("0x" + "b2" * 20, msgspec.convert(maker, Fill))]))

    def weekly(db: Path) -> list[tuple[Any, ...]]:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT * FROM candles WHERE interval = '1w' ORDER BY t").fetchall()

    fresh, old = tmp_path / "fresh.db", tmp_path / "old.db"
    for path in (fresh, old):
        store = Store(path, days=100000)
        for height, ms, fills in blocks:
            store.add_block(height, ms, [], fills)
        store.commit()
        store.close()
    want = weekly(fresh)
    assert len(want) == 3 and all(row[2] % (7 * day) == 0 for row in want)
    with sqlite3.connect(old) as conn:  # as the Monday-based code wrote them: a week from Monday the 16th
        conn.execute("DELETE FROM candles WHERE interval = '1w'")
        conn.execute("INSERT INTO candles SELECT '1w', coin, t, o, c, h, l, v, n, first, last, body FROM candles "
                     "WHERE interval = '1d' AND t = ?", (start // day * day,))
        assert conn.execute("SELECT t % ? FROM candles WHERE interval = '1w'", (7 * day,)).fetchall() == [(4 * day,)]
    Store(old, days=100000).close()
    assert weekly(old) == want


def test_a_full_disk_costs_the_uncommitted_blocks_not_the_service(tmp_path: Path) -> None:
    """A commit the store refuses (SQLite's "database or disk is full", made here by a page
    limit) is counted and rolled back, its blocks left to the backfill; the service goes on
    and stores again once there is room (it crashed, and could not even roll back, before)."""
    from hlbook.common.models import Fill
    from hlbook.services.history import metrics
    from hlbook.services.history.service import History, HistoryConfig

    (tmp_path / "node").mkdir()
    cfg = HistoryConfig(data_dir=str(tmp_path / "node"), db=str(tmp_path / "h.sqlite"), ingest_pub=f"ipc://{tmp_path}/in",
                        pub=f"ipc://{tmp_path}/pub", query=f"ipc://{tmp_path}/query")
    history = History(cfg)
    try:
        def block(height: int) -> wire.HistoryBlock:
            fills = [(f"0x{u:040x}", Fill("BTC", "81308.0", "0.1", "B", 1_778_002_753_000 + height, "0.0", "Open Long", "0.0",
                                         "0x" + "1" * 64, height * 100 + u, u % 2 == 0, "0.01", height * 100 + u // 2))
                     for u in range(40)]
            return wire.HistoryBlock(height, None, 1_778_002_753_000 + height, [], fills)

        history.on_block(block(1))
        history.commit()
        pages = history.store.db.execute("PRAGMA page_count").fetchone()[0]
        history.store.db.execute(f"PRAGMA max_page_count = {pages + 2}")
        before = metrics.STORE_ERRORS._value.get()
        for height in range(2, 40):
            history.on_block(block(height))
        history.commit()  # refused (as the blocks were, once the pages ran out): no exception
        assert metrics.STORE_ERRORS._value.get() > before
        assert history.backfill.busy  # what was refused is read again from the files
        assert history.store.db.execute("SELECT max(last) FROM held").fetchone()[0] < 39
        history.store.db.execute("PRAGMA max_page_count = 1073741823")  # room again
        history.on_block(block(40))
        history.commit()
        assert 40 in history.store.held and history.store.db.execute("SELECT count(*) FROM fills").fetchone()[0] == 80
    finally:
        history.close()


def test_a_gateway_that_does_not_read_its_replies_is_counted_and_costs_no_one_else(tmp_path: Path) -> None:
    """Replies an asker cannot take (it stopped reading, or it went away) are dropped at a
    bounded queue, counted and logged (they vanished without a trace before); the service
    keeps answering everyone else."""
    from hlbook.common.metrics import REPLIES_DROPPED
    from hlbook.common.models import Fill
    from hlbook.services.history.service import History, HistoryConfig

    (tmp_path / "node").mkdir()
    cfg = HistoryConfig(data_dir=str(tmp_path / "node"), db=str(tmp_path / "h.sqlite"), ingest_pub=f"ipc://{tmp_path}/in",
                        pub=f"ipc://{tmp_path}/pub", query=f"ipc://{tmp_path}/query")
    history = History(cfg)
    user = "0x" + "ab" * 20
    ctx = zmq.Context.instance()
    greedy, gone, polite = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER), ctx.socket(zmq.REQ)

    def steps(seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            history.step()

    def dropped() -> float:
        return REPLIES_DROPPED.labels("history")._value.get()

    try:
        for height in range(1, 21):  # 2,000 fills of one user: each userFills answer is about half a megabyte
            fills = [(user, Fill("BTC", "81308.0", "0.1", "B", 1_778_002_753_000 + height, "0.0", "Open Long", "0.0",
                                 "0x" + "1" * 64, height * 1000 + n, True, "0.01", height * 1000 + n)) for n in range(100)]
            history.on_block(wire.HistoryBlock(height, None, 1_778_002_753_000 + height, [], fills))
        history.commit()
        for sock in (greedy, gone, polite):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(cfg.query)
        greedy.setsockopt(zmq.RCVHWM, 1)

        before, sent = dropped(), 0  # the greedy asks and never reads: its queue fills, then its replies drop
        while dropped() == before and sent < 3000:
            for _ in range(100):
                greedy.send(wire.encode(wire.UserFillsQuery(user=user)))
            sent += 100
            steps(0.3)
        assert dropped() > before, f"{sent} replies never read, none dropped"

        before = dropped()  # one asks for a block to come (parked), and is gone before the answer
        gone.send(wire.encode(wire.UserFillsQuery(user=user, min_height=10**9)))
        deadline = time.monotonic() + 5
        while not history.parked and time.monotonic() < deadline:
            history.step()
        gone.close(0)
        polite.send(wire.encode(wire.StatusQuery()))
        deadline, answered = time.monotonic() + 10, None
        while time.monotonic() < deadline and (answered is None or history.parked):
            history.step()
            if answered is None and polite.poll(0):
                answered = wire.decode(polite.recv_multipart()[0], wire.HistoryReply)
        assert answered is not None and answered.ok and answered.height == 20  # the others are answered all along
        assert not history.parked and dropped() == before + 1
    finally:
        for sock in (greedy, gone, polite):
            sock.close(0)
        history.close()


def test_blocks_written_before_the_first_live_one_are_backfilled_though_the_files_came_late(tmp_path: Path) -> None:
    """The history service started before the node's files existed (its first backfill pass
    found none) still reads the blocks written before the first one ingest sends it: they went
    missing for good before (`hlbook up` started history beside the simulator)."""
    from hlbook.services.history.service import History, HistoryConfig
    from hlbook.services.nodesim.engine import Simulator
    from hlbook.services.nodesim.writer import NodeWriter

    node = tmp_path / "node"
    node.mkdir()
    cfg = HistoryConfig(data_dir=str(node), db=str(tmp_path / "h.sqlite"), ingest_pub=f"ipc://{tmp_path}/in",
                        pub=f"ipc://{tmp_path}/pub", query=f"ipc://{tmp_path}/query", days=100000)
    history = History(cfg)
    try:
        deadline = time.monotonic() + 5
        while history.backfill.busy and time.monotonic() < deadline:  # a pass over no files: nothing
            history.step()
        assert not history.backfill.busy and not history.store.held.rows()
        sim = Simulator(seed=3, coins=4)
        with NodeWriter(node, ("by-block",), partial_p=0.0, seed=3) as writer:
            blocks = [sim.step() for _ in range(8)]
            for block in blocks:
                writer.write_block(block)
        live = blocks[-1]  # ingest's first message to it: the node's newest block
        history.on_block(wire.HistoryBlock(live.height, None, live.time_ns // 1_000_000, [], []))
        deadline = time.monotonic() + 10
        while history.backfill.busy and time.monotonic() < deadline:
            history.step()
        assert history.store.held.rows() == [(blocks[0].height, live.height)]
    finally:
        history.close()

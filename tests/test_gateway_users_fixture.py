"""Per-user feeds over real mainnet node data (mainnet_btc_985148181_985148206):
real `hlbook ingest` and `hlbook gateway` processes, the node files written live
as a node does, a real WebSocket client. orderUpdates of the user with the most
statuses equal that user's statuses in the files, block by block; userFills of
a user with fills equal that user's fills in the files. userEvents of a third user
carry its fills and, as ``nonUserCancel``, the orders the system canceled: the
fixture has no such status, so that user's ``canceled`` statuses are rewritten
as statuses the node writes for them (``reduceOnlyCanceled``, ``marginCanceled``, …).

Per-user feeds come from ingest alone; one real book shard runs only because
the gateway takes WebSocket clients once every shard has reported its coins.
The blocks written before the gateway is ready (the first, and one or two more
until a shard block reached the gateway) are not followed; every later one is."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import websockets

from conftest import free_port, metric
from hlbook.common import nodefiles
from hlbook.common.models import STREAMS
from pipeline import http_get, stop_group

FIRST, LAST = 985148182, 985148206  # blocks of the fixture's by-block files (985148181 is the snapshot)


def fixture_lines(btc_data: Path) -> dict[Path, list[bytes]]:
    """Relative path -> lines of every by-block file of the fixture's block range."""
    out: dict[Path, list[bytes]] = {}
    for stream in STREAMS:
        for path in nodefiles.hour_files(btc_data, stream, "by-block"):
            lines = path.read_bytes().splitlines(keepends=True)
            if lines and FIRST <= orjson.loads(lines[0])["block_number"] <= LAST:
                out[path.relative_to(btc_data)] = lines
    assert len(out) == len(STREAMS), out.keys()
    return out


def node_ms(text: str) -> int:
    """Epoch ms of a node timestamp (UTC, nanoseconds): ``2026-05-05T17:39:13.024084407``."""
    whole, _, frac = text.partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) * 1000 + int((frac + "000")[:3])


def expected_order_updates(lines: list[bytes], user: str) -> list[list[dict[str, Any]]]:
    """One orderUpdates message per block with statuses of ``user``, in node order."""
    messages = []
    for raw in lines:
        entries = []
        for status in orjson.loads(raw)["events"]:
            if status["user"] != user:
                continue
            o = status["order"]
            order = {k: o[k] for k in ("coin", "side", "limitPx", "sz", "oid", "timestamp", "origSz")}
            if o.get("cloid"):
                order["cloid"] = o["cloid"]
            entries.append({"order": order, "status": status["status"], "statusTimestamp": node_ms(status["time"])})
        if entries:
            messages.append(entries)
    return messages


NON_USER_CANCELS = ("reduceOnlyCanceled", "marginCanceled", "selfTradeCanceled", "siblingFilledCanceled")


def expected_user_events(status_lines: list[bytes], fill_lines: list[bytes], user: str) -> list[dict[str, Any]]:
    """The userEvents messages of each block: ``user``'s fills, then the orders of it the system
    canceled (``nonUserCancel``), one key a message as the public API's union type."""
    messages: list[dict[str, Any]] = []
    for statuses, fills in zip(status_lines, fill_lines):
        mine = [fill for who, fill in orjson.loads(fills)["events"] if who == user]
        if mine:
            messages.append({"fills": mine})
        cancels = [{"coin": s["order"]["coin"], "oid": s["order"]["oid"]} for s in orjson.loads(statuses)["events"]
                   if s["user"] == user and s["status"] in NON_USER_CANCELS]
        if cancels:
            messages.append({"nonUserCancel": cancels})
    return messages


def expected_fills(lines: list[bytes], user: str) -> list[dict[str, Any]]:
    """One userFills message per block with fills of ``user``: the node's fields as it wrote them
    (``twapId: null`` too, as the public API sends it)."""
    messages = []
    for raw in lines:
        fills = [fill for who, fill in orjson.loads(raw)["events"] if who == user]
        if fills:
            messages.append({"user": user, "fills": fills})
    return messages


def ingest_metric(port: int, name: str) -> float | None:
    """A metric of ingest; None while there is none (or no page yet)."""
    return metric(port, name, default=None, timeout=2)


def wait_for(what: str, check: Any, procs: list[subprocess.Popen[bytes]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            assert proc.poll() is None, f"{proc.args[3]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_order_updates_and_user_fills_equal_the_fixture_files(btc_data: Path, tmp_path: Path) -> None:
    files = fixture_lines(btc_data)
    statuses_file = next(p for p in files if "order_statuses" in str(p))
    fills_file = next(p for p in files if "fills" in str(p))
    n_blocks = len(files[statuses_file])
    assert all(len(lines) == n_blocks == LAST - FIRST + 1 for lines in files.values())
    counts = Counter(s["user"] for raw in files[statuses_file] for s in orjson.loads(raw)["events"])
    orders_user = counts.most_common(1)[0][0]  # 0x5884…: ~2700 statuses, ~100 a block
    fill_counts = Counter(who for raw in files[fills_file][4:] for who, _ in orjson.loads(raw)["events"])
    fills_user = fill_counts.most_common(1)[0][0]  # 0x17c3…: fills in 3 blocks
    cancel_counts = Counter(s["user"] for raw in files[statuses_file][4:] for s in orjson.loads(raw)["events"]
                            if s["status"] == "canceled" and s["user"] not in (orders_user, fills_user))
    events_user = cancel_counts.most_common(1)[0][0]
    rewritten = 0
    for i, raw in enumerate(files[statuses_file]):
        doc = orjson.loads(raw)
        for s in doc["events"]:
            if s["user"] == events_user and s["status"] == "canceled":
                s["status"] = NON_USER_CANCELS[rewritten % len(NON_USER_CANCELS)]
                rewritten += 1
        files[statuses_file][i] = orjson.dumps(doc) + b"\n"

    data = tmp_path / "data"
    for rel, lines in files.items():  # the first block's line of each stream, as the node had written it
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_bytes(lines[0])
    written = 1  # blocks written so far

    def write_blocks(upto: int) -> None:
        """Append the blocks before ``upto`` as a node does: each block's line in every stream
        (the first order_statuses line of the batch in two writes)."""
        nonlocal written
        first = written
        for i in range(written, upto):
            for rel, lines in files.items():
                with open(data / rel, "ab") as fh:
                    if i == first and "order_statuses" in str(rel):
                        fh.write(lines[i][:1000])
                        fh.flush()
                        fh.write(lines[i][1000:])
                    else:
                        fh.write(lines[i])
        written = max(written, upto)

    snapshot = shutil.copy(btc_data / "snapshot_985148181.json", tmp_path / "snapshot.json")
    sockets = tmp_path / "zmq"
    sockets.mkdir()
    ingest_pub, ingest_replay = f"ipc://{sockets}/ingest-pub", f"ipc://{sockets}/ingest-replay"
    book_pub, book_query = f"ipc://{sockets}/book-0-pub", f"ipc://{sockets}/book-0-query"
    metrics_port, port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "processes.log", "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "hlbook.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        procs.append(proc)
        return proc

    def status(path: str) -> int:
        try:
            return http_get(base + path)[0]
        except OSError:
            return 0

    try:
        start("ingest", "--data-dir", str(data), "--pub", ingest_pub, "--replay", ingest_replay,
              "--metrics-port", str(metrics_port), "--from-height", str(FIRST))
        wait_for("ingest to publish the first block", lambda: ingest_metric(metrics_port, "hlbook_ingest_head_height") == FIRST, procs)
        # the gateway takes WebSocket clients once every shard has reported its coins: one real shard
        # (BTC from the fixture's snapshot, the first block by replay from ingest)
        start("book", "--shard", "0", "--shards", "1", "--snapshot-file", str(snapshot), "--ingest-pub", ingest_pub,
              "--ingest-replay", ingest_replay, "--pub", book_pub, "--query", book_query)
        start("gateway", "--port", str(port), "--shards", "1", "--ingest-pub", ingest_pub,
              "--book-pub", book_pub, "--book-query", book_query)
        wait_for("gateway /health", lambda: status("/health") == 200, procs)
        while status("/ready") != 200:  # a shard block reaches the gateway after its start
            assert written < 6, "gateway never ready"
            write_blocks(written + 1)
            with contextlib.suppress(AssertionError):
                wait_for("gateway /ready", lambda: status("/ready") == 200, procs, timeout=3)
        followed_from = written  # blocks written from here on are expected in full

        async def session() -> tuple[list[Any], list[Any], list[Any], list[Any]]:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None, max_queue=None) as ws:
                for sub in ({"type": "orderUpdates", "user": orders_user}, {"type": "userFills", "user": fills_user},
                            {"type": "userEvents", "user": events_user}):
                    await ws.send(json.dumps({"method": "subscribe", "subscription": sub}))
                updates: list[Any] = []
                fills: list[Any] = []
                events: list[Any] = []
                others: list[Any] = []

                async def collect(until: float, done: Any) -> None:
                    while not done() and time.monotonic() < until:
                        try:
                            raw = await asyncio.wait_for(ws.recv(), max(0.01, until - time.monotonic()))
                        except TimeoutError:
                            return
                        message = json.loads(raw)
                        {"orderUpdates": updates, "userFills": fills, "user": events}.get(message["channel"], others).append(message["data"])

                # the three acks and the error saying userFills has no snapshot here (no history service: it
                # knows no earlier fills, and says so rather than an empty snapshot), then the subscriptions reach ingest
                await collect(time.monotonic() + 10, lambda: len(others) >= 4)
                wait_for("ingest to see the three user subscriptions",
                         lambda: ingest_metric(metrics_port, "hlbook_ingest_user_subscriptions") == 3, procs)

                for upto in range(followed_from + 8, n_blocks + 8, 8):  # the node writes the rest, 8 blocks at a time
                    write_blocks(min(upto, n_blocks))
                    await collect(time.monotonic() + 0.2, lambda: False)

                total = (sum(len(s) for s in expected_order_updates(files[statuses_file][followed_from:], orders_user)),
                         sum(len(m["fills"]) for m in expected_fills(files[fills_file][followed_from:], fills_user)),
                         len(expected_user_events(files[statuses_file][followed_from:], files[fills_file][followed_from:], events_user)))

                def complete() -> bool:
                    return (sum(map(len, updates)), sum(len(m.get("fills", ())) for m in fills), len(events)) >= total

                await collect(time.monotonic() + 15, complete)
                await collect(time.monotonic() + 0.5, lambda: False)  # nothing doubled arrives late
                return updates, fills, events, others

        updates, fills, events, others = asyncio.run(session())
        assert ingest_metric(metrics_port, "hlbook_ingest_head_height") == LAST
    finally:
        for proc in reversed(procs):
            stop_group(proc)
        log.close()
    logged = (tmp_path / "processes.log").read_text()
    # ingest and the shard exit 0 on SIGTERM; uvicorn shuts the gateway down gracefully, then re-raises SIGTERM (-15)
    assert [p.returncode for p in procs] == [0, 0, -15] and "Traceback" not in logged, logged[-3000:]

    want_updates = expected_order_updates(files[statuses_file][followed_from:], orders_user)
    want_fills = expected_fills(files[fills_file][followed_from:], fills_user)
    assert followed_from <= 3 and len(want_updates) >= 18 and sum(map(len, want_updates)) > 2000
    assert sum(len(m["fills"]) for m in want_fills) == 3
    want_events = expected_user_events(files[statuses_file][followed_from:], files[fills_file][followed_from:], events_user)
    assert sum(len(m.get("nonUserCancel", ())) for m in want_events) >= 5
    acks = [m for m in others if isinstance(m, dict) and m.get("method") == "subscribe"]
    errors = [m for m in others if isinstance(m, str)]
    assert len(acks) == 3 and len(others) == 4 and len(errors) == 1, others
    assert errors[0].startswith(f"userFills of {fills_user}: no history service here") and "new fills follow" in errors[0]
    assert all("isSnapshot" not in m for m in fills)
    got_entries, want_entries = [u for m in updates for u in m], [u for m in want_updates for u in m]
    assert len(got_entries) == len(want_entries)
    assert got_entries == want_entries  # every status, in node order, field by field
    assert updates == want_updates  # one message per block
    assert fills == want_fills
    assert events == want_events  # fills and nonUserCancel of each block, in node order

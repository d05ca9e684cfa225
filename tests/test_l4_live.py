"""l4Book through the whole system on real mainnet data, written live.

`hlbook up` (ingest, 2 shards, gateway) starts on an empty node directory and
the real BTC fixture (51,351 resting orders; its blocks played forward, then
backward, by ``services/nodesim/replay.py``) is appended block by block at the
node's pace while ``l4Book`` clients join one after the other:

- every snapshot equals the book rebuilt from the fixture at its height, the
  ``Updates`` after it have contiguous heights and bring it to the book
  rebuilt at the last height; no feed resyncs and nobody gets a second
  snapshot;
- another client, on ``l2Book`` in its own process, never waits longer than
  ``MAX_GAP`` between two blocks while the 51k-order snapshots are rendered
  and sent. The bound: blocks come every ~68 ms; before the snapshots were
  rendered in forked children and passed through as bytes, one snapshot froze
  the shard and the gateway for ~1 s (3-5 s with several joiners); 300 ms is
  4.4 block intervals, room for a busy 2-core CI machine, and far below any
  such freeze.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import orjson
import websockets

from conftest import free_port
from hlbook.client.books import L4Book
from hlbook.common.models import BookDiff, OrderStatus
from hlbook.services.book import snapshot
from hlbook.services.book.book import Book
from hlbook.services.nodesim.engine import Block
from hlbook.services.nodesim.replay import Replay, at_time, load
from hlbook.services.nodesim.writer import NodeWriter
from pipeline import http_get, stop_group

BLOCKS = 70  # the fixture's 25 blocks forward, backward, and forward again
JOIN_AT = (4, 12, 21, 30, 40, 52)  # blocks written when each l4Book client subscribes
SKIP_FIRST = 3  # l2Book messages before the gaps count (the client connects while the first blocks come)
MAX_GAP = 0.300  # seconds: see the module docstring
BLOCK_GAP = 0.068  # seconds between blocks (the fixture's mean)


def l2_client(url: str, until: float, conn: Any) -> None:
    """Another client: l2Book BTC, the receive time of each message (its own process, its own loop)."""
    async def run() -> list[tuple[float, int]]:
        got = []
        async with websockets.connect(url, max_size=None) as ws:
            await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "l2Book", "coin": "BTC"}}))
            while time.time() < until:
                try:
                    raw = await asyncio.wait_for(ws.recv(), max(0.01, until - time.time()))
                except TimeoutError:
                    break
                message = json.loads(raw)
                if message["channel"] == "l2Book":
                    got.append((time.monotonic(), message["data"]["time"]))
        return got

    conn.send(asyncio.run(run()))


def fingerprint(levels: list[list[dict[str, Any]]]) -> list[list[tuple[int, str, str, str]]]:
    """(oid, user, px, sz) per order in book order (the client library's ``L4Book.fingerprint``)."""
    return [[(o["oid"], o["user"], o["limitPx"], o["sz"]) for o in side] for side in levels]


def test_l4book_clients_joining_while_real_blocks_flow(btc_data: Path, tmp_path: Path) -> None:
    snap = tmp_path / "snapshot.json"
    shutil.copy(btc_data / "snapshot_985148181.json", snap)
    blocks = [b for b, _ in zip(Replay(load(btc_data, snap), start_ns=time.time_ns() + 10**10).blocks(), range(BLOCKS))]
    live = tmp_path / "node"
    live.mkdir()
    port = free_port()
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "up", "--no-simulate", "--data-dir", str(live), "--snapshot-file", str(snap),
         "--shards", "2", "--port", str(port), "--metrics-base-port", "0", "--sockets", str(tmp_path / "zmq")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    written = [0]
    try:
        deadline = time.monotonic() + 60
        while _status(port, "/health") != 200:
            assert up.poll() is None and time.monotonic() < deadline, (tmp_path / "up.log").read_text()[-3000:]
            time.sleep(0.1)

        def write() -> None:
            start = time.monotonic()
            with NodeWriter(live, ("by-block",), partial_p=0.0) as writer:
                for i, block in enumerate(blocks):
                    time.sleep(max(0.0, start + i * BLOCK_GAP - time.monotonic()))
                    writer.write_block(at_time(block, time.time_ns()))
                    written[0] = i + 1

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        while _status(port, "/ready") != 200:
            assert up.poll() is None and written[0] < 25, "never ready"
            time.sleep(0.05)

        url = f"ws://127.0.0.1:{port}/ws"
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe()
        watcher = ctx.Process(target=l2_client, args=(url, time.time() + BLOCKS * BLOCK_GAP + 3, child), daemon=True)
        watcher.start()
        joined = asyncio.run(_l4_clients(url, written))
        writer.join(30)
        gaps_seen = parent.recv() if parent.poll(30) else None
        watcher.join(5)
        resyncs = _metric(port, "hlbook_gateway_l4_resyncs_total")
    finally:
        stop_group(up)
        log.close()
    logged = (tmp_path / "up.log").read_text()
    assert "Traceback" not in logged and "resync" not in logged and resyncs == 0, logged[-3000:]

    # exact snapshots, contiguous updates, the final book
    last = blocks[-1].height
    books = _books_at(snap, blocks, {m["Snapshot"]["height"] for messages in joined for m in messages if "Snapshot" in m} | {last})
    assert len(joined) == len(JOIN_AT)
    for messages in joined:
        snaps = [m["Snapshot"] for m in messages if "Snapshot" in m]
        assert len(snaps) == 1, "a second snapshot: the feed resynced"
        first = snaps[0]
        height = first["height"]
        assert fingerprint(first["levels"]) == fingerprint(books[height]), f"snapshot at {height} differs"
        assert first["levels"] == books[height], f"snapshot at {height}: order details differ"
        client = L4Book("BTC")
        for message in messages:
            assert client.apply({"channel": "l4Book", "data": message}) in (True, False)
        heights = [m["Updates"]["height"] for m in messages if "Updates" in m]
        assert heights == list(range(height + 1, last + 1)), f"joined at {height}: updates {heights[:3]}..{heights[-3:]}"
        assert client.height == last and list(client.fingerprint()) == fingerprint(books[last])

    # the other client went on receiving every block
    assert gaps_seen is not None
    times = [t for t, _ in gaps_seen][SKIP_FIRST:]
    assert len(times) >= 0.8 * (BLOCKS - JOIN_AT[0] - SKIP_FIRST), f"l2Book for {len(times)} blocks"
    worst = max(b - a for a, b in zip(times, times[1:]))
    assert worst <= MAX_GAP, f"l2Book waited {worst * 1000:.0f} ms between two blocks"


async def _l4_clients(url: str, written: list[int]) -> list[list[dict[str, Any]]]:
    """One l4Book client per JOIN_AT; each keeps every l4Book message (raw until the end) up to block BLOCKS."""
    async def one(at: int) -> list[dict[str, Any]]:
        while written[0] < at:
            await asyncio.sleep(0.01)
        raw = []
        async with websockets.connect(url, max_size=None, max_queue=None) as ws:
            await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "l4Book", "coin": "BTC"}}))
            deadline = time.monotonic() + BLOCKS * BLOCK_GAP + 20
            while time.monotonic() < deadline:
                text = await asyncio.wait_for(ws.recv(), 10)
                if text.startswith('{"channel":"l4Book"'):
                    raw.append(text)
                    if f'"height":{_last_height}' in text[:200]:
                        break
        return [orjson.loads(text)["data"] for text in raw]

    return list(await asyncio.gather(*(one(at) for at in JOIN_AT)))


_last_height = 985148181 + BLOCKS


def _books_at(snap: Path, blocks: list[Block], heights: set[int]) -> dict[int, list[list[dict[str, Any]]]]:
    """The fixture's book rebuilt at ``heights``: l4 levels as the shard renders them."""
    _, books = snapshot.load_file(str(snap))
    book: Book = books["BTC"]
    out = {}
    for block in [None, *blocks]:
        if block is not None:
            diffs = msgspec.convert(block.diffs, list[BookDiff])
            book.apply(block.height, block.time_ns // 1_000_000, diffs, msgspec.convert(block.statuses, list[OrderStatus]))
        if book.height in heights:
            out[book.height] = [list(side) for side in book.l4_levels()]
    return out



def _metric(port: int, name: str) -> float | None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next((s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name), None)


def _status(port: int, path: str) -> int:
    try:
        return http_get(f"http://127.0.0.1:{port}{path}")[0]
    except OSError:
        return 0

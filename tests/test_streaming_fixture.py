"""The real mainnet fixture's node files appended live, block by block, through the real
``hlbook up`` (one shard, no history), in either layout: by-block lines, or streaming rows
(a block's rows span lines; a stream writes nothing for a block without events of its kind,
and BTC trades about one block in four here). A WebSocket client on BTC's l2Book, bbo and
trades gets every block's l2Book and every bbo change, each equal to the book built from the
snapshot in-process: the same per-block sequence in both layouts (before, a streaming block
waited for a fill or the block timeout, and blocks closing together reached the client as
their last state only); and every trade once."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from hlbook.common import nodefiles
from hlbook.common.models import DECODERS, STREAMS, block_time_ms
from hlbook.services.book import l2, snapshot
from pipeline import stop_group, wait_ready
from test_gateway import connect, receive, send, sub

SNAPSHOT = "snapshot_985148181.json"
RATE = 8.0  # blocks a second: 125 ms apart, so a busy test machine does not merge two into one conflated message
Levels = tuple[tuple[tuple[str, str, int], ...], ...]


@pytest.fixture(scope="module")
def reference(btc_data: Path) -> dict[str, Any]:
    """From the snapshot and the by-block files: each block's time (ms), the top 20 levels and the
    best bid/ask after it (the snapshot's too), and the trades' ids."""
    height, books = snapshot.load_file(str(btc_data / SNAPSHOT))
    book = books["BTC"]
    times, levels, bbos, tids = {}, {}, {}, []
    rows = nodefiles.block_lines(btc_data, STREAMS, "by-block")
    for h in [height, *sorted(rows)]:
        if h in rows:
            line = DECODERS["raw_book_diffs"].decode(rows[h]["raw_book_diffs"])
            book.apply(h, 0, line.events)
            times[h] = block_time_ms(line.block_time)
            tids += sorted({fill.tid for _, fill in DECODERS["fills"].decode(rows[h]["fills"]).events})
        levels[h] = tuple(tuple(tuple(level) for level in side) for side in l2.levels(book, 20))
        bbos[h] = tuple(None if level is None else level.wire() for level in book.bbo())
    return {"times": times, "levels": levels, "bbos": bbos, "tids": tids}


async def client(port: int, live: Path, mode: str, rows: dict[int, dict[str, bytes]]) -> list[dict[str, Any]]:
    """Subscribe, append every block at ``RATE``, and return what came."""
    ws = await connect(f"ws://127.0.0.1:{port}/ws")
    for feed in ("l2Book", "bbo", "trades"):
        await send(ws, sub("subscribe", {"type": feed, "coin": "BTC"}))
    for _ in range(3):
        await receive(ws, "subscriptionResponse")
    got: list[dict[str, Any]] = []

    async def read() -> None:
        while True:
            got.append(json.loads(await ws.recv()))

    reader = asyncio.create_task(read())
    await asyncio.sleep(0.5)  # the subscriptions reach the shard
    folder = "by_block" if mode == "by-block" else "streaming"
    start = time.monotonic()
    for i, height in enumerate(sorted(rows)):
        await asyncio.sleep(max(0.0, start + i / RATE - time.monotonic()))
        for stream, data in rows[height].items():
            path = live / "hl" / "data" / f"node_{stream}_{folder}" / "hourly" / "20260505" / "17"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as fh:
                fh.write(data)
    await asyncio.sleep(2.0)  # the last trades close on the block timeout
    reader.cancel()
    await ws.close()
    return got


def played(btc_data: Path, tmp: Path, mode: str) -> list[dict[str, Any]]:
    live, port = tmp / "node", free_port()
    live.mkdir()
    log = open(tmp / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "up", "--no-simulate", "--data-dir", str(live), "--snapshot-file",
         str(btc_data / SNAPSHOT), "--mode", mode, "--shards", "1", "--port", str(port), "--metrics-base-port", "0",
         "--sockets", str(tmp / "zmq"), "--state-dir", str(tmp / "state"), "--no-history"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_ready(f"http://127.0.0.1:{port}", up, 90)
        return asyncio.run(client(port, live, mode, nodefiles.block_lines(btc_data, STREAMS, mode)))
    finally:
        stop_group(up)
        log.close()


@pytest.mark.parametrize("mode", ["by-block", "streaming"])
def test_every_blocks_l2book_and_bbo_change_reaches_the_client_in_both_layouts(
        btc_data: Path, tmp_path: Path, reference: dict[str, Any], mode: str) -> None:
    messages = played(btc_data, tmp_path, mode)
    times, levels, bbos = reference["times"], reference["levels"], reference["bbos"]
    heights = sorted(times)[:-1]  # streaming: the last block closes when the next one's rows come (there are none)
    height_of = {times[h]: h for h in heights}
    got_l2: dict[int, list[Levels]] = {}
    got_bbo: dict[int, list[Any]] = {}
    tids = []
    for m in messages:
        data = m.get("data")
        if m["channel"] == "l2Book" and data["time"] in height_of:
            side = tuple(tuple((lv["px"], lv["sz"], lv["n"]) for lv in s) for s in data["levels"])
            got_l2.setdefault(height_of[data["time"]], []).append(side)
        elif m["channel"] == "bbo" and data["time"] in height_of:
            best = tuple(None if lv is None else (lv["px"], lv["sz"], lv["n"]) for lv in data["bbo"])
            got_bbo.setdefault(height_of[data["time"]], []).append(best)
        elif m["channel"] == "trades":
            tids += [t["tid"] for t in data]
    assert got_l2 == {h: [levels[h]] for h in heights if levels[h] != levels[h - 1]}  # every change, once, its own block
    assert got_bbo == {h: [bbos[h]] for h in heights if bbos[h] != bbos[h - 1]}
    assert tids == reference["tids"]  # every trade once, in order

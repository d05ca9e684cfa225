"""Streaming vs by-block layout, end to end: the real mainnet BTC fixture
(``tests/data/mainnet_btc_985148181_985148206``, 25 blocks) appended live to the
node files at ``--rate`` blocks/s through the real ``hlbook up`` (one shard, one
gateway, no history), one WebSocket client on BTC's l2Book, bbo, trades and l4Book.

Per mode, in the same run: the fixture's files of that layout are appended block by
block (every line or row of a block, statuses, diffs then fills, one ``write`` each);
**append instant** = right after the block's last write. The client stamps each
message at receipt and matches it to its block by ``time`` (the block time in ms).
The reference is the snapshot with each block's diffs applied in-process (the top 20
levels and the best bid/ask after each block). Printed per mode:

- l2Book: blocks whose l2Book the client got / blocks that changed the top 20 levels;
- bbo changes missing / blocks that changed the best bid or ask;
- values that differ from the reference (must be 0);
- append -> client p50 / p99 / max of l2Book (and of trades);

over the blocks but the last: in streaming mode a block closes when the next one's rows
come, and the fixture has none after its last block.

    .venv/bin/python bench/streaming.py [--rate 15] [--modes by-block,streaming] [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import websockets

from hlbook.common import nodefiles
from hlbook.common.models import DECODERS, STREAMS, block_time_ms
from hlbook.services.book import l2, snapshot

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "mainnet_btc_985148181_985148206.tar.gz"
SNAPSHOT = "snapshot_985148181.json"
FEEDS = ({"type": "l2Book", "coin": "BTC"}, {"type": "bbo", "coin": "BTC"}, {"type": "trades", "coin": "BTC"},
         {"type": "l4Book", "coin": "BTC"})
Levels = tuple[tuple[tuple[str, str, int], ...], ...]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reference(data: Path) -> tuple[dict[int, int], dict[int, Levels], dict[int, Any], dict[int, int]]:
    """From the by-block files and the snapshot: height -> block time (ms), the top 20 levels
    and the best bid/ask after each block (the snapshot's too), and its number of trades."""
    height, books = snapshot.load_file(str(data / SNAPSHOT))
    book = books["BTC"]
    times, levels, bbos, trades = {}, {}, {}, {}
    lines = nodefiles.block_lines(data, STREAMS, "by-block")
    for height in [height, *sorted(lines)]:
        if height in lines:
            line = DECODERS["raw_book_diffs"].decode(lines[height]["raw_book_diffs"])
            book.apply(height, 0, line.events)
            times[height] = block_time_ms(line.block_time)
            trades[height] = len(orjson.loads(lines[height]["fills"])["events"]) // 2
        levels[height] = tuple(tuple(tuple(level) for level in side) for side in l2.levels(book, 20))
        bbos[height] = tuple(None if level is None else level.wire() for level in book.bbo())
    return times, levels, bbos, trades


class Client:
    """One WebSocket client on ``FEEDS``; every message of a block stamped at receipt."""

    def __init__(self) -> None:
        self.l2: list[tuple[int, int, Levels]] = []  # (time ms, receipt ns, levels)
        self.bbo: list[tuple[int, int, Any]] = []
        self.trades: list[tuple[int, int]] = []  # (time ms, receipt ns) per trade
        self.l4 = asyncio.Event()

    async def run(self, url: str, ready: asyncio.Event) -> None:
        async with websockets.connect(url, max_size=None, compression=None) as ws:
            for feed in FEEDS:
                await ws.send(orjson.dumps({"method": "subscribe", "subscription": feed}).decode())
            while True:
                text = await ws.recv()
                now = time.monotonic_ns()
                self.take(orjson.loads(text), now)
                if self.l4.is_set():
                    ready.set()

    def take(self, message: dict[str, Any], now: int) -> None:
        channel, data = message.get("channel"), message.get("data")
        if channel == "l2Book":
            self.l2.append((data["time"], now, tuple(tuple((lv["px"], lv["sz"], lv["n"]) for lv in side) for side in data["levels"])))
        elif channel == "bbo":
            self.bbo.append((data["time"], now, tuple(None if lv is None else (lv["px"], lv["sz"], lv["n"]) for lv in data["bbo"])))
        elif channel == "trades":
            self.trades += [(t["time"], now) for t in data]
        elif channel == "l4Book":
            self.l4.set()


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "hlbook up exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("hlbook up never ready")


async def play(port: int, live: Path, mode: str, blocks: dict[int, dict[str, bytes]], rate: float) -> tuple[Client, dict[int, int]]:
    """Subscribe, then append every block at ``rate``; (the client, height -> append instant ns)."""
    client, ready = Client(), asyncio.Event()
    task = asyncio.create_task(client.run(f"ws://127.0.0.1:{port}/ws", ready))
    await asyncio.wait_for(ready.wait(), 60)
    await asyncio.sleep(0.5)
    hour = live / "hl" / "data"
    appended: dict[int, int] = {}
    start = time.monotonic()
    for i, height in enumerate(sorted(blocks)):
        await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        for stream in STREAMS:
            data = blocks[height].get(stream)
            if data:
                path = hour / f"node_{stream}_{mode.replace('-', '_')}" / "hourly" / "20260505" / "17"
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(path, "ab", buffering=0) as fh:
                    fh.write(data)
        appended[height] = time.monotonic_ns()
    await asyncio.sleep(3.0)
    task.cancel()
    return client, appended


def run_mode(mode: str, data: Path, tmp: Path, rate: float) -> tuple[Client, dict[int, int]]:
    live, port = tmp / "node", free_port()
    live.mkdir()
    log = open(tmp / "up.log", "wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "up", "--no-simulate", "--data-dir", str(live), "--snapshot-file", str(data / SNAPSHOT),
         "--mode", mode, "--shards", "1", "--port", str(port), "--metrics-base-port", "0", "--sockets", str(tmp / "zmq"),
         "--state-dir", str(tmp / "state"), "--no-history", "--log-level", "WARNING"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_ready(port, up)
        return asyncio.run(play(port, live, mode, nodefiles.block_lines(data, STREAMS, mode), rate))
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(30)
        log.close()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def report(mode: str, client: Client, appended: dict[int, int], ref: tuple[Any, ...]) -> str:
    times, levels, bbos, trades = ref
    heights = sorted(times)[:-1]  # the last block: see the module
    height_of = {times[h]: h for h in heights}
    changed_l2 = {h for h in heights if levels[h] != levels[h - 1]}
    changed_bbo = {h for h in heights if bbos[h] != bbos[h - 1]}
    got_l2 = {height_of[t]: (now, lv) for t, now, lv in client.l2 if t in height_of}
    got_bbo = {height_of[t]: bbo for t, _, bbo in client.bbo if t in height_of}
    wrong = sum(lv != levels[h] for h, (_, lv) in got_l2.items()) + sum(b != bbos[h] for h, b in got_bbo.items())
    l2_ms = [(now - appended[h]) / 1e6 for h, (now, _) in got_l2.items()]
    trade_ms = [(now - appended[height_of[t]]) / 1e6 for t, now in client.trades if t in height_of]
    n_trades = sum(trades[h] for h in heights)
    return (f"| {mode} | {len(set(got_l2) & changed_l2)} / {len(changed_l2)} | {len(changed_bbo - set(got_bbo))} / {len(changed_bbo)} "
            f"| {wrong} | {pct(l2_ms, 0.5):.1f} / {pct(l2_ms, 0.99):.1f} / {max(l2_ms, default=float('nan')):.1f} "
            f"| {len(trade_ms)} / {n_trades}, p50 {pct(trade_ms, 0.5):.0f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=15.0, help="blocks appended a second")
    parser.add_argument("--modes", default="by-block,streaming")
    parser.add_argument("--runs", type=int, default=1, help="runs of each mode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hlbook-bench-streaming-") as scratch:
        data = Path(scratch) / "fixture"
        with tarfile.open(FIXTURE) as tar:
            tar.extractall(data, filter="data")
        ref = reference(data)
        print(f"{len(ref[0]) - 1} blocks (of {len(ref[0])}) at {args.rate:g} blocks/s, one client on BTC l2Book/bbo/trades/l4Book", flush=True)
        print("| layout | l2Book blocks got | bbo changes missing | values wrong | append -> client l2Book p50 / p99 / max (ms) | trades |")
        print("|---|---|---|---|---|---|")
        for run in range(args.runs):
            for mode in args.modes.split(","):
                tmp = Path(scratch) / f"{mode}-{run}"
                tmp.mkdir()
                client, appended = run_mode(mode, data, tmp, args.rate)
                print(report(mode, client, appended, ref), flush=True)


if __name__ == "__main__":
    main()

"""`hlbook replay` over the real fixture (mainnet_btc_985148181_985148206): a checkpoint made
from the node snapshot at 985148181, then blocks 182..206 from the node files, give a client
the l2Book and trades frames a live client got for the same blocks, value for value."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from conftest import free_port, metric
from hlbook.common import nodefiles
from hlbook.common.models import STREAMS, block_time_ms
from hlbook.services.book import checkpoint, snapshot
from hlbook.services.book.checkpoint import Header
from hlbook.services.replay.plan import Point, ReplayError, Start, check, choose, parse_point
from pipeline import post_info, stop_group
from test_book_shard import ShardProcess
from test_book_sim import Sim, advance

SNAPSHOT, FIRST, LAST = 985148181, 985148182, 985148206
SUBSCRIPTIONS = ({"type": "l2Book", "coin": "BTC"}, {"type": "trades", "coin": "BTC"})
LIVE_GAP = 0.14  # seconds between two blocks written live (twice the node's pace: one block per gateway turn)
SPEED = 0.5  # the replay's pace: the same


def block_lines(btc_data: Path) -> dict[Path, list[bytes]]:
    """Relative path -> the by-block lines of each stream (one per block, FIRST..LAST)."""
    out = {}
    for stream in STREAMS:
        (path,) = nodefiles.hour_files(btc_data, stream, "by-block")
        out[path.relative_to(btc_data)] = path.read_bytes().splitlines(keepends=True)
    assert all(len(lines) == LAST - FIRST + 1 for lines in out.values())
    return out


def block_times(lines: dict[Path, list[bytes]]) -> list[int]:
    diffs = next(v for k, v in lines.items() if "raw_book_diffs" in str(k))
    return [block_time_ms(orjson.loads(line)["block_time"]) for line in diffs]


async def collect(url: str, subscribed: Callable[[], Any], last_time: int, timeout: float = 30,
                  read_every: float = 0.0) -> dict[str, list[Any]]:
    """Connect (retrying while the gateway starts), subscribe, wait for the current book, call
    ``subscribed`` (awaited), then keep every l2Book and trades data until the book of ``last_time``
    (``at``: when each l2Book came, monotonic; ``read_every``: a slow client, sleeping after each message)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            ws = await websockets.connect(url, max_size=None, max_queue=None)
            break
        except (OSError, websockets.InvalidStatus):
            assert time.monotonic() < deadline, "the gateway never took the connection"
            await asyncio.sleep(0.1)
    got: dict[str, list[Any]] = {"l2Book": [], "trades": [], "at": []}
    async with ws:
        for sub in SUBSCRIPTIONS:
            await ws.send(json.dumps({"method": "subscribe", "subscription": sub}))
        while not got["l2Book"]:  # the book as the subscription found it: the shard has it
            message = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if message["channel"] in ("l2Book", "trades"):
                got[message["channel"]].append(message["data"])
                got["at"].append(time.monotonic())
        started = asyncio.ensure_future(subscribed())
        while time.monotonic() < deadline:
            try:
                message = json.loads(await asyncio.wait_for(ws.recv(), 1))
            except TimeoutError:
                if got["l2Book"][-1]["time"] == last_time and started.done():
                    break
                continue
            if message["channel"] in ("l2Book", "trades"):
                got[message["channel"]].append(message["data"])
                if message["channel"] == "l2Book":
                    got["at"].append(time.monotonic())
            await asyncio.sleep(read_every)
        await started
    return got


def after(frames: dict[str, list[Any]], first_time: int) -> dict[str, list[Any]]:
    """The frames of the blocks from ``first_time`` on (not the book the subscription found)."""
    return {"l2Book": [d for d in frames["l2Book"] if d["time"] >= first_time],
            "trades": [t for d in frames["trades"] for t in d]}


def pace(frames: dict[str, list[Any]], first_time: int) -> tuple[float, float]:
    """(seconds between the first and last block's book on the wall clock, in block time)."""
    came = [(at, d["time"]) for at, d in zip(frames["at"], frames["l2Book"]) if d["time"] >= first_time]
    return came[-1][0] - came[0][0], (came[-1][1] - came[0][1]) / 1000


def start_process(tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    log = open(tmp_path / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "hlbook.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)


def start_live(btc_data: Path, tmp_path: Path, data: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`hlbook up` (1 shard, no history, no checkpoints of its own) from the fixture's snapshot on the
    node folder ``data``, its state in ``tmp_path / "state"``; and its port."""
    port = free_port()
    up = start_process(tmp_path, "up", "up", "--no-simulate", "--data-dir", str(data), "--snapshot-file",
                       str(btc_data / f"snapshot_{SNAPSHOT}.json"), "--shards", "1", "--no-history", "--port", str(port),
                       "--metrics-base-port", "0", "--sockets", str(tmp_path / "zmq"), "--state-dir", str(tmp_path / "state"),
                       "--checkpoint-every", "0")
    return up, port


def writer(data: Path, lines: dict[Path, list[bytes]], gap: float = LIVE_GAP) -> Callable[[], Awaitable[None]]:
    """Writes the fixture's blocks into ``data`` as the node does, one every ``gap`` seconds."""
    async def write() -> None:
        for i in range(LAST - FIRST + 1):
            for rel, stream_lines in lines.items():
                (data / rel).parent.mkdir(parents=True, exist_ok=True)
                with open(data / rel, "ab") as fh:
                    fh.write(stream_lines[i])
            await asyncio.sleep(gap)

    return write


def live_frames(btc_data: Path, tmp_path: Path, lines: dict[Path, list[bytes]], times: list[int]) -> dict[str, list[Any]]:
    """What a live client gets while the node writes the fixture's blocks (hlbook up, from the snapshot)."""
    data = tmp_path / "live"
    data.mkdir()
    up, port = start_live(btc_data, tmp_path, data)
    try:
        return asyncio.run(collect(f"ws://127.0.0.1:{port}/ws", writer(data, lines), times[-1]))
    finally:
        stop_group(up)
        assert "Traceback" not in (tmp_path / "up.log").read_text()


def fills_of(lines: dict[Path, list[bytes]]) -> dict[str, list[tuple[int, str, str]]]:
    """(tid, px, sz) of each user's fills in the fixture's blocks."""
    fills: dict[str, list[tuple[int, str, str]]] = {}
    for line in next(v for k, v in lines.items() if "fills" in str(k)):
        for user, fill in orjson.loads(line)["events"]:
            fills.setdefault(user, []).append((fill["tid"], fill["px"], fill["sz"]))
    return fills


def user_fills(port: int, user: str) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + 15
    while True:
        try:
            status, got = post_info(f"http://127.0.0.1:{port}", {"type": "userFills", "user": user})
        except OSError:
            status, got = 0, None
        if status == 200:
            return sorted((f["tid"], f["px"], f["sz"]) for f in got)
        assert time.monotonic() < deadline, (status, got)
        time.sleep(0.1)


def replay_frames(btc_data: Path, tmp_path: Path, times: list[int], *args: str, read_every: float = 0.0,
                  env: dict[str, str] | None = None, to: str = str(LAST),
                  user: str | None = None, metrics_port: int = 0) -> tuple[dict[str, list[Any]], str]:
    """What a client of `hlbook replay` gets (it subscribes before the first block: --wait-clients);
    with ``user``: ``frames["fills"]`` holds the user's userFills before the first block and at the end;
    with ``metrics_port``: ``frames["clock"]``, the replay clock its ingest's metrics said at the end."""
    port = free_port()
    if metrics_port:
        args = (*args, "--metrics-port", str(metrics_port))
    replay = start_process(tmp_path, "replay", "replay", "--from", str(FIRST), "--to", to, "--data-dir", str(btc_data),
                   "--checkpoint-dir", str(tmp_path / "checkpoints"), "--port", str(port),
                   "--wait-clients", str(len(SUBSCRIPTIONS)), "--log-level", "INFO", *args, env=env)

    async def nothing() -> None:
        return None

    try:
        before = user_fills(port, user) if user else []
        frames = asyncio.run(collect(f"ws://127.0.0.1:{port}/ws", nothing, times[-1], read_every=read_every))
        frames["fills"] = [before, user_fills(port, user) if user else []]
        frames["clock"] = [metric(metrics_port, "hlbook_ingest_head_time_seconds")] if metrics_port else []
    finally:
        stop_group(replay)
    logged = (tmp_path / "replay.log").read_text()
    assert "Traceback" not in logged and replay.returncode == 0, logged[-3000:]
    left = [p for p in Path(tempfile.gettempdir()).glob("hlbook-*-*") if (p / ".hlbook-owner").is_file()
            and (p / ".hlbook-owner").read_text() == str(replay.pid)]
    assert left == []  # its sockets and scratch folders went with it
    return frames, logged


@pytest.fixture()
def fixture_checkpoint(btc_data: Path, tmp_path: Path) -> Path:
    height, books = snapshot.load_file(str(btc_data / f"snapshot_{SNAPSHOT}.json"))
    first_time = block_times(block_lines(btc_data))[0]
    return checkpoint.write(tmp_path / "checkpoints", Header(height, first_time - 70, 0, 1, 0, ""), books)


def test_a_replay_from_the_checkpoint_gives_the_frames_a_live_client_got(btc_data: Path, tmp_path: Path,
                                                                         fixture_checkpoint: Path) -> None:
    lines = block_lines(btc_data)
    times = block_times(lines)
    live = after(live_frames(btc_data, tmp_path, lines, times), times[0])
    assert len(live["l2Book"]) >= 20 and len(live["trades"]) == 6  # the fixture: 12 fills, 6 trades

    fills = fills_of(lines)
    user = max(fills, key=lambda u: len(fills[u]))
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()}
    metrics_port = free_port()
    frames, logged = replay_frames(btc_data, tmp_path, times, "--speed", str(SPEED), user=user, metrics_port=metrics_port)
    assert frames["clock"] == [times[-1] / 1000] and f"http://127.0.0.1:{metrics_port}/metrics" in logged  # the replay clock
    assert frames["fills"] == [[], sorted(fills[user])]  # history as of the replay clock: none before the first block
    replayed = after(frames, times[0])
    assert [d["time"] for d in replayed["l2Book"]] == [d["time"] for d in live["l2Book"]]
    assert replayed == live  # every level of every book, every trade, value for value
    assert f"l4-{SNAPSHOT}-0of1.ckpt" in logged and "reached --to" in logged
    wall, block_time = pace(frames, times[0])
    assert abs(wall - block_time / SPEED) <= 0.05 * block_time / SPEED, (wall, block_time / SPEED)  # --speed: within 5 %

    # as fast as read, a client reading one message every 20 ms and 2 messages queued at most for it in the gateway:
    # the replay waits for it (nothing conflated, nobody cut off), and it gets every frame
    last = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(times[-1] // 1000)) + f".{times[-1] % 1000:03d}"
    frames, logged = replay_frames(btc_data, tmp_path, times, "--as-fast-as-read", read_every=0.02,
                                   env={"HLBOOK_QUEUE_SIZE": "2"}, to=last)  # --to as a time: the last block's
    assert after(frames, times[0]) == live and "as fast as read" in logged
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "checkpoints").iterdir()} == kept  # read, never written


def test_choosing_checkpoints(tmp_path: Path) -> None:
    for height, shard in ((100, 0), (100, 1), (200, 0), (300, 0), (300, 1), (250, 1)):
        checkpoint.write(tmp_path, Header(height, height * 1000, shard, 2, 0, ""), {})
    checkpoint.write(tmp_path, Header(280, 280_000, 0, 1, 0, ""), {})
    start = choose(tmp_path, Point(height=270))
    assert (start.shards, start.heights, start.height) == (2, [200, 250], 200)  # 280 (one shard) is after 270
    assert choose(tmp_path, Point(time_ms=300_000)).heights == [300, 300]
    assert choose(tmp_path, Point(height=290)).heights == [280]
    with pytest.raises(ReplayError):
        choose(tmp_path, Point(height=99))
    assert parse_point("985148182") == Point(height=985148182)
    assert parse_point("2026-05-05T17:39:13.024Z") == Point(time_ms=1_778_002_753_024)
    with pytest.raises(ReplayError):
        parse_point("yesterday")


def test_a_replay_the_files_no_longer_hold_is_refused(btc_data: Path, tmp_path: Path) -> None:
    fixture = Start(1, [tmp_path / "c"], [SNAPSHOT], [0])
    check(btc_data, "by-block", fixture, Point(height=FIRST), Point(height=LAST))
    for start, begin, end, why in ((Start(1, [tmp_path / "c"], [SNAPSHOT - 10], [0]), FIRST, LAST, "holds block"),
                                   (fixture, SNAPSHOT, SNAPSHOT, "not after"), (fixture, FIRST, FIRST - 1, "before --from")):
        with pytest.raises(ReplayError, match=why):
            check(btc_data, "by-block", start, Point(height=begin), Point(height=end))


def test_a_two_shard_replay_from_checkpoints_at_different_heights_ends_at_the_nodes_books(tmp_path: Path) -> None:
    """The simulator's market: two live shards write checkpoints (each at its own height); a replay as
    fast as read from them to a later block serves, for every coin, the l2Book of the node's true book."""
    sim = Sim(tmp_path)
    shards: list[ShardProcess] = []
    try:
        base, truth = sim.snapshot()
        directory = tmp_path / "checkpoints"
        shards = [ShardProcess(tmp_path, f"s{k}", k, 2, sim.ingest_eps, "--info-url", sim.url, "--checkpoint-every",
                               str(1 / 60), "--checkpoint-dir", str(directory), production=True) for k in range(2)]
        deadline = time.monotonic() + 30
        while {k for _, _, k, _ in checkpoint.listing(directory)} != {0, 1}:
            assert time.monotonic() < deadline, [s.log_text()[-1000:] for s in shards]
            time.sleep(0.1)
        time.sleep(1.0)  # more blocks after them
    finally:
        for shard in shards:
            shard.stop()
        sim.stop()
    found = checkpoint.listing(directory)
    start = max(min(h for _, h, k, _ in found if k == shard) for shard in (0, 1))  # each shard has one at or before it
    (diffs,) = nodefiles.hour_files(sim.data, "raw_book_diffs", "by-block")
    last = nodefiles.tail(diffs)[1]
    assert last is not None and last > start + 10
    plan = choose(directory, Point(height=start))
    assert plan.shards == 2 and plan.height > base

    coins = sorted(c for c in truth if truth[c].bids.levels or truth[c].asks.levels)
    assert len(coins) >= 8
    left_out = coins.pop()  # --coins: all but this one
    port = free_port()
    replay = start_process(tmp_path, "replay", "replay", "--from", str(start), "--to", str(last), "--as-fast-as-read",
                           "--data-dir", str(sim.data), "--checkpoint-dir", str(directory), "--port", str(port),
                           *(arg for coin in coins for arg in ("--coins", coin)))
    try:
        deadline = time.monotonic() + 30
        while "reached --to" not in (tmp_path / "replay.log").read_text():
            assert replay.poll() is None and time.monotonic() < deadline, (tmp_path / "replay.log").read_text()[-3000:]
            time.sleep(0.2)
        assert post_info(f"http://127.0.0.1:{port}", {"type": "l2Book", "coin": left_out}) == (200, None)  # no such market here
        for coin in coins:
            want = advance(sim.data, truth[coin], base, last)
            status, got = post_info(f"http://127.0.0.1:{port}", {"type": "l2Book", "coin": coin})
            assert status == 200, (coin, got)
            levels = [[(lv["px"], lv["sz"], lv["n"]) for lv in side] for side in got["levels"]]
            assert levels == [[lv.wire() for lv in side.top(20)] for side in (want.bids, want.asks)], coin
    finally:
        stop_group(replay)
    logged = (tmp_path / "replay.log").read_text()
    assert "Traceback" not in logged and "ERROR" not in logged, logged[-3000:]

"""l4Book in the real gateway against a scripted shard, so every ordering that used
to lose updates is reproduced deterministically:

- the subscribe/snapshot race: the gateway asks for a snapshot only after the
  shard's sync marker proved its ``L4|`` subscription arrived;
- blocks that finish while the snapshot is fetched reach the client after it,
  contiguous (empty ``Updates`` for blocks that left the coin unchanged);
- a later joiner is served from the cached snapshot without a new query;
- a lost update resyncs every subscriber, also with a snapshot newer than the
  stream (the blocks it already holds are skipped).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest
import websockets
import zmq

from conftest import free_port
from hlbook.common import topics, wire
from hlbook.common.models import BookDiff, DiffBody, NewDiff
from pipeline import stop_group, wait_ready

COIN = "BTC"
USER = "0x" + "ab" * 20


class ScriptedShard:
    """The shard side of the wire (XPUB + ROUTER on ipc); the test says what happens when."""

    def __init__(self, tmp: Path) -> None:
        self.ctx = zmq.Context()
        self.pub_ep, self.query_ep = f"ipc://{tmp}/shard-pub", f"ipc://{tmp}/shard-query"
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.bind(self.pub_ep)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(self.query_ep)
        self.prev = wire.PrevTracker()
        self.height = 100
        self.last_change: int | None = None

    def block(self, change: bool = False) -> dict[str, Any] | None:
        """Finish the next block (its L4 update first when it changed the coin); the update's client JSON."""
        self.height += 1
        updates = None
        if change:
            diff = BookDiff(USER, self.height, COIN, "B", "100.0", DiffBody(new=NewDiff("1.5")))
            message = wire.L4Updates(self.height, self.prev.next(topics.l4(COIN), self.height), self.height * 1000, COIN, [], [diff])
            self.xpub.send_multipart([topics.l4(COIN), wire.encode(message)])
            self.last_change = self.height
            updates = {"time": message.time, "height": self.height, "order_statuses": [], "book_diffs": [msgspec.to_builtins(diff)]}
        block = wire.ShardBlock(self.height, self.prev.next(topics.shard_block(0), self.height), self.height * 1000, 0,
                                {COIN: "100.5"}, {COIN: "live"})
        self.xpub.send_multipart([topics.shard_block(0), wire.encode(block)])
        return updates

    def lost_update(self) -> None:
        """An L4 update whose predecessor never reached the gateway (as when PUB drops at its HWM)."""
        self.height += 1
        self.prev.next(topics.l4(COIN), self.height)  # sent into the void
        self.height += 1
        message = wire.L4Updates(self.height, self.prev.next(topics.l4(COIN), self.height), self.height * 1000, COIN, [], [])
        self.xpub.send_multipart([topics.l4(COIN), wire.encode(message)])

    def sync(self) -> None:
        self.xpub.send_multipart([topics.l4(COIN), wire.encode(wire.L4Sync(self.height, self.prev.peek(topics.l4(COIN)), COIN))])

    def await_subscription(self, topic: bytes, timeout: float = 5.0) -> None:
        """Read subscription events until ``topic``'s (the gateway's standing ones come first)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.xpub.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"{topic!r} never subscribed"
            if self.xpub.recv() == b"\x01" + topic:
                return

    def query(self, timeout: float = 5.0) -> tuple[list[bytes], wire.Query] | None:
        if not self.router.poll(int(timeout * 1000)):
            return None
        frames = self.router.recv_multipart()
        return frames[:-1], wire.decode(frames[-1], wire.Query)

    def answer_l4(self, envelope: list[bytes], height: int, levels: list[list[dict[str, Any]]]) -> None:
        body = json.dumps(levels, separators=(",", ":")).encode()
        header = wire.L4Snapshot(True, COIN, height, height * 1000, len(body))
        self.router.send_multipart([*envelope, wire.encode(header), body[:7], body[7:]])  # in two frames, as big ones come

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def levels_at(height: int) -> list[list[dict[str, Any]]]:
    return [[{"user": USER, "coin": COIN, "side": "B", "limitPx": "100.0", "sz": "1.0", "oid": height}], []]


async def receive_l4(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if message["channel"] == "l4Book":
            return message["data"]


@pytest.fixture
def setup(tmp_path: Path):
    shard = ScriptedShard(tmp_path)
    port = free_port()
    log = open(tmp_path / "gateway.log", "wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "gateway", "--port", str(port), "--shards", "1",
         "--ingest-pub", f"ipc://{tmp_path}/no-ingest-pub", "--ingest-replay", f"ipc://{tmp_path}/no-ingest-replay",
         "--book-pub", shard.pub_ep, "--book-query", shard.query_ep],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        for _ in range(300):  # blocks until the gateway has seen the shard
            shard.block()
            if _ready(port):
                break
            time.sleep(0.05)
        wait_ready(f"http://127.0.0.1:{port}", gateway, 10)
        yield shard, f"ws://127.0.0.1:{port}/ws"
    finally:
        stop_group(gateway)
        shard.close()
        log.close()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=0.2) as r:
            return r.status == 200
    except OSError:
        return False


def test_snapshot_joins_the_stream_whatever_the_order_of_events(setup) -> None:
    shard, url = setup

    async def run() -> None:
        first = await websockets.connect(url, max_size=None)
        await first.send(json.dumps({"method": "subscribe", "subscription": {"type": "l4Book", "coin": COIN}}))
        shard.await_subscription(topics.l4(COIN))

        # the race: an update reaches the gateway, but the shard has not confirmed the subscription yet:
        # the gateway must not ask for a snapshot (one taken now could miss what the stream brings next)
        shard.block(change=True)
        assert shard.query(timeout=0.5) is None, "snapshot asked for before the shard confirmed the subscription"
        shard.sync()
        marker = shard.height
        envelope, query = shard.query()
        assert query.op == "l4" and query.coin == COIN and query.min_height == marker

        # blocks finish while the snapshot is being fetched; the snapshot is of an earlier one
        expected: dict[int, Any] = {}
        for change in (True, False, True):
            updates = shard.block(change=change)
            expected[shard.height] = updates
        shard.answer_l4(envelope, marker + 1, levels_at(marker + 1))
        snap = (await receive_l4(first))["Snapshot"]
        assert (snap["height"], snap["levels"], snap["coin"]) == (marker + 1, levels_at(marker + 1), COIN)
        for height in range(marker + 2, shard.height + 1):
            updates = (await receive_l4(first))["Updates"]
            want = expected[height] or {"time": height * 1000, "height": height, "order_statuses": [], "book_diffs": []}
            assert updates == want

        # a second subscriber: the cached snapshot and the blocks after it, no new query
        second = await websockets.connect(url, max_size=None)
        await second.send(json.dumps({"method": "subscribe", "subscription": {"type": "l4Book", "coin": COIN}}))
        assert (await receive_l4(second))["Snapshot"]["height"] == marker + 1
        assert [(await receive_l4(second))["Updates"]["height"] for _ in range(marker + 2, shard.height + 1)] == \
            list(range(marker + 2, shard.height + 1))
        assert shard.query(timeout=0.3) is None
        shard.block(change=True)
        live = shard.height
        assert (await receive_l4(first))["Updates"]["height"] == live
        assert (await receive_l4(second))["Updates"]["height"] == live

        # a lost update: both get a fresh snapshot; this one is ahead of what the stream has brought
        shard.lost_update()
        envelope, query = shard.query()
        assert query.min_height == shard.height
        ahead = shard.height + 2
        shard.answer_l4(envelope, ahead, levels_at(ahead))
        for ws in (first, second):
            assert (await receive_l4(ws))["Snapshot"]["height"] == ahead
        for _ in range(3):
            shard.block(change=True)
        for ws in (first, second):  # ahead + 1 is the first block the snapshot does not hold
            assert [(await receive_l4(ws))["Updates"]["height"] for _ in range(shard.height - ahead)] == \
                list(range(ahead + 1, shard.height + 1))
        await first.close()
        await second.close()

    asyncio.run(run())

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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from hlbook.common import topics, wire
from scripted import COIN, USER, ScriptedShard, scripted_gateway

def levels_at(height: int) -> list[list[dict[str, Any]]]:
    return [[{"user": USER, "coin": COIN, "side": "B", "limitPx": "100.0", "sz": "1.0", "oid": height}], []]


async def receive_l4(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if message["channel"] == "l4Book":
            return message["data"]


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[ScriptedShard, str]]:
    with scripted_gateway(tmp_path) as (shard, port):
        yield shard, f"ws://127.0.0.1:{port}/ws"


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
        assert isinstance(query, wire.L4Query) and query.coin == COIN and query.min_height == marker

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

"""Real node blocks, played for as long as needed: forward, then backward.

A capture of real node data (a snapshot at height S and the by-block files of
blocks S+1..S+n) runs out after n blocks. :class:`Replay` plays those blocks
as recorded, then the same blocks in reverse order with every diff inverted
(``new`` <-> ``remove`` with the size the order had, ``update`` back to the
previous size), which brings the book back to the snapshot's orders and
sizes; then forward again, and so on. Heights and block times go on
increasing; statuses and fills are the recorded ones (fills' ``time`` and
``tid`` renewed, so trades stay distinct). Every block is consistent with the
books of the blocks before it, so ingest and the shards run on real line
sizes, real book shapes and real status mixes for any length of time. Time
priority inside a level drifts from the node's after the first backward pass
(a re-inserted order goes to the back of its level).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from hlbook.common import nodefiles
from hlbook.common.models import STREAMS, block_time_ms
from hlbook.services.nodesim.block import node_time
from hlbook.services.nodesim.engine import Block

Event = dict[str, Any]
TID_STEP = 1_000_000_007  # added to the recorded tids on each pass


class Recorded:
    """One recorded block: its events and block time."""

    def __init__(self, height: int, time_ns: int, statuses: list[Event], diffs: list[Event], fills: list[Any]) -> None:
        self.height, self.time_ns = height, time_ns
        self.statuses, self.diffs, self.fills = statuses, diffs, fills
        self.inverse: list[Event] = []  # the diffs that undo this block, in the order to apply them


def _time_ns(block_time: str) -> int:
    whole = block_time_ms(block_time) // 1000
    frac = block_time.partition(".")[2]
    return whole * 1_000_000_000 + int((frac + "000000000")[:9])


def load(data_dir: str | Path, snapshot: str | Path) -> list[Recorded]:
    """The by-block files under ``data_dir`` and the sizes of ``snapshot``'s orders -> recorded blocks with inverses."""
    lines: dict[str, list[Event]] = {}
    for stream in STREAMS:
        lines[stream] = [orjson.loads(line) for path in nodefiles.hour_files(data_dir, stream, "by-block")
                         for line in path.read_bytes().splitlines() if line]
    heights = [line["block_number"] for line in lines["order_statuses"]]
    for stream in STREAMS:
        if [line["block_number"] for line in lines[stream]] != heights:
            raise ValueError(f"{stream}: the streams do not hold the same blocks")
    sizes = _snapshot_sizes(Path(snapshot))
    blocks = []
    for s, d, f in zip(*(lines[stream] for stream in STREAMS)):
        block = Recorded(s["block_number"], _time_ns(s["block_time"]), s["events"], d["events"], f["events"])
        block.inverse = [_invert(diff, sizes) for diff in block.diffs][::-1]
        blocks.append(block)
    return blocks


def _snapshot_sizes(path: Path) -> dict[int, str]:
    _, coins = orjson.loads(path.read_bytes())
    return {order["oid"]: order["sz"] for _, sides in coins for side in sides for _, order in side}


def _invert(diff: Event, sizes: dict[int, str]) -> Event:
    """The diff that undoes ``diff``; ``sizes`` (oid -> size) moves past it."""
    body, oid = diff["raw_book_diff"], diff["oid"]
    if body == "remove":
        inverse: Any = {"new": {"sz": sizes.pop(oid)}}
    elif "new" in body:
        sizes[oid] = body["new"]["sz"]
        inverse = "remove"
    else:
        before = sizes[oid]
        sizes[oid] = body["update"]["newSz"]
        inverse = {"update": {"origSz": body["update"]["newSz"], "newSz": before}}
    return {**diff, "raw_book_diff": inverse}


class Replay:
    """Endless blocks from recorded ones (module docstring), starting after the last recorded height."""

    def __init__(self, recorded: list[Recorded], start_ns: int | None = None) -> None:
        if len(recorded) < 2:
            raise ValueError("at least two recorded blocks are needed")
        self.recorded = recorded
        self.gaps = [b.time_ns - a.time_ns for a, b in zip(recorded, recorded[1:])]
        self.start_ns = start_ns

    def blocks(self) -> Iterator[Block]:
        """Pass 0 is the recording itself (when ``start_ns`` is None its block times too)."""
        n = len(self.recorded)
        height = self.recorded[0].height
        time_ns = self.start_ns if self.start_ns is not None else self.recorded[0].time_ns
        k = 0
        while True:
            forward = k % 2 == 0
            for i in range(n) if forward else range(n - 1, -1, -1):
                yield self._block(self.recorded[i], height, time_ns, forward, k)
                height += 1
                time_ns += self.gaps[min(i, n - 2)] if forward else self.gaps[max(i - 1, 0)]
            k += 1

    @staticmethod
    def _block(rec: Recorded, height: int, time_ns: int, forward: bool, k: int) -> Block:
        fills = [[user, dict(fill, tid=fill["tid"] + k * TID_STEP)] for user, fill in rec.fills]
        return at_time(Block(height, time_ns, rec.statuses, rec.diffs if forward else rec.inverse, fills), time_ns)


def at_time(block: Block, time_ns: int) -> Block:
    """``block`` timed ``time_ns``, its statuses and fills too (the node times every event as its block)."""
    stamp, ms = node_time(time_ns), time_ns // 1_000_000
    statuses = [dict(status, time=stamp) for status in block.statuses]
    fills = [[user, dict(fill, time=ms)] for user, fill in block.fills]
    return Block(block.height, time_ns, statuses, block.diffs, fills)

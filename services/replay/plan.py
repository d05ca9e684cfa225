"""What a replay starts from: the point ``--from``/``--to`` name, the checkpoints at or before it."""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass
from pathlib import Path

from hlbook.common import nodefiles
from hlbook.common.models import STREAMS
from hlbook.services.book import checkpoint


class ReplayError(Exception):
    """The replay cannot start (said to the user as is)."""


@dataclass(frozen=True)
class Point:
    """A block height, or a block time (epoch ms)."""

    height: int | None = None
    time_ms: int | None = None

    def covers(self, height: int, time_ms: int) -> bool:
        """A block (or checkpoint) of ``height`` and ``time_ms`` is at or before this point."""
        return height <= self.height if self.height is not None else time_ms <= (self.time_ms or 0)


def parse_point(text: str) -> Point:
    """A block height (``985148182``) or a UTC time (``2026-05-05T17:39:13``, ``2026-05-05 17:39``, ``…Z``)."""
    text = text.strip()
    if text.isdigit():
        return Point(height=int(text))
    whole, _, frac = text.rstrip("Z").replace(" ", "T").partition(".")
    for layout in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            seconds = calendar.timegm(time.strptime(whole, layout))
        except ValueError:
            continue
        return Point(time_ms=seconds * 1000 + int((frac + "000")[:3]))
    raise ReplayError(f"{text!r} is neither a block height nor a UTC time like 2026-05-05T17:39:13")


@dataclass
class Start:
    """One checkpoint per shard: the replay's shards start from them."""

    shards: int
    files: list[Path]  # shard k's checkpoint at index k
    heights: list[int]
    times: list[int]

    @property
    def height(self) -> int:
        """The lowest: ingest publishes from the block after it (each shard skips what it holds)."""
        return min(self.heights)


def check(data_dir: str | Path, mode: str, start: Start, start_at: Point, end: Point) -> None:
    """The span makes sense and every stream's files still hold the block after the checkpoints."""
    if (end.height is not None and start_at.height is not None and end.height < start_at.height) or \
            (end.time_ms is not None and start_at.time_ms is not None and end.time_ms < start_at.time_ms):
        raise ReplayError("--to is before --from")
    if end.height is not None and end.height <= start.height:
        raise ReplayError(f"--to {end.height} is not after the checkpoints' height {start.height}")
    for stream in STREAMS:
        if nodefiles.holding(nodefiles.hour_files(data_dir, stream, mode), start.height + 1) is None:
            raise ReplayError(f"no {stream} file under {data_dir} holds block {start.height + 1} (pruned, or another --mode?)")


def choose(directory: str | Path, point: Point) -> Start:
    """The newest whole set (every shard of one shard count) of checkpoints at or before ``point``."""
    best: Start | None = None
    found = checkpoint.listing(directory)
    for shards in sorted({n for *_, n in found}):
        newest: dict[int, tuple[Path, int, int]] = {}
        for path, height, k, n in found:
            if n != shards:
                continue
            header = checkpoint.read_header(path)
            if point.covers(height, header.time):
                newest[k] = (path, height, header.time)  # the listing is oldest first
        if len(newest) < shards:
            continue
        chosen = [newest[k] for k in range(shards)]
        start = Start(shards, [c[0] for c in chosen], [c[1] for c in chosen], [c[2] for c in chosen])
        if best is None or start.height > best.height:
            best = start
    if best is None:
        raise ReplayError(f"no whole set of checkpoints at or before {point} in {directory} "
                          f"({len(found)} checkpoint files; the live shards write one every --checkpoint-every minutes)")
    return best

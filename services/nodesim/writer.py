"""Writes generated blocks into node-format hourly files.

By-block mode: one line per block per stream, empty blocks included.
Streaming mode: one event per line with the block info, streams interleaved,
nothing for empty blocks. Lines are compact JSON with the node's key order;
a line is sometimes written in two parts with a flush in between, so readers
see a partial last line as they do with a real node.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import orjson

from hlbook.common.models import STREAMS
from hlbook.common.nodefiles import MODES, hour_file, hour_files
from hlbook.services.nodesim.engine import Block, node_time

LATENCY_NS = 350_000_000  # local_time - block_time, as on a node keeping up
SPREAD_NS = 35_000_000  # streaming mode: a block's rows span this much local time


def parse_modes(mode: str) -> tuple[str, ...]:
    """``by-block``, ``streaming`` or ``both`` -> the modes to write."""
    if mode == "both":
        return MODES
    if mode not in MODES:
        raise ValueError(f"mode must be by-block, streaming or both, not {mode!r}")
    return (mode,)


class NodeWriter:
    """Appends blocks to ``<data_dir>/hl/data/node_<stream>_<mode>/hourly/YYYYMMDD/H`` (hour of the block time, UTC).

    ``partial_p``: probability that a line is written in two parts with a flush
    (and ``pause(partial_pause)``) in between. ``pause`` is ``time.sleep`` in a
    live run and ``None`` in tests (no waiting). ``chunks``: streaming mode
    flushes a block's lines in this many pieces, pausing between them.
    """

    def __init__(
        self,
        data_dir: str | Path,
        modes: tuple[str, ...] = ("by-block",),
        partial_p: float = 0.01,
        seed: int = 0,
        pause: Callable[[float], None] | None = None,
        partial_pause: float = 0.001,
        stream_spread: float = 0.0,
    ) -> None:
        for mode in modes:
            parse_modes(mode)
        self.data_dir = Path(data_dir)
        self.modes = modes
        self.partial_p = partial_p
        self.rng = random.Random(f"writer-{seed}")
        self.pause = pause
        self.partial_pause = partial_pause
        self.stream_spread = stream_spread
        self._files: dict[tuple[str, str], tuple[Path, IO[bytes]]] = {}
        self.last_height: int | None = None
        self._prev_time: int | None = None
        self._local_end = 0  # local times only move forward
        self._spread = SPREAD_NS

    def write_block(self, block: Block) -> None:
        """Write ``block`` to every stream of every mode; all of it is flushed when this returns."""
        encoded = {
            "order_statuses": [orjson.dumps(e) for e in block.statuses],
            "raw_book_diffs": [orjson.dumps(e) for e in block.diffs],
            "fills": [orjson.dumps(e) for e in block.fills],
        }
        gap = block.time_ns - self._prev_time if self._prev_time is not None else 2 * SPREAD_NS
        self._spread = max(1_000, min(SPREAD_NS, gap // 2))
        local_ns = max(block.time_ns + LATENCY_NS + int(self.rng.random() * 20_000_000), self._local_end + 1_000)
        self._prev_time, self._local_end = block.time_ns, local_ns + self._spread
        head = b'","block_time":"' + block.block_time.encode() + b'","block_number":' + str(block.height).encode()
        for mode in self.modes:
            if mode == "by-block":
                self._by_block(block, encoded, head, local_ns)
            else:
                self._streaming(block, encoded, head, local_ns)
        self.last_height = block.height

    def _line(self, local_ns: int, head: bytes, events: list[bytes]) -> bytes:
        return b'{"local_time":"' + node_time(local_ns).encode() + head + b',"events":[' + b",".join(events) + b"]}\n"

    def _by_block(self, block: Block, encoded: dict[str, list[bytes]], head: bytes, local_ns: int) -> None:
        for i, stream in enumerate(STREAMS):
            fh = self._file(stream, "by-block", block)
            offset = (i * self._spread + int(self.rng.random() * self._spread)) // 4
            self._write(fh, self._line(local_ns + offset, head, encoded[stream]))
            fh.flush()

    def _streaming(self, block: Block, encoded: dict[str, list[bytes]], head: bytes, local_ns: int) -> None:
        order = self._interleave([len(encoded[s]) for s in STREAMS])
        if not order:
            return
        handles = [self._file(stream, "streaming", block) for stream in STREAMS]
        cursors = [0, 0, 0]
        step = self._spread // max(len(order), 1)
        chunk = max(1, len(order) // 4)
        for n, k in enumerate(order):
            event = encoded[STREAMS[k]][cursors[k]]
            cursors[k] += 1
            self._write(handles[k], self._line(local_ns + n * step + int(self.rng.random() * step), head, [event]))
            if (n + 1) % chunk == 0:
                self._flush(handles)
                if self.pause and self.stream_spread:
                    self.pause(self.stream_spread / 4)
        self._flush(handles)

    def _interleave(self, counts: list[int]) -> list[int]:
        """A random merge of the three streams (each keeps its own order)."""
        order = [k for k, n in enumerate(counts) for _ in range(n)]
        self.rng.shuffle(order)
        return order

    def _write(self, fh: IO[bytes], line: bytes) -> None:
        if self.partial_p and self.rng.random() < self.partial_p:
            cut = 1 + int(self.rng.random() * (len(line) - 2))
            fh.write(line[:cut])
            fh.flush()
            if self.pause:
                self.pause(self.partial_pause)
            fh.write(line[cut:])
        else:
            fh.write(line)

    @staticmethod
    def _flush(handles: list[IO[bytes]]) -> None:
        for fh in set(handles):
            fh.flush()

    def _file(self, stream: str, mode: str, block: Block) -> IO[bytes]:
        """The open file of the block's hour (a new file at each hour)."""
        when = datetime.fromtimestamp(block.time_ns // 1_000_000_000, timezone.utc)
        path = hour_file(self.data_dir, stream, mode, when)
        current = self._files.get((stream, mode))
        if current is not None and current[0] == path:
            return current[1]
        if current is not None:
            current[1].close()
        path.parent.mkdir(parents=True, exist_ok=True)
        _trim_partial(path)
        fh = open(path, "ab")
        self._files[(stream, mode)] = (path, fh)
        return fh

    def close(self) -> None:
        for _, fh in self._files.values():
            fh.close()
        self._files.clear()

    def __enter__(self) -> NodeWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _trim_partial(path: Path) -> None:
    """Cut a partial last line left by an earlier run, so appending starts on a fresh line."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    tail = _last_complete_end(path, size)
    if tail != size:
        with open(path, "r+b") as fh:
            fh.truncate(tail)


def _last_complete_end(path: Path, size: int, chunk: int = 1 << 20) -> int:
    """Offset just after the last newline of the file (0 if none)."""
    with open(path, "rb") as fh:
        end = size
        while end > 0:
            start = max(0, end - chunk)
            fh.seek(start)
            data = fh.read(end - start)
            nl = data.rfind(b"\n")
            if nl >= 0:
                return start + nl + 1
            end = start
    return 0


_HEIGHT = re.compile(rb'"block_number":(\d+)')


def _last_line_height(path: Path) -> int | None:
    """Block number of the last complete line of a file."""
    end = _last_complete_end(path, path.stat().st_size)
    if end == 0:
        return None
    begin = _last_complete_end(path, end - 1)
    with open(path, "rb") as fh:
        fh.seek(begin)
        match = _HEIGHT.search(fh.read(200))
    return int(match.group(1)) if match else None


def last_height(data_dir: str | Path) -> int | None:
    """Highest block number on the last complete line of any stream's newest file (None: nothing written)."""
    heights = [
        h
        for stream in STREAMS
        for mode in MODES
        if (files := hour_files(data_dir, stream, mode)) and (h := _last_line_height(files[-1])) is not None
    ]
    return max(heights, default=None)

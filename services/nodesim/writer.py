"""Writes generated blocks into node-format hourly files.

By-block mode: one line per block per stream, empty blocks included.
Streaming mode: one event per line with the block info, streams interleaved,
nothing for empty blocks. Lines are compact JSON with the node's key order
(the block's events are encoded once, for both modes); a line is sometimes
written in two parts with a flush in between, so readers see a partial last
line as they do with a real node.

``local_time`` is when the line is written: with a ``clock`` (a live run) the
clock's reading as the line is written; without one (files generated ahead of
being played, as bench/e2e.py does, and tests) the block time plus a node's
usual latency.
"""

from __future__ import annotations

import random
import re
import time
from bisect import bisect_left
from collections.abc import Callable
from datetime import datetime, timezone
from itertools import compress
from pathlib import Path
from typing import IO, Any

from hlbook.common.models import STREAMS
from hlbook.common.nodefiles import MODES, hour_file, hour_files
from hlbook.services.nodesim.block import Block, node_time

LATENCY_NS = 350_000_000  # local_time - block_time, as on a node keeping up
LATENCY_JITTER_NS = 20_000_000
SPREAD_NS = 35_000_000  # streaming mode without a clock: a block's rows span this much local time
CHUNKS = 4  # streaming mode flushes a block's lines in this many pieces
HOUR_NS = 3_600_000_000_000


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
    live run and ``None`` in tests (no waiting). Streaming mode flushes a
    block's lines in ``CHUNKS`` pieces spread over ``stream_spread`` seconds
    (the time spent making them included). ``clock``: epoch nanoseconds now (``time.time_ns`` in a live
    run), the ``local_time`` of each line; None: block time + ``LATENCY_NS``.
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
        clock: Callable[[], int] | None = None,
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
        self.clock = clock
        self._files: dict[tuple[str, str], tuple[int, IO[bytes]]] = {}  # (stream, mode) -> (hour, file)
        self.last_height: int | None = None
        self._prev_time: int | None = None
        self._local = 0  # the last local time stamped: local times only move forward
        self._nominal = 0  # without a clock: the block's first local time
        self._spread = SPREAD_NS

    def write_block(self, block: Block) -> None:
        """Write ``block`` to every stream of every mode; all of it is flushed when this returns."""
        encoded = block.events()
        if self.clock is None:
            self._plan_nominal(block)
        head = b'","block_time":"' + block.block_time.encode() + b'","block_number":' + str(block.height).encode()
        for mode in self.modes:
            if mode == "by-block":
                self._by_block(block, encoded, head)
            else:
                self._streaming(block, encoded, head)
        self.last_height = block.height

    def _plan_nominal(self, block: Block) -> None:
        """Local times without a clock: from block time + latency, a block's lines spread over at most
        ``SPREAD_NS`` (less when blocks come closer), after the previous block's."""
        gap = block.time_ns - self._prev_time if self._prev_time is not None else 2 * SPREAD_NS
        first = block.time_ns + LATENCY_NS + int(self.rng.random() * LATENCY_JITTER_NS)
        self._nominal = max(first, self._local + 1_000)
        self._spread = max(1_000, min(SPREAD_NS, gap // 2))
        self._prev_time = block.time_ns

    def _stamp(self, offset: int) -> bytes:
        """The local time of the next line: the clock's reading, or the block's nominal time + ``offset``;
        always after the previous line's."""
        now = self.clock() if self.clock is not None else self._nominal + offset
        self._local = now = max(now, self._local + 1)
        return node_time(now).encode()

    def _by_block(self, block: Block, encoded: tuple[list[bytes], ...], head: bytes) -> None:
        """One line per stream: its parts written as they are (the events joined once, never copied again)."""
        for i, stream in enumerate(STREAMS):
            fh = self._file(stream, "by-block", block)
            offset = (i * self._spread + int(self.rng.random() * self._spread)) // 4
            start = b'{"local_time":"' + self._stamp(offset) + head + b',"events":['
            self._write(fh, [start, b",".join(encoded[i]), b"]}\n"])
            fh.flush()

    def _streaming(self, block: Block, encoded: tuple[list[bytes], ...], head: bytes) -> None:
        """One line per event, the streams interleaved (``_places``), flushed in ``CHUNKS`` pieces; a
        piece sometimes ends inside a line (a reader sees a partial line until the rest follows)."""
        places = self._places([len(events) for events in encoded])
        total = sum(len(p) for p in places)
        if not total:
            return
        handles = [self._file(stream, "streaming", block) for stream in STREAMS]
        size = max(1, total // CHUNKS)
        step = max(1, self._spread // total)
        began = time.monotonic()
        for piece, start in enumerate(range(0, total, size)):
            if piece:
                self._spread_out(began, piece)
            end = min(start + size, total)
            first = max(self.clock() if self.clock is not None else self._nominal + start * step, self._local + 1)
            cut = self._partial_stream(places, start, end)
            for k, fh in enumerate(handles):
                lo, hi = bisect_left(places[k], start), bisect_left(places[k], end)
                if lo < hi:
                    stamps = self._stamps(places[k][lo:hi], start, first, step)
                    self._local = max(self._local, stamps[-1])
                    lines = _lines(head, stamps, encoded[k][lo:hi])
                    if k == cut:  # the piece ends inside its last line
                        fh.write(b"".join(lines[:-1]))
                        self._write_parts(fh, lines[-1:])
                    else:
                        fh.write(b"".join(lines))
            for fh in handles:
                fh.flush()

    def _spread_out(self, began: float, piece: int) -> None:
        """Pause until the ``piece``-th piece of a block is due: the pieces span ``stream_spread`` seconds
        from ``began``, the time spent making them included."""
        if self.pause and self.stream_spread:
            wait = began + self.stream_spread * piece / CHUNKS - time.monotonic()
            if wait > 0:
                self.pause(wait)

    def _stamps(self, places: list[int], start: int, first: int, step: int) -> list[int]:
        """Local times of the lines at ``places`` of a piece starting at place ``start`` and time ``first``:
        with a clock 1 ns apart (the piece is written at once), else ``step`` apart with jitter."""
        if self.clock is not None:
            return [first + p - start for p in places]
        r = self.rng.random
        return [first + (p - start) * step + int(r() * step) for p in places]

    def _places(self, counts: list[int]) -> list[list[int]]:
        """A random merge of the three streams, each keeping its own order: the places (line numbers of
        the merge) of each stream's events. The two smaller streams' events, shuffled, take random
        places; the largest stream's fill the rest."""
        total = sum(counts)
        big = counts.index(max(counts))
        others = [k for k, n in enumerate(counts) if k != big for _ in range(n)]
        self.rng.shuffle(others)
        places: list[list[int]] = [[], [], []]
        free = bytearray(b"\x01") * total
        for place, k in zip(sorted(self.rng.sample(range(total), len(others))), others):
            places[k].append(place)
            free[place] = 0
        places[big] = list(compress(range(total), free))
        return places

    def _partial_stream(self, places: list[list[int]], start: int, end: int) -> int:
        """The stream whose write of the piece ``start:end`` ends inside a line, or -1: with probability
        ``partial_p`` a line, at most one a piece."""
        if not self.partial_p or self.rng.random() >= self.partial_p * (end - start):
            return -1
        place = start + int(self.rng.random() * (end - start))
        return next(k for k in range(3) if (i := bisect_left(places[k], place)) < len(places[k]) and places[k][i] == place)

    def _write(self, fh: IO[bytes], parts: list[bytes]) -> None:
        """A line (in ``parts``), sometimes in two writes with a flush between."""
        if self.partial_p and self.rng.random() < self.partial_p:
            self._write_parts(fh, parts)
        else:
            for part in parts:
                fh.write(part)

    def _write_parts(self, fh: IO[bytes], parts: list[bytes]) -> None:
        """``parts`` (ending with a line) in two writes with a flush between, cut inside the last line:
        a reader sees a partial line."""
        data = b"".join(parts)
        start = data.rfind(b"\n", 0, len(data) - 1) + 1  # the last line's start
        cut = start + 1 + int(self.rng.random() * (len(data) - start - 2))
        fh.write(data[:cut])
        fh.flush()
        if self.pause:
            self.pause(self.partial_pause)
        fh.write(data[cut:])

    def _file(self, stream: str, mode: str, block: Block) -> IO[bytes]:
        """The open file of the block's hour (a new file at each hour)."""
        hour = block.time_ns // HOUR_NS
        current = self._files.get((stream, mode))
        if current is not None and current[0] == hour:
            return current[1]
        if current is not None:
            current[1].close()
        path = hour_file(self.data_dir, stream, mode, datetime.fromtimestamp(hour * 3600, timezone.utc))
        path.parent.mkdir(parents=True, exist_ok=True)
        _trim_partial(path)
        fh = open(path, "ab")
        self._files[(stream, mode)] = (hour, fh)
        return fh

    def close(self) -> None:
        for _, fh in self._files.values():
            fh.close()
        self._files.clear()

    def __enter__(self) -> NodeWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _lines(head: bytes, stamps: list[int], events: list[bytes]) -> list[bytes]:
    """Streaming lines: each event with its local time (epoch ns, rising) and the block's info (``head``)."""
    second = stamps[0] // 1_000_000_000
    if stamps[-1] // 1_000_000_000 != second:  # a second starts among them (rare): split there
        cut = bisect_left(stamps, (second + 1) * 1_000_000_000)
        return _lines(head, stamps[:cut], events[:cut]) + _lines(head, stamps[cut:], events[cut:])
    line = b'{"local_time":"' + node_time(second * 1_000_000_000)[:-10].encode() + b".%09d" + head + b',"events":[%s]}\n'
    base = second * 1_000_000_000
    return list(map(line.__mod__, zip([ns - base for ns in stamps], events)))


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

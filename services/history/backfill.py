"""The backfill: blocks of the node's hourly files that the store does not hold.

A pass looks at the files in the window (``--history-hours``, at most the
retention), takes the heights between the oldest both streams have and the
newest both have finished, and reads only the runs the store does not hold
(bisecting each file to a run's first height). It reads a line at a time and
stores block by block, a slice of time per call, so memory stays at one block
and the service keeps answering between slices. Passes run at start and after
a live gap (a restart, a lost message), until no run is left.

Heights no file holds are counted (``hlbook_history_missing_blocks_total``) and
recorded as held: nothing could fill them later. In streaming mode a block
without events has no line, so heights between lines are empty blocks.

Lines pass the same judgement as ingest's (``nodelines``): duplicates, late lines,
damaged heights and times are dropped and counted, as are fills and statuses timed
away from their block.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec

from hlbook.common import nodefiles
from hlbook.common.models import DECODERS, STATUS_HEADS, OrderStatus, UserFill, block_time_ms
from hlbook.common.nodelines import Drops, Reason, fill_ms, passing, status_ms, timed
from hlbook.services.history import metrics
from hlbook.services.history.store import Store

log = logging.getLogger(__name__)

STREAMS = ("order_statuses", "fills")  # what history keeps (book diffs are the books' business)
Block = tuple[int, int, list[OrderStatus], list[UserFill]]  # height, time (ms), statuses without rejections, fills
Lines = Iterator[tuple[int, bytes]]
MAX_HOURS = 1e6  # a window longer than this (114 years) is "everything"


class Backfill:
    def __init__(self, data_dir: str | Path, mode: str, store: Store, hours: float | None = None,
                 until: tuple[int, int] | None = None) -> None:
        """``until``: (height, time ms) a replay starts after: no later block, a window ending then."""
        self.data_dir, self.mode, self.store, self.until = data_dir, mode, store, until
        self.hours = hours if hours is not None else store.days * 24
        self.wanted = True  # a pass is due
        self.work: Iterator[int] | None = None
        self.stored = 0  # blocks stored by the backfill since start

    @property
    def busy(self) -> bool:
        return self.work is not None or self.wanted

    def request(self) -> None:
        """Run a pass (again) after the current one: heights may be missing."""
        self.wanted = True

    def step(self, budget: float) -> int:
        """Work for about ``budget`` seconds; returns the blocks stored."""
        if self.work is None:
            if not self.wanted:
                return 0
            self.wanted = False
            self.work = self._pass()
        deadline = time.monotonic() + budget
        stored = 0
        for stored_now in self.work:
            stored += stored_now
            if time.monotonic() >= deadline:
                return stored
        self.work = None
        return stored

    # ------------------------------------------------------------ a pass

    def _files(self) -> dict[str, list[tuple[Path, int]]]:
        """Per stream: (file, its first height) of the files in the window, oldest first."""
        end = datetime.fromtimestamp(self.until[1] / 1000, timezone.utc) if self.until else datetime.now(timezone.utc)
        since = end - timedelta(hours=min(self.hours, MAX_HOURS))
        out = {}
        for stream in STREAMS:
            files = []
            for path in nodefiles.hour_files(self.data_dir, stream, self.mode):
                day, hour = nodefiles.hour_key(path)
                end = datetime.strptime(day, "%Y%m%d").replace(tzinfo=timezone.utc) + timedelta(hours=hour + 1)
                first = nodefiles.first_height(path) if end > since else None
                if first is not None:
                    files.append((path, first))
            out[stream] = files
        return out

    def _pass(self) -> Iterator[int]:
        files = self._files()
        if not all(files.values()):
            return
        lo = max(f[0][1] for f in files.values())
        tails = [nodefiles.tail(f[-1][0])[1] for f in files.values()]
        if any(t is None for t in tails):
            return
        hi = min(t for t in tails if t is not None) - (1 if self.mode == "streaming" else 0)  # a streaming block may go on
        if self.until is not None:
            hi = min(hi, self.until[0])
        holes = self.store.held.holes(lo, hi)
        if holes:
            log.info("backfill: %d heights in %d runs between %d and %d", sum(b - a + 1 for a, b in holes), len(holes), lo, hi)
        for first, last in holes:
            yield from self._fill(files, first, last)

    def _fill(self, files: dict[str, list[tuple[Path, int]]], first: int, last: int) -> Iterator[int]:
        """Store the blocks of ``first..last`` from the files; mark the heights without lines."""
        store, at = self.store, first  # at: the first height not yet accounted for
        streaming = self.mode == "streaming"
        statuses = _blocks("order_statuses", _lines("order_statuses", files["order_statuses"], first, last), streaming, first)
        fills = _blocks("fills", _lines("fills", files["fills"], first, last), streaming, first)
        for height, ms, block_statuses, block_fills in _merge(statuses, fills):
            self._skipped(at, height - 1)
            at = height + 1
            if height in store.held:  # stored live meanwhile
                continue
            store.add_block(height, ms, block_statuses, block_fills)
            self.stored += 1
            metrics.BLOCKS.labels("backfill").inc()
            yield 1
        self._skipped(at, last)
        yield 0

    def _skipped(self, first: int, last: int) -> None:
        """Heights without a line in any stream: empty blocks (streaming), else missing."""
        if first > last:
            return
        if self.mode == "by-block":
            missing = sum(b - a + 1 for a, b in self.store.held.holes(first, last))
            if missing:
                metrics.MISSING.inc(missing)
                log.warning("blocks %d..%d are in no file; recorded as held", first, last)
        self.store.mark_held(first, last)


DROPS = Drops("history", metrics.BAD_LINES, log)


def _lines(stream: str, files: list[tuple[Path, int]], first: int, last: int) -> Lines:
    """(height, line) of the complete lines with ``first <= height <= last``, in file order."""
    for height, line in nodefiles.lines_from([path for path, _ in files], first, last, DROPS.of(stream)):
        metrics.BACKFILL_BYTES.inc(len(line))
        yield height, line


def _decoded(stream: str, lines: Lines) -> Iterator[tuple[int, int, bytes, tuple[int, int, list]]]:
    """(height, time ms, line, (height, time ms, events kept)) of the lines that decode."""
    for height, line in lines:
        events: list[Any]
        try:
            if stream == "order_statuses":
                statuses = STATUS_HEADS.decode(line).resolve(None)[0]  # rejections stay undecoded
                block_time, ms = statuses.block_time, block_time_ms(statuses.block_time)
                events, mistimed = timed(statuses.events, ms, status_ms(block_time))
            else:
                fills = DECODERS[stream].decode(line)
                block_time, ms = fills.block_time, block_time_ms(fills.block_time)
                events, mistimed = timed(fills.events, ms, fill_ms)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            DROPS(stream, Reason.MALFORMED, height, str(exc))
            continue
        if mistimed:
            DROPS(stream, Reason.EVENT_TIME, height, f"{mistimed} event(s) not timed {block_time}", mistimed)
        yield height, ms, line, (height, ms, events)


def _blocks(stream: str, lines: Lines, streaming: bool, first: int) -> Iterator[tuple[int, int, list]]:
    """(height, time ms, events) per block, of the lines that pass the stream's judgement
    (``nodelines``); consecutive lines of one block (streaming) joined."""
    current: tuple[int, int, list] | None = None
    for height, ms, events in passing(DROPS, stream, streaming, _decoded(stream, lines), first - 1):
        if current is not None and current[0] == height:
            current[2].extend(events)
            continue
        if current is not None:
            yield current
        current = (height, ms, list(events))
    if current is not None:
        yield current


def _merge(statuses: Iterator[tuple[int, int, list]], fills: Iterator[tuple[int, int, list]]) -> Iterator[Block]:
    """The two streams' blocks joined by height, in height order."""
    s, f = next(statuses, None), next(fills, None)
    while s is not None or f is not None:
        height = min(b[0] for b in (s, f) if b is not None)
        ms = next(b[1] for b in (s, f) if b is not None and b[0] == height)
        block_statuses = s[2] if s is not None and s[0] == height else []
        block_fills = f[2] if f is not None and f[0] == height else []
        yield height, ms, block_statuses, block_fills
        if s is not None and s[0] == height:
            s = next(statuses, None)
        if f is not None and f[0] == height:
            f = next(fills, None)

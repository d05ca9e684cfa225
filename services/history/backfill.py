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

Lines are joined into blocks by ingest's joiner (``ingest.joiner.Joiner``, statuses and fills
only), fed in step as the live tailer reads them: the same judgement (``nodelines``:
duplicates, late lines, damaged heights and times, events timed away from their block) and
the same decoding, dropped lines counted here (``hlbook_history_bad_lines_total``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path


from hlbook.common import nodefiles
from hlbook.common.models import block_time_ms
from hlbook.common.nodelines import Drops
from hlbook.services.history import metrics
from hlbook.services.history.store import Store
from hlbook.services.ingest.joiner import Joiner
from hlbook.services.ingest.offline import Lines, joined

log = logging.getLogger(__name__)

STREAMS = ("order_statuses", "fills")  # what history keeps (book diffs are the books' business)
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
        joiner = Joiner(self.mode, float("inf"), first, DROPS, STREAMS)
        for block in joined(joiner, {s: _lines(s, files[s], first, last) for s in STREAMS}):
            height = block.height
            if not block.streams_seen:  # streaming: a height without rows, an empty block
                continue
            self._skipped(at, height - 1)
            at = height + 1
            if height in store.held:  # stored live meanwhile
                continue
            store.add_block(height, block_time_ms(block.block_time), block.statuses, block.fills)
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

"""Join the three node streams into blocks.

A block closes when every stream has reached it (by-block mode: the stream's
line for it is the whole block) or moved past it (streaming mode: one event per
line, so only a later height ends it). A stream that stays behind does not
stall the pipeline: once any stream is past a block for ``timeout`` seconds,
the block closes with what arrived, counted as incomplete. Heights at or below
the last closed block are duplicates (by-block) or late rows (streaming, after
a timeout): counted, logged and dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from hlbook.common.metrics import BAD_INPUT
from hlbook.common.models import STREAMS, BookDiff, NodeLine, OrderStatus, UserFill, block_time_ms
from hlbook.services.ingest import metrics

log = logging.getLogger(__name__)

JUMP_FREE = 1000  # blocks a line may run ahead of the others without question
MAX_BLOCK_RATE = 100  # blocks a second of block time can hold, at most (mainnet: ~15)


@dataclass
class Block:
    """One block, the events of the three streams in node order."""

    height: int
    block_time: str = ""
    local_time: str = ""
    statuses: list[OrderStatus] = field(default_factory=list)
    diffs: list[BookDiff] = field(default_factory=list)
    fills: list[UserFill] = field(default_factory=list)
    streams_seen: set[str] = field(default_factory=set)
    statuses_left_out: int = 0  # rejections nobody follows, not decoded (StatusHeadLine.resolve)
    missing: list[str] = field(default_factory=list)  # by-block: streams whose line of this block never came

    @property
    def n_statuses(self) -> int:
        return len(self.statuses) + self.statuses_left_out

    def add(self, stream: str, line: NodeLine, left_out: int = 0) -> None:
        if not self.block_time:
            self.block_time, self.local_time = line.block_time, line.local_time
        self.streams_seen.add(stream)
        getattr(self, _FIELD[stream]).extend(line.events)
        self.statuses_left_out += left_out


_FIELD = {"order_statuses": "statuses", "raw_book_diffs": "diffs", "fills": "fills"}


class Joiner:
    def __init__(self, mode: str, timeout: float, start_height: int | None = None) -> None:
        self.streaming = mode == "streaming"
        self.timeout = timeout
        self.pending: dict[int, Block] = {}
        self.reached: dict[str, int] = {s: -1 for s in STREAMS}  # highest height seen per stream
        self.last_closed: int | None = None if start_height is None else start_height - 1
        self._past_since: dict[int, float] = {}  # height -> when some stream first moved past it
        self._last_times: tuple[str, str] | None = None  # (block_time, local_time) of the last closed block
        self.top: tuple[int, int] | None = None  # (height, block time ms) of the highest line believed

    def add(self, stream: str, line: NodeLine, left_out: int = 0) -> None:
        height = line.block_number
        if not self._plausible(stream, line):
            return
        if self.last_closed is not None and height <= self.last_closed:
            # streaming: a row of a block closed by timeout; by-block: a repeated line
            kind = "late_row" if self.streaming else "duplicate"
            metrics.BLOCK_ANOMALIES.labels(kind).inc()
            log.warning("%s: %s for block %d (last closed %d) dropped", stream, kind, height, self.last_closed)
            return
        if height < self.reached[stream]:
            metrics.BLOCK_ANOMALIES.labels("out_of_order").inc()
            log.warning("%s: block %d after %d", stream, height, self.reached[stream])
        elif height == self.reached[stream] and not self.streaming:
            metrics.BLOCK_ANOMALIES.labels("duplicate").inc()
            return
        self.reached[stream] = max(self.reached[stream], height)
        block = self.pending.get(height)
        if block is None:
            block = self.pending[height] = Block(height)
        block.add(stream, line, left_out)

    def _plausible(self, stream: str, line: NodeLine) -> bool:
        """A height far ahead of every block seen, with a block time that cannot have
        covered that many blocks, is a damaged line: believing it would let every later
        block close before its lines came (the stream "moved past" them)."""
        height, ms = line.block_number, block_time_ms(line.block_time)
        top = self.top
        if top is not None and height - top[0] > JUMP_FREE and height - top[0] > (ms - top[1]) / 1000 * MAX_BLOCK_RATE:
            metrics.BAD_LINES.labels(stream, "implausible_height").inc()
            BAD_INPUT.labels("ingest", "implausible_height").inc()
            log.error("%s: block %d is %d blocks after %d but only %d ms later: line dropped",
                      stream, height, height - top[0], top[0], ms - top[1])
            return False
        if top is None or height > top[0]:
            self.top = (height, ms)
        return True

    def _done(self, height: int) -> bool:
        if self.streaming:
            return all(r > height for r in self.reached.values())
        return all(r >= height for r in self.reached.values())

    def ready(self, now: float | None = None, flush: bool = False) -> list[Block]:
        """Blocks that can close now, in height order; ``flush`` closes all pending."""
        if not self.pending:
            return []
        now = time.monotonic() if now is None else now
        top = max(self.reached.values())
        out: list[Block] = []
        for height in sorted(self.pending):
            if not (flush or self._done(height)):
                if height >= top:
                    break
                since = self._past_since.setdefault(height, now)
                if now - since < self.timeout:
                    break
                metrics.BLOCK_ANOMALIES.labels("timeout").inc()
            self._close(height, out)
        return out

    def _close(self, height: int, out: list[Block]) -> None:
        block = self.pending.pop(height)
        self._past_since.pop(height, None)
        if not self.streaming and len(block.streams_seen) < len(STREAMS):
            block.missing = sorted(set(STREAMS) - block.streams_seen)
            metrics.BLOCK_ANOMALIES.labels("incomplete").inc()
            log.warning("block %d closed without %s", height, block.missing)
        if self.last_closed is not None and height > self.last_closed + 1:
            self._fill_gap(height, block, out)
        self.last_closed = height
        self._last_times = block.block_time, block.local_time
        out.append(block)

    def _fill_gap(self, height: int, block: Block, out: list[Block]) -> None:
        """Heights skipped before ``height``: in streaming mode an empty block
        writes no row, so they are empty blocks (timed like the previous block);
        in by-block mode every block has a line, so they are missing."""
        assert self.last_closed is not None
        missing = range(self.last_closed + 1, height)
        if self.streaming:
            block_time, local_time = self._last_times if self._last_times else (block.block_time, block.local_time)
            out.extend(Block(h, block_time, local_time) for h in missing)
            return
        metrics.BLOCK_ANOMALIES.labels("gap").inc(len(missing))
        log.warning("blocks %d..%d missing", missing[0], missing[-1])

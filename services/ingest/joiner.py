"""Join the three node streams into blocks, in two phases.

A block's **books** phase needs its raw book diffs and fills: l2Book, bbo and
trades are built from them alone, and they are a few percent of a block's
bytes. Its **details** phase needs its order statuses (~95 % of the bytes, most
of them rejections): the details of the orders its diffs created, per-user
events, history. So the books of a block close as soon as the diff and fill
streams have reached it, whatever the status stream does; its details close
when the status stream has reached it too. Status lines are kept as read and
decoded only when their block's details close (after its books went out).

Streaming mode splits the books phase in two: a block's **books** (diffs) close
as soon as the diff stream has moved past it, its **trades** (fills) when the
fill stream has moved past it (or on timeout). Fills are sparse (a coin may trade
once every few blocks), so waiting for them would hold most blocks' books back
until a fill or the timeout, and blocks closing together would reach clients as
their last state only. A block's details never close before its trades.

A phase closes when its streams have reached the block (by-block mode: the
stream's line for it is the whole block) or moved past it (streaming mode: one
event per line, so only a later height ends it). A stream that stays behind
does not stall the pipeline: once any stream is past a block for ``timeout``
seconds, the phase closes with what arrived, counted as incomplete. A stream
that missed ``STALL_AFTER`` blocks in a row that way in by-block mode (its file
deleted, its writer stuck) is *stalled*: said once, and blocks close without waiting for it
until its next line comes (else each block would wait ``timeout`` and the lag
grow without end). Lines of a
phase already closed are duplicates (by-block) or late rows (streaming):
counted, logged and dropped.

Every line first passes its stream's ``nodelines.Sequence`` (duplicates, late lines,
heights and times that do not fit are dropped; a jump no other stream reaches waits), and
fills timed away from their block are dropped (``nodelines.timed``).

Whatever is dropped but a copy of what was joined (a duplicate), and every stream a block
closes without (by-block), is noted (``lose``) with the coins and users it concerned, for
the next block's ``E|`` (``wire.Dropped``): the gateway tells those clients of the gap.
"""

from __future__ import annotations

import enum
import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec

from hlbook.common import wire
from hlbook.common.models import DECODERS, STATUS_HEADS, STREAMS, BookDiff, NodeLine, OrderStatus, UserFill, block_time_ms
from hlbook.common.nodefiles import line_height
from hlbook.common.nodelines import Drops, Reason, Sequence, fill_ms, status_ms, timed
from hlbook.services.ingest import metrics

log = logging.getLogger(__name__)

STATUSES = "order_statuses"
DIFFS, FILLS = "raw_book_diffs", "fills"
BOOK_STREAMS = (DIFFS, FILLS)
PHASE_STREAMS = {"books": BOOK_STREAMS, "trades": (FILLS,), "details": (STATUSES,)}
STALL_AFTER = 3  # blocks in a row closed by timeout without a stream, after which it is not waited for
MAX_NAMED = 1_000  # coins or users a drop names at most (more: any, as when unknown)
MAX_DROPS = 100  # drops named for one E|; past them (a flood of damaged lines) one per stream and reason, naming no one
_HEAD = re.compile(rb'\{"local_time":"([^"]{1,64})","block_time":"([^"]{1,64})","block_number":(\d{1,19})[,}]')


_ms = functools.lru_cache(maxsize=256)(block_time_ms)  # the rows of a block share its time string


class Phase(enum.Enum):
    BOOKS = "books"
    TRADES = "trades"  # streaming mode only (by-block: a block's trades go with its books)
    DETAILS = "details"


class LineHead(NamedTuple):
    """What a line says before its events: enough to join it without decoding it."""

    local_time: str
    block_time: str
    block_number: int


def line_head(line: bytes) -> LineHead | None:
    """The head of a node line, read from its first bytes (None: not a node line)."""
    match = _HEAD.match(line, 0, 256)
    if match is None:
        return None
    return LineHead(match.group(1).decode(), match.group(2).decode(), int(match.group(3)))


@dataclass
class Block:
    """One block: its diffs and fills (books), its status lines as read and, once its
    details closed and they were decoded, its statuses, all in node order."""

    height: int
    block_time: str = ""
    local_time: str = ""
    status_lines: list[bytes] = field(default_factory=list)
    statuses: list[OrderStatus] = field(default_factory=list)
    diffs: list[BookDiff] = field(default_factory=list)
    fills: list[UserFill] = field(default_factory=list)
    streams_seen: set[str] = field(default_factory=set)
    statuses_left_out: int = 0  # rejections nobody follows, not decoded (StatusHeadLine.resolve)
    missing: list[str] = field(default_factory=list)  # by-block: book streams whose line of this block never came
    statuses_missing: bool = False  # by-block: its status line never came (or did not decode)
    trade_coins: list[str] = field(default_factory=list)  # streaming: coins whose trades went out in its trades phase
    dropped: list[wire.Dropped] = field(default_factory=list)  # node data dropped since the previous block's E| (for its E|)

    @property
    def n_statuses(self) -> int:
        return len(self.statuses) + self.statuses_left_out

    def times(self, block_time: str, local_time: str) -> None:
        if not self.block_time:
            self.block_time, self.local_time = block_time, local_time

    def decode_statuses(self, wanted: Callable[[str], bool] | None, drops: Drops | None = None) -> list[tuple[bytes, Exception]]:
        """Decode the status lines read: every status but the rejections of users ``wanted``
        does not accept (``StatusHeadLine.resolve``), and none timed away from the block
        (dropped, told to ``drops``). Returns the lines that did not decode."""
        bad: list[tuple[bytes, Exception]] = []
        for line in self.status_lines:
            try:
                statuses, left_out = STATUS_HEADS.decode(line).resolve(wanted)
                events, mistimed = timed(statuses.events, block_time_ms(statuses.block_time), status_ms(statuses.block_time))
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                bad.append((line, exc))
                continue
            if mistimed and drops is not None:
                drops(STATUSES, Reason.EVENT_TIME, self.height, f"{mistimed} status(es) not timed {statuses.block_time}", mistimed,
                      left_out_of(statuses.events, events))
            self.statuses.extend(events)
            self.statuses_left_out += left_out
        self.status_lines = []
        return bad


Item = NodeLine | tuple[LineHead, bytes]  # a book stream's line decoded, a status line as read


def _events(item: Any) -> list[Any] | None:
    """The events of a dropped item (a line as joined, or an event); None: unreadable."""
    if isinstance(item, tuple) and isinstance(item[0], LineHead):
        try:
            return list(STATUS_HEADS.decode(item[1]).events)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
    events = getattr(item, "events", None)
    return list(events) if events is not None else [item]


def left_out_of(events: list[Any], kept: list[Any]) -> list[Any]:
    """The events ``kept`` does not hold (by identity)."""
    ids = set(map(id, kept))
    return [e for e in events if id(e) not in ids]


def concerned(items: list[Any]) -> tuple[list[str] | None, list[str] | None]:
    """(coins, users) dropped items concerned; None: unknown (nothing said, or too many to name)."""
    coins: set[str] = set()
    users: set[str] = set()
    for item in items:
        events = _events(item)
        if events is None:
            return None, None
        for event in events:
            if isinstance(event, tuple):  # a fill: (user, fill)
                users.add(event[0])
                coins.add(event[1].coin)
                continue
            users.add(event.user)
            coin = event.order.coin if isinstance(event, OrderStatus) else getattr(event, "coin", None)
            if coin is not None:
                coins.add(coin)
    return _named(coins, items), _named(users, items)


def _named(names: set[str], items: list[Any]) -> list[str] | None:
    return sorted(names) if items and len(names) <= MAX_NAMED else None


class Joiner:
    """``streams``: those joined (history's backfill: statuses and fills; a block's books then
    wait for the fills alone, by-block, or for nothing, streaming)."""

    def __init__(self, mode: str, timeout: float, start_height: int | None = None, drops: Drops | None = None,
                 streams: tuple[str, ...] = STREAMS) -> None:
        self.streaming = mode == "streaming"
        self.drops = drops or Drops("ingest", metrics.BAD_LINES, log, self.lose)
        self.dropped: list[wire.Dropped] = []  # for the next block whose details go out
        last = None if start_height is None else start_height - 1
        self.sequences: dict[str, Sequence[Item]] = {s: Sequence(s, self.streaming, self.drops, last) for s in streams}
        self._elsewheres = {s: functools.partial(self._elsewhere, s) for s in streams}
        self.timeout = timeout
        book_streams = (DIFFS,) if self.streaming else BOOK_STREAMS
        self.book_streams = tuple(s for s in book_streams if s in streams)  # what a block's books wait for
        self.pending: dict[int, Block] = {}  # books not closed yet
        self.trading: dict[int, Block] = {}  # streaming: books closed, trades not yet
        self.detailing: dict[int, Block] = {}  # books (and trades) closed, details not yet
        self.reached: dict[str, int] = {s: -1 for s in STREAMS}  # highest height seen per stream
        self.last_closed: int | None = None if start_height is None else start_height - 1  # books
        self.last_traded: int | None = self.last_closed  # trades (streaming; by-block: with the books)
        self.last_detailed: int | None = self.last_closed
        self._past_since: dict[tuple[Phase, int], float] = {}  # when some stream first moved past a phase of a block
        self.missed: dict[str, int] = {s: 0 for s in STREAMS}  # blocks in a row closed by timeout without it
        self.stalled: set[str] = set()  # streams not waited for (see the module)
        self._last_times: tuple[str, str] | None = None  # (block_time, local_time) of the last closed block

    # ------------------------------------------------------------ drops

    def lose(self, stream: str, reason: str, height: int | None, items: list[Any]) -> None:
        """Note node data dropped (``items``: what, [] unknown) for the clients it concerned, told
        with the next block's ``E|``. A duplicate is a copy of what was joined: nothing is lost."""
        if reason == Reason.DUPLICATE:
            return
        if len(self.dropped) >= MAX_DROPS:
            if not any(d.stream == stream and d.reason == reason and d.coins is None for d in self.dropped):
                self.dropped.append(wire.Dropped(stream, str(reason)))
            return
        coins, users = concerned(items)
        self.dropped.append(wire.Dropped(stream, str(reason), height, coins, users))

    def take_dropped(self) -> list[wire.Dropped]:
        """The drops noted since the last call (for the block whose details go out now)."""
        dropped, self.dropped = self.dropped, []
        return dropped

    # ------------------------------------------------------------ lines

    def feed(self, stream: str, line: bytes) -> None:
        """A line as read: a book stream's decoded, a status line kept as read (decoded when its
        block's details close, after its books went out); one that does not decode is dropped."""
        try:
            if stream == STATUSES:
                head = line_head(line)
                if head is None:
                    raise ValueError("no block_number where a node line has it")
                self.add_statuses(head, line)
            else:
                self.add(stream, DECODERS[stream].decode(line), line)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:  # ValueError: a bad block_time
            self.drops(stream, Reason.MALFORMED, line_height(line), f"{exc}: {line[:200]!r}")

    def add(self, stream: str, line: NodeLine, raw: bytes | None = None) -> None:
        """A decoded line of a book stream (diffs or fills); ``raw``: as read (tells a row read twice)."""
        self._push(stream, line.block_number, line.block_time, raw if raw is not None else msgspec.json.encode(line), line)

    def add_statuses(self, head: LineHead, line: bytes) -> None:
        """A status line (by-block) or row (streaming), kept as read until its block's details close."""
        self._push(STATUSES, head.block_number, head.block_time, line, (head, line))

    def _push(self, stream: str, height: int, block_time: str, raw: bytes, item: Item) -> None:
        """Through the stream's sequence; a line may also confirm another stream's held jump."""
        for passed in self.sequences[stream].push(height, _ms(block_time), raw, item, self._elsewheres[stream]):
            self._take(stream, passed)
        for other, sequence in self.sequences.items():
            if sequence.held:
                for passed in sequence.release(self._elsewhere(other)):
                    self._take(other, passed)

    def _elsewhere(self, stream: str) -> int | None:
        """The highest height the other streams claim."""
        return max((h for s, q in self.sequences.items() if s != stream and (h := q.top) is not None), default=None)

    def _take(self, stream: str, item: Item) -> None:
        if isinstance(item, tuple):
            self._take_statuses(*item)
            return
        height = item.block_number
        trades_apart = self.streaming and stream == FILLS
        if not self._accept(stream, height, self.last_traded if trades_apart else self.last_closed, item):
            return
        block = (trades_apart and self.trading.get(height)) or self._block(height)
        block.times(item.block_time, item.local_time)
        block.streams_seen.add(stream)
        if stream == "fills":
            events: list[UserFill] = item.events  # type: ignore[assignment]
            fills, mistimed = timed(events, _ms(item.block_time), fill_ms)
            if mistimed:
                self.drops(stream, Reason.EVENT_TIME, height, f"{mistimed} fill(s) not timed {item.block_time}", mistimed,
                           left_out_of(events, fills))
            block.fills.extend(fills)
        else:
            block.diffs.extend(item.events)  # type: ignore[arg-type]

    def _take_statuses(self, head: LineHead, line: bytes) -> None:
        height = head.block_number
        if not self._accept(STATUSES, height, self.last_detailed, (head, line)):
            return
        block = self.detailing.get(height) or self.trading.get(height)
        if block is None:
            if self.last_closed is not None and height <= self.last_closed:  # its block was missing when the books closed
                self._refuse(STATUSES, height, (head, line))
                log.warning("%s: line of block %d, which closed without one, dropped", STATUSES, height)
                return
            block = self._block(height)
        block.times(head.block_time, head.local_time)
        block.streams_seen.add(STATUSES)
        block.status_lines.append(line)

    def _block(self, height: int) -> Block:
        block = self.pending.get(height)
        if block is None:
            block = self.pending[height] = Block(height)
        return block

    def _accept(self, stream: str, height: int, closed: int | None, item: Item) -> bool:
        if closed is not None and height <= closed:
            kind = self._refuse(stream, height, item)
            log.warning("%s: %s for block %d (last closed %d) dropped", stream, kind, height, closed)
            return False
        self.reached[stream] = max(self.reached[stream], height)
        self.missed[stream] = 0
        if stream in self.stalled:
            self.stalled.discard(stream)
            metrics.STALLED.labels(stream).set(0)
            log.warning("%s: lines again (block %d): waited for again", stream, height)
        return True

    def _refuse(self, stream: str, height: int, item: Item) -> str:
        """A line of a block whose phase closed. Streaming: a row of a block closed by timeout, lost
        (noted); by-block: a repeated line, or one of a block closed without it (noted then)."""
        kind = "late_row" if self.streaming else "duplicate"
        metrics.BLOCK_ANOMALIES.labels(kind).inc()
        if self.streaming:
            self.lose(stream, kind, height, [item])
        return kind

    # ------------------------------------------------------------ closing

    def _done(self, streams: tuple[str, ...], height: int) -> bool:
        if self.streaming:
            return all(self.reached[s] > height for s in streams)
        return all(self.reached[s] >= height for s in streams)

    def _due(self, phase: Phase, height: int, now: float) -> bool:
        """Whether a block some stream has moved past waited ``timeout`` for the rest of a phase."""
        if height >= max(self.reached.values()):
            return False
        # by-block mode only: every stream has a line for every block there, so one that never came is missing
        # (in streaming mode a stream without rows for a block is normal, fills most of all)
        behind = [] if self.streaming else [s for s in PHASE_STREAMS[phase.value] if s in self.sequences and self.reached[s] < height]
        if behind and self.stalled.issuperset(behind):
            return True  # not waited for: closes at once, still counted incomplete
        since = self._past_since.setdefault((phase, height), now)
        if now - since < self.timeout:
            return False
        metrics.BLOCK_ANOMALIES.labels("timeout").inc()
        for stream in behind:
            self._missed(stream, height)
        return True

    def _start_timers(self, phase: Phase, blocks: dict[int, Block], now: float) -> None:
        """Start the timeout of every block of ``blocks`` some stream moved past, not only of the
        first one waiting: blocks without fills (most, for a quiet coin) then close ``timeout``
        after the next block came, instead of one ``timeout`` after another."""
        top = max(self.reached.values())
        for height in blocks:
            if height < top:
                self._past_since.setdefault((phase, height), now)

    def _missed(self, stream: str, height: int) -> None:
        self.missed[stream] += 1
        if self.missed[stream] >= STALL_AFTER and stream not in self.stalled:
            self.stalled.add(stream)
            metrics.STALLED.labels(stream).set(1)
            log.error("%s: no line for %d blocks in a row (up to block %d) while the other streams go on (its file deleted, "
                      "or its writer stuck?): blocks close without waiting for it until it comes back", stream,
                      self.missed[stream], height)

    def ready(self, now: float | None = None, flush: bool = False) -> list[tuple[Phase, Block]]:
        """The phases that can close now: books in height order, then (streaming) trades, then
        details, each in height order (a block's details never before its books and trades);
        ``flush`` closes all."""
        out: list[tuple[Phase, Block]] = []
        if not self.pending and not self.trading and not self.detailing and not flush:
            return out
        now = time.monotonic() if now is None else now
        if flush:
            for stream, sequence in self.sequences.items():
                for passed in sequence.flush():
                    self._take(stream, passed)
        for height in sorted(self.pending):
            if not (flush or self._done(self.book_streams, height) or self._due(Phase.BOOKS, height, now)):
                break
            self._close_books(height, out)
        self._start_timers(Phase.TRADES, self.trading, now)
        for height in sorted(self.trading):
            if not (flush or self._done((FILLS,), height) or self._due(Phase.TRADES, height, now)):
                break
            self._close_trades(height, out)
        for height in sorted(self.detailing):
            if not (flush or self._done((STATUSES,), height) or self._due(Phase.DETAILS, height, now)):
                break
            block = self.detailing.pop(height)
            self._past_since.pop((Phase.DETAILS, height), None)
            if not self.streaming and not block.status_lines:
                block.statuses_missing = True
                metrics.BLOCK_ANOMALIES.labels("incomplete").inc()
                log.warning("block %d closed without its order statuses", height)
                self.lose(STATUSES, "incomplete", height, [])
            self.last_detailed = height
            out.append((Phase.DETAILS, block))
        return out

    def _close_books(self, height: int, out: list[tuple[Phase, Block]]) -> None:
        block = self.pending.pop(height)
        self._past_since.pop((Phase.BOOKS, height), None)
        if not self.streaming and not block.streams_seen.issuperset(self.book_streams):
            block.missing = sorted(set(self.book_streams) - block.streams_seen)
            metrics.BLOCK_ANOMALIES.labels("incomplete").inc()
            log.warning("block %d closed without %s", height, block.missing)
            for stream in block.missing:
                self.lose(stream, "incomplete", height, [])
        if self.last_closed is not None and height > self.last_closed + 1:
            self._fill_gap(height, block, out)
        self.last_closed = height
        self._last_times = block.block_time, block.local_time
        self._closed_books(block, out)

    def _closed_books(self, block: Block, out: list[tuple[Phase, Block]]) -> None:
        """Its books are out: its details (streaming: its trades) are awaited next."""
        if self.streaming:
            if self.last_traded is None:  # the first block: fills of an earlier one are late, not a new block
                self.last_traded = block.height - 1
            self.trading[block.height] = block
        else:
            self.last_traded = block.height
            self.detailing[block.height] = block
        out.append((Phase.BOOKS, block))

    def _close_trades(self, height: int, out: list[tuple[Phase, Block]]) -> None:
        self._past_since.pop((Phase.TRADES, height), None)
        self.last_traded = height
        self.detailing[height] = block = self.trading.pop(height)
        out.append((Phase.TRADES, block))

    def _fill_gap(self, height: int, block: Block, out: list[tuple[Phase, Block]]) -> None:
        """Heights skipped before ``height``: in streaming mode an empty block
        writes no row, so they are empty blocks (timed like the previous block);
        in by-block mode every block has a line, so they are missing."""
        assert self.last_closed is not None
        missing = range(self.last_closed + 1, height)
        if self.streaming:
            block_time, local_time = self._last_times if self._last_times else (block.block_time, block.local_time)
            for h in missing:
                self._closed_books(Block(h, block_time, local_time), out)
            return
        metrics.BLOCK_ANOMALIES.labels("gap").inc(len(missing))
        log.warning("blocks %d..%d missing", missing[0], missing[-1])

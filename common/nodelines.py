"""Judging node lines before they are joined into blocks: one set of rules for every reader
of the node's files (ingest's tailer and its restart rebuild, history's backfill).

A stream's lines come in height order (by-block: one line a block; streaming: the rows of a
block together), every event of a block is timed as its block, and no block is timed ahead
of the clock. So a line is dropped, counted and logged when it is:

- ``duplicate``: a height its stream already passed on (by-block), or a row read twice
  (streaming);
- ``late``: below a height its stream already passed on;
- ``implausible_height``: a jump ahead that its own stream then goes back from (the lines
  after it are lower). A jump no other stream has reached is held until another stream
  reaches it or its own stream goes on past it, so a damaged height never closes blocks;
- ``future_time``: timed more than ``FUTURE_MS`` after both the host's clock and the
  stream's previous block (the first line read: a day after the clock);

and an event (a fill, an order status) timed more than ``EVENT_SLACK_MS`` away from its
block is dropped alone (``event_time``): it would move a candle, a retention cut or a
bisection.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Generic, NamedTuple, TypeVar

from prometheus_client import Counter

from hlbook.common.metrics import BAD_INPUT
from hlbook.common.models import OrderStatus, UserFill, block_time_ms

FUTURE_MS = 60_000  # a block timed this far past the clock and its stream's previous block is damaged
FIRST_FUTURE_MS = 86_400_000  # the first block read has no previous one: only a day past the clock counts (a host
# clock a minute off, or blocks staged ahead by a benchmark, must not stop every line)
EVENT_SLACK_MS = 1_000  # an event timed further than this from its block is damaged (the node times them alike)
LOG_EVERY_S = 1.0  # one log line a second per stream and reason, saying how many were dropped since

T = TypeVar("T")
E = TypeVar("E")
Elsewhere = Callable[[], "int | None"]  # the highest height the other streams claim, asked only for a jump
Told = Callable[[str, str, "int | None", list[Any]], None]  # (stream, reason, height, what was dropped: [] unknown)


class Reason(enum.StrEnum):
    MALFORMED = "malformed"
    DUPLICATE = "duplicate"
    LATE = "late"
    JUMP = "implausible_height"
    FUTURE = "future_time"
    EVENT_TIME = "event_time"


class Drops:
    """Counts what one reader drops (its service's bad-lines counter and ``hlbook_bad_input_total``)
    and logs it, at most one line a second per stream and reason; ``told`` hears of every drop
    (ingest: to tell the clients of what it concerned)."""

    def __init__(self, service: str, counter: Counter, log: logging.Logger, told: Told | None = None) -> None:
        self.service, self.counter, self.log, self.told = service, counter, log, told
        self._said: dict[tuple[str, str], tuple[float, int]] = {}  # (stream, reason) -> (last logged, dropped since)

    def __call__(self, stream: str, reason: str, height: int | None, detail: str = "", n: int = 1,
                 items: list[Any] | None = None) -> None:
        """``items``: what was dropped (lines as joined, or events), when known."""
        self.counter.labels(stream, reason).inc(n)
        BAD_INPUT.labels(self.service, reason).inc(n)
        if self.told is not None:
            self.told(stream, reason, height, items or [])
        now = time.monotonic()
        last, since = self._said.get((stream, reason), (-LOG_EVERY_S, 0))
        if now - last < LOG_EVERY_S:
            self._said[(stream, reason)] = (last, since + n)
            return
        self._said[(stream, reason)] = (now, 0)
        more = f" (and {since} more since the last such line)" if since else ""
        self.log.error("%s: dropped %d %s at block %s%s%s", stream, n, reason, height, f": {detail}" if detail else "", more)

    def of(self, stream: str) -> Callable[[str, int | None, bytes], None]:
        """A callback for ``nodefiles.within``: a line of ``stream`` skipped, with its reason."""
        return lambda reason, height, line: self(stream, reason, height)


def future(block_ms: int, before_ms: int | None, now_ms: int | None = None) -> bool:
    """Whether a block time is too far ahead of the clock and of the block before it."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    if before_ms is None:
        return block_ms > now + FIRST_FUTURE_MS
    return block_ms > now + FUTURE_MS and block_ms > before_ms + FUTURE_MS


def timed(events: list[E], block_ms: int, ms_of: Callable[[E], int]) -> tuple[list[E], int]:
    """(the events timed as their block, how many were not)."""
    kept = [e for e in events if abs(ms_of(e) - block_ms) <= EVENT_SLACK_MS]
    return (events, 0) if len(kept) == len(events) else (kept, len(events) - len(kept))


def status_ms(block_time: str) -> Callable[[OrderStatus], int]:
    """A block's statuses' times in ms (one timed as its block, as the node writes them, is not parsed)."""
    block_ms = block_time_ms(block_time)
    return lambda status: block_ms if status.time == block_time else block_time_ms(status.time)


def fill_ms(fill: UserFill) -> int:
    return fill[1].time


class _Held(NamedTuple, Generic[T]):
    height: int
    block_ms: int
    line: bytes
    item: T


class Sequence(Generic[T]):
    """One stream's lines as read: passes on those that fit, in height order (see the module)."""

    def __init__(self, stream: str, streaming: bool, drops: Drops, last: int | None = None) -> None:
        self.stream, self.streaming, self.drops = stream, streaming, drops
        self.last = last  # the highest height passed on
        self.last_ms: int | None = None  # its block time
        self.held: list[_Held[T]] = []  # a jump ahead and the lines after it, until confirmed
        self._rows: set[int] = set()  # streaming: hashes of the rows of block ``last`` passed on

    @property
    def top(self) -> int | None:
        """The highest height this stream claims (held lines included)."""
        return self.held[-1].height if self.held else self.last

    def push(self, height: int, block_ms: int, line: bytes, item: T, elsewhere: Elsewhere | None = None) -> list[T]:
        """The lines that can be passed on once this one is read. ``elsewhere``: the highest height
        the other streams claim (None: unknown; a jump then waits for this stream's next line)."""
        if future(block_ms, self.last_ms):
            self.drops(self.stream, Reason.FUTURE, height, f"block time {block_ms} ms", items=[item])
            return []
        if self.held:
            if height < self.held[0].height:
                self._drop_held()
            else:
                self.held.append(_Held(height, block_ms, line, item))
                return self.release(elsewhere() if elsewhere is not None else None)
        last = self.last
        if last is not None and height > last + 1:
            other = elsewhere() if elsewhere is not None else None
            if other is None or height > other:
                self.held.append(_Held(height, block_ms, line, item))
                return []
        return [item] if self._fits(height, block_ms, line, item) else []

    def release(self, elsewhere: int | None) -> list[T]:
        """The held lines, once another stream reached their height or this one went on past it."""
        if not self.held:
            return []
        first = self.held[0].height
        if not ((elsewhere is not None and elsewhere >= first) or self.held[-1].height > first):
            return []
        return self.flush()

    def flush(self) -> list[T]:
        """Every held line that fits (the end of what is to be read)."""
        held, self.held = self.held, []
        return [h.item for h in held if self._fits(h.height, h.block_ms, h.line, h.item)]

    def _drop_held(self) -> None:
        self.drops(self.stream, Reason.JUMP, self.held[0].height,
                   f"{len(self.held)} line(s) after block {self.last}, followed by a lower height", len(self.held),
                   [h.item for h in self.held])
        self.held = []

    def _fits(self, height: int, block_ms: int, line: bytes, item: T) -> bool:
        """Whether a line follows the ones passed on (and note it passed)."""
        last = self.last
        if last is not None and height < last:
            self.drops(self.stream, Reason.LATE, height, f"after block {last}", items=[item])
            return False
        if last is not None and height == last:
            if not self.streaming or hash(line) in self._rows:
                self.drops(self.stream, Reason.DUPLICATE, height, items=[item])
                return False
        else:
            self._rows.clear()
        if self.streaming:
            self._rows.add(hash(line))
        self.last, self.last_ms = height, block_ms
        return True


def passing(drops: Drops, stream: str, streaming: bool, lines: Iterable[tuple[int, int, bytes, T]],
            last: int | None = None) -> Iterable[T]:
    """The items of (height, block ms, line, item) that pass one stream's sequence, judged on its own
    (a file read through: a jump is confirmed or dropped by the line after it)."""
    sequence: Sequence[T] = Sequence(stream, streaming, drops, last)
    for height, block_ms, line, item in lines:
        yield from sequence.push(height, block_ms, line, item)
    yield from sequence.flush()

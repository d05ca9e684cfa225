"""A coin's book as of a past block time: the start of a replay (``plan.choose``: the newest
checkpoints at or before the time, ``plan.check``: the node's files still hold what follows),
for one coin, rolled forward in this process to the last block at or before the time.

What the live server answers ``/info`` ``l4Snapshot`` / ``l2Book`` with a ``time`` from
(``gateway/past.py`` runs :func:`answer` in a worker process, off the event loop). Only the
coin's entry of the checkpoint is decoded, only its diffs applied and only the status lines of
blocks that create orders of it parsed (a quiet coin skips most); the node's lines are
joined into blocks by ingest's joiner (``offline.joined``: the live judgement of every line),
and each block goes into the book in the shard's two phases (``Book.apply``, then
``Book.detail`` with the statuses of the oids its diffs touched, as ingest's ``D|`` carries
them). Only whole blocks count: a time at or after the newest block every stream has
finished is refused, as is one before the oldest checkpoint, one the files no longer cover,
one further than ``max_span_s`` past its checkpoint, and any data the joiner dropped on the
way (a damaged line): never an empty or partial book that looks valid.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec

from hlbook.common import nodefiles, topics
from hlbook.common.models import STREAMS, DiffBody, block_time_ms
from hlbook.services.book import checkpoint, l2, l4, snapshot
from hlbook.services.book.book import Book, OutOfSync
from hlbook.services.ingest.joiner import Block, Joiner
from hlbook.services.ingest.offline import joined
from hlbook.services.replay.plan import Point, ReplayError, Start, check, choose

log = logging.getLogger(__name__)

NO_END = 1 << 62  # read the files on until the first block after the time


class PastError(Exception):
    """A point-in-time request refused: ``text`` for the client, ``outcome`` for the metric, HTTP ``status``."""

    def __init__(self, text: str, outcome: str, status: int = 400) -> None:
        super().__init__(text, outcome, status)
        self.text, self.outcome, self.status = text, outcome, status


@dataclass(frozen=True)
class Source:
    """Where the past is: the live shards' checkpoints and the node's files."""

    checkpoints: str
    data_dir: str
    mode: str
    max_span_s: float = 1800.0  # a time further than this past its checkpoint is refused (files to read)


@dataclass(frozen=True)
class Ask:
    """One request: ``kind`` ``l4Snapshot`` or ``l2Book`` (with its levels' parameters)."""

    kind: str
    coin: str
    time: int  # block time, epoch ms
    n_levels: int = 20
    n_sig_figs: int | None = None
    mantissa: int | None = None


@dataclass
class AsOf:
    """The coin's book as of the last block at or before the time asked."""

    book: Book
    height: int
    time: int  # that block's time (ms)


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def start_of(source: Source, coin: str, at: int) -> tuple[Path, int, int]:
    """(checkpoint, its height, its time) of the shard holding ``coin``, the newest at or before ``at``."""
    try:
        start = choose(source.checkpoints, Point(time_ms=at))
    except ReplayError:
        found = checkpoint.listing(source.checkpoints)
        oldest = f" (the oldest is of {_utc(checkpoint.read_header(found[0][0]).time)})" if found else ""
        raise PastError(f"time {at} ({_utc(at)}) is before the oldest checkpoint{oldest}: no book of then is kept",
                        "too_old") from None
    k = topics.shard_of(coin, start.shards)
    path, height, ckpt_time = start.files[k], start.heights[k], start.times[k]
    if (at - ckpt_time) / 1000 > source.max_span_s:
        raise PastError(f"time {at} is {(at - ckpt_time) / 1000:.0f} s after the nearest checkpoint (at most "
                        f"{source.max_span_s:.0f} s are read from the node's files: are checkpoints written?)", "too_far")
    try:
        check(source.data_dir, source.mode, Start(1, [path], [height], [ckpt_time]), Point(time_ms=at), Point(time_ms=at))
    except ReplayError as exc:
        log.warning("point in time %d: %s", at, exc)
        raise PastError(f"the node's files no longer hold the blocks after the checkpoint before time {at} "
                        f"(block {height + 1}): pruned", "too_old") from None
    return path, height, ckpt_time


def book_at(source: Source, coin: str, at: int, deadline: float) -> AsOf:
    """``coin``'s book as of block time ``at`` (PastError when it cannot be told exactly)."""
    path, height, ckpt_time = start_of(source, coin, at)
    _, _, books = checkpoint.load_file(path, coin.__eq__)
    asof = AsOf(books.get(coin) or Book(coin, height, ckpt_time), height, ckpt_time)
    joiner = Joiner(source.mode, float("inf"), height + 1)  # the fills too: a streaming block's phases wait for them
    lines = {s: nodefiles.lines_from(nodefiles.hour_files(source.data_dir, s, source.mode), height + 1, NO_END,
                                         functools.partial(_damaged, s))
             for s in STREAMS}
    creates = functools.partial(_creates, coin)  # the statuses of other blocks are not even parsed
    for block in joined(joiner, lines, flush=False, wanted=creates):  # whole blocks only: every stream has moved on
        if time.monotonic() > deadline:
            raise PastError(f"time {at}: not rebuilt within the time allowed (from block {height}, at {asof.height})",
                            "timeout", 504)
        if joiner.dropped:
            raise PastError(f"the node's files hold damaged data near block {block.height}: no exact book of then",
                            "damaged", 500)
        block_ms = block_time_ms(block.block_time)
        if block_ms > at:
            return asof
        _apply(asof, block, block_ms)
    raise PastError(f"time {at} ({_utc(at)}) is not before the newest block the node's files hold whole "
                    f"({asof.height}, {_utc(asof.time)}): ask for a time in the past", "too_new")


def _damaged(stream: str, reason: str, height: int | None, line: bytes) -> None:
    """A node line the reader cannot place (no height): the book of then cannot be told exactly."""
    raise PastError(f"the node's {stream} file holds a damaged line ({reason}): no exact book of then", "damaged", 500)


def _creates(coin: str, block: Block) -> bool:
    """Whether ``block`` creates orders of ``coin`` (only they take details from its statuses)."""
    return any(d.coin == coin and isinstance(d.raw_book_diff, DiffBody) and d.raw_book_diff.new is not None for d in block.diffs)


def _apply(asof: AsOf, block: Block, block_ms: int) -> None:
    """One block into the book as a shard applies it: its diffs, then its details."""
    book = asof.book
    diffs = [d for d in block.diffs if d.coin == book.coin]
    if diffs:
        try:
            created = book.apply(block.height, block_ms, diffs)
        except OutOfSync as exc:
            raise PastError(f"{book.coin}: the node's files do not fit the checkpoint at block {block.height} ({exc.reason})",
                            "error", 500) from None
        oids = {d.oid for d in diffs}
        statuses = [s for s in block.statuses if s.order.oid in oids]  # as ingest's D|<coin>| carries them
        if statuses:
            book.detail(created, statuses)
    asof.height, asof.time = block.height, block_ms


def render(ask: Ask, asof: AsOf) -> bytes:
    """The answer's JSON: l4Snapshot as an l4Book snapshot's data, l2Book as the public API's."""
    coin = msgspec.json.encode(ask.coin)
    if ask.kind == "l4Snapshot":
        levels = b"".join(l4.render(asof.book))
        return b'{"coin":%s,"time":%d,"height":%d,"levels":%s}' % (coin, asof.time, asof.height, levels)
    sides = l2.levels(asof.book, ask.n_levels, ask.n_sig_figs, ask.mantissa)
    return msgspec.json.encode({"coin": ask.coin, "time": asof.time,
                                "levels": [[{"px": px, "sz": sz, "n": n} for px, sz, n in side] for side in sides]})


def answer(source: Source, ask: Ask, timeout: float) -> bytes:
    """The JSON answer to ``ask`` (in a worker process); PastError when refused."""
    started = time.monotonic()
    try:
        asof = book_at(source, ask.coin, ask.time, started + timeout)
    except (OSError, msgspec.DecodeError, msgspec.ValidationError, snapshot.SnapshotError) as exc:
        # a checkpoint pruned while read, or one a crash or a full disk cut short: said, not a traceback
        log.warning("%s %s as of %d: %s", ask.kind, ask.coin, ask.time, exc)
        raise PastError(f"the checkpoint or node files before time {ask.time} could not be read ({exc})", "error", 500) from None
    out = render(ask, asof)
    log.info("%s %s as of %d: block %d, %.2f s", ask.kind, ask.coin, ask.time, asof.height, time.monotonic() - started)
    return out


PR_SET_PDEATHSIG = 1  # linux prctl: a signal when the parent goes


def nice_worker() -> None:
    """A worker's initialiser: niced (the live path keeps the CPU, as the history service's), and
    stopped with the gateway that started it, however that one ends."""
    os.nice(10)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not linux: the pool's own shutdown only
        pass
    if os.getppid() == 1:  # the gateway went before the line above
        os._exit(0)

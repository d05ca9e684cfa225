"""Validation of the books against fresh node snapshots, in a forked child.

Every ``--validate-every`` seconds the shard forks (``jobs.py``): the child
holds the books as they were at the fork, fetches a node snapshot, brings both
to one height with ingest's stored slices (the snapshot forward when it is
older, the books forward when it is newer), and compares each owned coin: the
orders (oid, user, px, sz) of each side in book order, so a lost diff, a wrong
size, a wrong price or a wrong time priority all show. Order details that
come with no status (HIP-2 orders) are not compared. The parent gets the
differing coins back and resyncs only those; nothing of this runs in its loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import msgspec
import zmq

from hlbook.common import topics, wire
from hlbook.common.security import Curve
from hlbook.common.wire import CoinState
from hlbook.services.book import metrics, snapshot
from hlbook.services.book.book import Book, OutOfSync
from hlbook.services.book.jobs import Jobs, JobsBusy
from hlbook.services.book.state import ShardState

log = logging.getLogger(__name__)


class Outcome(msgspec.Struct):
    """What a validation child found."""

    height: int = 0  # the height both sides were compared at
    compared: int = 0  # coins compared
    mismatches: dict[str, str] = {}  # coin -> reason
    skipped: str | None = None  # why nothing was compared


def difference(ours: Book | None, theirs: Book | None) -> str | None:
    """Why two books of one coin differ (``None`` when equal); a missing book is empty."""
    a = ours.fingerprint() if ours is not None else ([], [])
    b = theirs.fingerprint() if theirs is not None else ([], [])
    if a == b:
        return None
    for mine, node in zip(a, b):
        if mine == node:
            continue
        if {o[0] for o in mine} != {o[0] for o in node}:
            return "orders"  # an order is missing or extra
        if sorted(o[:3] for o in mine) != sorted(o[:3] for o in node):
            return "price"
        if sorted(mine) != sorted(node):
            return "size"
        return "priority"
    return "orders"  # not reached: some side differs


def roll_forward(books: dict[str, Book], slices: list[wire.BookSlice], target: int, owned: Callable[[str], bool]) -> None:
    """Apply the slices above each book's height, up to ``target``; OutOfSync when one does not fit
    (what is compared needs no order details: their statuses are not read)."""
    for s in slices:
        if s.height > target or not owned(s.coin):
            continue
        book = books.get(s.coin)
        if book is not None and s.height > book.height:
            book.apply(s.height, s.time, s.diffs)
    for book in books.values():
        book.height = max(book.height, target)


def compare(state: ShardState, info_url: str, ingest_replay: str, timeout: float, curve_dir: str | None = None) -> Outcome:
    """The child's work: fetch, bring both sides to one height, compare every coin
    that is live here or held by the node (a coin absent from a side is empty)."""
    height, theirs = snapshot.load(snapshot.fetch_shared(info_url, state.name)[0], state.owns)
    not_live = {coin for coin, c in state.coins.items() if c.state != CoinState.LIVE}
    ours = {coin: c.book for coin, c in state.coins.items() if coin not in not_live}
    coins = (set(ours) | set(theirs)) - not_live
    for coin in coins:
        ours.setdefault(coin, Book(coin, state.base))
        theirs.setdefault(coin, Book(coin, height))
    target = max([height, state.height, *(b.height for b in ours.values())])
    start = min([height, *(b.height for b in ours.values())]) + 1
    if start <= target:
        stored = _stored_slices(ingest_replay, start, timeout, curve_dir)
        if stored is None:
            return Outcome(skipped=f"ingest no longer holds the blocks from {start}")
        slices, head = stored
        if head < target:
            return Outcome(skipped=f"ingest holds blocks up to {head}, not {target}")
        try:
            roll_forward(theirs, slices, target, state.owns)
            roll_forward(ours, slices, target, state.owns)
        except OutOfSync as exc:
            return Outcome(skipped=f"the stored slices do not apply ({exc})")
    mismatches = {}
    for coin in sorted(coins):
        reason = difference(ours[coin], theirs[coin])
        if reason is not None:
            mismatches[coin] = reason
    return Outcome(target, len(coins), mismatches)


def _stored_slices(endpoint: str, from_height: int, timeout: float, curve_dir: str | None) -> tuple[list[wire.BookSlice], int] | None:
    """Ingest's stored slices from ``from_height`` and the newest height it holds (None: refused, no answer)."""
    ctx = zmq.Context()  # the child's own: the parent's sockets belong to the parent's io threads
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        curve = Curve.from_dir(curve_dir)
        if curve is not None:
            curve.connect(req)
        req.connect(endpoint)
        req.send(wire.encode(wire.ReplayRequest(from_height, [topics.BOOK_PREFIX])))
        if not req.poll(int(timeout * 1000)):
            return None
        frames = req.recv_multipart()
        reply = wire.decode(frames[0], wire.ReplayReply)
        if not reply.ok or reply.head is None:
            return None
        return [wire.decode(frames[i + 1], wire.BookSlice) for i in range(1, len(frames) - 1, 2)], reply.head
    finally:
        ctx.destroy(linger=0)


def aligned(every: float) -> float:
    """The next multiple of ``every`` on the wall clock, as a monotonic time: every shard
    validates at the same moment, against one shared snapshot (``snapshot.fetch_shared``)."""
    return time.monotonic() + every - time.time() % every


class Validation:
    """Schedules validation children and acts on what they found."""

    def __init__(self, state: ShardState, jobs: Jobs, info_url: str, ingest_replay: str, every: float, timeout: float,
                 repair: Callable[[list[str], str], None], curve_dir: str | None = None) -> None:
        self.state = state
        self.jobs = jobs
        self.info_url = info_url
        self.ingest_replay = ingest_replay
        self.every = every
        self.timeout = timeout
        self.repair = repair  # resync these coins, with this reason
        self.curve_dir = curve_dir
        self.next_at = aligned(every)
        self.running = False

    def tick(self, now: float) -> None:
        if self.every <= 0 or self.running or now < self.next_at or self.state.phase != CoinState.LIVE:
            return
        self.next_at = aligned(self.every)
        try:
            self.jobs.submit("validate", self._prepare)
        except JobsBusy:
            metrics.VALIDATIONS.labels("skipped_busy").inc()
            return
        self.running = True

    def _prepare(self) -> tuple[Callable[[], Iterator[bytes]], Callable[[list[bytes] | None, str | None], None]]:
        state, url, replay, timeout, curve = self.state, self.info_url, self.ingest_replay, self.timeout, self.curve_dir
        return (lambda: iter([msgspec.msgpack.encode(compare(state, url, replay, timeout, curve))])), self._done

    def _done(self, chunks: list[bytes] | None, error: str | None) -> None:
        self.running = False
        if chunks is None:
            metrics.VALIDATIONS.labels("failed").inc()
            metrics.SNAPSHOTS.labels("validate", "error").inc()
            return
        outcome = msgspec.msgpack.decode(b"".join(chunks), type=Outcome)
        metrics.SNAPSHOTS.labels("validate", "ok").inc()
        if outcome.skipped:
            metrics.VALIDATIONS.labels("skipped_height").inc()
            log.info("validation skipped: %s", outcome.skipped)
            return
        metrics.VALIDATIONS.labels("compared").inc()
        for coin, reason in outcome.mismatches.items():
            c = self.state.coins.get(coin)
            if c is not None and c.state != CoinState.LIVE:
                continue
            metrics.MISMATCHES.labels(reason).inc()
            log.error("%s differs from the node's snapshot at %d (%s): resyncing it", coin, outcome.height, reason)
            if c is None:  # a coin the node has and this shard never saw
                self.state.coin(coin)
            self.repair([coin], f"validation_{reason}")
        log.info("validation at %d: %d coins compared, %d differ", outcome.height, outcome.compared, len(outcome.mismatches))

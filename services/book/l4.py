"""l4 snapshots: every resting order of a coin, rendered once as the clients' JSON.

The levels are rendered by the shard as the exact JSON the WebSocket clients
get (``[[order+user, …bids], [order+user, …asks]]``, the upstream
order_book_server shape), so the gateway passes them through as bytes with no
decode or re-encode. Small books are rendered in the block loop; a book above
``INLINE_ORDERS`` is rendered in a forked child (``jobs.py``), and every
request for that coin that arrives before the child starts is answered with
the same bytes (one render per coin at a time, shared by every gateway).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import msgspec

from hlbook.common import fixed, wire
from hlbook.services.book import metrics
from hlbook.services.book.book import (K_CHILDREN, K_IS_TRIG, K_REDUCE, K_SIDE, K_TIF, K_TPSL, K_TRIG_COND, K_TRIG_PX,
                                       K_TYPE, Book, Kind, Side, children_of, fmt_cloid)
from hlbook.services.book.jobs import Jobs, JobsBusy

log = logging.getLogger(__name__)

INLINE_ORDERS = 300  # books up to this size are rendered in the loop (~0.3 ms); larger ones in a child
CHUNK_ORDERS = 4096  # orders per chunk written to the pipe / sent as one frame

_json = msgspec.json.encode
_ORDER = ('{"user":%s,"coin":%s,"side":"%s","limitPx":"%s","sz":"%s","oid":%d,"timestamp":%d%s,"origSz":"%s"%s,'
          '"cloid":%s}')
NODE_ORDER = '[%s,{' + _ORDER[len('{"user":%s,'):] + ']'  # the node's fileSnapshot entry: [user, order]


def _kind_parts(kind: Kind) -> tuple[str, str]:
    """The JSON of the order fields a kind holds, around ``origSz``."""
    middle = (f',"triggerCondition":{_json(kind[K_TRIG_COND]).decode()},"isTrigger":{_json(kind[K_IS_TRIG]).decode()}'
              f',"triggerPx":{_json(kind[K_TRIG_PX]).decode()},"children":{_json(children_of(kind[K_CHILDREN])).decode()}'
              f',"isPositionTpsl":{_json(kind[K_TPSL]).decode()},"reduceOnly":{_json(kind[K_REDUCE]).decode()}'
              f',"orderType":{_json(kind[K_TYPE]).decode()}')
    return middle, f',"tif":{_json(kind[K_TIF]).decode()}'


def render(book: Book, order_fmt: str = _ORDER) -> Iterator[bytes]:
    """The JSON of ``[[bids…], [asks…]]`` (best first, time priority), in chunks whose
    concatenation is the document. Same content as :meth:`Book.l4_levels`; with
    ``NODE_ORDER``, entries are the node snapshot's ``[user, order]``."""
    coin = _json(book.coin).decode()
    kinds: dict[int, tuple[str, str]] = {}
    users: dict[str, str] = {}
    fmt = fixed.fmt
    yield b"["
    for i, side in enumerate((book.bids, book.asks)):
        yield b"[" if i == 0 else b"],["
        first = True
        for part in _side(side, coin, kinds, users, fmt, order_fmt):
            yield part if first else b"," + part
            first = False
    yield b"]]"


def _side(side: Side, coin: str, kinds: dict[int, tuple[str, str]], users: dict[str, str],
          fmt: Callable[[int], str], order_fmt: str) -> Iterator[bytes]:
    out: list[str] = []
    for level in side.iter_levels():
        px = level.px_str or fmt(level.px)
        for o in level.orders:
            kind = o.kind
            parts = kinds.get(id(kind))
            if parts is None:
                parts = kinds[id(kind)] = _kind_parts(kind)
            user = users.get(o.user)
            if user is None:
                user = users[o.user] = _json(o.user).decode()
            sz = fmt(o.sz)
            orig = sz if o.orig_sz == o.sz else fmt(o.orig_sz)
            cloid = "null" if o.cloid is None else f'"{fmt_cloid(o.cloid)}"'
            out.append(order_fmt % (user, coin, kind[K_SIDE], px, sz, o.oid, o.ts, parts[0], orig, parts[1], cloid))
        if len(out) >= CHUNK_ORDERS:
            yield ",".join(out).encode()
            out = []
    if out:
        yield ",".join(out).encode()


Reply = list[bytes]
Send = Callable[[list[bytes], Reply], None]  # (envelope, reply frames)
Current = Callable[[str], tuple[Book, int, int] | None]  # coin -> (live book, height, time), None when not live


@dataclass(eq=False)
class Render:
    """One render of a coin: who waits for it, and its height once forked."""

    coin: str
    waiting: list[list[bytes]] = field(default_factory=list)  # envelopes
    height: int | None = None  # set when the child is forked


class Snapshots:
    """Answers ``l4`` queries: a ``wire.L4Snapshot`` frame, then the levels' JSON."""

    def __init__(self, jobs: Jobs, send: Send, current: Current) -> None:
        self.jobs = jobs
        self.send = send
        self.current = current
        self.renders: dict[str, list[Render]] = {}  # coin -> renders queued or running

    def request(self, envelope: list[bytes], book: Book, height: int, time: int, min_height: int) -> None:
        """Answer now (small book), join a render of recent enough height, or queue one."""
        coin = book.coin
        if len(book) <= INLINE_ORDERS:
            metrics.L4_SNAPSHOTS.labels("inline").inc()
            self.send(envelope, reply(coin, height, time, [b"".join(render(book))]))
            return
        renders = self.renders.setdefault(coin, [])
        for r in renders:
            if r.height is None or r.height >= min_height:  # a queued render forks at the current height or later
                metrics.L4_SNAPSHOTS.labels("shared").inc()
                r.waiting.append(envelope)
                return
        job = Render(coin, [envelope])
        try:
            self.jobs.submit("l4", lambda: self._fork(job))
        except JobsBusy as exc:
            self.send(envelope, [wire.encode(wire.error_reply(f"l4 snapshot of {coin}: shard busy ({exc}); retry"))])
            return
        renders.append(job)

    def _fork(self, job: Render) -> tuple[Callable[[], Iterator[bytes]], Callable[[list[bytes] | None, str | None], None]] | None:
        current = self.current(job.coin)
        if current is None:
            self._finish(job, [wire.encode(wire.error_reply(f"coin {job.coin!r} is no longer live"))])
            return None
        book, job.height, time = current
        height = job.height
        metrics.L4_SNAPSHOTS.labels("forked").inc()

        def done(chunks: list[bytes] | None, error: str | None) -> None:
            if chunks is None:
                self._finish(job, [wire.encode(wire.error_reply(f"l4 snapshot of {job.coin} failed: {error}"))])
            else:
                self._finish(job, reply(job.coin, height, time, chunks))

        return (lambda: render(book)), done

    def _finish(self, job: Render, frames: Reply) -> None:
        renders = self.renders.get(job.coin, [])
        if job in renders:
            renders.remove(job)
        if not renders:
            self.renders.pop(job.coin, None)
        for envelope in job.waiting:
            self.send(envelope, frames)


def reply(coin: str, height: int, time: int, levels: list[bytes]) -> Reply:
    """Reply frames of an l4 snapshot: the header, then the levels' JSON in pieces."""
    return [wire.encode(wire.L4Snapshot(True, coin, height, time, sum(len(c) for c in levels))), *levels]

"""Answers to ``wire.ShardQuery`` requests on the shard's ROUTER socket.

Replies are msgpack maps with ``ok`` (and ``error`` when false); an ``l4``
reply is a ``wire.L4Snapshot`` frame followed by the levels' JSON (``l4.py``).
A coin that is not ``live`` is never served (its book is known incomplete or
wrong). No answer may hold the block loop more than about a millisecond: the
ones that read a whole book (an l4 snapshot of a big book, an aggregation with
no view kept, a user's open orders in big books) are computed in a forked
child (``jobs.py``) and sent when it is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hlbook.common import l2rules, wire
from hlbook.common.wire import CoinState
from hlbook.services.book import l2, metrics
from hlbook.services.book.book import Book
from hlbook.services.book.jobs import Jobs, JobsBusy
from hlbook.services.book.l4 import Snapshots
from hlbook.services.book.state import ShardState

Reply = dict[str, Any]
Send = Callable[[list[bytes], list[bytes]], None]  # (envelope, reply frames)
INLINE_LEVELS = 2000  # price levels an aggregation without a view may walk in the loop
INLINE_SCAN = 5000  # orders an open-orders scan may read in the loop (~0.5 ms)


class Queries:
    def __init__(self, state: ShardState, jobs: Jobs, send: Send) -> None:
        self.state = state
        self.jobs = jobs
        self.send = send
        self.snapshots = Snapshots(jobs, send, self._current)
        self.handlers: dict[type[wire.ShardQuery], Callable[[list[bytes], Any], Reply | None]] = {
            wire.L4Query: self.l4,
            wire.L2Query: self.l2_levels,
            wire.CoinsQuery: self.coins,
            wire.OpenOrdersQuery: self.open_orders,
            wire.OrderQuery: self.order,
        }

    def answer(self, envelope: list[bytes], query: wire.ShardQuery) -> None:
        handler = self.handlers.get(type(query))
        if handler is None:  # a request type of the wire with no handler here
            self.unknown(envelope, wire.op_name(query))
            return
        reply = handler(envelope, query)
        metrics.QUERIES.labels(wire.op_name(query), "deferred" if reply is None else "ok" if reply["ok"] else "error").inc()
        if reply is not None:
            self.reply(envelope, reply)

    def unknown(self, envelope: list[bytes], op: str) -> None:
        """Refuse a request whose ``op`` no handler serves."""
        metrics.QUERIES.labels("unknown", "error").inc()
        self.reply(envelope, wire.error_reply(f"unknown op {op!r}; one of {sorted(map(wire.op_name, self.handlers))}"))

    def reply(self, envelope: list[bytes], reply: Reply) -> None:
        self.send(envelope, [wire.encode(reply)])

    def _live_book(self, query: wire.L4Query | wire.L2Query) -> Book | Reply:
        if not query.coin:
            return wire.error_reply("coin is required")
        state = self.state.coin_state(query.coin)
        if state is None:
            return wire.error_reply(f"coin {query.coin!r} is not held by shard {self.state.shard}")
        if state != CoinState.LIVE:
            return wire.error_reply(f"coin {query.coin!r} is {state}")
        return self.state.coins[query.coin].book

    def _current(self, coin: str) -> tuple[Book, int, int] | None:
        book = self.state.live_book(coin)
        return None if book is None else (book, self.state.coin_height(book), self.state.coin_time(book))

    def _in_child(self, envelope: list[bytes], name: str, compute: Callable[[], Reply]) -> Reply | None:
        """Compute the reply in a forked child; None (answered later) or a refusal."""
        def prepare() -> tuple[Callable[[], list[bytes]], Callable[[list[bytes] | None, str | None], None]]:
            def done(chunks: list[bytes] | None, error: str | None) -> None:
                if chunks is None:
                    self.reply(envelope, wire.error_reply(f"{name} failed: {error}"))
                else:
                    self.send(envelope, [b"".join(chunks)])
            return (lambda: [wire.encode(compute())]), done

        try:
            self.jobs.submit(name, prepare)
        except JobsBusy as exc:
            return wire.error_reply(f"shard busy ({exc}); retry")
        return None

    # ------------------------------------------------------------ ops

    def l4(self, envelope: list[bytes], query: wire.L4Query) -> Reply | None:
        book = self._live_book(query)
        if isinstance(book, dict):
            return book
        self.snapshots.request(envelope, book, self.state.coin_height(book), self.state.coin_time(book), query.min_height)
        return None

    def l2_levels(self, envelope: list[bytes], query: wire.L2Query) -> Reply | None:
        book = self._live_book(query)
        if isinstance(book, dict):
            return book
        try:
            l2rules.validate(query.n_sig_figs, query.mantissa)
        except ValueError as exc:
            return wire.error_reply(str(exc))
        if query.n_levels < 1:
            return wire.error_reply("n_levels must be positive")
        height, time = self.state.coin_height(book), self.state.coin_time(book)

        def compute() -> Reply:
            levels = l2.levels(book, query.n_levels, query.n_sig_figs, query.mantissa)
            return {"ok": True, "coin": book.coin, "height": height, "time": time, "levels": levels}

        cheap = (query.n_sig_figs is None or (query.n_sig_figs, query.mantissa or 1) in book.views
                 or len(book.bids) + len(book.asks) <= INLINE_LEVELS) and query.n_levels <= INLINE_LEVELS
        return compute() if cheap else self._in_child(envelope, "l2", compute)

    def coins(self, envelope: list[bytes], query: wire.CoinsQuery) -> Reply:
        state = self.state
        return {"ok": True, "shard": state.shard, "height": state.height, "phase": state.phase, "coins": state.states()}

    def open_orders(self, envelope: list[bytes], query: wire.OpenOrdersQuery) -> Reply | None:
        """Every resting order of ``user`` in the shard's live books (a scan: in a child for big books)."""
        if not query.user:
            return wire.error_reply("user is required")
        user = query.user.lower()
        books = self.state.live_books()
        height = self.state.height

        def compute() -> Reply:
            orders = [order.to_dict(coin) for coin, book in books.items() for order in book.orders.values() if order.user == user]
            return {"ok": True, "height": height, "orders": orders}

        small = sum(len(book) for book in books.values()) <= INLINE_SCAN
        return compute() if small else self._in_child(envelope, "open_orders", compute)

    def order(self, envelope: list[bytes], query: wire.OrderQuery) -> Reply:
        """The resting order ``oid`` (``order: null`` when no live book holds it)."""
        if query.oid is None:
            return wire.error_reply("oid is required")
        for coin, book in self.state.live_books().items():
            found = book.orders.get(query.oid)
            if found is not None:
                return {"ok": True, "height": self.state.height, "order": found.to_dict(coin)}
        return {"ok": True, "height": self.state.height, "order": None}

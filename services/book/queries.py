"""Answers to ``Query`` requests on the shard's ROUTER socket.

Replies are msgpack maps with ``ok`` (and ``error`` when false); a coin that is
not ``live`` is never served (its book is known incomplete or wrong).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hlbook.common import wire
from hlbook.services.book import l2, metrics

if TYPE_CHECKING:
    from hlbook.services.book.shard import Shard

Reply = dict[str, Any]


def error(text: str) -> Reply:
    return {"ok": False, "error": text}


def answer(shard: Shard, query: wire.Query) -> Reply:
    handler = HANDLERS.get(query.op)
    if handler is None:
        metrics.QUERIES.labels("unknown", "error").inc()
        return error(f"unknown op {query.op!r}; one of {sorted(HANDLERS)}")
    reply = handler(shard, query)
    metrics.QUERIES.labels(query.op, "ok" if reply["ok"] else "error").inc()
    return reply


def _live_book(shard: Shard, query: wire.Query) -> Any:
    if not query.coin:
        return error("coin is required")
    state = shard.coin_state(query.coin)
    if state is None:
        return error(f"coin {query.coin!r} is not held by shard {shard.cfg.shard}")
    if state != "live":
        return error(f"coin {query.coin!r} is {state}")
    return shard.books[query.coin]


def l4(shard: Shard, query: wire.Query) -> Reply:
    book = _live_book(shard, query)
    if isinstance(book, dict):
        return book
    return {"ok": True, "coin": book.coin, "height": shard.coin_height(book), "time": shard.coin_time(book), "levels": book.l4_levels()}


def l2_levels(shard: Shard, query: wire.Query) -> Reply:
    book = _live_book(shard, query)
    if isinstance(book, dict):
        return book
    try:
        l2.validate(query.n_sig_figs, query.mantissa)
    except ValueError as exc:
        return error(str(exc))
    if query.n_levels < 1:
        return error("n_levels must be positive")
    levels = l2.levels(book, query.n_levels, query.n_sig_figs, query.mantissa)
    return {"ok": True, "coin": book.coin, "height": shard.coin_height(book), "time": shard.coin_time(book), "levels": levels}


def coins(shard: Shard, query: wire.Query) -> Reply:
    return {"ok": True, "shard": shard.cfg.shard, "height": shard.height, "phase": shard.phase, "coins": shard.states()}


def open_orders(shard: Shard, query: wire.Query) -> Reply:
    """Every resting order of ``user`` in the shard's live books (a scan: queries are rare)."""
    if not query.user:
        return error("user is required")
    user = query.user.lower()
    orders = [
        order.to_dict(coin)
        for coin, book in shard.books.items()
        if shard.coin_state(coin) == "live"
        for order in book.orders.values()
        if order.user == user
    ]
    return {"ok": True, "height": shard.height, "orders": orders}


def order(shard: Shard, query: wire.Query) -> Reply:
    """The resting order ``oid`` (``order: null`` when no live book holds it)."""
    if query.oid is None:
        return error("oid is required")
    for coin, book in shard.books.items():
        found = book.orders.get(query.oid)
        if found is not None and shard.coin_state(coin) == "live":
            return {"ok": True, "height": shard.height, "order": found.to_dict(coin)}
    return {"ok": True, "height": shard.height, "order": None}


HANDLERS: dict[str, Callable[[Any, wire.Query], Reply]] = {
    "l4": l4,
    "l2": l2_levels,
    "coins": coins,
    "open_orders": open_orders,
    "order": order,
}

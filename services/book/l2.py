"""L2 levels as the public API serves them: full precision or buckets of ``nSigFigs``
(bucket arithmetic in ``aggregate.py``).

Full precision reads the top ``n`` levels. An aggregation with a view
attached to the book (:func:`sync_views`, for what is subscribed) reads the
top ``n`` buckets; otherwise levels are read best first until ``n`` buckets
are complete (queries), O(levels read).
"""

from __future__ import annotations

from typing import NamedTuple

from hlbook.common import fixed
from hlbook.common.wire import Level
from hlbook.services.book.aggregate import AggSide, bucket, step_of
from hlbook.services.book.book import Book, Side, level_json

__all__ = ["AggSide", "bucket", "step_of", "levels", "side_levels", "bbo", "sync_views", "Top", "top", "render_l2", "render_bbo"]
Agg = tuple[int | None, int | None]  # (nSigFigs, mantissa): None, None is full precision


_fmt_cache: dict[int, str] = {}
NO_BID = 1 << 256  # above any price: the first bid always opens a bucket


def _fmt(value: int) -> str:
    text = _fmt_cache.get(value)
    if text is None:
        if len(_fmt_cache) > 100_000:
            _fmt_cache.clear()
        text = _fmt_cache[value] = fixed.fmt(value)
    return text


def side_levels(side: Side, n: int, n_sig_figs: int | None = None, mantissa: int | None = None) -> list[Level]:
    """Up to ``n`` levels of one side, best first, as ``(px, sz, n)``."""
    if n_sig_figs is None:
        return [lv.wire() for lv in side.top(n)]
    man = mantissa or 1
    is_bid = side.is_bid
    levels = side.levels
    keys = reversed(side.keys) if is_bid else iter(side.keys)
    out: list[Level] = []
    # Prices come best first and buckets are monotonic, so a level belongs to
    # the current bucket iff it has not passed the bucket's edge.
    cur = NO_BID if is_bid else -1
    cur_sz = cur_n = 0
    for px in keys:
        if (px >= cur) if is_bid else (px <= cur):
            lv = levels[px]
            cur_sz += lv.sz
            cur_n += len(lv.orders)
            continue
        if cur_n:
            out.append((_fmt(cur), fixed.fmt(cur_sz), cur_n))
            if len(out) == n:
                return out
        lv = levels[px]
        cur, cur_sz, cur_n = bucket(px, n_sig_figs, man, is_bid), lv.sz, len(lv.orders)
    if cur_n:
        out.append((_fmt(cur), fixed.fmt(cur_sz), cur_n))
    return out


def levels(book: Book, n: int = 20, n_sig_figs: int | None = None, mantissa: int | None = None) -> tuple[list[Level], list[Level]]:
    """``[bids, asks]`` of ``book``, up to ``n`` levels each."""
    if n_sig_figs is not None:
        view = book.views.get((n_sig_figs, mantissa or 1))
        if view is not None:
            return _view_levels(view[0], n), _view_levels(view[1], n)
    return (
        side_levels(book.bids, n, n_sig_figs, mantissa),
        side_levels(book.asks, n, n_sig_figs, mantissa),
    )


class Top(NamedTuple):
    """The top levels (or buckets) of both sides as clients get them: each level's JSON
    and its price (or bucket price), best first."""

    bids: list[bytes]
    asks: list[bytes]
    bid_px: list[int]
    ask_px: list[int]

    def first(self, n: int) -> Top:
        return Top(self.bids[:n], self.asks[:n], self.bid_px[:n], self.ask_px[:n])

    def may_change(self, n: int, bid: int | None, ask: int | None) -> bool:
        """Whether a block that touched bids at ``bid`` at best and asks at ``ask`` at best
        (None: that side untouched) can have changed these ``n`` levels: not when every
        change lies beyond the last level shown of a side that shows ``n``."""
        if bid is not None and (len(self.bid_px) < n or bid >= self.bid_px[-1]):
            return True
        return ask is not None and (len(self.ask_px) < n or ask <= self.ask_px[-1])


def top(book: Book, n: int, n_sig_figs: int | None = None, mantissa: int | None = None) -> Top:
    """:class:`Top` of ``book``: ``n`` levels a side, full precision or aggregated."""
    if n_sig_figs is None:
        bids, asks = book.bids.top(n), book.asks.top(n)
        return Top([lv.fragment() for lv in bids], [lv.fragment() for lv in asks], [lv.px for lv in bids], [lv.px for lv in asks])
    view = book.views.get((n_sig_figs, mantissa or 1))
    if view is None:  # no view attached: read levels until n buckets (no prices: every change counts)
        bid_levels, ask_levels = levels(book, n, n_sig_figs, mantissa)
        return Top([level_json(*lv) for lv in bid_levels], [level_json(*lv) for lv in ask_levels], [], [])
    bid_rows, ask_rows = view[0].top(n), view[1].top(n)
    fmt = fixed.fmt
    return Top([level_json(_fmt(px), fmt(sz), count) for px, sz, count in bid_rows],
               [level_json(_fmt(px), fmt(sz), count) for px, sz, count in ask_rows],
               [row[0] for row in bid_rows], [row[0] for row in ask_rows])


def render_l2(coin_json: bytes, time: int, top: Top) -> bytes:
    """The ``data`` of a client's l2Book message: ``{"coin","time","levels":[[…],[…]]}``."""
    return b'{"coin":%s,"time":%d,"levels":[[%s],[%s]]}' % (coin_json, time, b",".join(top.bids), b",".join(top.asks))


def render_bbo(coin_json: bytes, time: int, bid: bytes | None, ask: bytes | None) -> bytes:
    """The ``data`` of a client's bbo message: ``{"coin","time","bbo":[level|null, level|null]}``."""
    return b'{"coin":%s,"time":%d,"bbo":[%s,%s]}' % (coin_json, time, bid or b"null", ask or b"null")


def _view_levels(view: AggSide, n: int) -> list[Level]:
    fmt = fixed.fmt
    return [(_fmt(px), fmt(sz), count) for px, sz, count in view.top(n)]


def sync_views(book: Book, aggs: set[Agg]) -> None:
    """Keep exactly the aggregated views of ``aggs`` attached to ``book``."""
    wanted = {(nsf, man or 1) for nsf, man in aggs if nsf is not None}
    for key in [k for k in book.views if k not in wanted]:
        book.detach(key)
    for key in wanted - book.views.keys():
        book.attach(key, AggSide(book.bids, *key), AggSide(book.asks, *key))


def bbo(book: Book) -> tuple[Level | None, Level | None]:
    """Best bid and ask as wire levels."""
    bid, ask = book.bbo()
    return (bid.wire() if bid else None, ask.wire() if ask else None)

"""What is derived from the node's fills.

Public trades: the two fills of a trade share its ``tid``; the trade takes the
taker's (``crossed``) side, price, size and hash, and ``users`` = [buyer, seller].
``aggregateByTime``: the partial fills of one crossing order at one time merged
(Hyperliquid: "Resting orders filled by multiple crossing orders will not be
aggregated")."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from hlbook.common import fixed
from hlbook.common.models import Fill, UserFill
from hlbook.common.wire import Trade

log = logging.getLogger(__name__)


def trades_of(fills: list[UserFill]) -> tuple[list[tuple[int, Trade]], int]:
    """The block's trades (in the order their tids first appear), each with the place of its taker fill in ``fills``;
    and how many tids did not form a buyer/seller pair with one taker (no trade for them). One pass and a dict
    of places: a block of tens of thousands of fills is a fraction of a second, not seconds."""
    by_tid: dict[int, list[int]] = {}
    for place, (_, fill) in enumerate(fills):
        places = by_tid.get(fill.tid)
        if places is None:
            by_tid[fill.tid] = [place]
        else:
            places.append(place)
    trades, unpaired = [], 0
    for places in by_tid.values():
        made = (len(places) == 2 and _pair(fills, places)) or _general(fills, places)
        if made is None:
            unpaired += 1
        else:
            trades.append(made)
    return trades, unpaired


def _pair(fills: list[UserFill], places: list[int]) -> tuple[int, Trade] | None:
    """The trade of two fills (with its taker's place), as ``trade_of`` makes it; None when they are not a pair."""
    (first, a), (second, b) = fills[places[0]], fills[places[1]]
    if a.side == "B" and b.side == "A":
        buyer, seller = first, second
    elif a.side == "A" and b.side == "B":
        buyer, seller = second, first
    else:
        return None
    if a.crossed:
        place, taker = places[0], a
    elif b.crossed:
        place, taker = places[1], b
    else:
        return None
    return place, Trade(coin=taker.coin, side=taker.side, px=taker.px, sz=taker.sz, hash=taker.hash,
                        time=taker.time, tid=taker.tid, users=[buyer, seller])


def _general(fills: list[UserFill], places: list[int]) -> tuple[int, Trade] | None:
    """``trade_of`` the fills at ``places``, with its taker's place (None, said, when they are not a pair)."""
    trade = trade_of(fills[p] for p in places)
    return None if trade is None else (next(p for p in places if fills[p][1].crossed), trade)


def trade_of(pair: Iterable[UserFill]) -> Trade | None:
    """The public trade of the two fills sharing a tid (None when they are not a pair)."""
    fills = list(pair)
    buyer = next((u for u, f in fills if f.side == "B"), None)
    seller = next((u for u, f in fills if f.side == "A"), None)
    taker: Fill | None = next((f for _, f in fills if f.crossed), None)
    if len(fills) != 2 or buyer is None or seller is None or taker is None:
        log.warning("fills %s do not form a buyer/seller pair with one taker; no trade", fills)
        return None
    return Trade(coin=taker.coin, side=taker.side, px=taker.px, sz=taker.sz, hash=taker.hash,
                 time=taker.time, tid=taker.tid, users=[buyer, seller])


def aggregate_by_time(fills: list[Fill]) -> list[Fill]:
    """Partial fills of one crossing order at one time merged: sizes, fees and PnL summed, price
    size-weighted, the rest from the order's first fill; a resting order's fills (``crossed`` false)
    stay apart."""
    groups: dict[tuple[int, int], list[Fill]] = {}
    for place, fill in enumerate(fills):
        groups.setdefault((fill.oid, fill.time) if fill.crossed else (-1, place), []).append(fill)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        sizes = [fixed.parse(f.sz) for f in group]
        total = sum(sizes)
        notional = sum(fixed.parse(f.px) * s for f, s in zip(group, sizes))
        # the order's first fill (the position before it: each fill of a buy raises it, of a sell lowers it),
        # whichever order the fills come in (the history service reads them by tid)
        starts = [fixed.parse(f.startPosition) for f in group]
        first = group[starts.index(min(starts) if group[0].side == "B" else max(starts))]
        out.append(Fill(**{
            **{f: getattr(first, f) for f in first.__struct_fields__},
            "sz": fixed.fmt(total),
            "px": fixed.fmt(notional // total) if total else first.px,
            "fee": fixed.fmt(sum(fixed.parse(f.fee) for f in group)),
            "closedPnl": fixed.fmt(sum(fixed.parse(f.closedPnl) for f in group)),
        }))
    return out

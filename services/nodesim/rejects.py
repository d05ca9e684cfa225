"""Rejected orders, the bulk of a block (~94 % of the whole market's statuses), rendered from templates.

Rejections come from senders that keep sending the same order (as the bots
behind mainnet's rejections do): one user, coin, status, side, size, tif,
reduceOnly and cloid habit each, and a price that follows the book (an ALO
at or through the other side's best, others some ticks off the fair price).
Each sender's fixed parts are encoded once; a rejection is one format of the
block (its time baked in) with the price, oid and cloid substituted. A few
senders are replaced every block. A rejection changes no book. The bytes are
exactly what ``orjson.dumps`` writes for the node's status dict (key order,
types, canonical decimals); tests/test_nodesim.py decodes and checks them.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from collections.abc import Callable
from typing import NamedTuple

from hlbook.common import fixed
from hlbook.common.fixed import fmt
from hlbook.services.nodesim.market import ASK, BID, FAIR, Market, json_str

REJECTIONS_PERP = (
    ("badAloPxRejected", 60.0),
    ("perpMarginRejected", 12.0),
    ("iocCancelRejected", 8.0),
    ("minTradeNtlRejected", 4.0),
    ("reduceOnlyRejected", 3.0),
    ("perpMaxPositionRejected", 0.5),
)
REJECTIONS_SPOT = (
    ("badAloPxRejected", 60.0),
    ("insufficientSpotBalanceRejected", 12.0),
    ("iocCancelRejected", 8.0),
    ("minTradeNtlRejected", 4.0),
)
SENDERS = 2048  # senders at any time
TURNOVER = 16  # senders replaced each block (a sender lives ~130 blocks)
CLOID_P = 0.8

_HEAD = b'","hash":null,"builder":null,"status":"%s","order":{"coin":"%s","side":"%s","limitPx":"'
_TAIL = (b',"triggerCondition":"N/A","isTrigger":false,"triggerPx":"0.0","children":[],"isPositionTpsl":false,'
         b'"reduceOnly":%s,"orderType":"Limit","origSz":"%s","tif":"%s","cloid":')


class Sender(NamedTuple):
    """A sender's encoded parts (user to ``limitPx":"``; size to ``"oid":``; after the timestamp to
    ``"cloid":``) and its price rule: ``market.bases[base] + offset``."""

    head: bytes
    size: bytes
    tail: bytes
    market: Market
    base: int  # ASK, BID or FAIR
    offset: int
    cloid: bool


def block_formats(time: str, ms: int) -> tuple[bytes, bytes]:
    """A block's status formats, with and without a cloid: head, px, size, oid, tail[, cloid hex]."""
    line = b'{"time":"' + time.encode() + b'","user":"%s%s","sz":"%s%d,"timestamp":' + str(ms).encode() + b"%s"
    return line + b'"0x%s"}}', line + b"null}}"


class Senders:
    """The senders of rejected orders; ``render(k)`` is k rejections."""

    def __init__(self, markets: list[Market], cum_weights: list[float], users: list[bytes], rng: random.Random,
                 size: int = SENDERS) -> None:
        self.markets, self.cum_weights, self.users, self.rng = markets, cum_weights, users, rng
        self._statuses = {False: _cumulative(REJECTIONS_PERP), True: _cumulative(REJECTIONS_SPOT)}
        self.senders = [self._new() for _ in range(size)]

    def _new(self) -> Sender:
        """A sender: coin by activity weight, status by the rejection mix, the rest as mainnet's."""
        rng = self.rng
        m = self.markets[bisect_right(self.cum_weights, rng.random() * self.cum_weights[-1])]
        coin = m.coin
        names, cum = self._statuses[coin.is_spot]
        status = names[bisect_right(cum, rng.random() * cum[-1])]
        buy = rng.random() < 0.5
        if status == "badAloPxRejected":  # an ALO that would cross: at or through the other side's best
            tif, base, ticks = "Alo", ASK if buy else BID, int(rng.random() * 4)
        else:
            tif = "Ioc" if status == "iocCancelRejected" or rng.random() < 0.4 else "Alo"
            base, ticks = FAIR, -(1 + int(rng.random() * m.spread_ticks))
        reduce_only = status == "reduceOnlyRejected" or rng.random() < 0.05
        notional = min(math.exp(rng.gauss(5.5, 1.6)), 300_000.0)
        sz = fmt(max(1, int(notional * fixed.ONE / m.fair * fixed.ONE / coin.lot)) * coin.lot).encode()
        user = self.users[int(rng.random() ** 2 * len(self.users))]
        side = b"B" if buy else b"A"
        return Sender(
            user + _HEAD % (status.encode(), json_str(coin.name), side),
            sz + b'","oid":',
            _TAIL % (b"true" if reduce_only else b"false", sz, tif.encode()),
            m, base, coin.tick * ticks if buy else -coin.tick * ticks, rng.random() < CLOID_P,
        )

    def turn_over(self, n: int = TURNOVER) -> None:
        """Replace ``n`` senders picked at random."""
        for _ in range(n):
            self.senders[int(self.rng.random() * len(self.senders))] = self._new()

    def render(self, k: int, formats: tuple[bytes, bytes], oid: int) -> list[bytes]:
        """``k`` rejections from senders picked at random (oids from ``oid + 1``), at the books' prices now."""
        r: Callable[[], float] = self.rng.random
        senders, n = self.senders, len(self.senders)
        with_cloid, without = formats
        cloids = b"%0*x" % (32 * k, self.rng.getrandbits(128 * k))
        out = []
        for i in range(0, 32 * k, 32):
            head, size, tail, m, base, offset, cloid = senders[int(r() * n)]
            px = m.bases[base] + offset
            if px < m.min_px:
                px = m.min_px
            elif px > m.max_px:
                px = m.max_px
            text = m.px_text.get(px) or m.px_bytes(px)
            oid += 1
            if cloid:
                out.append(with_cloid % (head, text, size, oid, tail, cloids[i:i + 32]))
            else:
                out.append(without % (head, text, size, oid, tail))
        return out


def _cumulative(weights: tuple[tuple[str, float], ...]) -> tuple[list[str], list[float]]:
    total, cum = 0.0, []
    for _, w in weights:
        total += w
        cum.append(total)
    return [name for name, _ in weights], cum

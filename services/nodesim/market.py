"""One coin's live state in the simulator: its book, its resting orders and its flow targets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sortedcontainers import SortedDict

from hlbook.common.fixed import fmt
from hlbook.common.models import ASSISTANCE_FUND_USER, HIP2_USER
from hlbook.services.nodesim.universe import Coin

SPECIAL_USERS = (HIP2_USER, ASSISTANCE_FUND_USER)
PX_CACHE = 4096  # formatted prices kept per coin (cleared when full)
TEXT_CACHE = 65_536  # formatted decimals kept by ``text`` (cleared when full)
_ORDER = (b'{"coin":"%s","side":"%s","limitPx":"%s","sz":"%s","oid":%d,"timestamp":%d,"triggerCondition":"%s",'
          b'"isTrigger":%s,"triggerPx":"%s","children":[],"isPositionTpsl":false,"reduceOnly":%s,"orderType":"%s",'
          b'"origSz":"%s","tif":%s,"cloid":%s}')
_BOOL = {False: b"false", True: b"true"}
ASK, BID, FAIR = range(3)  # indexes of Market.bases


@dataclass(slots=True)
class Resting:
    """An order resting on a book (or a pending trigger order when ``is_trigger``)."""

    oid: int
    user: str
    coin: str
    side: str
    px: int
    sz: int
    orig_sz: int
    timestamp: int
    cloid: str | None
    tif: str | None
    order_type: str = "Limit"
    reduce_only: bool = False
    trigger_condition: str = "N/A"
    is_trigger: bool = False
    trigger_px: int = 0
    limit_px: int = 0  # status limitPx of a trigger order (the resting px may differ)
    pos: int = -1  # index in its market's ``orders`` or ``specials``

    @property
    def special(self) -> bool:
        """An order of the HIP-2 or assistance-fund address (no statuses)."""
        return self.user in SPECIAL_USERS

    def order(self, sz: int | None = None, px: int | None = None) -> dict[str, Any]:
        """The node's order object (status and snapshot shape)."""
        return {
            "coin": self.coin,
            "side": self.side,
            "limitPx": fmt(self.px if px is None else px),
            "sz": fmt(self.sz if sz is None else sz),
            "oid": self.oid,
            "timestamp": self.timestamp,
            "triggerCondition": self.trigger_condition,
            "isTrigger": self.is_trigger,
            "triggerPx": fmt(self.trigger_px),
            "children": [],
            "isPositionTpsl": False,
            "reduceOnly": self.reduce_only,
            "orderType": self.order_type,
            "origSz": fmt(self.orig_sz),
            "tif": self.tif,
            "cloid": self.cloid,
        }

    def order_json(self, sz: int | None = None) -> bytes:
        """``orjson.dumps(self.order(sz))``, from a template (the strings need no escaping: coin names are
        checked by ``json_str``, the others are the engine's own)."""
        return _ORDER % (
            self.coin.encode(), self.side.encode(), text(self.px), text(self.sz if sz is None else sz), self.oid,
            self.timestamp, self.trigger_condition.encode(), _BOOL[self.is_trigger], text(self.trigger_px),
            _BOOL[self.reduce_only], self.order_type.encode(), text(self.orig_sz), quoted(self.tif), quoted(self.cloid),
        )


_texts: dict[int, bytes] = {}


def text(value: int) -> bytes:
    """``fmt(value)`` as bytes, cached."""
    out = _texts.get(value)
    if out is None:
        if len(_texts) >= TEXT_CACHE:
            _texts.clear()
        out = _texts[value] = fmt(value).encode()
    return out


def quoted(value: str | None) -> bytes:
    """A JSON string or null (for strings that need no escaping)."""
    return b"null" if value is None else b'"' + value.encode() + b'"'


def json_str(value: str) -> bytes:
    """``value`` as it sits between JSON quotes; ValueError if it would need escaping."""
    raw = value.encode()
    if orjson.dumps(value) != b'"' + raw + b'"':
        raise ValueError(f"{value!r} needs escaping in JSON")
    return raw


class Market:
    """A coin's book (price -> {oid: Resting} in time priority, bids keyed by -px) with its best
    prices cached (``bases``: best ask, best bid, fair, each side's best standing in for an empty
    side's), its resting orders in lists for random picks (``orders``: everyone's but the special
    users', ``specials``: theirs), its fair price, and the depths its flow keeps it at
    (``target``, ``special_target``: the resting orders it started with)."""

    __slots__ = ("coin", "min_px", "max_px", "bids", "asks", "best_bid", "best_ask", "fair", "bases", "orders",
                 "specials", "target", "special_target", "spread_ticks", "px_text")

    def __init__(self, coin: Coin) -> None:
        json_str(coin.name)  # templates write coin names unescaped
        self.coin = coin
        self.min_px, self.max_px = coin.min_px, coin.max_px
        self.bids: SortedDict = SortedDict()
        self.asks: SortedDict = SortedDict()
        self.best_bid: int | None = None
        self.best_ask: int | None = None
        self.fair = coin.price
        self.bases = [self.fair] * 3
        self.orders: list[Resting] = []
        self.specials: list[Resting] = []
        self.target = self.special_target = 0
        self.spread_ticks = max(2.0, 0.003 * coin.price / coin.tick)
        self.px_text: dict[int, bytes] = {}

    def set_fair(self, px: int) -> None:
        self.fair = px
        self._rebase()

    def _rebase(self) -> None:
        fair = self.fair
        self.bases = [fair if self.best_ask is None else self.best_ask, fair if self.best_bid is None else self.best_bid,
                      fair]

    def best(self, side: str) -> int | None:
        return self.best_bid if side == "B" else self.best_ask

    def levels(self, side: str) -> SortedDict:
        return self.bids if side == "B" else self.asks

    def resting(self) -> int:
        return len(self.orders) + len(self.specials)

    def add(self, o: Resting) -> None:
        """Rest ``o`` at the back of its level."""
        if o.side == "B":
            levels, key = self.bids, -o.px
            if self.best_bid is None or o.px > self.best_bid:
                self.best_bid = o.px
                self._rebase()
        else:
            levels, key = self.asks, o.px
            if self.best_ask is None or o.px < self.best_ask:
                self.best_ask = o.px
                self._rebase()
        level = levels.get(key)
        if level is None:
            levels[key] = {o.oid: o}
        else:
            level[o.oid] = o
        group = self.specials if o.special else self.orders
        o.pos = len(group)
        group.append(o)

    def discard(self, o: Resting) -> None:
        """Take ``o`` off the book."""
        levels = self.bids if o.side == "B" else self.asks
        key = -o.px if o.side == "B" else o.px
        level = levels[key]
        del level[o.oid]
        if not level:
            del levels[key]
            if o.side == "B" and o.px == self.best_bid:
                self.best_bid = -levels.peekitem(0)[0] if levels else None
                self._rebase()
            elif o.side == "A" and o.px == self.best_ask:
                self.best_ask = levels.peekitem(0)[0] if levels else None
                self._rebase()
        group = self.specials if o.special else self.orders
        last = group.pop()
        if last is not o:
            group[o.pos] = last
            last.pos = o.pos
        o.pos = -1

    def entries(self, side: str) -> list[Resting]:
        """Orders of a side, best price first, time priority within a level."""
        return [o for level in self.levels(side).values() for o in level.values()]

    def top_size(self, side: str, n: int) -> int:
        """Total size of the first ``n`` orders of a side."""
        total = 0
        for level in self.levels(side).values():
            for o in level.values():
                total += o.sz
                n -= 1
                if not n:
                    return total
        return total

    def px_bytes(self, px: int) -> bytes:
        """``fmt(px)`` as bytes, cached."""
        text = self.px_text.get(px)
        if text is None:
            if len(self.px_text) >= PX_CACHE:
                self.px_text.clear()
            text = self.px_text[px] = fmt(px).encode()
        return text

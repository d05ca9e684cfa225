"""L4 order book of one coin: every resting order, price levels in time priority.

Per side, a plain dict maps a fixed-point price to its :class:`Level` and a
``SortedList`` holds the keys best first (bids negated), so the best price and
the top N levels cost O(levels read), never a scan of the book. A level keeps
an insertion-ordered dict ``oid -> Order`` (time priority) and its running
total size.

Per-order state is compact (docs/BENCHMARKS.md, "Book"): sizes and prices are
fixed-point ints, the fields most orders share (side, tif, order type, trigger
fields, flags) are one interned tuple, ``children`` is kept as JSON bytes.

Rules (as the node writes its data): ``new`` inserts at the back of its level with px/sz from
the diff and details from the status of the same oid in the same block (a
fired trigger order rests with the node's ``Triggered`` details, see
:func:`kind_of`);
``update`` sets the size to ``newSz``; ``remove`` deletes. An update/remove of
an unknown oid, a ``new`` for a known one, a diff whose px/side disagree
with the order, or a price/size that is not positive and plausible raises
:class:`OutOfSync`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import msgspec
from sortedcontainers import SortedList

from hlbook.common import fixed
from hlbook.common.models import BookDiff, Order as NodeOrder, OrderStatus

BID, ASK = "B", "A"
DETAIL_STATUSES = ("open", "triggered")
MAX_PX = 10**12 * fixed.ONE  # a price or size beyond these is a damaged line, not a market
MAX_SZ = 10**15 * fixed.ONE
BAD_VALUES = ("bad_diff", "bad_side", "bad_value")  # OutOfSync reasons that mean damaged input

# Kind tuple: the order fields most orders share, interned. Its indexes are Final
# literals, so that a type checker knows each field's type.
K_SIDE: Final = 0
K_TIF: Final = 1
K_TYPE: Final = 2
K_TRIG_COND: Final = 3
K_TRIG_PX: Final = 4
K_IS_TRIG: Final = 5
K_REDUCE: Final = 6
K_TPSL: Final = 7
K_CHILDREN: Final = 8
Kind = tuple[str, str | None, str, str, str, bool, bool, bool, bytes | None]

_kinds: dict[Kind, Kind] = {}
_px_cache: dict[str, int] = {}
_POW10 = [10**i for i in range(fixed.DECIMALS + 1)]
_CACHE_MAX = 100_000


class OutOfSync(Exception):
    """The diffs do not fit the book: the coin must be rebuilt."""

    def __init__(self, coin: str, reason: str, oid: int) -> None:
        super().__init__(f"{coin}: {reason} (oid {oid})")
        self.coin, self.reason, self.oid = coin, reason, oid


def intern_kind(kind: Kind) -> Kind:
    """The shared copy of ``kind`` (orders with children keep their own)."""
    if kind[K_CHILDREN] is not None:
        return kind
    shared = _kinds.get(kind)
    if shared is None:
        if len(_kinds) >= _CACHE_MAX:
            _kinds.clear()
        shared = _kinds[kind] = kind
    return shared


def parse_px(text: str) -> int:
    """``fixed.parse`` with a bounded cache (prices repeat a lot)."""
    value = _px_cache.get(text)
    if value is None:
        if len(_px_cache) >= _CACHE_MAX:
            _px_cache.clear()
        value = _px_cache[text] = fixed.parse(text)
    return value


def parse_cloid(cloid: str | None) -> int | None:
    return None if cloid is None else int(cloid, 16)


def fmt_cloid(cloid: int | None) -> str | None:
    return None if cloid is None else f"0x{cloid:032x}"


CHILD_KEYS = tuple(NodeOrder.__struct_fields__)


def children_bytes(children: list[Any]) -> bytes | None:
    """``children`` packed as msgpack (None when empty, as almost always): when
    every child has the node's order keys in order, only their values (b"V")."""
    if not children:
        return None
    if all(isinstance(c, dict) and tuple(c) == CHILD_KEYS for c in children):
        return b"V" + msgspec.msgpack.encode([list(c.values()) for c in children])
    return b"M" + msgspec.msgpack.encode(children)


def children_of(packed: bytes | None) -> list[Any]:
    """Inverse of :func:`children_bytes`."""
    if packed is None:
        return []
    body = msgspec.msgpack.decode(packed[1:])
    if packed[:1] == b"V":
        return [dict(zip(CHILD_KEYS, values)) for values in body]
    return body


def default_kind(side: str) -> Kind:
    """Details of orders that come with no status (HIP-2, assistance fund)."""
    return intern_kind((side, "Alo", "Limit", "N/A", "0.0", False, False, False, None))


def kind_of(order: NodeOrder, side: str) -> Kind:
    """The shared-details tuple of a node order (side from the diff).

    A trigger order that fired rests as the node's snapshots show it: its
    status carries the order as placed (``isTrigger``, ``Price below …``, no
    tif); resting, it is ``isTrigger: false``, ``triggerCondition: "Triggered"``,
    ``triggerPx: "0.0"``, ``tif: "Gtc"``."""
    if order.isTrigger:
        return intern_kind((side, "Gtc", order.orderType, "Triggered", "0.0", False, order.reduceOnly, order.isPositionTpsl,
                            children_bytes(order.children) if order.children else None))
    kind = (
        side,
        order.tif,
        order.orderType,
        order.triggerCondition,
        order.triggerPx,
        order.isTrigger,
        order.reduceOnly,
        order.isPositionTpsl,
        children_bytes(order.children) if order.children else None,
    )
    return _kinds.get(kind) or intern_kind(kind)


class Order(msgspec.Struct, gc=False, eq=False):
    """One resting order. ``px``, ``sz``, ``orig_sz`` fixed-point; ``cloid`` an int.

    A Struct without GC tracking: 16 bytes less than a ``__slots__`` object,
    safe because an order references only ints, strings and its kind tuple."""

    oid: int
    user: str
    px: int
    sz: int
    ts: int
    orig_sz: int
    cloid: int | None
    kind: Kind

    @property
    def side(self) -> str:
        return self.kind[K_SIDE]

    def to_dict(self, coin: str) -> dict[str, Any]:
        """The node/API order shape plus ``user`` (upstream l4 snapshot entries)."""
        k = self.kind
        return {
            "user": self.user,
            "coin": coin,
            "side": k[K_SIDE],
            "limitPx": fixed.fmt(self.px),
            "sz": fixed.fmt(self.sz),
            "oid": self.oid,
            "timestamp": self.ts,
            "triggerCondition": k[K_TRIG_COND],
            "isTrigger": k[K_IS_TRIG],
            "triggerPx": k[K_TRIG_PX],
            "children": children_of(k[K_CHILDREN]),
            "isPositionTpsl": k[K_TPSL],
            "reduceOnly": k[K_REDUCE],
            "orderType": k[K_TYPE],
            "origSz": fixed.fmt(self.orig_sz),
            "tif": k[K_TIF],
            "cloid": fmt_cloid(self.cloid),
        }


DEEP = 32  # orders at one price past which a Level keeps them in a dict


class Level(msgspec.Struct, gc=False, eq=False):
    """Orders at one price in time priority, with their total size.

    A list while short (2.4 orders on average on mainnet BTC: removal is a
    C-speed identity scan, and a list costs a third of a small dict's memory);
    past ``DEEP`` orders a dict keyed by the orders themselves (identity-hashed,
    insertion-ordered), so that removing from a level of thousands (mainnet
    has some) costs the same as from a short one. Either iterates the orders
    in time priority."""

    px: int
    orders: list[Order] | dict[Order, None] = msgspec.field(default_factory=list)
    sz: int = 0
    px_str: str | None = None
    cached: tuple[str, str, int] | None = None  # wire(), until the level changes
    json: bytes | None = None  # fragment(), until the level changes

    @property
    def n(self) -> int:
        return len(self.orders)

    def add(self, order: Order) -> None:
        orders = self.orders
        if isinstance(orders, list):
            orders.append(order)
            if len(orders) > DEEP:
                self.orders = dict.fromkeys(orders)
        else:
            orders[order] = None
        self.sz += order.sz
        self.cached = self.json = None

    def resize(self, delta: int) -> None:
        self.sz += delta
        self.cached = self.json = None

    def discard(self, order: Order) -> None:
        orders = self.orders
        if isinstance(orders, dict):
            del orders[order]
        elif orders[-1] is order:
            orders.pop()
        else:
            orders.remove(order)  # eq=False: an identity scan at C speed
        self.sz -= order.sz
        self.cached = self.json = None

    def wire(self) -> tuple[str, str, int]:
        """``(px, sz, n)`` with canonical strings (built once per change)."""
        cached = self.cached
        if cached is None:
            if self.px_str is None:
                self.px_str = fixed.fmt(self.px)
            cached = self.cached = (self.px_str, fixed.fmt(self.sz), len(self.orders))
        return cached

    def fragment(self) -> bytes:
        """``{"px","sz","n"}`` as clients get it (JSON, built once per change)."""
        frag = self.json
        if frag is None:
            frag = self.json = level_json(*self.wire())
        return frag


def level_json(px: str, sz: str, n: int) -> bytes:
    """A client's L2 level, ``{"px":"81307.0","sz":"0.20195","n":4}``."""
    return b'{"px":"%s","sz":"%s","n":%d}' % (px.encode(), sz.encode(), n)


class Side:
    """One side of a book: price -> Level, prices sorted (bids read from the end)."""

    __slots__ = ("is_bid", "levels", "keys", "views")

    def __init__(self, is_bid: bool) -> None:
        self.is_bid = is_bid
        self.levels: dict[int, Level] = {}
        self.keys: SortedList[int] = SortedList()  # ascending prices (the Level's own int objects)
        self.views: list[Any] = []  # aggregate.AggSide views kept up to date on every change

    def level_for(self, px: int) -> Level:
        level = self.levels.get(px)
        if level is None:
            level = self.levels[px] = Level(px)
            self.keys.add(px)
        return level

    def drop(self, level: Level) -> None:
        del self.levels[level.px]
        self.keys.remove(level.px)

    def best(self) -> Level | None:
        if not self.levels:
            return None
        return self.levels[self.keys[-1 if self.is_bid else 0]]

    def iter_levels(self) -> Iterator[Level]:
        """Levels best first; stop iterating whenever enough was read."""
        levels = self.levels
        for key in (reversed(self.keys) if self.is_bid else self.keys):
            yield levels[key]

    def top(self, n: int) -> list[Level]:
        levels = self.levels
        keys = self.keys
        if self.is_bid:
            return [levels[k] for k in keys.islice(max(len(keys) - n, 0), reverse=True)]
        return [levels[k] for k in keys.islice(0, n)]

    def __len__(self) -> int:
        return len(self.levels)


def parse_sz(text: str) -> int:
    """Fast path of ``fixed.parse`` for plain ``123.456`` strings (falls back for the rest)."""
    dot = text.find(".")
    if 0 < dot and 0 < len(text) - dot - 1 <= fixed.DECIMALS:
        digits = text[:dot] + text[dot + 1 :]
        if digits.isdigit():
            return int(digits) * _POW10[fixed.DECIMALS - (len(text) - dot - 1)]
    return fixed.parse(text)


_users: dict[str, str] = {}


def new_order(diff: BookDiff, sz_text: str, status: OrderStatus | None, time: int) -> Order:
    """The order a ``new`` diff creates: px/sz from the diff, details from the status."""
    px = parse_px(diff.px)
    sz = parse_sz(sz_text)
    user = _users.get(diff.user)
    if user is None:
        if len(_users) >= _CACHE_MAX:
            _users.clear()
        user = _users[diff.user] = sys.intern(diff.user)
    if status is None:
        return Order(diff.oid, user, px, sz, time, sz, None, default_kind(diff.side))
    o = status.order
    orig = sz if o.origSz == sz_text else parse_sz(o.origSz)
    cloid = o.cloid
    return Order(diff.oid, user, px, sz, o.timestamp, orig, None if cloid is None else int(cloid, 16), kind_of(o, diff.side))


def details_of(statuses: Iterable[OrderStatus]) -> dict[int, OrderStatus]:
    """Status per oid giving order details: ``open``/``triggered`` preferred, else the first."""
    out: dict[int, OrderStatus] = {}
    for st in statuses:
        oid = st.order.oid
        if oid not in out or (st.status in DETAIL_STATUSES and out[oid].status not in DETAIL_STATUSES):
            out[oid] = st
    return out


class Book:
    """The L4 book of one coin."""

    __slots__ = ("coin", "bids", "asks", "orders", "height", "time", "views")

    def __init__(self, coin: str, height: int = 0, time: int = 0) -> None:
        self.coin = coin
        self.bids = Side(True)
        self.asks = Side(False)
        self.orders: dict[int, Order] = {}
        self.height = height
        self.time = time
        self.views: dict[tuple[int, int], tuple[Any, Any]] = {}  # (nSigFigs, mantissa) -> (bid view, ask view)

    def attach(self, key: tuple[int, int], bid_view: Any, ask_view: Any) -> None:
        """Keep two aggregated views (``aggregate.AggSide``) updated from now on."""
        self.views[key] = (bid_view, ask_view)
        self.bids.views.append(bid_view)
        self.asks.views.append(ask_view)

    def detach(self, key: tuple[int, int]) -> None:
        bid_view, ask_view = self.views.pop(key)
        self.bids.views.remove(bid_view)
        self.asks.views.remove(ask_view)

    def side(self, side: str) -> Side:
        """The bids or asks; OutOfSync for any other side."""
        if side == BID:
            return self.bids
        if side == ASK:
            return self.asks
        raise OutOfSync(self.coin, "bad_side", -1)

    # ------------------------------------------------------------ mutation

    def insert(self, oid: int, order: Order) -> None:
        """Append ``order`` at the back of its level."""
        orders = self.orders
        if oid in orders:
            raise OutOfSync(self.coin, "duplicate_oid", oid)
        side = self.side(order.kind[K_SIDE])
        level = side.level_for(order.px)
        orders[oid] = order
        level.add(order)
        for view in side.views:
            view.change(order.px, order.sz, 1)

    def update(self, oid: int, new_sz: int) -> None:
        order = self.orders.get(oid)
        if order is None:
            raise OutOfSync(self.coin, "unknown_oid", oid)
        side = self.side(order.kind[K_SIDE])
        side.levels[order.px].resize(new_sz - order.sz)
        for view in side.views:
            view.change(order.px, new_sz - order.sz, 0)
        order.sz = new_sz

    def remove(self, oid: int) -> Order:
        order = self.orders.pop(oid, None)
        if order is None:
            raise OutOfSync(self.coin, "unknown_oid", oid)
        side = self.bids if order.kind[K_SIDE] == BID else self.asks
        level = side.levels[order.px]
        level.discard(order)
        if not level.orders:
            side.drop(level)
        for view in side.views:
            view.change(order.px, -order.sz, -1)
        return order

    def apply(self, height: int, time: int, diffs: list[BookDiff], statuses: Sequence[OrderStatus] = ()) -> list[Order]:
        """Apply one block's diffs (with the statuses of the same block, or without: see
        :meth:`detail`); OutOfSync when they do not fit. Returns the orders ``new`` diffs created."""
        try:
            created = self._apply(time, diffs, statuses)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # malformed numbers or shapes
            raise OutOfSync(self.coin, "bad_diff", -1) from exc
        self.height = height
        self.time = time
        return created

    def detail(self, orders: list[Order], statuses: list[OrderStatus]) -> None:
        """Give orders created without their block's statuses the details those statuses hold
        (as :func:`new_order` would have): the block's diffs are applied as soon as they come,
        its statuses follow. Orders already gone are skipped."""
        details = details_of(statuses)
        for order in orders:
            status = details.get(order.oid)
            if status is not None and self.orders.get(order.oid) is order:
                o = status.order
                order.ts, order.orig_sz = o.timestamp, parse_sz(o.origSz)
                order.cloid = None if o.cloid is None else int(o.cloid, 16)
                order.kind = kind_of(o, order.kind[K_SIDE])

    def _apply(self, time: int, diffs: list[BookDiff], statuses: Sequence[OrderStatus]) -> list[Order]:
        details: dict[int, OrderStatus] | None = None
        created: list[Order] = []
        for diff in diffs:
            body = diff.raw_book_diff
            if isinstance(body, str):
                if body != "remove":
                    raise OutOfSync(self.coin, "bad_diff", diff.oid)
                self.remove(self._checked(diff).oid)
            elif (new := body.new) is not None:
                if details is None:
                    details = details_of(statuses) if statuses else {}
                order = new_order(diff, new.sz, details.get(diff.oid), time)
                if not (0 < order.px < MAX_PX and 0 < order.sz < MAX_SZ):
                    raise OutOfSync(self.coin, "bad_value", diff.oid)
                self.insert(diff.oid, order)
                created.append(order)
            elif (upd := body.update) is not None:
                size = parse_sz(upd.newSz)
                if not 0 <= size < MAX_SZ:
                    raise OutOfSync(self.coin, "bad_value", diff.oid)
                self.update(self._checked(diff).oid, size)
            else:
                raise OutOfSync(self.coin, "bad_diff", diff.oid)
        return created

    def _checked(self, diff: BookDiff) -> Order:
        """The order a remove/update diff refers to, if its px and side agree."""
        order = self.orders.get(diff.oid)
        if order is None:
            raise OutOfSync(self.coin, "unknown_oid", diff.oid)
        if order.px != parse_px(diff.px) or order.kind[K_SIDE] != diff.side:
            raise OutOfSync(self.coin, "px_mismatch", diff.oid)
        return order

    # ------------------------------------------------------------ reads

    def bbo(self) -> tuple[Level | None, Level | None]:
        return self.bids.best(), self.asks.best()

    def mid(self) -> int | None:
        """(best bid + best ask) / 2, fixed-point; None unless both sides exist."""
        bid, ask = self.bids.best(), self.asks.best()
        if bid is None or ask is None:
            return None
        return (bid.px + ask.px) // 2

    def l4_levels(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every order, levels best first, time priority within a level."""
        coin = self.coin
        return (
            [o.to_dict(coin) for lv in self.bids.iter_levels() for o in lv.orders],
            [o.to_dict(coin) for lv in self.asks.iter_levels() for o in lv.orders],
        )

    def fingerprint(self) -> tuple[list[tuple[int, str, int, int]], list[tuple[int, str, int, int]]]:
        """(oid, user, px, sz) per order in book order: what validation compares."""
        return (
            [(o.oid, o.user, o.px, o.sz) for lv in self.bids.iter_levels() for o in lv.orders],
            [(o.oid, o.user, o.px, o.sz) for lv in self.asks.iter_levels() for o in lv.orders],
        )

    def __len__(self) -> int:
        return len(self.orders)

"""Local books: ``L2BookView`` (l2Book) and ``L4Book`` (l4Book snapshot + updates).

Prices and sizes are ``Decimal`` (never float); output strings are canonical
(shortest form, at least one decimal: ``"81307.0"``, ``"0.00014"``).
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from hlbook.client.handlers import Handlers
from hlbook.common.chain import Chain, Step

if TYPE_CHECKING:
    from hlbook.client.client import HLClient
    from hlbook.client.registry import Strategy

log = logging.getLogger("hlbook.client")

Level = tuple[Decimal, Decimal, int]


def dec(text: str) -> Decimal:
    """Exact decimal of a price/size string."""
    return Decimal(text)


def canon(value: Decimal) -> str:
    """Canonical decimal string: ``Decimal("81307")`` -> ``"81307.0"``."""
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


def _data(message: dict[str, Any]) -> Any:
    return message["data"] if "channel" in message else message


class Freshness:
    """How old a local book's data is: ``age`` (seconds since the last message applied,
    None before any); ``fresh`` while its subscription is active (not after the
    connection dropped) and ``age`` is under ``stale_after`` (None: never stale by age)."""

    def __init__(self, stale_after: float | None) -> None:
        self.stale_after = stale_after
        self.received_at: float | None = None  # monotonic
        self._client: HLClient | None = None
        self.sub_id: int | None = None

    def touch(self) -> None:
        self.received_at = time.monotonic()

    @property
    def age(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at

    @property
    def fresh(self) -> bool:
        age = self.age
        if age is None or (self.stale_after is not None and age > self.stale_after):
            return False
        if self._client is None or self.sub_id is None:
            return True
        info = self._client.get_subscription(self.sub_id)
        return info is not None and info["state"] == "active"


class L2BookView(Freshness):
    """The latest l2Book message of one coin, as exact decimals; ``synced`` while fresh
    (see ``Freshness``: ``stale_after`` seconds without a message, or the connection lost)."""

    def __init__(self, coin: str | None = None, *, stale_after: float | None = 10.0) -> None:
        super().__init__(stale_after)
        self.coin = coin
        self.time: int | None = None
        self.bids: list[Level] = []
        self.asks: list[Level] = []
        self.updates = 0

    def apply(self, message: dict[str, Any]) -> None:
        """Take an l2Book message (or its ``data``)."""
        data = _data(message)
        bids, asks = data["levels"]
        self.coin = data["coin"]
        self.time = data.get("time")
        self.bids = [(dec(lv["px"]), dec(lv["sz"]), int(lv["n"])) for lv in bids]
        self.asks = [(dec(lv["px"]), dec(lv["sz"]), int(lv["n"])) for lv in asks]
        self.updates += 1
        self.touch()

    @property
    def synced(self) -> bool:
        """Data received, and fresh."""
        return self.fresh

    @property
    def best_bid(self) -> Level | None:
        return self.bids[0] if self.bids else None

    @property
    def best_ask(self) -> Level | None:
        return self.asks[0] if self.asks else None

    @property
    def mid(self) -> Decimal | None:
        """(best bid + best ask) / 2, exact."""
        if not self.bids or not self.asks:
            return None
        return (self.bids[0][0] + self.asks[0][0]) / 2

    @property
    def spread(self) -> Decimal | None:
        if not self.bids or not self.asks:
            return None
        return self.asks[0][0] - self.bids[0][0]

    def render(self, depth: int = 10) -> str:
        """A two-sided text table of the top ``depth`` levels."""
        return render_levels(self.coin or "?", self.time, self.bids[:depth], self.asks[:depth])

    async def subscribe(self, client: HLClient, **params: Any) -> int:
        """Subscribe l2Book for ``self.coin`` (extra params: nSigFigs, mantissa, nLevels)."""
        self._client = client
        self.sub_id = await client.subscribe({"type": "l2Book", "coin": self.coin, **params}, self.apply)
        return self.sub_id


def render_levels(coin: str, time_ms: int | None, bids: list[Level], asks: list[Level]) -> str:
    """Bids left, asks right, best first."""
    lines = [f"{coin}  time={time_ms}", f"{'n':>4} {'bid sz':>16} {'bid px':>14} | {'ask px':<14} {'ask sz':<16} {'n':<4}"]
    for i in range(max(len(bids), len(asks))):
        b = bids[i] if i < len(bids) else None
        a = asks[i] if i < len(asks) else None
        left = f"{b[2]:>4} {canon(b[1]):>16} {canon(b[0]):>14}" if b else " " * 36
        right = f"{canon(a[0]):<14} {canon(a[1]):<16} {a[2]:<4}" if a else ""
        lines.append(f"{left} | {right}")
    return "\n".join(lines)


class BookDesync(Exception):
    """The updates cannot be applied: a height gap or an unknown/duplicate oid."""


@dataclass(eq=False)
class L4Order:
    """One resting order; ``details`` holds the order fields as received."""

    oid: int
    user: str
    side: str
    px: Decimal
    sz: Decimal
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The snapshot shape with this order's current size."""
        return {**self.details, "user": self.user, "side": self.side, "limitPx": canon(self.px), "sz": canon(self.sz), "oid": self.oid}


class _Side:
    """Price levels of one side: dict of FIFO levels plus a sorted price list."""

    def __init__(self, descending: bool) -> None:
        self.descending = descending
        self.levels: dict[Decimal, dict[int, L4Order]] = {}
        self._keys: list[Decimal] = []  # ascending sort keys (negated prices for bids)

    def add(self, order: L4Order) -> None:
        level = self.levels.get(order.px)
        if level is None:
            level = self.levels[order.px] = {}
            bisect.insort(self._keys, -order.px if self.descending else order.px)
        level[order.oid] = order

    def remove(self, order: L4Order) -> None:
        level = self.levels[order.px]
        del level[order.oid]
        if not level:
            del self.levels[order.px]
            key = -order.px if self.descending else order.px
            del self._keys[bisect.bisect_left(self._keys, key)]

    def prices(self) -> list[Decimal]:
        """Prices best first."""
        return [-k for k in self._keys] if self.descending else list(self._keys)


class L4Book(Freshness):
    """Every resting order of one coin, from an ``l4Book`` subscription.

    Checks each ``Updates`` height against the last one (``strict_heights``:
    exactly +1, as hlbook sends one per block; upstream order_book_server sends
    only blocks that changed the coin, so pass ``strict_heights=False`` there)
    and every oid; on any gap or inconsistency it drops its state and asks the
    server for a fresh snapshot, so it is never silently wrong: between the
    problem and the new snapshot ``synced`` is False, as it is while not fresh
    (``Freshness``: hlbook sends a message per block, so ``stale_after`` seconds
    without one, or a lost connection, means the book may be behind).
    """

    def __init__(
        self, coin: str, *, strict_heights: bool = True, on_update: Callable[[L4Book], Any] | None = None, stale_after: float | None = 10.0
    ) -> None:
        super().__init__(stale_after)
        self.coin = coin
        self.strict_heights = strict_heights
        self.on_update = on_update
        self.handlers = Handlers(f"l4Book {coin}'s on_update")
        self._synced = False  # the state follows the feed (see ``synced``)
        self.height: int | None = None
        self._chain = Chain(dense=strict_heights)  # where ``height`` stands
        self.time: int | None = None
        self.resyncs = 0
        self.last_desync: str | None = None
        self.orders: dict[int, L4Order] = {}
        self._sides = {"B": _Side(descending=True), "A": _Side(descending=False)}

    # -- wiring to a client ------------------------------------------------------

    async def subscribe(self, client: HLClient, strategy: Strategy = "shared") -> int:
        """Subscribe l4Book for the coin (``strategy="dedicated"``: on a connection of
        its own, for a heavy book); the book keeps itself in sync."""
        self._client = client
        self.sub_id = await client.subscribe({"type": "l4Book", "coin": self.coin}, self.handle, strategy=strategy)
        return self.sub_id

    def handle(self, message: dict[str, Any]) -> bool:
        """Apply one l4Book message; on desync, reset and re-subscribe. True if applied."""
        try:
            applied = self.apply(message)
        except BookDesync as exc:
            self._desync(str(exc))
            return False
        if applied and self.on_update is not None:
            self.handlers.call(self.on_update, self)
        return applied

    def _desync(self, reason: str) -> None:
        log.warning("l4Book %s out of sync (%s): asking for a fresh snapshot", self.coin, reason)
        self.last_desync = reason
        self.resyncs += 1
        self._reset()
        if self._client is not None and self.sub_id is not None:
            self._client.resubscribe(self.sub_id)

    @property
    def synced(self) -> bool:
        """The state follows the feed (no gap or inconsistency since the snapshot), and is fresh."""
        return self._synced and self.fresh

    def _reset(self) -> None:
        self._synced = False
        self.orders.clear()
        self._sides = {"B": _Side(descending=True), "A": _Side(descending=False)}

    # -- state machine -------------------------------------------------------------

    def apply(self, message: dict[str, Any]) -> bool:
        """Apply a Snapshot or Updates message; False if ignored (not synced yet, stale)."""
        data = _data(message)
        if "Snapshot" in data:
            self.apply_snapshot(data["Snapshot"])
            return True
        if "Updates" in data:
            return self.apply_updates(data["Updates"])
        raise BookDesync(f"unknown l4Book message: {sorted(data)}")

    def apply_snapshot(self, snap: dict[str, Any]) -> None:
        """Replace the state with a snapshot."""
        if snap.get("coin") not in (None, self.coin):
            raise BookDesync(f"snapshot of {snap.get('coin')!r}")
        self._reset()
        for side_levels in snap["levels"]:
            for entry in side_levels:
                self._insert(_order_from(entry))
        self.height = int(snap["height"])
        self._chain.from_snapshot(self.height)
        self.time = snap.get("time")
        self._synced = True
        self.touch()

    def apply_updates(self, upd: dict[str, Any]) -> bool:
        """Apply one block of diffs; raises BookDesync on a gap or unknown oid."""
        if not self._synced or self.height is None:
            return False
        height = int(upd["height"])
        # hlbook sends one Updates per block (a dense stream: each is the next height);
        # order_book_server only blocks that changed the coin: nothing to check but their order
        step = self._chain.step(height, None if self.strict_heights else self._chain.last)
        if step is Step.SEEN:
            return False
        if step is Step.GAP:
            raise BookDesync(f"height gap: {self.height} -> {height}")
        details = {s["order"]["oid"]: s for s in upd.get("order_statuses", ()) if isinstance(s.get("order"), dict)}
        for diff in upd.get("book_diffs", ()):
            self._apply_diff(diff, details)
        self.height = height
        self._chain.advance(height)
        self.time = upd.get("time", self.time)
        self.touch()
        return True

    def _apply_diff(self, diff: dict[str, Any], details: dict[int, dict[str, Any]]) -> None:
        oid = diff["oid"]
        raw = diff["raw_book_diff"]
        if raw == "remove":
            self._delete(self._known(oid, "remove"))
        elif "new" in raw:
            if oid in self.orders:
                raise BookDesync(f"new for resting oid {oid}")
            status = details.get(oid)
            extra = {**status["order"], "user": status.get("user", diff["user"])} if status else {"coin": self.coin}
            self._insert(L4Order(oid, diff["user"], diff["side"], dec(diff["px"]), dec(raw["new"]["sz"]), extra))
        elif "update" in raw:
            order = self._known(oid, "update")
            order.sz = dec(raw["update"]["newSz"])
        else:
            raise BookDesync(f"unknown diff {raw!r}")

    def _known(self, oid: int, what: str) -> L4Order:
        order = self.orders.get(oid)
        if order is None:
            raise BookDesync(f"{what} of unknown oid {oid}")
        return order

    def _insert(self, order: L4Order) -> None:
        if order.side not in self._sides:
            raise BookDesync(f"bad side {order.side!r}")
        self.orders[order.oid] = order
        self._sides[order.side].add(order)

    def _delete(self, order: L4Order) -> None:
        del self.orders[order.oid]
        self._sides[order.side].remove(order)

    # -- reading -------------------------------------------------------------------

    def side_orders(self, side: str) -> list[L4Order]:
        """Orders of ``"B"`` or ``"A"``, best level first, time priority within."""
        s = self._sides[side]
        return [o for px in s.prices() for o in s.levels[px].values()]

    def levels(self, depth: int | None = None) -> tuple[list[Level], list[Level]]:
        """Aggregated (px, sz, n) per side, best first."""
        return self._agg("B", depth), self._agg("A", depth)

    def _agg(self, side: str, depth: int | None) -> list[Level]:
        s = self._sides[side]
        prices = s.prices()[:depth] if depth is not None else s.prices()
        return [(px, sum((o.sz for o in s.levels[px].values()), Decimal(0)), len(s.levels[px])) for px in prices]

    def snapshot_levels(self) -> list[list[dict[str, Any]]]:
        """The book in the Snapshot ``levels`` shape (canonical strings)."""
        return [[o.to_dict() for o in self.side_orders("B")], [o.to_dict() for o in self.side_orders("A")]]

    def fingerprint(self) -> tuple[list[tuple[int, str, str, str]], list[tuple[int, str, str, str]]]:
        """(oid, user, px, sz) per order in book order, for comparisons."""
        return tuple([(o.oid, o.user, canon(o.px), canon(o.sz)) for o in self.side_orders(s)] for s in ("B", "A"))  # type: ignore[return-value]

    def render(self, depth: int = 10) -> str:
        bids, asks = self.levels(depth)
        return render_levels(self.coin, self.time, bids, asks) + f"\nheight={self.height} orders={len(self.orders)} resyncs={self.resyncs}"


def _order_from(entry: Any) -> L4Order:
    """An order from a snapshot entry: ``{user, …order}`` or ``[user, order]``."""
    if isinstance(entry, list):
        user, order = entry
        order = {**order, "user": user}
    else:
        order = entry
    return L4Order(int(order["oid"]), order.get("user", ""), order["side"], dec(order["limitPx"]), dec(order["sz"]), order)

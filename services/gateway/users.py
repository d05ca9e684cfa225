"""Per-user streams from ingest's ``U|<user>|`` messages: the public API
shapes of orderUpdates, userFills, userEvents and userTwapSliceFills, and a
bounded store per followed user (recent fills and the latest status of recent
orders, by oid and cloid) for snapshots and info requests.

Ingest publishes a user's events only while someone follows that user, so the
store of a user starts when the first client follows them and is dropped when
the last one leaves (a later store would have a hole).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from hlbook.common import fixed
from hlbook.common.models import Fill, OrderStatus, block_time_ms
from hlbook.services.gateway import metrics

# statuses the system set (not the user): userEvents nonUserCancel
NON_USER_CANCELS = frozenset({
    "marginCanceled", "vaultWithdrawalCanceled", "openInterestCapCanceled", "selfTradeCanceled",
    "reduceOnlyCanceled", "siblingFilledCanceled", "delistedCanceled", "liquidatedCanceled", "scheduledCancel",
})
ORDER_FIELDS = ("coin", "side", "limitPx", "sz", "oid", "timestamp", "origSz")


def order_update(status: OrderStatus) -> dict[str, Any]:
    """One orderUpdates entry: ``{"order": {…}, "status", "statusTimestamp"}``."""
    order = status.order
    body = {field: getattr(order, field) for field in ORDER_FIELDS}
    if order.cloid:
        body["cloid"] = order.cloid
    return {"order": body, "status": status.status, "statusTimestamp": block_time_ms(status.time)}


def aggregate_by_time(fills: list[Fill]) -> list[Fill]:
    """Partial fills of one order at one time merged: sizes, fees and PnL summed, price size-weighted."""
    groups: dict[tuple[int, int], list[Fill]] = {}
    for fill in fills:
        groups.setdefault((fill.oid, fill.time), []).append(fill)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        sizes = [fixed.parse(f.sz) for f in group]
        total = sum(sizes)
        notional = sum(fixed.parse(f.px) * s for f, s in zip(group, sizes))
        first = group[0]
        out.append(Fill(**{
            **{f: getattr(first, f) for f in first.__struct_fields__},
            "sz": fixed.fmt(total),
            "px": fixed.fmt(notional // total) if total else first.px,
            "fee": fixed.fmt(sum(fixed.parse(f.fee) for f in group)),
            "closedPnl": fixed.fmt(sum(fixed.parse(f.closedPnl) for f in group)),
        }))
    return out


class UserStore:
    """What is kept of one followed user (bounded)."""

    def __init__(self, fills_kept: int, orders_kept: int) -> None:
        self.fills: deque[Fill] = deque(maxlen=fills_kept)
        self.orders: OrderedDict[int, OrderStatus] = OrderedDict()  # oid -> latest status, oldest first
        self.cloids: dict[str, int] = {}  # cloid -> latest oid (a modify keeps the cloid, new oid)
        self.orders_kept = orders_kept
        self.followers = 0

    def add(self, statuses: list[OrderStatus], fills: list[Fill]) -> None:
        self.fills.extend(fills)
        for status in statuses:
            oid = status.order.oid
            self.orders.pop(oid, None)
            self.orders[oid] = status
            if status.order.cloid:
                self.cloids[status.order.cloid] = oid
        while len(self.orders) > self.orders_kept:
            _, old = self.orders.popitem(last=False)
            if old.order.cloid and self.cloids.get(old.order.cloid) == old.order.oid:
                del self.cloids[old.order.cloid]

    def status(self, oid: int | None = None, cloid: str | None = None) -> OrderStatus | None:
        if cloid is not None:
            oid = self.cloids.get(cloid)
        return self.orders.get(oid) if oid is not None else None


class Users:
    """Stores of the users followed by this gateway's clients (at most ``max_users``)."""

    def __init__(self, fills_kept: int = 2000, orders_kept: int = 2000, max_users: int = 10_000) -> None:
        self.fills_kept, self.orders_kept, self.max_users = fills_kept, orders_kept, max_users
        self.stores: dict[str, UserStore] = {}

    def follow(self, user: str) -> UserStore | None:
        """The user's store (None when the cap of followed users is reached)."""
        store = self.stores.get(user)
        if store is None:
            if len(self.stores) >= self.max_users:
                return None
            store = self.stores[user] = UserStore(self.fills_kept, self.orders_kept)
            metrics.USERS.set(len(self.stores))
        store.followers += 1
        return store

    def unfollow(self, user: str) -> None:
        store = self.stores.get(user)
        if store is not None:
            store.followers -= 1
            if store.followers <= 0:
                del self.stores[user]
                metrics.USERS.set(len(self.stores))

"""Per-user streams from ingest's ``U|<user>|`` messages: the public API
shapes of orderUpdates, userFills, userEvents and userTwapSliceFills, and the
count of followers per user. What happened before a client subscribed (the
userFills snapshot, historicalOrders, …) comes from the history service.
"""

from __future__ import annotations

from typing import Any

from hlbook.common.models import OrderStatus, block_time_ms
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


class Users:
    """Users followed by this gateway's clients (at most ``max_users``): each is a ``U|<user>|``
    subscription on ingest, which builds that user's messages only while followed."""

    def __init__(self, max_users: int = 10_000) -> None:
        self.max_users = max_users
        self.followers: dict[str, int] = {}

    def can_follow(self, user: str) -> bool:
        return user in self.followers or len(self.followers) < self.max_users

    def follow(self, user: str) -> None:
        self.followers[user] = self.followers.get(user, 0) + 1
        metrics.USERS.set(len(self.followers))

    def unfollow(self, user: str) -> None:
        count = self.followers.get(user, 0) - 1
        if count > 0:
            self.followers[user] = count
        else:
            self.followers.pop(user, None)
        metrics.USERS.set(len(self.followers))

"""Info requests answered from the per-user stores and the candles
(``userFills``, ``userFillsByTime``, ``orderStatus`` by oid or cloid,
``historicalOrders``, ``candleSnapshot``).

History is what this gateway kept: a user's fills and order statuses since a
client of this gateway started following that user (capped by
``--user-fills-kept`` / ``--user-orders-kept``), candles since the gateway
started (``--candles-kept`` per coin and interval). Resting orders of any user
come from the books (``openOrders``, ``orderStatus`` by oid).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from hlbook.services.gateway.candles import INTERVALS
from hlbook.services.gateway.hub import Hub
from hlbook.services.gateway.info import Info, InfoError
from hlbook.services.gateway.users import aggregate_by_time, order_update

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def _int(payload: dict[str, Any], field: str, default: int | None = None) -> int:
    value = payload.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InfoError(f"{field} must be an integer (epoch ms)")
    return value


def handlers(hub: Hub, info: Info) -> dict[str, Handler]:
    books_order_status = info.handlers["orderStatus"]

    def fills(payload: dict[str, Any]) -> list[Any]:
        store = hub.users.stores.get(info.user_of(payload))
        kept = list(store.fills) if store else []
        return aggregate_by_time(kept) if payload.get("aggregateByTime") else kept

    async def user_fills(payload: dict[str, Any]) -> list[Any]:
        return fills(payload)[::-1]  # newest first

    async def user_fills_by_time(payload: dict[str, Any]) -> list[Any]:
        start = _int(payload, "startTime")
        end = _int(payload, "endTime", int(time.time() * 1000))
        return [f for f in fills(payload) if start <= f.time <= end]

    async def order_status(payload: dict[str, Any]) -> dict[str, Any]:
        user = info.user_of(payload)
        oid = payload.get("oid")
        store = hub.users.stores.get(user)
        found = None
        if store is not None:
            found = store.status(cloid=oid) if isinstance(oid, str) else store.status(oid=oid) if isinstance(oid, int) else None
        if found is not None:
            update = order_update(found)
            update["order"] = {**_order_fields(found), **update["order"]}
            return {"status": "order", "order": update}
        if isinstance(oid, str):
            return {"status": "unknownOid"}
        return await books_order_status(payload)

    async def historical_orders(payload: dict[str, Any]) -> list[Any]:
        store = hub.users.stores.get(info.user_of(payload))
        return [order_update(s) for s in reversed(store.orders.values())] if store else []

    async def candle_snapshot(payload: dict[str, Any]) -> list[Any]:
        req = payload.get("req")
        if not isinstance(req, dict):
            raise InfoError("candleSnapshot needs req: {coin, interval, startTime, endTime}")
        coin, interval = req.get("coin"), req.get("interval")
        if not isinstance(coin, str) or not hub.coin_exists(coin):
            raise InfoError(f"unknown coin {coin!r}")
        if interval not in INTERVALS:
            raise InfoError(f"interval must be one of {list(INTERVALS)}")
        return hub.candles.snapshot(coin, interval, _int(req, "startTime"), _int(req, "endTime", int(time.time() * 1000)))

    return {
        "userFills": user_fills,
        "userFillsByTime": user_fills_by_time,
        "orderStatus": order_status,
        "historicalOrders": historical_orders,
        "candleSnapshot": candle_snapshot,
    }


def _order_fields(status: Any) -> dict[str, Any]:
    order = status.order
    return {f: getattr(order, f) for f in order.__struct_fields__ if getattr(order, f) is not None}

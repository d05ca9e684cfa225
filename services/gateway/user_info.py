"""Info requests about the past, answered by the history service: ``userFills``,
``userFillsByTime``, ``historicalOrders``, ``orderStatus`` (of orders no longer
resting, or by cloid), ``candleSnapshot``, ``recentTrades``.

The history service keeps every user's fills and orders and every coin's
trades and candles from the node's files; its answers are the clients' JSON,
passed through without decoding. A gateway without one (no
``--history-query``) answers these from what it has: resting orders from the
books, trades seen since it started, and an error for the rest.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from hlbook.common import wire
from hlbook.common.candles import INTERVALS
from hlbook.services.gateway.hub import RECENT_TRADES, Hub
from hlbook.services.gateway.info import Info, InfoError
from hlbook.services.gateway.upstream import QueryError

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
CLOID_OR_OID = "oid must be a non-negative 64-bit integer or a cloid (0x and 32 hex digits)"


def _int(payload: dict[str, Any], field: str, default: int | None = None) -> int:
    value = payload.get(field, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise InfoError(f"{field} must be an integer (epoch ms)")
    return value


def handlers(hub: Hub, info: Info) -> dict[str, Handler]:
    books_order_status = info.handlers["orderStatus"]
    books_recent_trades = info.handlers["recentTrades"]

    async def ask(query: wire.HistoryQuery) -> msgspec.Raw:
        try:
            return msgspec.Raw((await hub.upstream.history(query))[1])
        except QueryError as exc:
            raise InfoError(str(exc)) from None

    async def user_fills(payload: dict[str, Any]) -> msgspec.Raw:
        return await ask(wire.HistoryQuery("user_fills", user=info.user_of(payload), aggregate=bool(payload.get("aggregateByTime"))))

    async def user_fills_by_time(payload: dict[str, Any]) -> msgspec.Raw:
        return await ask(wire.HistoryQuery("user_fills_by_time", user=info.user_of(payload), start=_int(payload, "startTime"),
                                           end=_int(payload, "endTime", int(time.time() * 1000)),
                                           aggregate=bool(payload.get("aggregateByTime"))))

    async def historical_orders(payload: dict[str, Any]) -> msgspec.Raw:
        return await ask(wire.HistoryQuery("historical_orders", user=info.user_of(payload)))

    async def order_status(payload: dict[str, Any]) -> Any:
        """A resting order as the books hold it now; else its last status in the history."""
        user, oid = info.user_of(payload), payload.get("oid")
        if isinstance(oid, int) and not isinstance(oid, bool):
            resting = await books_order_status(payload)
            if resting["status"] != "unknownOid" or not hub.upstream.has_history:
                return resting
            return await ask(wire.HistoryQuery("order_status", user=user, oid=oid))
        if isinstance(oid, str) and len(oid) == 34 and oid.startswith("0x"):
            return await ask(wire.HistoryQuery("order_status", user=user, cloid=oid.lower()))
        raise InfoError(CLOID_OR_OID)

    async def recent_trades(payload: dict[str, Any]) -> Any:
        """The history's newest trades with those this gateway saw since (the history may be a block behind)."""
        live = await books_recent_trades(payload)
        if not hub.upstream.has_history:
            return live
        stored = msgspec.json.decode(await ask(wire.HistoryQuery("recent_trades", coin=payload["coin"])), type=list[wire.Trade])
        merged = {t.tid: t for t in stored}
        for trade in live:
            merged.setdefault(trade.tid, trade)
        return sorted(merged.values(), key=lambda t: (t.time, t.tid))[-RECENT_TRADES:]

    async def candle_snapshot(payload: dict[str, Any]) -> msgspec.Raw:
        req = payload.get("req")
        if not isinstance(req, dict):
            raise InfoError("candleSnapshot needs req: {coin, interval, startTime, endTime}")
        coin, interval = req.get("coin"), req.get("interval")
        if not isinstance(coin, str) or not hub.coin_exists(coin):
            raise InfoError(f"unknown coin {coin!r}")
        if interval not in INTERVALS:
            raise InfoError(f"interval must be one of {list(INTERVALS)}")
        return await ask(wire.HistoryQuery("candles", coin=coin, interval=interval, start=_int(req, "startTime"),
                                           end=_int(req, "endTime", int(time.time() * 1000))))

    return {
        "userFills": user_fills,
        "userFillsByTime": user_fills_by_time,
        "orderStatus": order_status,
        "historicalOrders": historical_orders,
        "candleSnapshot": candle_snapshot,
        "recentTrades": recent_trades,
    }

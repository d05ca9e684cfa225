"""Typed feed messages (msgspec Structs) in the public API's shapes.

``typed(channel, data)`` turns a message's ``data`` into them; fields the
models do not name stay in the raw message. Prices and sizes stay strings, as
on the wire.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

log = logging.getLogger("hlbook.client")


class Model(msgspec.Struct, frozen=True):
    """Base of the feed models (each restates ``frozen=True``: msgspec inherits it, type checkers do not)."""


class Level(Model, frozen=True):
    px: str
    sz: str
    n: int


class L2Book(Model, frozen=True):
    coin: str
    time: int
    levels: tuple[tuple[Level, ...], tuple[Level, ...]]


class Trade(Model, frozen=True):
    coin: str
    side: str
    px: str
    sz: str
    time: int
    tid: int
    hash: str | None = None
    users: tuple[str, str] | None = None


class Bbo(Model, frozen=True):
    coin: str
    time: int
    bbo: tuple[Level | None, Level | None]


class AllMids(Model, frozen=True):
    mids: dict[str, str]


class Candle(Model, frozen=True):
    t: int
    T: int
    s: str
    i: str
    o: str
    c: str
    h: str
    l: str  # noqa: E741  (the wire's name)
    v: str
    n: int


class Fill(Model, frozen=True):
    coin: str
    px: str
    sz: str
    side: str
    time: int
    oid: int
    tid: int
    hash: str | None = None
    crossed: bool | None = None
    dir: str | None = None
    startPosition: str | None = None
    closedPnl: str | None = None
    fee: str | None = None
    feeToken: str | None = None
    cloid: str | None = None


class UserFills(Model, frozen=True):
    user: str
    fills: tuple[Fill, ...]
    isSnapshot: bool = False


class Order(Model, frozen=True):
    coin: str
    side: str
    limitPx: str
    sz: str
    oid: int
    timestamp: int
    origSz: str
    cloid: str | None = None


class OrderUpdate(Model, frozen=True):
    order: Order
    status: str
    statusTimestamp: int


class L4Order(Model, frozen=True):
    user: str
    coin: str
    side: str
    limitPx: str
    sz: str
    oid: int
    timestamp: int
    cloid: str | None = None


class L4Snapshot(Model, frozen=True):
    coin: str
    time: int
    height: int
    levels: tuple[tuple[L4Order, ...], tuple[L4Order, ...]]


class L4Updates(Model, frozen=True):
    time: int
    height: int
    order_statuses: tuple[dict[str, Any], ...]
    book_diffs: tuple[dict[str, Any], ...]


MODELS: dict[str, Any] = {
    "l2Book": L2Book,
    "trades": tuple[Trade, ...],
    "bbo": Bbo,
    "allMids": AllMids,
    "candle": Candle,
    "userFills": UserFills,
    "orderUpdates": tuple[OrderUpdate, ...],
}
_L4 = {"Snapshot": L4Snapshot, "Updates": L4Updates}


def typed(channel: str, data: Any) -> Any:
    """``data`` as its model; as it is when the channel has none or it does not fit."""
    try:
        if channel == "l4Book" and isinstance(data, dict) and len(data) == 1:
            ((kind, body),) = data.items()
            return msgspec.convert(body, _L4[kind])
        model = MODELS.get(channel)
        return data if model is None else msgspec.convert(data, model)
    except (msgspec.ValidationError, KeyError) as exc:
        log.debug("%s message does not fit its model (%s): kept raw", channel, exc)
        return data

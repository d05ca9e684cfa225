"""Requests of the public WebSocket API: parsing, subscription validation and
normalisation, and the public API's error texts (docs/ARCHITECTURE.md, "Gateway")."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec

from hlbook.services.book import l2
from hlbook.common.candles import INTERVALS
from hlbook.services.gateway.frames import Text

FEEDS = ("l2Book", "trades", "bbo", "allMids", "l4Book", "candle", "activeAssetCtx", "orderUpdates", "userFills", "userEvents", "userTwapSliceFills")
USER_FEEDS = frozenset({"orderUpdates", "userFills", "userEvents", "userTwapSliceFills"})
CONFLATED = frozenset({"l2Book", "bbo", "allMids", "candle", "activeAssetCtx"})  # a slow client gets the latest only
CHANNELS = {"userEvents": "user"}  # channel of a feed when it differs from its type
USER = re.compile(r"0x[0-9a-fA-F]{40}")
DEFAULT_LEVELS = 20

_encoder = msgspec.json.Encoder()


class RequestError(Exception):
    """A request that gets ``{"channel":"error","data":text}``."""

    def __init__(self, text: str, reason: str) -> None:
        super().__init__(text)
        self.text = text
        self.reason = reason  # metric label


def dumps(value: Any) -> str:
    """Compact JSON text (msgspec: dicts, lists, structs)."""
    return _encoder.encode(value).decode()


def message(channel: str, data: Any) -> Text:
    """``{"channel": channel, "data": data}`` as text, encoded once for every receiver."""
    return Text(dumps({"channel": channel, "data": data}))


def parse_request(raw: str | bytes) -> dict[str, Any]:
    """A request object with a string ``method``; RequestError otherwise."""
    try:
        request = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        request = None
    if not isinstance(request, dict) or not isinstance(request.get("method"), str):
        text = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
        raise RequestError(f"Error parsing JSON into valid websocket request: {text[:1000]}", "bad_json")
    return request


def _invalid(sub: Any) -> RequestError:
    return RequestError(f"Invalid subscription: {dumps(sub)}", "invalid_subscription")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalise(sub: Any, coin_exists: Callable[[str], bool]) -> dict[str, Any]:
    """The subscription as acks echo it (l2Book: ``nSigFigs``/``mantissa`` null
    when absent); RequestError ``Invalid subscription`` when the public API would refuse it."""
    if not isinstance(sub, dict) or sub.get("type") not in FEEDS:
        raise _invalid(sub)
    kind = sub["type"]
    if kind in USER_FEEDS:
        return _user_subscription(sub)
    if kind == "allMids":
        dex = sub.get("dex")
        if dex is not None and not isinstance(dex, str):
            raise _invalid(sub)
        return {"type": kind, "dex": dex} if dex else {"type": kind}
    coin = sub.get("coin")
    if not isinstance(coin, str) or not coin_exists(coin):
        raise _invalid(sub)
    if kind == "candle":
        if sub.get("interval") not in INTERVALS:
            raise _invalid(sub)
        return {"type": kind, "coin": coin, "interval": sub["interval"]}
    if kind != "l2Book":
        return {"type": kind, "coin": coin}
    nsf, man, n_levels = sub.get("nSigFigs"), sub.get("mantissa"), sub.get("nLevels")
    try:
        if (nsf is not None and not _is_int(nsf)) or (man is not None and not _is_int(man)):
            raise ValueError("not an integer")
        l2.validate(nsf, man)
    except ValueError:
        raise _invalid(sub) from None
    out = {"type": kind, "coin": coin, "nSigFigs": nsf, "mantissa": man}
    if n_levels is not None:
        if not _is_int(n_levels) or not 1 <= n_levels <= l2.MAX_LEVELS:
            raise _invalid(sub)
        out["nLevels"] = n_levels
    return out


def _user_subscription(sub: dict[str, Any]) -> dict[str, Any]:
    user = sub.get("user")
    if not isinstance(user, str) or not USER.fullmatch(user):
        raise _invalid(sub)
    out = {"type": sub["type"], "user": user.lower()}
    if sub["type"] == "userFills" and sub.get("aggregateByTime") is not None:
        if not isinstance(sub["aggregateByTime"], bool):
            raise _invalid(sub)
        out["aggregateByTime"] = sub["aggregateByTime"]
    return out


def identity(normalised: dict[str, Any]) -> str:
    """Text that names a subscription (two equal subscriptions share it)."""
    return dumps(dict(sorted(normalised.items())))


FeedKey = tuple[Any, ...]


def feed_key(normalised: dict[str, Any]) -> FeedKey:
    """The feed (one encoded stream shared by every subscriber) a subscription reads."""
    kind = normalised["type"]
    if kind == "l2Book":
        return (kind, normalised["coin"], normalised["nSigFigs"], normalised["mantissa"],
                normalised.get("nLevels", DEFAULT_LEVELS))
    if kind == "allMids":
        return (kind, normalised.get("dex", ""))
    if kind == "candle":
        return (kind, normalised["coin"], normalised["interval"])
    if kind == "userFills":
        return (kind, normalised["user"], bool(normalised.get("aggregateByTime")))
    if kind in USER_FEEDS:
        return (kind, normalised["user"])
    return (kind, normalised["coin"])

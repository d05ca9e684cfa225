"""Requests of the public WebSocket API: parsing, the feed key type, and the
public API's error texts (docs/ARCHITECTURE.md, "Gateway"). What each
subscription type accepts is in ``kinds.py``."""

from __future__ import annotations

import re
from typing import Any, ClassVar

import msgspec

from hlbook.services.gateway.frames import Text

USER = re.compile(r"0x[0-9a-fA-F]{40}")

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


def invalid(sub: Any) -> RequestError:
    return RequestError(f"Invalid subscription: {dumps(sub)}", "invalid_subscription")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def identity(normalised: dict[str, Any]) -> str:
    """Text that names a subscription (two equal subscriptions share it)."""
    return dumps(dict(sorted(normalised.items())))


class FeedKey(msgspec.Struct, frozen=True, cache_hash=True):
    """The key of a feed (one encoded stream shared by every subscriber): one
    Struct class per subscription type (``kinds.py``); keys of different types
    never compare equal. ``kind`` is the subscription type."""

    kind: ClassVar[str]


class CoinKey(FeedKey, frozen=True):
    """A feed of one coin."""

    coin: str


class UserKey(FeedKey, frozen=True):
    """A feed of one user (counted against ``--max-followed-users``)."""

    user: str

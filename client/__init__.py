"""Python client for hlbook and the public Hyperliquid WebSocket API.

Async; depends on ``websockets``, ``orjson`` and ``msgspec`` only, and never
imports the server parts. Names load on first use, so that importing
``hlbook.client.cli`` (which ``hlbook`` does for every command, the servers'
too) loads none of the client itself.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "BookDesync": "books", "L2BookView": "books", "L4Book": "books",
    "HLClient": "client",
    "ClientConfig": "connection", "backoff_delay": "connection",
    "Ack": "events", "Connected": "events", "Data": "events", "Disconnected": "events", "Dropped": "events",
    "Error": "events", "Event": "events", "EventStream": "events", "Gap": "events",
    "OrderEvent": "orders", "OrderTracker": "orders",
    "ClientClosed": "registry", "ConnectionLost": "registry", "SubscriptionError": "registry", "TooManyConnections": "registry",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'hlbook.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hlbook.client.{home}"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from hlbook.client.books import BookDesync, L2BookView, L4Book
    from hlbook.client.client import HLClient
    from hlbook.client.connection import ClientConfig, backoff_delay
    from hlbook.client.events import Ack, Connected, Data, Disconnected, Dropped, Error, Event, EventStream, Gap
    from hlbook.client.orders import OrderEvent, OrderTracker
    from hlbook.client.registry import ClientClosed, ConnectionLost, SubscriptionError, TooManyConnections

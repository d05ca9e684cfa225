"""Python client for hlbook and the public Hyperliquid WebSocket API.

Async, depends only on the standard library, ``websockets`` and ``orjson``:
importing it never imports the server parts.
"""

from hlbook.client.books import BookDesync, L2BookView, L4Book
from hlbook.client.client import HLClient
from hlbook.client.connection import ClientConfig, backoff_delay
from hlbook.client.orders import OrderEvent, OrderTracker
from hlbook.client.registry import SubscriptionError

__all__ = [
    "BookDesync",
    "ClientConfig",
    "HLClient",
    "L2BookView",
    "L4Book",
    "OrderEvent",
    "OrderTracker",
    "SubscriptionError",
    "backoff_delay",
]

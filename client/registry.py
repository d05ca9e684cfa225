"""Subscription registry: identities, routing keys and delivery to users.

Routing: every subscription has a *route key* (type plus the fields that its
messages echo: coin, user, interval). A connection holds at most one server
subscription per route key, so an incoming message is routed by one dict
lookup, never broadcast. Subscriptions whose messages do not echo what tells
them apart share a route key and therefore go to separate connections:

- ``l2Book`` of one coin with several aggregations (nSigFigs/mantissa/nLevels
  are not echoed in the message);
- ``l4Book`` (its ``Updates`` carry no coin), ``orderUpdates`` and
  ``userEvents`` (no user in the message), ``allMids`` with different ``dex``.

A duplicate subscription (same identity) shares one server subscription.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import orjson

from hlbook.client.events import Ack, Data, Error, EventBus, Gap, publish
from hlbook.client.handlers import Handlers
from hlbook.client.metrics import SubscriptionMetrics
from hlbook.client.models import typed

if TYPE_CHECKING:
    from hlbook.client.connection import Connection

Message = dict[str, Any]
Callback = Callable[[Message], Any] | Callable[[Message], Awaitable[Any]]

_TYPE_TO_CHANNEL = {"userEvents": "user"}
_CHANNEL_TO_TYPE = {"user": "userEvents", "activeSpotAssetCtx": "activeAssetCtx"}
_BY_COIN = {"l2Book", "trades", "bbo", "activeAssetCtx"}
_BY_USER = {"userFills", "userFundings", "userNonFundingLedgerUpdates", "userTwapSliceFills", "userTwapHistory", "webData2",
            "spotState", "userHistoricalOrders", "allDexsClearinghouseState"}
#: Types whose first message is a snapshot: a new user joining a live server
#: subscription triggers a re-subscription so that it gets one too.
SNAPSHOT_TYPES = {"l4Book", "userFills", "userTwapSliceFills", "userFundings", "userNonFundingLedgerUpdates", "userTwapHistory",
                  "userHistoricalOrders"}
RouteKey = tuple[Any, ...]
#: Where a subscription lives: ``shared`` (any shared connection with room),
#: ``dedicated`` (a connection of its own), ``user_grouped`` (the connection of its user).
Strategy = Literal["shared", "dedicated", "user_grouped"]


class SubscriptionError(Exception):
    """The server refused a subscription (or it is gone)."""


class TooManyConnections(SubscriptionError):
    """A subscription would need a connection past the client's ``max_connections``."""


class ClientClosed(SubscriptionError):
    """The client (or order tracker) was closed while this was waited for."""


class ConnectionLost(ConnectionError):
    """A subscription's connection dropped while ``next_message(fail_on_disconnect=True)`` waited."""


def normalize(subscription: dict[str, Any]) -> dict[str, Any]:
    """A copy without ``None`` values; user addresses lower-cased."""
    if not isinstance(subscription, dict) or not isinstance(subscription.get("type"), str):
        raise ValueError(f"a subscription is a dict with a 'type': {subscription!r}")
    out = {k: v for k, v in subscription.items() if v is not None}
    if isinstance(out.get("user"), str):
        out["user"] = out["user"].lower()
    return out


def identity(subscription: dict[str, Any]) -> str:
    """Canonical text of a subscription: equal identities share a server subscription."""
    return orjson.dumps(normalize(subscription), option=orjson.OPT_SORT_KEYS).decode()


def route_key(subscription: dict[str, Any]) -> RouteKey:
    """The key its messages are routed by (see module docstring)."""
    sub = normalize(subscription)
    kind = sub["type"]
    if kind in _BY_COIN:
        return (kind, sub.get("coin"))
    if kind == "candle":
        return (kind, sub.get("coin"), sub.get("interval"))
    if kind in _BY_USER:
        return (kind, sub.get("user"))
    if kind == "activeAssetData":
        return (kind, sub.get("user"), sub.get("coin"))
    if kind == "clearinghouseState":
        return (kind, sub.get("user"), sub.get("dex") or "")
    if kind == "assetCtxs":
        return (kind, sub.get("dex") or "")
    return (kind,)


def channel_of(subscription: dict[str, Any]) -> str:
    """The channel its messages arrive on."""
    return _TYPE_TO_CHANNEL.get(subscription["type"], subscription["type"])


def message_route_key(channel: str, data: Any) -> RouteKey | None:
    """Route key of an incoming feed message; None if it cannot be routed."""
    kind = _CHANNEL_TO_TYPE.get(channel, channel)
    try:
        if kind == "trades":
            return (kind, data[0]["coin"]) if data else None
        if kind in _BY_COIN:
            return (kind, data["coin"])
        if kind == "candle":
            return (kind, data["s"], data["i"])
        if kind in _BY_USER:
            return (kind, data["user"].lower())
        if kind == "activeAssetData":
            return (kind, data["user"].lower(), data["coin"])
        if kind == "clearinghouseState":
            return (kind, data["user"].lower(), data["dex"])
        if kind == "assetCtxs":
            return (kind, data["dex"])
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return (kind,)


@dataclass(eq=False)
class UserSubscription:
    """One ``subscribe()`` call: its callback or queue, and its metrics."""

    id: int
    subscription: dict[str, Any]
    server: ServerSubscription
    callback: Callback | None = None
    queue_size: int = 1000  # without a callback, 0: no queue (read it with ``events()``); with one: awaitables waiting at most
    bus: EventBus | None = None
    metrics: SubscriptionMetrics = field(default_factory=SubscriptionMetrics)
    error: str | None = None
    activated: bool = False
    on_gap: Callable[[float, float], Any] | None = None
    queue: asyncio.Queue[Message | None] | None = None
    waiters: list[tuple[asyncio.Future[Message], bool]] = field(default_factory=list)  # next_message: (future, fail on disconnect)
    handlers: Handlers = field(init=False)

    def __post_init__(self) -> None:
        self.handlers = Handlers(f"callback of subscription {self.id}", self.queue_size)
        if self.callback is None and self.queue_size > 0:
            self.queue = asyncio.Queue(self.queue_size)

    def deliver(self, message: Message) -> None:
        """Hand one message to the user: to its callback (see ``Handlers``), else to its queue."""
        self.metrics.record()
        publish(self.bus, self._data, message)
        if self.waiters:
            self._settle(message)
        if self.callback is not None:
            self.handlers.call(self.callback, message)
        elif self.queue is not None:
            self._put(message)

    def wait_next(self, fail_on_disconnect: bool) -> asyncio.Future[Message]:
        """A future of the next message (see ``HLClient.next_message``)."""
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.waiters.append((future, fail_on_disconnect))
        return future

    def forget(self, future: asyncio.Future[Message]) -> None:
        self.waiters = [w for w in self.waiters if w[0] is not future]

    def _settle(self, result: Message | Exception, disconnect: bool = False) -> None:
        """Hand ``result`` to the ``next_message`` waiters (a disconnect: to those that fail on one)."""
        waiting, self.waiters = self.waiters, [w for w in self.waiters if disconnect and not w[1]]
        for future, fail in waiting:
            if future.done() or (disconnect and not fail):
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    def lost(self, reason: str) -> None:
        """Its connection dropped: waiters that asked to fail on a disconnect do."""
        if self.waiters:
            self._settle(ConnectionLost(reason), disconnect=True)

    def _data(self, message: Message) -> Data:
        channel = message["channel"]
        return Data(self.id, channel, typed(channel, message.get("data")), message)

    def _put(self, message: Message | None) -> None:
        assert self.queue is not None
        if self.queue.full():
            self.queue.get_nowait()
            if message is not None:
                self.metrics.dropped += 1
        self.queue.put_nowait(message)

    def acked(self, resumed: bool, lost_at: float | None) -> None:
        """The server took it (``resumed``: again after a lost connection, which ``lost_at``)."""
        connection = self.server.connection.id if self.server.connection else None
        publish(self.bus, Ack, self.id, connection, resumed)
        if resumed and lost_at is not None:
            now = time.time()
            publish(self.bus, Gap, self.id, connection, lost_at, now)
            if self.on_gap is not None:
                self.handlers.call(self.on_gap, lost_at, now)

    def fail(self, error: str) -> None:
        """Record a refusal; an iterator ends with SubscriptionError."""
        self.error = error
        publish(self.bus, Error, error, self.server.connection.id if self.server.connection else None, self.id)
        self._settle(SubscriptionError(error))
        if self.queue is not None:
            self._put(None)

    def close(self, error: SubscriptionError | None = None) -> None:
        """Stop the callback's awaiting, end iterators and waiters (``error``, else ``ClientClosed``)."""
        self.handlers.close()
        self._settle(error or ClientClosed("client closed"))
        if self.queue is not None:
            self._put(None)

    def metrics_dict(self) -> dict[str, Any]:
        """Its metrics, with what its callback dropped and how often it raised."""
        out = self.metrics.as_dict()
        out["dropped"] += self.handlers.dropped
        out["callback_errors"] = self.handlers.errors
        return out

    def info(self) -> dict[str, Any]:
        """What it is and where it stands (metrics: ``metrics.as_dict()``)."""
        return {
            "id": self.id,
            "subscription": self.subscription,
            "strategy": self.server.strategy,
            "state": self.server.state,
            "error": self.error,
            "connection": self.server.connection.id if self.server.connection else None,
            "shared_with": sorted(u for u in self.server.users if u != self.id),
        }


@dataclass(eq=False)
class ServerSubscription:
    """One subscription as the server knows it, shared by duplicate user subscriptions."""

    key: str
    subscription: dict[str, Any]
    route: RouteKey
    strategy: Strategy = "shared"
    users: dict[int, UserSubscription] = field(default_factory=dict)
    connection: Connection | None = None
    state: str = "pending"  # pending | active | failed | closed
    error: str | None = None
    lost_at: float | None = None  # wall time its connection dropped; the next ack is a reconnect
    sent_at: float | None = None  # monotonic time of the last subscribe sent
    refusals: int = 0  # refusals since the last ack (retried while ``lost``)
    active: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def lost(self) -> bool:
        """Taken by the server before its connection dropped, not re-acknowledged yet."""
        return self.lost_at is not None

    def on_ack(self) -> None:
        """The server confirmed it: count a reconnect for users that had it before."""
        self.state = "active"
        self.error = None
        self.sent_at = None
        self.refusals = 0
        for user in list(self.users.values()):
            resumed = user.activated and self.lost
            if resumed:
                user.metrics.reconnects += 1
            user.activated = True
            user.acked(resumed, self.lost_at)
        self.lost_at = None
        self.active.set()

    def on_lost(self, reason: str = "connection lost") -> None:
        """Its connection dropped: pending until re-acknowledged."""
        if self.state == "active":
            self.lost_at = time.time()
        if self.state != "failed":
            self.state = "pending"
        self.active.clear()
        for user in list(self.users.values()):
            user.lost(reason)

    def on_error(self, error: str) -> None:
        """The server refused it, or its connection gave up."""
        self.state = "failed"
        self.error = error
        for user in list(self.users.values()):
            user.fail(error)
        self.active.set()

    def close(self, reason: str) -> None:
        """The client closed: waiters end (``ClientClosed``)."""
        self.state = "closed"
        self.error = reason
        self.active.set()

    def deliver(self, message: Message) -> None:
        """Fan a routed message out to every user subscription."""
        for user in list(self.users.values()):
            user.deliver(message)

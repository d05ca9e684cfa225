"""``HLClient``: the user-facing facade over connections and the registry."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, get_args

from hlbook.client.connection import ClientConfig, Connection, RateLimiter
from hlbook.client.events import Ack, EventBus, EventStream, check_size, publish
from hlbook.client.registry import (
    SNAPSHOT_TYPES,
    Callback,
    Message,
    ClientClosed,
    ConnectionLost,
    ServerSubscription,
    Strategy,
    SubscriptionError,
    TooManyConnections,
    UserSubscription,
    identity,
    normalize,
    route_key,
)

log = logging.getLogger("hlbook.client")


def check_strategy(sub: dict[str, Any], strategy: Strategy) -> None:
    """``ValueError`` unless ``strategy`` is known and fits the subscription."""
    if strategy not in get_args(Strategy):
        raise ValueError(f"strategy must be one of {get_args(Strategy)}, not {strategy!r}")
    if strategy == "user_grouped" and not isinstance(sub.get("user"), str):
        raise ValueError(f"user_grouped needs a subscription with a user: {sub!r}")


class HLClient:
    """Async client for hlbook and the public Hyperliquid WebSocket API.

    >>> async with HLClient("ws://127.0.0.1:8000/ws") as client:
    ...     sid = await client.subscribe({"type": "l2Book", "coin": "BTC"}, print)

    Connections are opened on demand, following each subscription's strategy
    (``shared``: any shared connection with room for its route key;
    ``dedicated``: one of its own; ``user_grouped``: the connection of its user,
    so that the relative order of that user's feeds holds), and supervised:
    heartbeat, reconnect with backoff, resubscription.
    """

    def __init__(self, url: str | None = None, config: ClientConfig | None = None, **settings: Any) -> None:
        config = config or ClientConfig()
        if url is not None:
            settings["url"] = url
        self.config = replace(config, **settings)
        self.limiter = RateLimiter(self.config.max_messages_per_minute, self.config.rate_window)
        self.bus = EventBus()
        self._connections: list[Connection] = []
        self._servers: dict[str, ServerSubscription] = {}
        self._users: dict[int, UserSubscription] = {}
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self._post_ids = itertools.count(1)
        self.stats: collections.Counter[str] = collections.Counter()  # connections_limited (HTTP 429), users_past_cap, refused_past_cap

    async def __aenter__(self) -> HLClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections ---------------------------------------------------------

    def _live(self) -> list[Connection]:
        return [c for c in self._connections if c.live]

    def _new_connection(self, strategy: Strategy = "shared", user: str | None = None, what: str = "a subscription") -> Connection:
        """A new connection; ``TooManyConnections`` past ``max_connections``."""
        if len(self._live()) >= self.config.max_connections:
            self.stats["refused_past_cap"] += 1
            raise TooManyConnections(f"{what} needs a new {strategy} connection and the client holds max_connections "
                                     f"{self.config.max_connections} (the server's per-address cap is above it)")
        conn = Connection(next(self._conn_ids), self.config, self.limiter, self.bus, strategy, user, self.stats)
        self._connections.append(conn)
        conn.start()
        return conn

    def _connection_for(self, server: ServerSubscription) -> Connection:
        """A live connection of the server subscription's strategy with room for it, or a new one;
        past ``max_connections`` a new user joins the user_grouped connection with the fewest users
        (a user already placed stays where it is: its feeds' order holds)."""
        user = server.subscription.get("user") if server.strategy == "user_grouped" else None
        if server.strategy != "dedicated":
            for conn in self._live():
                if conn.strategy == server.strategy and (user is None or user in conn.users) and conn.has_room(server.route):
                    return conn
        if user is not None and len(self._live()) >= self.config.max_connections and self._user_connection(user) is None:
            grouped = [c for c in self._live() if c.strategy == "user_grouped" and c.has_room(server.route)]
            if grouped:
                conn = min(grouped, key=lambda c: len(c.users))
                self.stats["users_past_cap"] += 1
                log.info("max_connections %d reached: the feeds of %s join connection %d (users %s)",
                         self.config.max_connections, user, conn.id, sorted(conn.users))
                return conn
        return self._new_connection(server.strategy, user, f"subscription {server.subscription}")

    def _shared_connection(self) -> Connection:
        """The first live shared connection, opened if none."""
        for conn in self._live():
            if conn.strategy == "shared":
                return conn
        return self._new_connection(what="the shared connection")

    def _user_connection(self, user: str) -> Connection | None:
        """The live user_grouped connection holding ``user``'s feeds, if any."""
        return next((c for c in self._live() if c.strategy == "user_grouped" and user in c.users), None)

    async def connect(self, timeout: float | None = None) -> None:
        """Open a shared connection now; ``ConnectionError`` when the attempt fails
        (refused, not a WebSocket, 503…) or takes over ``timeout`` (``open_timeout``).
        The connection keeps retrying in the background either way."""
        await self._shared_connection().wait_open(timeout if timeout is not None else self.config.open_timeout)

    async def close(self) -> None:
        """Close every connection, end every iterator and waiter (``ClientClosed``);
        the client can be used again after."""
        for user in self._users.values():
            user.close()
        for server in self._servers.values():
            server.close("client closed")
        self.bus.end()
        connections, self._connections = self._connections, []
        self._servers.clear()
        self._users.clear()
        await asyncio.gather(*(c.close() for c in connections))

    # -- registry --------------------------------------------------------------

    async def subscribe(
        self, subscription: dict[str, Any], callback: Callback | None = None, *, queue_size: int = 1000, strategy: Strategy = "shared",
        on_gap: Callable[[float, float], Any] | None = None,
    ) -> int:
        """Subscribe; returns the subscription id at once (see ``wait_active``).

        ``callback``: called inline (keep it short); an awaitable it returns is
        awaited by a per-subscription task, in order (at most ``queue_size``
        waiting); an exception is logged and counted (``callback_errors``). Without a
        callback, read the messages with ``messages(id)`` (bounded queue: the
        oldest is dropped and counted when full), or with ``events()``
        (``queue_size=0``: no queue). ``strategy``: see the class; an identical
        subscription of the same strategy shares the existing one. ``on_gap(since, until)``:
        called (as a callback) when it is back after a lost connection, the ``Gap`` event.
        """
        sub = normalize(subscription)
        check_strategy(sub, strategy)
        check_size("queue_size", queue_size, 0)
        server, new = self._server_for(sub, strategy)
        if new:
            try:
                conn = self._connection_for(server)
            except TooManyConnections:
                del self._servers[server.key]
                raise
        user = UserSubscription(next(self._ids), sub, server, callback, queue_size, self.bus, on_gap=on_gap)
        server.users[user.id] = user
        self._users[user.id] = user
        if new:
            conn.add(server)
        elif server.state == "active":
            self._join_active(server, user)
        return user.id

    def _server_for(self, sub: dict[str, Any], strategy: Strategy) -> tuple[ServerSubscription, bool]:
        """The server subscription of ``sub`` with that strategy, and whether it is new (a refused or
        given-up one is asked for afresh). An identical one of another strategy is not shared: it
        lives elsewhere (a user_grouped feed must be on its user's connection)."""
        key = f"{strategy} {identity(sub)}"
        server = self._servers.get(key)
        if server is not None and server.state != "failed":
            return server, False
        if server is not None:
            self._discard(server)
        server = self._servers[key] = ServerSubscription(key=key, subscription=sub, route=route_key(sub), strategy=strategy)
        return server, True

    def _join_active(self, server: ServerSubscription, user: UserSubscription) -> None:
        """A new user of a live server subscription: a snapshot type is asked again so that
        it gets its snapshot (the others get one too); any other is acknowledged at once."""
        conn = server.connection
        if server.subscription["type"] in SNAPSHOT_TYPES and conn is not None:
            conn.resubscribe(server)
        else:
            user.activated = True
            publish(self.bus, Ack, user.id, conn.id if conn else None)

    def _discard(self, server: ServerSubscription) -> None:
        """Forget a failed server subscription (its users keep their error); drop
        its connection if that failed too and holds nothing else."""
        if self._servers.get(server.key) is server:
            del self._servers[server.key]
        conn = server.connection
        server.connection = None
        if conn is not None and conn.routes.get(server.route) is server:
            del conn.routes[server.route]
            if conn.state == "failed" and not conn.routes:
                self._connections.remove(conn)

    async def unsubscribe(self, sub_id: int) -> bool:
        """Remove a subscription; the server one goes when its last user does."""
        user = self._users.pop(sub_id, None)
        if user is None:
            return False
        user.close(SubscriptionError(f"subscription {sub_id} unsubscribed"))
        server = user.server
        server.users.pop(sub_id, None)
        if not server.users:
            if self._servers.get(server.key) is server:
                del self._servers[server.key]
            conn = server.connection
            if conn is not None:
                conn.remove(server)
                await self._close_if_idle(conn)
        return True

    async def _close_if_idle(self, conn: Connection) -> None:
        """Close an emptied connection, unless it is the last shared one."""
        if conn.routes or conn not in self._connections:
            return
        if conn.strategy == "shared" and sum(c.strategy == "shared" for c in self._connections) == 1:
            return
        self._connections.remove(conn)
        await conn.close()

    def resubscribe(self, sub_id: int) -> None:
        """Ask the server again (fresh snapshot); shared users get it too."""
        server = self._user(sub_id).server
        if server.connection is not None:
            server.connection.resubscribe(server)

    async def wait_active(self, sub_id: int, timeout: float | None = None) -> None:
        """Wait until the server acknowledged it; ``SubscriptionError`` if refused or
        gone, ``ClientClosed`` if the client closed meanwhile."""
        server = self._user(sub_id).server
        await asyncio.wait_for(server.active.wait(), timeout)
        if server.state == "closed":
            raise ClientClosed(server.error)
        if server.state == "failed":
            raise SubscriptionError(server.error)

    def _user(self, sub_id: int) -> UserSubscription:
        user = self._users.get(sub_id)
        if user is None:
            raise SubscriptionError(f"no subscription {sub_id} (unsubscribed, or its client closed)")
        return user

    async def messages(self, sub_id: int) -> AsyncIterator[Message]:
        """Iterate the messages of a subscription made without a callback."""
        user = self._user(sub_id)
        if user.queue is None:
            raise ValueError("messages() needs a subscription made without a callback and with a queue")
        while True:
            message = await user.queue.get()
            if message is None:
                if user.error:
                    raise SubscriptionError(user.error)
                return
            yield message

    async def next_message(self, sub_id: int, timeout: float | None = None, *, fail_on_disconnect: bool = False) -> Message:
        """The next message of a subscription (any: with a callback or a queue, which it leaves as
        is). ``fail_on_disconnect``: ``ConnectionLost`` when its connection drops first, or has
        dropped and is not back (as ccxt.pro's ``watch*``); else it waits across the reconnect.
        ``SubscriptionError`` if refused or unsubscribed, ``ClientClosed``, ``TimeoutError``."""
        user = self._user(sub_id)
        server = user.server
        if server.state == "failed":
            raise SubscriptionError(server.error)
        down = server.lost or (server.connection is not None and server.connection.state in ("backoff", "failed", "closed"))
        if fail_on_disconnect and down:
            raise ConnectionLost(f"subscription {sub_id}: its connection dropped and is not back yet")
        future = user.wait_next(fail_on_disconnect)
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            user.forget(future)

    def events(self, size: int = 10_000) -> EventStream:
        """Every event from now on, in one async iterator (see ``hlbook.client.events``):
        ``Data``, ``Ack``, ``Gap``, ``Error``, ``Connected``, ``Disconnected``, ``Dropped``."""
        return EventStream(self.bus, size)

    async def info(self, payload: dict[str, Any], timeout: float = 10.0, *, user: str | None = None) -> Any:
        """An ``/info`` request over the WebSocket (``post``); returns the response payload.

        It goes over the shared connection (opened if none), never a dedicated one or a
        user's group; with ``user``, over that user's ``user_grouped`` connection if the
        client has one (an order tracker's loads: no extra connection)."""
        conn = (self._user_connection(user.lower()) if user else None) or self._shared_connection()
        await conn.wait_open(timeout)
        return await conn.post(next(self._post_ids), {"type": "info", "payload": payload}, timeout)

    # -- lookups and metrics ---------------------------------------------------------

    def list_subscriptions(self, *, type: str | None = None, user: str | None = None) -> list[dict[str, Any]]:  # noqa: A002
        """Every subscription (of that ``type``, of that ``user``) with its state."""
        user = user.lower() if user else None
        return [
            u.info() for u in self._users.values()
            if (type is None or u.subscription["type"] == type) and (user is None or u.subscription.get("user") == user)
        ]

    def get_subscription(self, sub_id: int) -> dict[str, Any] | None:
        """One subscription's state (strategy, connection, error…), or None."""
        user = self._users.get(sub_id)
        return user.info() if user else None

    def subscription_metrics(self, sub_id: int) -> dict[str, Any] | None:
        """One subscription's counters (messages, rates, reconnects, dropped), or None."""
        user = self._users.get(sub_id)
        return user.metrics_dict() if user else None

    def metrics(self) -> dict[str, Any]:
        """Everything in one call: ``subscriptions`` (each one's ``get_subscription`` and
        ``subscription_metrics``), ``connections`` (each one's ``connection_info`` and
        ``connection_metrics``) and the ``client``'s counters; plain data."""
        return {
            "subscriptions": [{**u.info(), **u.metrics_dict()} for u in self._users.values()],
            "connections": [{**c.info(), **c.metrics()} for c in self._connections],
            "client": {
                "subscriptions": len(self._users),
                "connections": len(self._live()),
                "max_connections": self.config.max_connections,
                **{k: self.stats[k] for k in ("connections_limited", "users_past_cap", "refused_past_cap")},
            },
        }

    def connection_info(self) -> list[dict[str, Any]]:
        """Every connection's state: strategy, user, state, subscriptions, last error."""
        return [c.info() for c in self._connections]

    def connection_metrics(self, conn_id: int) -> dict[str, Any] | None:
        """One connection's counters (connects, attempt, ping RTT, messages), or None."""
        conn = next((c for c in self._connections if c.id == conn_id), None)
        return conn.metrics() if conn else None

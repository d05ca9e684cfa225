"""``HLClient``: the user-facing facade over connections and the registry."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from hlbook.client.connection import ClientConfig, Connection, RateLimiter
from hlbook.client.registry import (
    SNAPSHOT_TYPES,
    Callback,
    Message,
    ServerSubscription,
    SubscriptionError,
    UserSubscription,
    identity,
    normalize,
    route_key,
)


class HLClient:
    """Async client for hlbook and the public Hyperliquid WebSocket API.

    >>> async with HLClient("ws://127.0.0.1:8000/ws") as client:
    ...     sid = await client.subscribe({"type": "l2Book", "coin": "BTC"}, print)

    Connections are opened on demand (a new one when a subscription does not
    fit: > ``max_subscriptions_per_connection`` or a route-key clash) and
    supervised: heartbeat, reconnect with backoff, resubscription.
    """

    def __init__(self, url: str | None = None, config: ClientConfig | None = None, **settings: Any) -> None:
        config = config or ClientConfig()
        if url is not None:
            settings["url"] = url
        self.config = replace(config, **settings)
        self.limiter = RateLimiter(self.config.max_messages_per_minute, self.config.rate_window)
        self._connections: list[Connection] = []
        self._servers: dict[str, ServerSubscription] = {}
        self._users: dict[int, UserSubscription] = {}
        self._ids = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self._post_ids = itertools.count(1)

    async def __aenter__(self) -> HLClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connections ---------------------------------------------------------

    def _new_connection(self) -> Connection:
        conn = Connection(next(self._conn_ids), self.config, self.limiter)
        self._connections.append(conn)
        conn.start()
        return conn

    def _connection_for(self, server: ServerSubscription) -> Connection:
        for conn in self._connections:
            if conn.state != "failed" and conn.has_room(server.route):
                return conn
        return self._new_connection()

    async def connect(self, timeout: float | None = None) -> None:
        """Open the first connection and wait for it (``TimeoutError`` after ``timeout``)."""
        conn = self._connections[0] if self._connections else self._new_connection()
        await asyncio.wait_for(conn.opened.wait(), timeout if timeout is not None else self.config.open_timeout)

    async def close(self) -> None:
        """Close every connection and end every iterator."""
        for user in self._users.values():
            user.close()
        await asyncio.gather(*(c.close() for c in self._connections))
        self._connections.clear()

    # -- registry --------------------------------------------------------------

    async def subscribe(self, subscription: dict[str, Any], callback: Callback | None = None, *, queue_size: int = 1000) -> int:
        """Subscribe; returns the subscription id at once (see ``wait_active``).

        ``callback``: a plain function is called inline (keep it short); a
        coroutine function runs in a per-subscription task, in order. Without a
        callback, read the messages with ``messages(id)`` (bounded queue: the
        oldest is dropped and counted when full).
        """
        sub = normalize(subscription)
        key = identity(sub)
        server = self._servers.get(key)
        new = server is None
        if server is None:
            server = ServerSubscription(key=key, subscription=sub, route=route_key(sub))
            self._servers[key] = server
        user = UserSubscription(next(self._ids), sub, server, callback, queue_size)
        server.users[user.id] = user
        self._users[user.id] = user
        if new:
            self._connection_for(server).add(server)
        elif server.state == "active":
            user.activated = True
            if sub["type"] in SNAPSHOT_TYPES and server.connection is not None:
                server.connection.resubscribe(server)
        elif server.state == "failed":
            user.fail(server.error or "failed")
        return user.id

    async def unsubscribe(self, sub_id: int) -> bool:
        """Remove a subscription; the server one goes when its last user does."""
        user = self._users.pop(sub_id, None)
        if user is None:
            return False
        user.close()
        server = user.server
        server.users.pop(sub_id, None)
        if not server.users:
            self._servers.pop(server.key, None)
            conn = server.connection
            if conn is not None:
                conn.remove(server)
                if not conn.routes and len(self._connections) > 1:
                    self._connections.remove(conn)
                    await conn.close()
        return True

    def resubscribe(self, sub_id: int) -> None:
        """Ask the server again (fresh snapshot); shared users get it too."""
        server = self._users[sub_id].server
        if server.connection is not None:
            server.connection.resubscribe(server)

    async def wait_active(self, sub_id: int, timeout: float | None = None) -> None:
        """Wait until the server acknowledged it; ``SubscriptionError`` if refused."""
        server = self._users[sub_id].server
        await asyncio.wait_for(server.active.wait(), timeout)
        if server.state == "failed":
            raise SubscriptionError(server.error)

    async def messages(self, sub_id: int) -> AsyncIterator[Message]:
        """Iterate the messages of a subscription made without a callback."""
        user = self._users[sub_id]
        if user.queue is None or user.worker is not None:
            raise ValueError("subscription has a callback; messages() needs one made without")
        while True:
            message = await user.queue.get()
            if message is None:
                if user.error:
                    raise SubscriptionError(user.error)
                return
            yield message

    async def info(self, payload: dict[str, Any], timeout: float = 10.0) -> Any:
        """An ``/info`` request over the WebSocket (``post``); returns the response payload."""
        conn = self._connections[0] if self._connections else self._new_connection()
        await asyncio.wait_for(conn.opened.wait(), timeout)
        return await conn.post(next(self._post_ids), {"type": "info", "payload": payload}, timeout)

    def list_subscriptions(self) -> list[dict[str, Any]]:
        """Every subscription with its state and metrics."""
        return [u.info() for u in self._users.values()]

    def get_subscription(self, sub_id: int) -> dict[str, Any] | None:
        """One subscription with its state and metrics, or None."""
        user = self._users.get(sub_id)
        return user.info() if user else None

    def connection_info(self) -> list[dict[str, Any]]:
        """Every connection's state, for debugging."""
        return [c.info() for c in self._connections]

"""``FakeServer``: a small real WebSocket server speaking the public protocol.

For testing code built on the client (and the client itself): acks with the
normalised subscription, pong, the public error texts, the 1000-subscription
limit, and feeds you publish by hand. It can be stopped, restarted on the same
port, killed abruptly, silenced (stops answering, pings included), made to
close every new connection right after the upgrade (``drop_new``), to refuse
subscriptions of some coins (``refused_coins``) or to answer HTTP 429 past
``max_connections`` open connections (the gateway's per-address cap).
"""

from __future__ import annotations

import contextlib
import time
from http import HTTPStatus
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import State

from hlbook.client.registry import channel_of, identity, normalize

MAX_SUBSCRIPTIONS = 1000


@dataclass(eq=False)
class FakeConnection:
    """One client connection as the fake server sees it."""

    ws: ServerConnection
    silent: bool = False
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    received: int = 0
    posts: int = 0  # info requests (``post``) it answered
    received_at: list[float] = field(default_factory=list)  # monotonic time of each request

    async def send(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            await self.ws.send(orjson.dumps(message).decode())


def normalised(sub: dict[str, Any]) -> dict[str, Any]:
    """What the public API echoes in acks (l2Book: nSigFigs/mantissa as null)."""
    out = dict(sub)
    if out["type"] == "l2Book":
        out.setdefault("nSigFigs", None)
        out.setdefault("mantissa", None)
    return out


class FakeServer:
    """Start with ``await FakeServer().start()``; ``url`` is ``ws://127.0.0.1:PORT/ws``."""

    def __init__(
        self,
        port: int = 0,
        on_subscribe: Callable[[FakeConnection, dict[str, Any]], Awaitable[None]] | None = None,
        on_info: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.port = port
        self.on_info = on_info
        self.on_subscribe = on_subscribe
        self.silent = False
        self.drop_new = False  # close each new connection right after the upgrade
        self.refused_coins = {"INVALID"}  # subscriptions of these coins: Invalid subscription
        self.max_connections: int | None = None  # past it, a connect is answered HTTP 429
        self.limited = 0  # connects answered 429
        self._open: set[ServerConnection] = set()  # upgrades admitted, not closed yet
        self.connections: list[FakeConnection] = []
        self.subscribe_requests = 0
        self.total_connections = 0
        self._server: Server | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> FakeServer:
        self._server = await serve(self._handler, "127.0.0.1", self.port, ping_interval=None, max_size=None,
                                   process_request=self._admit)
        self.port = self._server.sockets[0].getsockname()[1] if self.port == 0 else self.port
        return self

    async def stop(self, abort: bool = False) -> None:
        """Stop listening and drop every connection (``abort``: no closing handshake, like a kill)."""
        if self._server is None:
            return
        self._server.close(close_connections=not abort)
        if abort:
            for conn in list(self.connections):
                conn.ws.transport.abort()
        await self._server.wait_closed()
        self._server = None
        self.connections.clear()

    def silence_current(self) -> None:
        """Current connections stop answering (a half-dead socket); new ones answer."""
        for conn in self.connections:
            conn.silent = True

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    def subscribers(self, subscription: dict[str, Any]) -> list[FakeConnection]:
        key = identity(subscription)
        return [c for c in self.connections if key in c.subscriptions]

    async def publish(self, subscription: dict[str, Any], data: Any) -> int:
        """Send a feed message to every connection holding ``subscription``; returns how many."""
        targets = self.subscribers(subscription)
        message = {"channel": channel_of(normalize(subscription)), "data": data}
        for conn in targets:
            await conn.send(message)
        return len(targets)

    def _admit(self, ws: ServerConnection, request: Request) -> Response | None:
        """429 past ``max_connections``, as the gateway answers past its per-address cap."""
        self._open = {c for c in self._open if c.state is not State.CLOSED}
        if self.max_connections is not None and len(self._open) >= self.max_connections:
            self.limited += 1
            return ws.respond(HTTPStatus.TOO_MANY_REQUESTS, "Too many connections from this address")
        self._open.add(ws)
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        conn = FakeConnection(ws)
        self.total_connections += 1
        if self.drop_new:
            await ws.close()
            return
        self.connections.append(conn)
        try:
            async for raw in ws:
                conn.received += 1
                conn.received_at.append(time.monotonic())
                if not (self.silent or conn.silent):
                    await self._request(conn, raw)
        except Exception:
            pass
        finally:
            if conn in self.connections:
                self.connections.remove(conn)

    async def _request(self, conn: FakeConnection, raw: str | bytes) -> None:
        try:
            request = orjson.loads(raw)
            method = request["method"]
        except Exception:
            await conn.send({"channel": "error", "data": f"Error parsing JSON into valid websocket request: {raw!r}"})
            return
        if method == "ping":
            await conn.send({"channel": "pong"})
        elif method == "post":
            await self._post(conn, request)
        elif method in ("subscribe", "unsubscribe"):
            await self._subscription(conn, method, request.get("subscription"))
        else:
            await conn.send({"channel": "error", "data": f"Error parsing JSON into valid websocket request: {raw!r}"})

    async def _post(self, conn: FakeConnection, request: dict[str, Any]) -> None:
        conn.posts += 1
        try:
            if self.on_info is None:
                raise ValueError("this FakeServer answers no info requests (on_info)")
            payload = request["request"]["payload"]
            response = {"type": "info", "payload": {"type": payload["type"], "data": self.on_info(payload)}}
        except Exception as exc:
            response = {"type": "error", "payload": str(exc)}
        await conn.send({"channel": "post", "data": {"id": request.get("id"), "response": response}})

    async def _subscription(self, conn: FakeConnection, method: str, sub: Any) -> None:
        try:
            key = identity(sub)
        except ValueError:
            await conn.send({"channel": "error", "data": f"Invalid subscription: {orjson.dumps(sub).decode()}"})
            return
        text = orjson.dumps(sub).decode()
        if method == "subscribe":
            self.subscribe_requests += 1
            if key in conn.subscriptions:
                await conn.send({"channel": "error", "data": f"Already subscribed: {text}"})
                return
            if len(conn.subscriptions) >= MAX_SUBSCRIPTIONS:
                await conn.send({"channel": "error", "data": "Cannot subscribe to more than 1000 channels."})
                return
            if sub.get("coin") in self.refused_coins:
                await conn.send({"channel": "error", "data": f"Invalid subscription: {text}"})
                return
            conn.subscriptions[key] = sub
        elif conn.subscriptions.pop(key, None) is None:
            await conn.send({"channel": "error", "data": f"Already unsubscribed: {text}"})
            return
        await conn.send({"channel": "subscriptionResponse", "data": {"method": method, "subscription": normalised(sub)}})
        if method == "subscribe" and self.on_subscribe is not None:
            await self.on_subscribe(conn, sub)

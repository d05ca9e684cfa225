"""One supervised WebSocket connection: connect, heartbeat, reconnect, resubscribe.

A connection owns a set of server subscriptions (at most one per route key,
see ``registry``). It keeps them as *desired state*: after every successful
upgrade it re-sends a subscribe for each, paced by the shared rate limiter, so
a restart of the server is invisible to the user apart from the gap.

Attempts count until a session proves *stable* (open ``stable_after`` seconds):
a server that accepts the upgrade and drops it at once is retried with a
growing backoff and, with ``max_attempts``, given up on like one that refuses.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
import websockets
from websockets.asyncio.client import ClientConnection, connect

from hlbook.client.events import Connected, Disconnected, Error, EventBus, publish
from hlbook.client.registry import RouteKey, ServerSubscription, Strategy, message_route_key, route_key

log = logging.getLogger("hlbook.client")

_PING = {"method": "ping"}


class _Counting(ClientConnection):
    """Notes when bytes arrive, also in the middle of a message: a pong queued behind a big
    l4Book snapshot on a slow link arrives late, and the bytes before it say the link lives."""

    bytes_at = 0.0

    def data_received(self, data: bytes) -> None:
        self.bytes_at = time.monotonic()
        super().data_received(data)


@dataclass
class ClientConfig:
    """Connection settings (seconds unless noted)."""

    url: str = "ws://127.0.0.1:8000/ws"
    open_timeout: float = 10.0
    ping_interval: float = 30.0
    pong_timeout: float = 10.0
    silence_timeout: float = 60.0  # nothing at all received for this long: dead
    backoff_base: float = 0.25
    backoff_cap: float = 30.0
    max_attempts: int | None = None  # consecutive failed attempts before giving up; None: never
    stable_after: float = 10.0  # a session open this long resets the attempt counter; a shorter one counts as failed
    max_subscriptions_per_connection: int = 1000
    max_messages_per_minute: int = 1800  # under the server's 2000, shared by all connections
    rate_window: float = 60.0  # the window of max_messages_per_minute (tests shorten it)
    max_message_size: int | None = 256 * 2**20
    ack_timeout: float = 10.0  # a subscribe without ack is sent again after this
    refused_retries: int = 3  # a subscription refused right after a reconnect, though taken before: re-sent this often first
    max_connections: int = 90  # opened at most (the gateway and the public API take 100 an address); past it users share
    limited_retries: int = 3  # connects answered HTTP 429 (the server's per-address cap) in a row before giving up


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    high = min(cap, base * (2 ** min(attempt, 60)))
    return (rng or random).uniform(0.0, high)


class RateLimiter:
    """At most ``limit`` sends in any sliding 60 s window (bounded log of send times)."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._sent: collections.deque[float] = collections.deque(maxlen=limit)
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until one more send stays within the limit, then count it."""
        async with self._lock:
            if len(self._sent) >= self.limit:
                wait = self._sent[0] + self.window - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._sent.append(time.monotonic())

    def in_window(self) -> int:
        """Sends in the last window."""
        now = time.monotonic()
        return sum(1 for t in self._sent if now - t < self.window)


class DeadConnection(Exception):
    """Heartbeat failure: no pong in time or a silent socket."""


class Connection:
    """A WebSocket connection kept alive forever (or until ``max_attempts``).

    ``strategy`` and ``user`` say which subscriptions it takes (see ``HLClient``)."""

    def __init__(
        self, conn_id: int, config: ClientConfig, limiter: RateLimiter, bus: EventBus | None = None,
        strategy: Strategy = "shared", user: str | None = None, stats: collections.Counter[str] | None = None,
    ) -> None:
        self.id = conn_id
        self.config = config
        self.limiter = limiter
        self.bus = bus
        self.strategy = strategy
        self.user = user  # the user it was opened for (user_grouped); past max_connections others join
        self.stats = stats if stats is not None else collections.Counter()  # the client's counters
        self.routes: dict[RouteKey, ServerSubscription] = {}
        self.state = "idle"  # idle | connecting | open | backoff | failed | closed
        self.connects = 0
        self.reconnects = 0
        self.attempt = 0
        self.last_error: str | None = None
        self.connected_since: float | None = None
        self.last_rx = 0.0
        self.rtt: float | None = None
        self.received = 0
        self.unrouted = 0
        self.handling_errors = 0
        self.limited = 0  # connects answered HTTP 429
        self._limited_run = 0  # ... in a row
        self.errors: collections.deque[str] = collections.deque(maxlen=20)
        self._opened_at = 0.0  # monotonic time of the current session's upgrade
        self._outcome: asyncio.Future[str | None] | None = None  # the next attempt's error, None if it opened
        self._ws: Any = None
        self._outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._ping_sent: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._posts: dict[int, asyncio.Future[Any]] = {}

    # -- desired state -------------------------------------------------

    @property
    def live(self) -> bool:
        """Neither given up nor closed."""
        return self.state not in ("failed", "closed")

    @property
    def users(self) -> set[str]:
        """The users whose feeds it holds (user_grouped)."""
        return {s.subscription["user"] for s in self.routes.values() if isinstance(s.subscription.get("user"), str)}

    def has_room(self, route: RouteKey) -> bool:
        """Whether a server subscription with this route key fits here."""
        return route not in self.routes and len(self.routes) < self.config.max_subscriptions_per_connection

    def add(self, server: ServerSubscription) -> None:
        """Own a server subscription and subscribe it if connected."""
        self.routes[server.route] = server
        server.connection = self
        self._send_if_open({"method": "subscribe", "subscription": server.subscription})

    def remove(self, server: ServerSubscription) -> None:
        """Drop a server subscription and unsubscribe it if connected."""
        if self.routes.get(server.route) is server:
            del self.routes[server.route]
        server.connection = None
        self._send_if_open({"method": "unsubscribe", "subscription": server.subscription})

    def resubscribe(self, server: ServerSubscription) -> None:
        """Unsubscribe and subscribe again (e.g. for a fresh snapshot)."""
        server.state = "pending"
        server.active.clear()
        self._send_if_open({"method": "unsubscribe", "subscription": server.subscription})
        self._send_if_open({"method": "subscribe", "subscription": server.subscription})

    async def post(self, post_id: int, request: dict[str, Any], timeout: float) -> Any:
        """Send ``{"method":"post"}`` and wait for its ``response`` (``ConnectionError`` if dropped)."""
        if self.state != "open":
            raise ConnectionError(f"connection {self.id} is {self.state}")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._posts[post_id] = future
        self._outbox.put_nowait({"method": "post", "id": post_id, "request": request})
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self._posts.pop(post_id, None)

    def _on_post(self, data: Any) -> None:
        future = self._posts.get(data["id"]) if isinstance(data, dict) and "id" in data else None
        if future is None or future.done():
            self.unrouted += 1
            return
        response = data.get("response") or {}
        if response.get("type") == "error":
            future.set_exception(RuntimeError(str(response.get("payload"))))
        else:
            future.set_result(response.get("payload"))

    async def wait_open(self, timeout: float) -> None:
        """Until open; ``ConnectionError`` when the next attempt fails, it gave up, or ``timeout``."""
        if self.state == "open":
            return
        if self.state in ("failed", "closed"):
            raise ConnectionError(f"connection {self.id} to {self.config.url} {self.state}: {self.last_error}")
        if self._outcome is None:
            self._outcome = asyncio.get_running_loop().create_future()
        try:
            error = await asyncio.wait_for(asyncio.shield(self._outcome), timeout)
        except asyncio.TimeoutError:
            error = f"not open after {timeout}s (last error: {self.last_error})"
        if error is not None:
            raise ConnectionError(f"connection {self.id} to {self.config.url}: {error}")

    def _attempted(self, error: str | None) -> None:
        """Tell ``wait_open`` callers how the attempt went."""
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(error)
        self._outcome = None

    def _send_if_open(self, request: dict[str, Any]) -> None:
        if self.state == "open":
            self._outbox.put_nowait(request)

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Start the supervising task."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"hlbook-conn-{self.id}")

    async def close(self) -> None:
        """Close for good."""
        self._closing = True
        self.state = "closed"
        self._attempted("closed")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._ws is not None:
            await self._ws.close()

    async def _run(self) -> None:
        cfg = self.config
        while not self._closing:
            self.state = "connecting"
            try:
                ws = await connect(
                    cfg.url, open_timeout=cfg.open_timeout, ping_interval=None, close_timeout=1, max_size=cfg.max_message_size,
                    create_connection=_Counting
                )
            except (websockets.InvalidURI, ValueError) as exc:  # ValueError: e.g. a port that is no number
                await self._backoff(f"invalid URL: {exc}", fatal=True)
                return
            except (OSError, asyncio.TimeoutError, websockets.WebSocketException) as exc:
                if not await self._backoff(*self._connect_failed(exc)):
                    return
                continue
            self._limited_run = 0
            self._attempted(None)
            await self._session(ws)
            if self._closing:
                return
            lasted = time.monotonic() - self._opened_at
            if lasted >= cfg.stable_after:
                self.attempt = 0
                # the first retry after a drop waits a jittered moment too (no thundering herd)
                publish(self.bus, Disconnected, self.id, self.last_error or "closed", True)
                await asyncio.sleep(backoff_delay(0, cfg.backoff_base, cfg.backoff_cap))
            elif not await self._backoff(f"closed after {lasted:.2f}s: {self.last_error}"):
                return

    def _connect_failed(self, exc: Exception) -> tuple[str, bool]:
        """The error of a failed connect, and whether to give up: HTTP 429 (the server's
        per-address connection cap) is said, counted, and given up on after ``limited_retries``."""
        if not (isinstance(exc, websockets.InvalidStatus) and exc.response.status_code == 429):
            self._limited_run = 0
            return f"connect failed: {exc!r}", False
        self.limited += 1
        self._limited_run += 1
        self.stats["connections_limited"] += 1
        error = (f"HTTP 429: the server refuses more connections from this address (its per-address cap); "
                 f"lower max_connections ({self.config.max_connections}) or close other connections from this address")
        log.warning("connection %d to %s: %s (%d in a row)", self.id, self.config.url, error, self._limited_run)
        return error, self._limited_run > self.config.limited_retries

    async def _backoff(self, error: str, fatal: bool = False) -> bool:
        """Count a failed attempt; wait before the next (True) or give up (False)."""
        cfg = self.config
        self.last_error = error
        self.attempt += 1
        give_up = fatal or (cfg.max_attempts is not None and self.attempt >= cfg.max_attempts)
        publish(self.bus, Disconnected, self.id, error, not give_up)
        self._attempted(error)
        if give_up:
            self.state = "failed"
            log.error("connection %d gave up after %d attempts: %s", self.id, self.attempt, error)
            for server in list(self.routes.values()):
                server.on_error(f"connection failed: {error}")
            return False
        self.state = "backoff"
        delay = backoff_delay(self.attempt, cfg.backoff_base, cfg.backoff_cap)
        log.info("connection %d: %s; retry %d in %.2fs", self.id, error, self.attempt, delay)
        await asyncio.sleep(delay)
        return True

    async def _session(self, ws: Any) -> None:
        self._ws = ws
        self.connects += 1
        if self.connects > 1:
            self.reconnects += 1
        self.state = "open"
        self.connected_since = time.time()
        self.last_rx = self._opened_at = time.monotonic()
        self._ping_sent = None
        self._outbox = asyncio.Queue()
        for server in list(self.routes.values()):
            if server.state != "failed":
                self._outbox.put_nowait({"method": "subscribe", "subscription": server.subscription})
        publish(self.bus, Connected, self.id, self.connects > 1)
        tasks = [asyncio.create_task(c) for c in (self._reader(ws), self._writer(ws), self._heartbeat(ws))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                self.last_error = repr(exc) if exc else "closed by server"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.connected_since = None
            self._ws = None
            if not self._closing:
                self.state = "backoff"
                log.warning("connection %d lost: %s", self.id, self.last_error)
            for server in list(self.routes.values()):
                server.on_lost(f"connection {self.id} lost: {self.last_error}")
            for future in self._posts.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"connection {self.id} lost"))
            try:
                await asyncio.wait_for(ws.close(), 1.0)
            except Exception:
                pass

    # -- tasks ---------------------------------------------------------------

    async def _writer(self, ws: Any) -> None:
        while True:
            request = await self._outbox.get()
            await self._send(ws, request)
            if request["method"] == "subscribe":
                server = self._server_of(request["subscription"])
                if server is not None:
                    server.sent_at = time.monotonic()

    async def _send(self, ws: Any, request: dict[str, Any]) -> None:
        await self.limiter.acquire()
        await ws.send(orjson.dumps(request).decode())

    async def _heartbeat(self, ws: Any) -> None:
        cfg = self.config
        tick = max(0.01, min(0.5, cfg.ping_interval / 4, cfg.pong_timeout / 4))
        last_ping = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            heard = max(self.last_rx, getattr(ws, "bytes_at", 0.0))  # a message still arriving is traffic
            if now - heard > cfg.silence_timeout:
                raise DeadConnection(f"silent for {now - heard:.1f}s")
            if self._ping_sent is not None and now - self._ping_sent > cfg.pong_timeout and now - heard > cfg.pong_timeout:
                raise DeadConnection(f"no pong in {cfg.pong_timeout}s")  # and nothing else arriving either
            if self._ping_sent is None and now - last_ping >= cfg.ping_interval:
                await self._send(ws, _PING)  # may wait for the rate limiter: time the pong from here
                last_ping = self._ping_sent = time.monotonic()
            if self.attempt and now - self._opened_at >= cfg.stable_after:
                self.attempt = 0  # a stable session: the next drop starts the count afresh
            self._retry_unacked(now)

    def _retry_unacked(self, now: float) -> None:
        """Re-send a subscribe the server never acknowledged (``ack_timeout``)."""
        for server in self.routes.values():
            if server.state == "pending" and server.sent_at is not None and now - server.sent_at > self.config.ack_timeout:
                server.sent_at = None
                self._outbox.put_nowait({"method": "subscribe", "subscription": server.subscription})

    async def _reader(self, ws: Any) -> None:
        async for raw in ws:
            self.last_rx = time.monotonic()
            self.received += 1
            try:
                message = orjson.loads(raw)
                channel = message["channel"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                if raw != "Websocket connection established.":
                    self.unrouted += 1
                continue
            try:
                self._handle(channel, message)
            except Exception:  # a bug of ours must not end the session (nor the connection's task)
                self.handling_errors += 1
                log.exception("connection %d: message on %s not handled", self.id, channel)

    def _handle(self, channel: str, message: dict[str, Any]) -> None:
        data = message.get("data")
        if channel == "pong":
            if self._ping_sent is not None:
                self.rtt = time.monotonic() - self._ping_sent
            self._ping_sent = None
        elif channel == "subscriptionResponse":
            self._on_ack(data)
        elif channel == "post":
            self._on_post(data)
        elif channel == "error":
            self._on_error(str(data))
        else:
            key = message_route_key(channel, data)
            server = self.routes.get(key) if key is not None else None
            if server is None:
                self.unrouted += 1
            else:
                server.deliver(message)

    def _server_of(self, subscription: Any) -> ServerSubscription | None:
        try:
            return self.routes.get(route_key(subscription))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def _on_ack(self, data: Any) -> None:
        if not isinstance(data, dict) or data.get("method") != "subscribe":
            return
        server = self._server_of(data.get("subscription"))
        if server is not None and server.state == "pending":
            server.on_ack()

    def _on_error(self, text: str) -> None:
        self.errors.append(text)
        log.warning("connection %d: server error: %s", self.id, text)
        server = self._server_of_error(text)
        if server is not None and text.startswith("Already subscribed"):
            server.on_ack()
        elif server is not None and text.startswith("Invalid subscription") and not self._retry_refused(server):
            server.on_error(text)  # an Error event per user subscription
        else:
            publish(self.bus, Error, text, self.id)

    def _retry_refused(self, server: ServerSubscription) -> bool:
        """Whether a refusal is retried: the server took it before the connection dropped,
        and one that has just restarted may refuse it until it knows its coins again. It
        stays pending and is sent again after ack_timeout (``_retry_unacked``)."""
        if server.lost and server.refusals < self.config.refused_retries:
            server.refusals += 1
            return True
        return False

    def _server_of_error(self, text: str) -> ServerSubscription | None:
        """The subscription an error text names (``Invalid subscription: {…}``), if any."""
        _, sep, body = text.partition(": ")
        try:
            return self._server_of(orjson.loads(body)) if sep else None
        except orjson.JSONDecodeError:
            return None

    def info(self) -> dict[str, Any]:
        """What it is and where it stands."""
        return {
            "id": self.id,
            "url": self.config.url,
            "strategy": self.strategy,
            "user": self.user,
            "users": sorted(self.users) if self.strategy == "user_grouped" else [],
            "state": self.state,
            "subscriptions": len(self.routes),
            "active_subscriptions": sum(1 for s in self.routes.values() if s.state == "active"),
            "connected_since": self.connected_since,
            "last_error": self.last_error,
            "recent_server_errors": list(self.errors),
        }

    def metrics(self) -> dict[str, Any]:
        """Counters: connects, reconnects, the current attempt, ping RTT, messages."""
        return {
            "connects": self.connects,
            "reconnects": self.reconnects,
            "attempt": self.attempt,
            "uptime_seconds": round(time.monotonic() - self._opened_at, 3) if self.state == "open" else None,
            "last_message_age": round(time.monotonic() - self.last_rx, 3) if self.last_rx else None,
            "ping_rtt": self.rtt,
            "messages_received": self.received,
            "unrouted_messages": self.unrouted,
            "handling_errors": self.handling_errors,
            "limited": self.limited,
        }

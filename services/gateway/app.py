"""The Starlette app: ``/ws`` (public WebSocket protocol), ``POST /info``,
``/health``, ``/ready``, ``/metrics``, ``/debug/connections`` and the web view at ``/``."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from hlbook.common import config
from hlbook.common.security import Curve
from hlbook.services.gateway import metrics
from hlbook.services.gateway.frames import POLICY, FrameWriter
from hlbook.services.gateway.guard import AddressBudget
from hlbook.services.gateway.hub import Hub
from hlbook.services.gateway.info import Info, InfoError
from hlbook.services.gateway.info import label as info_label
from hlbook.services.gateway.kinds import feed_key, normalise
from hlbook.services.gateway.past import TIMEOUT as PAST_TIMEOUT
from hlbook.services.gateway.past import WORKERS as PAST_WORKERS
from hlbook.services.gateway.past import Past
from hlbook.services.gateway.protocol import FeedKey, RequestError, UserKey, dumps, identity, message, parse_request
from hlbook.services.gateway.session import Outbound, Session, SubscriptionStats
from hlbook.services.gateway.upstream import Upstream
from hlbook.services.gateway.polled import INTERVAL as POLL_INTERVAL
from hlbook.services.gateway.polled import MAX_KEYS as POLL_MAX_KEYS
from hlbook.services.gateway.polled import MAX_PER_ADDRESS as POLL_MAX_PER_ADDRESS
from hlbook.services.gateway.polled import MAX_PER_CONNECTION as POLL_MAX_PER_CONNECTION
from hlbook.services.gateway.polled import Polls
from hlbook.services.gateway.upstream_info import MAX_BYTES, MAX_IN_FLIGHT, TEXT, TIMEOUT, UpstreamInfo
from hlbook.services.gateway.users import Users

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
SWEEP_EVERY = 1.0
SEND_STUCK = 10.0  # seconds one send may block (client not reading) before the client is cut off
MAX_INFO_BODY = 64 << 10  # bytes of a POST /info body (the largest real request is a few hundred)
MAX_PENDING_POSTS = 16


@dataclass
class GatewayConfig:
    shards: int = 1
    ingest_pub: str = config.INGEST_PUB
    ingest_replay: str | None = config.INGEST_REPLAY
    book_pubs: list[str] = field(default_factory=list)  # default: config.book_endpoints(k)
    book_queries: list[str] = field(default_factory=list)
    token: str | None = None
    max_connections_per_ip: int = 100  # TCP connections, from the accept (guard.py)
    header_timeout: float = 10.0  # seconds a request's headers may take
    allowed_origins: tuple[str, ...] = ()  # WebSocket Origin headers accepted (empty: any; clients without one always)
    curve_dir: str | None = None  # ZeroMQ CURVE keys (common.security)
    max_subscriptions: int = 1000
    max_messages_per_minute: int = 2000
    idle_timeout: float = 60.0
    queue_size: int = 4096
    lossless: bool = False  # replays: nothing conflated or cut off; a client with queue_size messages waiting holds back upstream
    query_timeout: float = 3.0
    max_followed_users: int = 10_000
    max_subscriptions_per_ip: int = 5000  # across one address's connections
    max_followed_users_per_ip: int = 1000
    history_pub: str | None = None  # the history service (candles, user history); None: served without it
    history_query: str | None = None
    stale_after: float = 5.0  # seconds without a block, or behind the node's block time, after which /ready says stale
    info_upstream: str | None = None  # the node's info server (POST URL): what hlbook does not compute goes there
    info_upstream_timeout: float = TIMEOUT
    info_upstream_concurrency: int = MAX_IN_FLIGHT
    info_upstream_max_bytes: int = MAX_BYTES
    checkpoint_dir: str | None = None  # the shards' checkpoints and the node's files: point-in-time books (past.py)
    data_dir: str | None = None
    mode: str = "by-block"
    past_workers: int = PAST_WORKERS
    past_timeout: float = PAST_TIMEOUT
    past_max_span: float = 1800.0  # seconds of node files a point-in-time book may read past its checkpoint
    poll_interval: float = POLL_INTERVAL  # seconds between two polls of one node-state subscription (polled.py)
    poll_max_keys: int = POLL_MAX_KEYS  # distinct polled subscriptions gateway-wide
    poll_max_per_connection: int = POLL_MAX_PER_CONNECTION
    poll_max_per_ip: int = POLL_MAX_PER_ADDRESS  # across one address's connections

    def endpoints(self) -> tuple[list[str], list[str]]:
        pubs = self.book_pubs or [config.book_endpoints(k)[0] for k in range(self.shards)]
        queries = self.book_queries or [config.book_endpoints(k)[1] for k in range(self.shards)]
        if len(pubs) != self.shards or len(queries) != self.shards:
            raise ValueError(f"{self.shards} shards need {self.shards} --book-pub and --book-query endpoints")
        return pubs, queries


class Gateway:
    """Everything one gateway process holds: upstream, hub, sessions, limits."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        pubs, queries = cfg.endpoints()
        history = (cfg.history_pub, cfg.history_query) if cfg.history_pub and cfg.history_query else None
        self.upstream = Upstream(cfg.ingest_pub, pubs, queries, cfg.query_timeout, cfg.ingest_replay,
                                 Curve.from_dir(cfg.curve_dir), history)
        self.hub = Hub(self.upstream, Users(cfg.max_followed_users))
        self.info_upstream = None if not cfg.info_upstream else UpstreamInfo(
            cfg.info_upstream, cfg.info_upstream_timeout, cfg.info_upstream_concurrency, cfg.info_upstream_max_bytes, label=info_label)
        self.past = Past(cfg.checkpoint_dir, cfg.data_dir, cfg.mode, cfg.past_workers, cfg.past_timeout, cfg.past_max_span)
        self.info = Info(self.hub, self.info_upstream, self.past)
        self.polls = self.hub.polls = Polls(self.info, cfg.poll_interval, cfg.poll_max_keys, cfg.poll_max_per_connection,
                                                cfg.poll_max_per_ip)
        self.sessions: dict[Session, asyncio.Task[None]] = {}  # session -> its writer task
        self.budgets: dict[str, AddressBudget] = {}  # address -> what its connections hold
        self.outbound = Outbound()
        self.tasks: list[asyncio.Task[None]] = []
        if cfg.lossless:
            self.upstream.room = self._room

    async def _room(self) -> None:
        """Lossless: wait while some client has ``queue_size`` messages waiting (ZeroMQ's queues then
        fill, and the shards and ingest, sending with XPUB_NODROP, wait too)."""
        while any(s.texts >= self.cfg.queue_size and not s.closing for s in self.sessions):
            await asyncio.sleep(0.002)

    async def start(self) -> None:
        self.upstream.start(self.hub.on_message)
        self.tasks.append(asyncio.create_task(self._sweep()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.upstream.close()
        self.past.close()
        if self.info_upstream is not None:
            await self.info_upstream.close()

    def authorised(self, conn: HTTPConnection) -> bool:
        if not self.cfg.token:
            return True
        given = conn.query_params.get("token") or ""
        header = conn.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            given = header[7:].strip()
        return hmac.compare_digest(given.encode(), self.cfg.token.encode())

    async def _sweep(self) -> None:
        """Close idle clients and clients whose writer is stuck on a send; tell book subscribers
        of a silent shard's coins (``Hub.say_silent_shards``)."""
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            self.hub.say_silent_shards()
            now = time.monotonic()
            for session, writer in list(self.sessions.items()):
                if now - session.heard > self.cfg.idle_timeout:
                    session.close("idle", f"Connection closed: nothing received for {self.cfg.idle_timeout:g} s")
                elif session.sending_since and (session.closing or now - session.sending_since > SEND_STUCK):
                    session.close("slow_client")
                    writer.cancel()  # blocked on a client that does not read

    # ------------------------------------------------------------ one WebSocket

    async def serve(self, ws: WebSocket) -> None:
        """One WebSocket connection (connections per address are capped from the TCP accept: ``guard``)."""
        ip = ws.client.host if ws.client else "?"
        refusal = self._refusal(ws)
        if refusal:
            reason, response = refusal
            metrics.REFUSED.labels(reason).inc()
            await ws.send_denial_response(response)
            return
        await ws.accept()
        await self._session(ws, ip)

    def _refusal(self, ws: WebSocket) -> tuple[str, Response] | None:
        """Why a handshake is refused, with the HTTP answer: 401, 403 or 503 + Retry-After."""
        if not self.authorised(ws):
            return "unauthorised", Response("unauthorised: a valid token is required", status_code=401)
        origin = ws.headers.get("origin")
        if self.cfg.allowed_origins and origin is not None and origin not in self.cfg.allowed_origins:
            return "origin", Response(f"origin {origin} is not allowed", status_code=403)
        if not self.hub.knows_coins():  # it would answer valid subscriptions with "Invalid subscription"
            return "not_ready", not_ready()
        return None

    async def _session(self, ws: WebSocket, ip: str) -> None:
        session = Session(f"{ip}:{ws.client.port if ws.client else 0}", ws.send_text, self.cfg.queue_size,
                          self.cfg.max_messages_per_minute, FrameWriter.of(ws.scope), self.outbound, self.cfg.lossless)
        writer = asyncio.create_task(self._write(session, ws))
        reader = asyncio.create_task(self._read(session, ws))
        self.sessions[session] = writer
        metrics.CONNECTIONS.inc()
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            session.close("client_closed")  # no-op when already closing for another reason
            reader.cancel()
            metrics.CONNECTIONS.dec()
            metrics.CLOSED.labels(session.closing or "client_closed").inc()
            for stats in session.subs.values():
                self._release(session, stats.feed)
                self.hub.detach(session, stats.feed)
            session.subs.clear()
            del self.sessions[session]
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(writer, 2.0)

    async def _read(self, session: Session, ws: WebSocket) -> None:
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):
            while not session.closing:
                received = await ws.receive()
                if received["type"] == "websocket.disconnect":
                    return
                session.heard = time.monotonic()
                text = received.get("text")
                self.handle(session, text if text is not None else received.get("bytes") or b"")
                await asyncio.sleep(0)  # let writers run between requests of a burst

    async def _write(self, session: Session, ws: WebSocket) -> None:
        """Send the session's messages; when it closes for a reason of ours, say why and close."""
        with contextlib.suppress(Exception):
            await session.writer()
        if session.closing in ("client_closed", None):
            return
        with contextlib.suppress(Exception):
            if session.close_text:
                await ws.send_text(message("error", session.close_text))
            await ws.close(code=POLICY, reason=session.closing)

    # ------------------------------------------------------------ requests

    def handle(self, session: Session, raw: str | bytes) -> None:
        if not session.allow_request():
            metrics.ERRORS.labels("rate_limited").inc()
            session.close("rate_limited", f"Too many messages: more than {self.cfg.max_messages_per_minute} per minute")
            return
        try:
            request = parse_request(raw)
            method = request["method"]
            metrics.REQUESTS.labels(method if method in ("subscribe", "unsubscribe", "ping", "post") else "other").inc()
            if method in ("subscribe", "unsubscribe"):
                self.subscription(session, method, request.get("subscription"))
            elif method == "ping":
                session.reply('{"channel":"pong"}')
            elif method == "post":
                self.post(session, request)
            else:
                raise RequestError(f"Error parsing JSON into valid websocket request: {dumps(request)[:1000]}", "unknown_method")
        except RequestError as exc:
            metrics.ERRORS.labels(exc.reason).inc()
            session.reply(message("error", exc.text))
        except Exception:  # a bug must cost one request, not the connection
            metrics.ERRORS.labels("internal").inc()
            log.exception("request %r failed", raw[:200])
            session.reply(message("error", "Internal error handling the request"))

    def subscription(self, session: Session, method: str, sub: Any) -> None:
        norm = normalise(sub, self.hub.coin_exists)
        ident = identity(norm)
        if method == "subscribe":
            if ident in session.subs:
                raise RequestError(f"Already subscribed: {dumps(norm)}", "already_subscribed")
            if len(session.subs) >= self.cfg.max_subscriptions:
                raise RequestError(f"Cannot subscribe to more than {self.cfg.max_subscriptions} channels.", "too_many_subscriptions")
            key = feed_key(norm)
            if any(stats.feed == key for stats in session.subs.values()):  # the same feed spelt otherwise (dex "" or absent)
                raise RequestError(f"Already subscribed: {dumps(norm)}", "already_subscribed")
            self._within_budget(session, key)
            self.hub.check(key)
            self.polls.admit(self.hub, session, key)
            session.subs[ident] = SubscriptionStats(norm, key)
            session.reply(message("subscriptionResponse", {"method": method, "subscription": norm}))
            self.hub.attach(session, ident, key)
            self.budgets.setdefault(session.ip, AddressBudget()).add(_user_of(key))
            return
        stats = session.subs.pop(ident, None)
        if stats is None:
            raise RequestError(f"Already unsubscribed: {dumps(norm)}", "not_subscribed")
        self._release(session, stats.feed)
        self.hub.detach(session, stats.feed)
        session.forget(stats.feed)
        session.reply(message("subscriptionResponse", {"method": method, "subscription": norm}))

    def _within_budget(self, session: Session, key: FeedKey) -> None:
        """RequestError when the session's address holds its share already (all its connections)."""
        budget = self.budgets.get(session.ip)
        if budget is None:
            return
        if budget.subscriptions >= self.cfg.max_subscriptions_per_ip:
            raise RequestError(f"Cannot subscribe to more than {self.cfg.max_subscriptions_per_ip} channels from one address.",
                               "too_many_subscriptions_per_ip")
        user = _user_of(key)
        if user is not None and user not in budget.users and len(budget.users) >= self.cfg.max_followed_users_per_ip:
            raise RequestError(f"Cannot follow more than {self.cfg.max_followed_users_per_ip} users from one address.",
                               "too_many_users_per_ip")

    def _release(self, session: Session, key: FeedKey) -> None:
        budget = self.budgets.get(session.ip)
        if budget is not None:
            budget.remove(_user_of(key))
            if not budget:
                del self.budgets[session.ip]

    def post(self, session: Session, request: dict[str, Any]) -> None:
        post_id = request.get("id")
        inner = request.get("request")
        if not isinstance(inner, dict) or inner.get("type") != "info":
            kind = inner.get("type") if isinstance(inner, dict) else None
            session.reply(message("post", {"id": post_id, "response": {"type": "error", "payload": f"only info requests are served, not {kind!r}"}}))
            return
        if session.pending_posts >= MAX_PENDING_POSTS:
            raise RequestError(f"Too many pending post requests (at most {MAX_PENDING_POSTS})", "too_many_posts")
        session.pending_posts += 1
        asyncio.create_task(self._answer_post(session, post_id, inner.get("payload")))

    async def _answer_post(self, session: Session, post_id: Any, payload: Any) -> None:
        """Every post gets its answer: the data, or an error (also on a bug: logged)."""
        try:
            data = await self.info.answer(payload)
            response = {"type": "info", "payload": {"type": payload["type"], "data": data}}
        except InfoError as exc:
            response = {"type": "error", "payload": exc.text}
        except Exception:
            metrics.ERRORS.labels("internal").inc()
            log.exception("post %r failed", payload)
            response = {"type": "error", "payload": "Internal error handling the request"}
        finally:
            session.pending_posts -= 1
        session.reply(message("post", {"id": post_id, "response": response}))

    # ------------------------------------------------------------ HTTP

    async def info_endpoint(self, request: Request) -> Response:
        if not self.authorised(request):
            return Response("unauthorised", status_code=401)
        if not self.hub.knows_coins():  # meta would list no coin, l2Book would know none
            return not_ready()
        body = await _body(request, MAX_INFO_BODY)
        if body is None:
            metrics.INFO.labels("too_large", "error").inc()
            return Response(f"Request body larger than {MAX_INFO_BODY} bytes", status_code=413)
        try:
            payload = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError) as exc:  # as the public API (axum's Json) answers a body that is not JSON
            metrics.INFO.labels("unparsable", "error").inc()
            return Response(f"Failed to parse the request body as JSON: {exc}", status_code=400, media_type=TEXT)
        try:
            data = await self.info.answer(payload)
        except InfoError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            return Response(exc.text, status_code=exc.status, media_type=exc.content_type, headers=headers)
        return Response(msgspec.json.encode(data), media_type="application/json")

    async def ready(self, request: Request) -> Response:
        """200 while this gateway serves (``Hub.ready``: every shard's coins known, one shard at
        least live), also while the node is silent or hlbook is behind it: ``stale`` says so (no
        block for ``--stale-after`` seconds, or the newest one's block time that far behind the
        clock; every gateway is as stale then, a load balancer should keep them). ``stale_coins``
        lists the coins not current here (``Hub.stale_coins``: a silent shard's). ``?coin=X``: 503
        when X is one of them, 404 when there is no X. ``?fresh=1`` (monitoring): 503 also when
        stale or a shard is not live."""
        hub, now = self.hub, time.monotonic()
        shards = [{"shard": k, "height": v.height, "phase": v.phase, "live": v.live(now), "silent_s": _seconds(v.silence(now)),
                   "coins": dict(Counter(v.states.values()))} for k, v in enumerate(hub.shards)]
        age, lag, limit = hub.block_age(), hub.lag(), self.cfg.stale_after
        stale = age is None or age > limit or (lag is not None and lag > limit)
        ready, stale_coins = hub.ready(), hub.stale_coins()
        body = {"ready": ready, "stale": stale, "block_age_s": _seconds(age), "lag_s": _seconds(lag), "delay_s": _seconds(hub.delay()),
                "stale_coins": stale_coins, "shards": shards}
        coin, fresh = request.query_params.get("coin"), request.query_params.get("fresh") in ("1", "true")
        if coin is not None and hub.knows_coins() and not hub.coin_exists(coin):
            return Response(dumps({**body, "error": f"unknown coin {coin!r}"}), status_code=404, media_type="application/json")
        ok = ready and coin not in stale_coins and not (fresh and (stale or not hub.whole()))
        return Response(dumps(body), status_code=200 if ok else 503, media_type="application/json")

    async def debug(self, request: Request) -> Response:
        """Every client's address and followed users: with ``--token`` to its holders, else to this host only."""
        if not self.authorised(request):
            return Response("unauthorised", status_code=401)
        if not self.cfg.token and not _loopback(request.client.host if request.client else ""):
            return Response("/debug/connections answers this host only unless --token is set", status_code=403)
        body = {"connections": [s.info() for s in self.sessions], "feeds": len(self.hub.feeds),
                "upstream_topics": sorted(t.decode() for t in self.upstream.counts)}
        return Response(dumps(body), media_type="application/json")


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def not_ready() -> Response:
    return Response("not ready: the book shards have not reported their coins yet; retry shortly", status_code=503,
                    headers={"Retry-After": "2"})


async def _body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is larger than ``limit`` bytes (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def health(request: Request) -> Response:
    return Response('{"status":"ok"}', media_type="application/json")


async def metrics_endpoint(request: Request) -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def index(request: Request) -> Response:
    page = STATIC / "index.html"
    if not page.exists():
        return Response("hlbook gateway: WebSocket at /ws, POST /info", media_type="text/plain")
    return FileResponse(page)


def create_app(cfg: GatewayConfig) -> Starlette:
    gateway = Gateway(cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.stop()

    routes = [
        WebSocketRoute("/ws", gateway.serve),
        Route("/info", gateway.info_endpoint, methods=["POST"]),
        Route("/health", health),
        Route("/ready", gateway.ready),
        Route("/metrics", metrics_endpoint),
        Route("/debug/connections", gateway.debug),
        Route("/", index),
    ]
    if STATIC.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return app


def _user_of(key: FeedKey) -> str | None:
    return key.user if isinstance(key, UserKey) else None

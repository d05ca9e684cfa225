"""The gateway's ZeroMQ side: one SUB socket connected to ingest, every shard
and the history service (topics subscribed while some client needs them,
counted), a DEALER per shard for queries (request ids, timeouts), one to
ingest's replay ROUTER (to repair a lost trades or user message) and one to
the history service's queries."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from hlbook.common import topics, wire
from hlbook.common.metrics import BAD_INPUT
from hlbook.common.security import Curve

log = logging.getLogger(__name__)

RCVHWM = 500_000
BATCH = 2000  # messages handled per wake-up before yielding to the event loop
REPLAYS_IN_FLIGHT = 4  # replay requests to ingest at once: it queues at most 8 replies for one peer (REPLIES_QUEUED)
# and drops the rest, so a burst (after its restart every lost topic is asked for at once) waited 3 s per try
ALWAYS = (topics.SHARD_PREFIX, topics.HEARTBEAT_PREFIX, topics.RESET_PREFIX, topics.TRADES_PREFIX, topics.HEADER, topics.BLOCK_END)


class QueryError(Exception):
    """A shard answered ``ok: false`` or did not answer in time."""


Reply = tuple[dict[str, Any], list[memoryview]]  # the reply map, then any further frames (l4 levels)


class Upstream:
    """Subscriptions to ingest and the shards, queries to the shards, replays from ingest."""

    def __init__(self, ingest_pub: str, book_pubs: list[str], book_queries: list[str], query_timeout: float = 3.0,
                 ingest_replay: str | None = None, curve: Curve | None = None,
                 history: tuple[str, str] | None = None) -> None:
        self.endpoints = (ingest_pub, book_pubs, book_queries)
        self.curve = curve
        self.ingest_replay = ingest_replay
        self.history_endpoints = history  # (pub, query) of the history service
        self.query_timeout = query_timeout
        self.counts: dict[bytes, int] = {}
        self.dealers: list[zmq.asyncio.Socket] = []
        self.replayer: zmq.asyncio.Socket | None = None
        self.historian: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, asyncio.Future[Reply]] = {}
        self.tasks: list[asyncio.Task[None]] = []
        self.room: Callable[[], Awaitable[None]] | None = None  # awaited before each read (backpressure)
        self._replays: asyncio.Semaphore | None = None  # REPLAYS_IN_FLIGHT (made in the running loop)

    def _open(self) -> None:
        """Create the sockets (inside the running event loop: asyncio sockets bind to it)."""
        ingest_pub, book_pubs, book_queries = self.endpoints
        self.ctx = zmq.asyncio.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, RCVHWM)
        self.sub.setsockopt(zmq.SNDHWM, 0)  # subscriptions travel on the send side: never drop one (libzmq #2258)
        self.sub.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.connect(self.sub)
        history_pub = [self.history_endpoints[0]] if self.history_endpoints else []
        for endpoint in [ingest_pub, *book_pubs, *history_pub]:
            self.sub.connect(endpoint)
        for prefix in ALWAYS:
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sub_nowait: zmq.Socket[bytes] = zmq.Socket.shadow(self.sub.underlying)  # plain socket for draining without awaiting
        for endpoint in book_queries:
            self.dealers.append(self._dealer(endpoint))
        if self.ingest_replay:
            self.replayer = self._dealer(self.ingest_replay)
        if self.history_endpoints:
            self.historian = self._dealer(self.history_endpoints[1])

    def _dealer(self, endpoint: str) -> zmq.asyncio.Socket:
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.connect(dealer)
        dealer.connect(endpoint)
        return dealer

    @property
    def has_history(self) -> bool:
        return self.history_endpoints is not None

    def _extra_dealers(self) -> list[zmq.asyncio.Socket]:
        return [d for d in (self.replayer, self.historian) if d is not None]

    @property
    def shards(self) -> int:
        return len(self.endpoints[2])

    def subscribe(self, topic: bytes) -> None:
        self.counts[topic] = self.counts.get(topic, 0) + 1
        if self.counts[topic] == 1:
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)

    def unsubscribe(self, topic: bytes) -> None:
        n = self.counts.get(topic, 0) - 1
        if n > 0:
            self.counts[topic] = n
            return
        self.counts.pop(topic, None)
        self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)

    def resubscribe(self, topic: bytes) -> None:
        """Send the subscription again (a SUB socket sends a topic only on its first subscribe)."""
        if topic in self.counts:
            self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)

    def start(self, on_message: Callable[[bytes, bytes], None]) -> None:
        self._open()
        self.tasks.append(asyncio.create_task(self._read(on_message)))
        self.tasks.extend(asyncio.create_task(self._replies(d)) for d in [*self.dealers, *self._extra_dealers()])

    async def _read(self, on_message: Callable[[bytes, bytes], None]) -> None:
        sub = self.sub_nowait
        while True:
            if self.room is not None:
                await self.room()
            frames = await self.sub.recv_multipart()
            for _ in range(BATCH):
                if len(frames) == 2:
                    try:
                        on_message(frames[0], frames[1])
                    except Exception:  # a bug in one handler must not stop the feed
                        BAD_INPUT.labels("gateway", "error").inc()
                        log.exception("handling %r failed", frames[0][:40])
                else:
                    BAD_INPUT.labels("gateway", "bad_frame").inc()
                try:
                    frames = wire.recv(sub, zmq.NOBLOCK)
                except zmq.Again:
                    break
            await asyncio.sleep(0)

    async def _replies(self, dealer: zmq.asyncio.Socket) -> None:
        while True:
            frames = await dealer.recv_multipart(copy=False)  # an l4 reply's levels stay in ZeroMQ's buffers
            future = self._waiting.pop(frames[0].bytes, None) if len(frames) >= 3 else None
            if future is None or future.done():
                continue  # answer to a request that timed out
            try:
                future.set_result((wire.decode(frames[2].bytes), [f.buffer for f in frames[3:]]))
            except (msgspec.DecodeError, ValueError) as exc:
                future.set_exception(QueryError(f"undecodable reply: {exc}"))

    async def _ask(self, dealer: zmq.asyncio.Socket, request: bytes, what: str, timeout: float | None = None) -> Reply:
        request_id = str(next(self._ids)).encode()
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await dealer.send_multipart([request_id, b"", request])
            return await asyncio.wait_for(future, timeout or self.query_timeout)
        except TimeoutError:
            raise QueryError(f"{what} did not answer in {timeout or self.query_timeout} s") from None
        finally:
            self._waiting.pop(request_id, None)

    async def query_parts(self, shard: int, query: wire.ShardQuery) -> Reply:
        """A shard's ``ok`` reply and the frames after it; QueryError when it refuses or times out."""
        reply, parts = await self._ask(self.dealers[shard], wire.encode(query), f"shard {shard}")
        if not isinstance(reply, dict) or not reply.get("ok"):
            raise QueryError(str(reply.get("error") if isinstance(reply, dict) else reply))
        return reply, parts

    async def query(self, shard: int, query: wire.ShardQuery) -> dict[str, Any]:
        """A shard's ``ok`` reply; QueryError when it refuses or times out."""
        return (await self.query_parts(shard, query))[0]

    async def replay(self, from_height: int, prefix: bytes) -> list[tuple[bytes, bytes]]:
        """Ingest's stored messages on topics starting with ``prefix`` from ``from_height``, in order."""
        if self.replayer is None:
            raise QueryError("no --ingest-replay endpoint configured")
        request = wire.ReplayRequest(from_height, [prefix], partial=True)  # the chain tells whether anything is missing
        if self._replays is None:
            self._replays = asyncio.Semaphore(REPLAYS_IN_FLIGHT)
        async with self._replays:
            header, frames = await self._ask(self.replayer, wire.encode(request), "ingest replay")
        reply = msgspec.convert(header, wire.ReplayReply)
        if not reply.ok:
            raise QueryError(f"replay from {from_height} refused: {reply.error}")
        return [(bytes(frames[i]), bytes(frames[i + 1])) for i in range(0, len(frames) - 1, 2)]

    async def history(self, query: wire.HistoryQuery, timeout: float | None = None) -> tuple[wire.HistoryReply, bytes]:
        """The history service's answer: its reply header and the answer's JSON."""
        if self.historian is None:
            raise QueryError("this gateway has no history service (--history-query)")
        header, frames = await self._ask(self.historian, wire.encode(query), "the history service", timeout)
        reply = msgspec.convert(header, wire.HistoryReply)
        if not reply.ok or not frames:
            raise QueryError(reply.error or "empty history answer")
        return reply, bytes(frames[0])

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.sub.close(0)
        for dealer in [*self.dealers, *self._extra_dealers()]:
            dealer.close(0)
        self.ctx.term()

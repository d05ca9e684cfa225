"""The gateway's ZeroMQ side: one SUB socket connected to ingest and every
shard (topics subscribed while some client needs them, counted), and a DEALER
per shard for queries (request ids, timeouts)."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from hlbook.common import topics, wire
from hlbook.common.metrics import BAD_INPUT

log = logging.getLogger(__name__)

RCVHWM = 500_000
BATCH = 2000  # messages handled per wake-up before yielding to the event loop
ALWAYS = (topics.SHARD_PREFIX, topics.RESET_PREFIX, topics.TRADES_PREFIX)


class QueryError(Exception):
    """A shard answered ``ok: false`` or did not answer in time."""


class Upstream:
    """Subscriptions to ingest and the shards, and queries to the shards."""

    def __init__(self, ingest_pub: str, book_pubs: list[str], book_queries: list[str], query_timeout: float = 3.0) -> None:
        self.endpoints = (ingest_pub, book_pubs, book_queries)
        self.query_timeout = query_timeout
        self.counts: dict[bytes, int] = {}
        self.dealers: list[zmq.asyncio.Socket] = []
        self._ids = itertools.count(1)
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self.tasks: list[asyncio.Task[None]] = []

    def _open(self) -> None:
        """Create the sockets (inside the running event loop: asyncio sockets bind to it)."""
        ingest_pub, book_pubs, book_queries = self.endpoints
        self.ctx = zmq.asyncio.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, RCVHWM)
        self.sub.setsockopt(zmq.SNDHWM, 0)  # subscriptions travel on the send side: never drop one (libzmq #2258)
        self.sub.setsockopt(zmq.LINGER, 0)
        for endpoint in [ingest_pub, *book_pubs]:
            self.sub.connect(endpoint)
        for prefix in ALWAYS:
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sub_nowait = zmq.Socket.shadow(self.sub.underlying)  # plain socket for draining without awaiting
        for endpoint in book_queries:
            dealer = self.ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(endpoint)
            self.dealers.append(dealer)

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

    def start(self, on_message: Callable[[bytes, bytes], None]) -> None:
        self._open()
        self.tasks.append(asyncio.create_task(self._read(on_message)))
        self.tasks.extend(asyncio.create_task(self._replies(d)) for d in self.dealers)

    async def _read(self, on_message: Callable[[bytes, bytes], None]) -> None:
        sub = self.sub_nowait
        while True:
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
                    frames = sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
            await asyncio.sleep(0)

    async def _replies(self, dealer: zmq.asyncio.Socket) -> None:
        while True:
            frames = await dealer.recv_multipart()
            future = self._waiting.pop(frames[0], None) if len(frames) == 3 else None
            if future is None or future.done():
                continue  # answer to a request that timed out
            try:
                future.set_result(wire.decode(frames[2]))
            except (msgspec.DecodeError, ValueError) as exc:
                future.set_exception(QueryError(f"undecodable reply: {exc}"))

    async def query(self, shard: int, query: wire.Query) -> dict[str, Any]:
        """A shard's ``ok`` reply; QueryError when it refuses or times out."""
        request_id = str(next(self._ids)).encode()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            await self.dealers[shard].send_multipart([request_id, b"", wire.encode(query)])
            reply = await asyncio.wait_for(future, self.query_timeout)
        except TimeoutError:
            raise QueryError(f"shard {shard} did not answer in {self.query_timeout} s") from None
        finally:
            self._waiting.pop(request_id, None)
        if not isinstance(reply, dict) or not reply.get("ok"):
            raise QueryError(str(reply.get("error") if isinstance(reply, dict) else reply))
        return reply

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.sub.close(0)
        for dealer in self.dealers:
            dealer.close(0)
        self.ctx.term()

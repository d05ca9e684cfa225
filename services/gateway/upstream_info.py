"""Forwarding of info requests to the node's info server (``--info-upstream``).

A node run with ``--serve-info`` answers most info types itself from its state
(positions, balances, fees, the asset ids of ``meta``); hlbook computes only
what needs its books or its history (``info.HANDLERS``). Every other type of
the public API a client asks ``POST /info`` or a WebSocket ``post`` for is sent
to the node as it came and its answer passed back unchanged: status, body,
content type (``info.Info.answer`` decides what is forwarded).

Bounded on every side:

- **time**: ``timeout`` seconds for the whole exchange (connect, send, the
  answer read); past it the client gets 504.
- **size**: the request is already at most 64 kB (``app.MAX_INFO_BODY``);
  the answer is read in pieces and dropped past ``max_bytes`` (502).
- **concurrency**: at most ``max_in_flight`` requests to the node at once;
  one more is answered 503 + ``Retry-After`` at once, never queued.
- **repeats**: the answers of types that change rarely (``CACHED``: meta,
  spotMeta, perpDexs) are kept ``CACHE_TTL`` seconds, and identical requests
  arriving while one is on its way share its answer.

Errors are in the public API's form: the node's own 4xx/5xx answers go back
as they came (``422 Failed to deserialize the JSON body into the target
type: …``, text/plain); what hlbook itself refuses is plain text too.
``hlbook_gateway_info_upstream_total{type, outcome}`` counts every forwarded
request (``type`` is a public info type or ``other``)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import httpx
import msgspec

from hlbook.common.metrics import Counter, Histogram

log = logging.getLogger(__name__)

CACHED = frozenset({"meta", "spotMeta", "perpDexs"})  # answers that change rarely (a listing, a new dex)
CACHE_TTL = 5.0  # seconds a cached answer is served
TIMEOUT = 5.0
MAX_IN_FLIGHT = 64
MAX_BYTES = 32 << 20  # a mainnet spotMetaAndAssetCtxs is ~0.5 MB, webData2 of a busy user a few MB
JSON = "application/json"
TEXT = "text/plain; charset=utf-8"

FORWARDED = Counter("hlbook_gateway_info_upstream_total",
                    "Info requests forwarded to the node's info server, by type (a public info type or other) and outcome "
                    "(ok, cached, shared, http_4xx, http_5xx, timeout, unreachable, too_large, bad_answer, busy)",
                    ["type", "outcome"])
FORWARD_SECONDS = Histogram("hlbook_gateway_info_upstream_seconds", "Time the node's info server took to answer (forwarded requests)",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))


@dataclass(frozen=True, slots=True)
class Answer:
    """What the node answered (or what hlbook answers in its place when the node could not)."""

    status: int
    body: bytes
    content_type: str = JSON
    retry_after: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def text(self) -> str:
        """The body as a WebSocket ``post`` error's payload."""
        return self.body.decode("utf-8", "replace")


def refusal(status: int, text: str, retry_after: int | None = None) -> Answer:
    return Answer(status, text.encode(), TEXT, retry_after)


class UpstreamInfo:
    """Sends info requests to one upstream ``POST /info`` (a node's info server)."""

    def __init__(self, url: str, timeout: float = TIMEOUT, max_in_flight: int = MAX_IN_FLIGHT,
                 max_bytes: int = MAX_BYTES, cache_ttl: float = CACHE_TTL,
                 label: Callable[[str], str] | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.max_bytes = max_bytes
        self.cache_ttl = cache_ttl
        self.label: Callable[[str], str] = label or str  # info type -> metrics label (bounded)
        self.in_flight = 0
        self.cache: dict[bytes, tuple[float, Answer]] = {}
        self.pending: dict[bytes, asyncio.Future[Answer]] = {}
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:  # created in the running loop
            limits = httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=min(self.max_in_flight, 16))
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), limits=limits,
                                             headers={"Content-Type": JSON}, trust_env=False)
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def ask(self, kind: str, payload: dict[str, Any]) -> Answer:
        """The node's answer to ``payload`` (an info request of type ``kind``)."""
        label = self.label(kind)
        body = msgspec.json.encode(payload)
        if kind not in CACHED:
            return await self._send(label, body)
        now = time.monotonic()
        hit = self.cache.get(body)
        if hit is not None and hit[0] > now:
            FORWARDED.labels(label, "cached").inc()
            return hit[1]
        waiting = self.pending.get(body)
        if waiting is not None:  # the same request is on its way: share its answer
            FORWARDED.labels(label, "shared").inc()
            return await asyncio.shield(waiting)
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.pending[body] = future
        try:
            answer = await self._send(label, body)
            if answer.ok:
                self._remember(body, answer, now)
            future.set_result(answer)
            return answer
        except BaseException as exc:  # cancelled: the sharers get a refusal, not a hang
            future.set_result(refusal(503, "the info request to the node was cancelled; retry", 1))
            raise exc
        finally:
            del self.pending[body]

    def _remember(self, key: bytes, answer: Answer, now: float) -> None:
        if len(self.cache) > 256:  # requests differ only by dex: a few dozen keys; a flood of made-up ones is dropped
            self.cache = {k: v for k, v in self.cache.items() if v[0] > now}
            if len(self.cache) > 256:
                self.cache.clear()
        self.cache[key] = (now + self.cache_ttl, answer)

    async def _send(self, label: str, body: bytes) -> Answer:
        if self.in_flight >= self.max_in_flight:
            FORWARDED.labels(label, "busy").inc()
            return refusal(503, f"Too many info requests forwarded to the node at once (at most {self.max_in_flight}); "
                                "retry shortly", 1)
        self.in_flight += 1
        started = time.monotonic()
        try:
            answer, outcome = await asyncio.wait_for(self._exchange(body), self.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            answer, outcome = refusal(504, f"The node's info server did not answer within {self.timeout:g} s"), "timeout"
        except httpx.HTTPError as exc:
            log.warning("info upstream %s: %s", self.url, exc)
            answer, outcome = refusal(502, f"The node's info server cannot be reached: {type(exc).__name__}"), "unreachable"
        finally:
            self.in_flight -= 1
        FORWARD_SECONDS.observe(time.monotonic() - started)
        FORWARDED.labels(label, outcome).inc()
        return answer

    async def _exchange(self, body: bytes) -> tuple[Answer, str]:
        """One request; the answer read in pieces, dropped past ``max_bytes``."""
        async with self.client.stream("POST", self.url, content=body) as response:
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                return self._too_large(), "too_large"
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > self.max_bytes:
                    return self._too_large(), "too_large"
                chunks.append(chunk)
            data = b"".join(chunks)
            content_type = response.headers.get("content-type", TEXT)
            if response.status_code != 200:
                return Answer(response.status_code, data, content_type), f"http_{response.status_code // 100}xx"
            try:
                msgspec.json.decode(data, type=msgspec.Raw)  # embedded as is in WebSocket replies: must be JSON
            except msgspec.DecodeError:
                return refusal(502, "The node's info server answered something that is not JSON"), "bad_answer"
            return Answer(200, data, JSON), "ok"

    def _too_large(self) -> Answer:
        return refusal(502, f"The node's answer is larger than {self.max_bytes} bytes")

"""Point-in-time books (``/info`` ``l4Snapshot``, and ``l2Book`` with a ``time``): answered by
``replay.asof`` (the nearest checkpoint at or before the time, then the node's files) in a
pool of worker processes, so the event loop and the live path never wait for them.

Bounded: ``workers`` requests at once (each a process; one more is answered 503 +
``Retry-After`` at once, never queued), ``timeout`` seconds each (504: the worker stops at
its next block), and only as far back as checkpoints and node files reach, at most
``max_span_s`` of files past a checkpoint. The workers are started on the first request,
niced by 10; ``replay.asof`` (the book engine) is imported on the first request only (the
gateway needs it to start the workers; it never runs it). ``hlbook_gateway_past_requests_total{type, outcome}`` counts every request,
``hlbook_gateway_past_seconds`` times the answered ones.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from types import ModuleType
from typing import Any

import msgspec

from hlbook.services.gateway.metrics import PAST, PAST_SECONDS

log = logging.getLogger(__name__)

WORKERS = 1
TIMEOUT = 30.0
GRACE_S = 5.0  # past the timeout, what the gateway waits for a worker to say it stopped
RETRY_AFTER = 1


class Refused(Exception):
    """Said to the client: ``text`` with HTTP ``status`` (503 and 504 with ``retry_after``)."""

    def __init__(self, text: str, status: int, retry_after: int | None = None) -> None:
        super().__init__(text)
        self.text, self.status, self.retry_after = text, status, retry_after


class Past:
    """The pool and its limits. Without ``checkpoints`` and ``data_dir`` every request is refused (501)."""

    def __init__(self, checkpoints: str | None, data_dir: str | None, mode: str, workers: int = WORKERS,
                 timeout: float = TIMEOUT, max_span_s: float = 1800.0) -> None:
        self.where = (checkpoints, data_dir, mode, max_span_s) if checkpoints and data_dir else None
        self.workers, self.timeout = workers, timeout
        self.in_flight = 0
        self._pool: ProcessPoolExecutor | None = None
        self._asof: ModuleType | None = None

    @property
    def asof(self) -> ModuleType:
        if self._asof is None:
            from hlbook.services.replay import asof

            self._asof = asof
        return self._asof

    def pool(self) -> ProcessPoolExecutor:
        if self._pool is None:  # spawned: a fork would copy the event loop's sockets and threads
            self._pool = ProcessPoolExecutor(self.workers, multiprocessing.get_context("spawn"), initializer=self.asof.nice_worker)
        return self._pool

    async def ask(self, kind: str, coin: str, at: int, **levels: Any) -> msgspec.Raw:
        """The JSON answer to ``kind`` (l4Snapshot, l2Book with ``levels``: n_levels, n_sig_figs,
        mantissa) for ``coin`` as of block time ``at``; Refused when it cannot be given."""
        outcome = "error"
        try:
            body = await self._ask(kind, coin, at, levels)
            outcome = "ok"
            return msgspec.Raw(body)
        except Refused as exc:
            outcome = {503: "busy", 504: "timeout", 501: "off"}.get(exc.status, "error")
            raise
        except Exception as exc:
            if self._asof is None or not isinstance(exc, self._asof.PastError):
                raise
            outcome = exc.outcome
            raise Refused(exc.text, exc.status) from None
        finally:
            PAST.labels(kind, outcome).inc()

    async def _ask(self, kind: str, coin: str, at: int, levels: dict[str, Any]) -> bytes:
        if self.where is None:
            raise Refused(f"{kind} with a time needs the checkpoints and the node's files: this gateway runs without "
                          "--data-dir", 501)
        if self.in_flight >= self.workers:
            raise Refused(f"{self.workers} point-in-time request(s) already being rebuilt; retry later", 503, RETRY_AFTER)
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self.in_flight += 1  # held until the worker is done, even past the gateway's wait
        try:
            checkpoints, data_dir, mode, max_span_s = self.where
            source = self.asof.Source(checkpoints, data_dir, mode, max_span_s)
            job: Future[bytes] = self.pool().submit(self.asof.answer, source, self.asof.Ask(kind, coin, at, **levels), self.timeout)
        except (BrokenProcessPool, RuntimeError):
            self.in_flight -= 1
            self._pool = None
            raise Refused("the point-in-time worker stopped; retry", 503, RETRY_AFTER) from None
        job.add_done_callback(lambda _: self._release_from(loop))
        try:
            body = await asyncio.wait_for(asyncio.wrap_future(job), self.timeout + GRACE_S)
        except TimeoutError:
            raise Refused(f"{kind} {coin} as of {at}: not rebuilt within {self.timeout:g} s", 504) from None
        except BrokenProcessPool:
            self._pool = None
            log.error("a point-in-time worker died (%s %s as of %d)", kind, coin, at)
            raise Refused("the point-in-time worker stopped; retry", 503, RETRY_AFTER) from None
        PAST_SECONDS.observe(time.monotonic() - started)
        return body

    def _release_from(self, loop: asyncio.AbstractEventLoop) -> None:
        """A worker is done (called in the pool's thread): its slot is free again, in the loop."""
        try:
            loop.call_soon_threadsafe(self._release)
        except RuntimeError:  # the loop is closed: the gateway stopped
            pass

    def _release(self) -> None:
        self.in_flight -= 1

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

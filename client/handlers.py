"""Running a program's handlers (callbacks, ``on_event``, ``on_update``) safely.

One rule for every handler the client calls: an exception is logged and
counted, never raised into the client (the rest of the message is still
applied, streams and timers go on); an awaitable result (``async def``, a
lambda returning a coroutine, an object with an async ``__call__``) is awaited
by a task of its own, in the order of the calls.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("hlbook.client")


class Handlers:
    """Calls handlers for one owner (``what``, for the log); ``errors``: calls that
    raised; at most ``limit`` awaitables wait, the oldest dropped beyond (``dropped``)."""

    def __init__(self, what: str, limit: int = 10_000) -> None:
        self.what = what
        self.limit = max(1, limit)
        self.errors = 0
        self.dropped = 0
        self._waiting: collections.deque[Awaitable[Any]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def call(self, handler: Callable[..., Any], *args: Any) -> None:
        """Call ``handler(*args)``; never raises."""
        try:
            result = handler(*args)
        except Exception:
            self._failed()
            return
        if inspect.isawaitable(result):
            self._wait(result)

    def _failed(self) -> None:
        self.errors += 1
        log.exception("%s failed", self.what)

    def _wait(self, awaitable: Awaitable[Any]) -> None:
        if len(self._waiting) >= self.limit:
            _discard(self._waiting.popleft())
            self.dropped += 1
        self._waiting.append(awaitable)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        while self._waiting:
            try:
                await self._waiting.popleft()
            except Exception:
                self._failed()

    def close(self) -> None:
        """Stop: what still waits is dropped."""
        if self._task is not None:
            self._task.cancel()
        while self._waiting:
            _discard(self._waiting.popleft())


def _discard(awaitable: Awaitable[Any]) -> None:
    """Drop an awaitable never awaited (a coroutine is closed: no 'never awaited' warning)."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()

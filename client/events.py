"""Everything a client sees, as one stream of typed events (``HLClient.events()``).

A program that wants one place to consume from iterates an ``EventStream``:
feed messages (``Data``, with ``data`` typed by ``models`` and the raw dict in
``raw``), acknowledgements, refusals and server errors, connection changes and
the gaps a lost connection leaves in each subscription.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger("hlbook.client")


def check_size(name: str, value: object, minimum: int) -> None:
    """``ValueError`` unless ``value`` is an int of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, not {value!r}")


class Event(msgspec.Struct, frozen=True):
    """Base of the client events (each restates ``frozen=True``: msgspec inherits it, type checkers do not)."""


class Data(Event, frozen=True):
    """A feed message of subscription ``sub_id``: ``data`` typed (``hlbook.client.models``)
    where the channel has a model, else as received; ``raw`` the message as received."""

    sub_id: int
    channel: str
    data: Any
    raw: dict[str, Any]


class Ack(Event, frozen=True):
    """The server took subscription ``sub_id`` (``resumed``: again, after a lost connection)."""

    sub_id: int
    connection: int | None
    resumed: bool = False


class Gap(Event, frozen=True):
    """Subscription ``sub_id`` is back after a lost connection: messages between
    ``since`` and ``until`` (wall clock) may be missing."""

    sub_id: int
    connection: int | None
    since: float
    until: float


class Error(Event, frozen=True):
    """A refusal or failure of subscription ``sub_id``, or (``sub_id`` None) a server error text."""

    text: str
    connection: int | None = None
    sub_id: int | None = None


class Connected(Event, frozen=True):
    """Connection ``connection`` is open (``reconnect``: not its first time)."""

    connection: int
    reconnect: bool


class Disconnected(Event, frozen=True):
    """Connection ``connection`` was lost or could not open (``retrying`` False: it gave up)."""

    connection: int
    error: str
    retrying: bool


class Dropped(Event, frozen=True):
    """This stream was full: its ``count`` oldest events were dropped."""

    count: int


class EventStream:
    """An async iterator over a client's events from its creation on; bounded
    (``size``: the oldest are dropped, then reported by one ``Dropped``). Ends
    when the client closes; ``close()`` (or leaving ``async with``) stops it."""

    def __init__(self, bus: EventBus, size: int) -> None:
        check_size("size", size, 1)
        self._bus = bus
        self._events: collections.deque[Event | None] = collections.deque()
        self._size = size
        self._dropped = 0
        self._ready = asyncio.Event()
        self._ended = False
        bus.add(self)

    def put(self, event: Event | None) -> None:
        """Queue one event (None ends the stream)."""
        if self._ended:
            return
        if len(self._events) >= self._size and event is not None:
            self._events.popleft()
            self._dropped += 1
        self._events.append(event)
        self._ready.set()

    def close(self) -> None:
        """Stop receiving; the iteration ends after what is queued."""
        self._bus.discard(self)
        self.put(None)
        self._ended = True

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._dropped:
            count, self._dropped = self._dropped, 0
            return Dropped(count)
        while not self._events:
            self._ready.clear()
            await self._ready.wait()
        event = self._events.popleft()
        if event is None:
            self._events.append(None)  # stays ended
            raise StopAsyncIteration
        return event

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Fans events out to the open streams (weakly held: a stream dropped by its
    program stops costing anything)."""

    def __init__(self) -> None:
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()

    @property
    def active(self) -> bool:
        """Whether any stream listens (events are only built then)."""
        return bool(self._streams)

    def add(self, stream: EventStream) -> None:
        self._streams.add(stream)

    def discard(self, stream: EventStream) -> None:
        self._streams.discard(stream)

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every stream; a failing stream is logged, never raised to the sender."""
        for stream in list(self._streams):
            try:
                stream.put(event)
            except Exception:
                log.exception("event stream failed to take %s", type(event).__name__)

    def end(self) -> None:
        """End every stream (the client closed)."""
        for stream in list(self._streams):
            stream.close()


def publish(bus: EventBus | None, make: Callable[..., Event], *args: Any, **kwargs: Any) -> None:
    """Build and publish an event only when someone listens."""
    if bus is not None and bus.active:
        bus.publish(make(*args, **kwargs))

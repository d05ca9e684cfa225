"""Pre-built WebSocket frames written straight to the connection.

Going through ASGI costs a few µs per frame and per client (Starlette's
wrapper, uvicorn's send, websockets building the frame). A feed message goes to
many clients, so the gateway builds its text frame once (``Text.frame``) and a
session writes all its pending frames with one ``transport.write``.

A big message (an l4Book snapshot: ~19 MB for BTC) is a :class:`Blob`: its
parts (a JSON prefix, the shard's rendered levels as received, a suffix) are
never joined or copied; each session writes it in ``CHUNK`` pieces, waiting for
the transport to drain between them, so no write holds the event loop.

``FrameProtocol`` is uvicorn's websockets sans-I/O protocol that puts itself
into the ASGI scope, so the session can reach the transport. Only connections
without a negotiated extension (permessage-deflate compresses per connection)
take this path; the handshake, pings, reading and closing stay uvicorn's
(a ping flood is cut off). Should uvicorn's internals change,
``FrameWriter.of`` returns None and sessions fall back to ASGI sends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from hlbook.services.gateway import guard, metrics

SCOPE_KEY = "hlbook.frames"
POLICY = 1008  # WebSocket close code: policy violation
CHUNK = 256 << 10  # bytes of a Blob written at once


class Text(str):
    """A message's JSON text; its WebSocket text frame is built on first use, once."""

    _frame: bytes | None = None

    def frame(self) -> bytes:
        frame = self._frame
        if frame is None:
            frame = self._frame = text_frame(self)
        return frame


class Blob:
    """A big text message kept as its parts (bytes or memoryviews, UTF-8), written in chunks."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes | memoryview]) -> None:
        self.parts = parts
        self.size = sum(len(p) for p in parts)

    def chunks(self, size: int = CHUNK) -> Iterator[bytes | memoryview]:
        """The text frame in pieces of at most about ``size`` bytes (the frame header goes
        with the first part, when that part is small: a JSON prefix)."""
        head = frame_header(self.size)
        for part in self.parts:
            if head and len(part) < size:
                yield head + bytes(part)
                head = b""
                continue
            if head:
                yield head
                head = b""
            view = memoryview(part)
            for start in range(0, len(view), size):
                yield view[start : start + size]
        if head:
            yield head

    def text(self) -> str:
        """The whole text (for sends through ASGI: a copy, ~10 ms per 19 MB)."""
        return b"".join(self.parts).decode()


Message = str | Blob  # what a session sends (a str is often a Text)


_lanes: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}


def _bulk_lane() -> asyncio.Lock:
    """The event loop's one lane for pieces of big messages."""
    loop = asyncio.get_running_loop()
    lane = _lanes.get(loop)
    if lane is None:
        lane = _lanes[loop] = asyncio.Lock()
    return lane


def frame_header(n: int) -> bytes:
    """Header of a final, unmasked text frame (server to client) of ``n`` payload bytes."""
    if n < 126:
        return bytes((0x81, n))
    if n < 1 << 16:
        return bytes((0x81, 126)) + n.to_bytes(2, "big")
    return bytes((0x81, 127)) + n.to_bytes(8, "big")


def text_frame(text: str) -> bytes:
    """A final, unmasked text frame (server to client)."""
    payload = text.encode()
    return frame_header(len(payload)) + payload


def frame_of(text: str) -> bytes:
    return text.frame() if isinstance(text, Text) else text_frame(text)


class HoldingTransport:
    """A connection's transport as uvicorn's protocol sees it: while a big message is
    written piece by piece (``hold``), the protocol's own frames (a pong, a keepalive
    ping, a close) wait and follow it, instead of landing inside it."""

    def __init__(self, transport: Any) -> None:
        self.raw = transport
        self.held: list[bytes] | None = None
        self.close_after = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def write(self, data: bytes | memoryview) -> None:
        if self.held is not None:
            self.held.append(bytes(data))
        else:
            self.raw.write(data)

    def close(self) -> None:
        if self.held is not None:
            self.close_after = True
        else:
            self.raw.close()

    def hold(self) -> None:
        self.held = []

    def release(self) -> None:
        held, self.held = self.held or [], None
        if held:
            self.raw.write(b"".join(held))
        if self.close_after:
            self.raw.close()


class FrameProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, plus: it puts itself into the ASGI scope (so a session
    can write pre-built frames), holds its own frames back during a big message, limits
    the pings a client may send, and tells the connection guard when it ends."""

    max_pings_per_second = 10.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(HoldingTransport(transport))  # type: ignore[arg-type]  # a transport by delegation
        self.ping_tokens = self.max_pings_per_second
        self.ping_refill = time.monotonic()
        self.pongs_due = False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        guard.release(self.transport.raw)  # type: ignore[attr-defined]  # our HoldingTransport

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][SCOPE_KEY] = self

    def handle_ping(self) -> None:
        """Answer a ping, unless the client sends them faster than ``max_pings_per_second``
        (a ping flood costs a write each): then close the connection (1008). The websockets
        state machine queues a pong for every ping of a read at once, so they are written
        after the read's last ping was counted: a flood in one read gets no pong at all."""
        now = time.monotonic()
        rate = self.max_pings_per_second
        self.ping_tokens = min(rate, self.ping_tokens + (now - self.ping_refill) * rate)
        self.ping_refill = now
        if self.ping_tokens >= 1:
            self.ping_tokens -= 1
            if not self.pongs_due:
                self.pongs_due = True
                asyncio.get_running_loop().call_soon(self._write_pongs)
            return
        if not self.close_sent:
            metrics.ERRORS.labels("ping_flood").inc()
            self.conn.data_to_send()  # the pongs queued for the rest of the flood: dropped
            self.conn.send_close(POLICY, "Too many pings")
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.close_sent = True
            self.transport.close()

    def _write_pongs(self) -> None:
        self.pongs_due = False
        if not self.close_sent:
            super().handle_ping()  # writes what the state machine queued


class FrameWriter:
    """Writes frames to one connection, honouring the transport's flow control."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    @classmethod
    def of(cls, scope: MutableMapping[str, Any]) -> FrameWriter | None:
        protocol = scope.get("extensions", {}).get(SCOPE_KEY)
        needed = ("transport", "writable", "close_sent", "conn")
        if protocol is None or not all(hasattr(protocol, a) for a in needed) or protocol.conn.extensions:
            return None
        if not isinstance(protocol.transport, HoldingTransport):
            return None
        return cls(protocol)

    def ready(self) -> bool:
        """Whether a write now goes straight out (the transport is not full or closing)."""
        protocol = self.protocol
        return protocol.writable.is_set() and not protocol.close_sent and not protocol.transport.is_closing()

    def write_now(self, frames: list[bytes]) -> None:
        """Write frames at once (call only when :meth:`ready`)."""
        self.protocol.transport.raw.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def write(self, frames: list[bytes]) -> None:
        await self._drained()
        self.write_now(frames)

    async def write_blob(self, blob: Blob) -> None:
        """Write a big message piece by piece, letting the transport drain and the event
        loop run in between. Every session writing a Blob takes turns, one piece at a
        time (one lane per event loop): 100 clients joining l4Book at once cost the loop
        one 256 kB copy per turn, not a hundred. The protocol's own frames wait meanwhile."""
        transport = self.protocol.transport
        bulk = _bulk_lane()
        transport.hold()
        try:
            for chunk in blob.chunks():
                await self._drained()
                async with bulk:
                    if self.protocol.close_sent or transport.is_closing():
                        raise ConnectionError("connection closing")
                    transport.raw.write(chunk)
                await asyncio.sleep(0)
        finally:
            transport.release()

    def abort(self) -> None:
        """Drop the connection now, with whatever is queued for it (a client cut off as too slow)."""
        self.protocol.transport.raw.abort()

    async def _drained(self) -> None:
        protocol = self.protocol
        if not protocol.writable.is_set():
            await protocol.writable.wait()  # the client reads slower than we write
        if protocol.close_sent or protocol.transport.is_closing():
            raise ConnectionError("connection closing")

"""Pre-built WebSocket frames written straight to the connection.

Going through ASGI costs a few µs per frame and per client (Starlette's
wrapper, uvicorn's send, websockets building the frame). A feed message goes to
many clients, so the gateway builds its text frame once (``Text.frame``) and a
session writes all its pending frames with one ``transport.write``.

``FrameProtocol`` is uvicorn's websockets sans-I/O protocol plus one line: it
puts itself into the ASGI scope, so the session can reach the transport. Only
connections without a negotiated extension (permessage-deflate compresses per
connection) take this path; the handshake, pings, reading and closing stay
uvicorn's. Should uvicorn's internals change, ``FrameWriter.of`` returns None
and sessions fall back to ASGI sends.
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

SCOPE_KEY = "hlbook.frames"


class Text(str):
    """A message's JSON text; its WebSocket text frame is built on first use, once."""

    _frame: bytes | None = None

    def frame(self) -> bytes:
        frame = self._frame
        if frame is None:
            frame = self._frame = text_frame(self)
        return frame


def text_frame(text: str) -> bytes:
    """A final, unmasked text frame (server to client)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 1 << 16:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def frame_of(text: str) -> bytes:
    return text.frame() if isinstance(text, Text) else text_frame(text)


class FrameProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][SCOPE_KEY] = self


class FrameWriter:
    """Writes frames to one connection, honouring the transport's flow control."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    @classmethod
    def of(cls, scope: dict[str, Any]) -> FrameWriter | None:
        protocol = scope.get("extensions", {}).get(SCOPE_KEY)
        needed = ("transport", "writable", "close_sent", "conn")
        if protocol is None or not all(hasattr(protocol, a) for a in needed) or protocol.conn.extensions:
            return None
        return cls(protocol)

    async def write(self, frames: list[bytes]) -> None:
        protocol = self.protocol
        if not protocol.writable.is_set():
            await protocol.writable.wait()  # the client reads slower than we write
        if protocol.close_sent or protocol.transport.is_closing():
            raise ConnectionError("connection closing")
        protocol.transport.write(b"".join(frames))

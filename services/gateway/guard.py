"""Connection limits that hold from the TCP accept on, before any request is read.

uvicorn reads a request's headers with no deadline and counts nothing per
address: a client sending headers a byte at a time (slowloris), or a thousand
such sockets, would hold file descriptors forever. ``GuardedHttp`` (uvicorn's
httptools protocol) counts every connection of an address from its accept to
its close (also after a WebSocket upgrade: ``frames.FrameProtocol`` releases
it), answers ``429`` and closes past ``max_per_ip``, and drops a connection
whose request headers are not complete ``header_timeout`` seconds after the
request began.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from hlbook.services.gateway import metrics

log = logging.getLogger(__name__)


class Limits:
    """Per-address connection counts (one per gateway process)."""

    def __init__(self, max_per_ip: int = 100, header_timeout: float = 10.0) -> None:
        self.max_per_ip = max_per_ip
        self.header_timeout = header_timeout
        self.per_ip: Counter[str] = Counter()
        self.owners: dict[int, str] = {}  # id(transport) -> its address

    def admit(self, ip: str, transport: Any) -> bool:
        if self.per_ip[ip] >= self.max_per_ip:
            return False
        self.per_ip[ip] += 1
        self.owners[id(transport)] = ip
        return True

    def release(self, transport: Any) -> None:
        ip = self.owners.pop(id(transport), None)
        if ip is not None:
            self.per_ip[ip] -= 1
            if not self.per_ip[ip]:
                del self.per_ip[ip]


limits = Limits()


def release(transport: Any) -> None:
    limits.release(transport)


REFUSED_LINGER = 1.0  # seconds a refused connection may stay to read its 429
TOO_MANY = b"Too many connections from this address"
REFUSAL = (b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain\r\nconnection: close\r\n"
           b"content-length: %d\r\n\r\n%s" % (len(TOO_MANY), TOO_MANY))


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a per-address cap from the accept and a header deadline."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.header_timer: Any = None
        self.refused = False
        ip = self.client[0] if self.client else "?"
        if not limits.admit(ip, transport):
            # answer at once and stop writing; what the client sends is discarded, so it reads
            # the 429 instead of a reset; it has REFUSED_LINGER seconds to go
            metrics.REFUSED.labels("too_many_connections").inc()
            self.refused = True
            transport.write(REFUSAL)
            if transport.can_write_eof():
                transport.write_eof()
            self.header_timer = self.loop.call_later(REFUSED_LINGER, transport.abort)
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.refused:
            super().data_received(data)

    def eof_received(self) -> None:
        if self.refused:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        limits.release(self.transport)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # also the next request of a kept-alive connection

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self.header_timer = self.loop.call_later(limits.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _too_slow(self) -> None:
        self.header_timer = None
        metrics.REFUSED.labels("header_timeout").inc()
        log.info("%s: request headers not complete after %.0f s: connection dropped", self.client, limits.header_timeout)
        self.transport.abort()

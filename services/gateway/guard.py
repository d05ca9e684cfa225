"""Connection limits that hold from the TCP accept on, before any request is read.

uvicorn reads a request's headers with no deadline and counts nothing per
address: a client sending headers a byte at a time (slowloris), or a thousand
such sockets, would hold file descriptors forever. ``GuardedHttp`` (uvicorn's
httptools protocol) counts every connection of an address from its accept to
its close (also after a WebSocket upgrade: ``frames.FrameProtocol`` releases
it), answers ``429`` and closes past ``max_per_ip``, and drops a connection
whose request headers are not complete ``header_timeout`` seconds after the
request began.

Request heads are bounded too, at a fixed cost whatever is sent: a target over
``MAX_URL`` bytes is answered ``414``, more than ``MAX_HEADERS`` header fields or
a head (request line and headers) over ``MAX_HEAD`` bytes ``431``, and the
connection is closed. Without this uvicorn (and httptools beneath it) grows the
URL and each header by concatenation, so one client sending a 100 MB URL held a
core and gigabytes until the header deadline.
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


MAX_URL = 8 * 1024  # bytes of request target (the public API's paths are a few bytes)
MAX_HEADERS = 100  # header fields in one request
MAX_HEAD = 64 * 1024  # bytes from a request's first byte to its blank line


class HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head already answered."""


def _answer(status: bytes, text: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: text/plain\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s"
            % (status, len(text), text))


URI_TOO_LONG = _answer(b"414 URI Too Long", b"Request target longer than %d bytes" % MAX_URL)
HEAD_TOO_LARGE = _answer(b"431 Request Header Fields Too Large",
                         b"Request head over %d bytes or %d header fields" % (MAX_HEAD, MAX_HEADERS))
REFUSED_LINGER = 1.0  # seconds a refused connection may stay to read its 429
TOO_MANY = b"Too many connections from this address"
REFUSAL = _answer(b"429 Too Many Requests", TOO_MANY)


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a per-address cap from the accept, a header deadline and
    bounded request heads."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.header_timer: Any = None
        self.refused = False
        self.in_head = False  # a request has begun and its headers are not complete
        self.head_bytes = 0  # bytes received since it began (whole reads: bounded by one read)
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
        if self.refused:
            return
        super().data_received(data)
        if self.in_head and not self.refused:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._refuse_head(HEAD_TOO_LARGE, "head_too_large")

    def send_400_response(self, msg: str) -> None:
        if not self.refused:  # not for a head this class already answered (HeadRefused)
            super().send_400_response(msg)

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > MAX_URL:
            self._refuse_head(URI_TOO_LONG, "uri_too_long")
            raise HeadRefused
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= MAX_HEADERS:
            self._refuse_head(HEAD_TOO_LARGE, "head_too_large")
            raise HeadRefused
        super().on_header(name, value)

    def _refuse_head(self, answer: bytes, reason: str) -> None:
        """Answer a head too large, discard the rest, close once written."""
        self.refused = True
        self.in_head = False
        self._disarm()
        metrics.REFUSED.labels(reason).inc()
        log.info("%s: request refused (%s)", self.client, reason)
        self.transport.write(answer)
        self.transport.close()

    def eof_received(self) -> None:
        if self.refused:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        limits.release(self.transport)
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_bytes = 0
        self._arm()  # also the next request of a kept-alive connection

    def on_headers_complete(self) -> None:
        self.in_head = False
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


class AddressBudget:
    """What one address holds across all its connections: subscriptions, and the users its
    user feeds follow (so that one address cannot fill the gateway-wide cap of followed users,
    or multiply its cost over many connections, locking others out)."""

    def __init__(self) -> None:
        self.subscriptions = 0
        self.users: dict[str, int] = {}  # user -> subscriptions of this address following them

    def add(self, user: str | None) -> None:
        self.subscriptions += 1
        if user is not None:
            self.users[user] = self.users.get(user, 0) + 1

    def remove(self, user: str | None) -> None:
        self.subscriptions -= 1
        if user is not None:
            left = self.users.pop(user, 1) - 1
            if left:
                self.users[user] = left

    def __bool__(self) -> bool:
        return self.subscriptions > 0

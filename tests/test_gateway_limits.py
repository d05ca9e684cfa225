"""Gateway limits that hold against hostile clients, on a real gateway process (a
scripted shard behind it): slow headers and too many connections per address from
the TCP accept on, bodies too large, absurd JSON, ping floods, clients that stop
reading, Origins, the debug view, and uvicorn's own frames (pongs) never landing
inside a big message being written."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import metric
from pipeline import get_from, post_info
from scripted import COIN, ScriptedShard, scripted_gateway

BIG_LEVELS = [[{"user": "0x" + "cd" * 20, "coin": COIN, "side": "B", "limitPx": f"{100000 - i}.0", "sz": "1.0", "oid": i,
                "pad": "x" * 200} for i in range(20_000)], []]  # ~5 MB of JSON: a snapshot written in ~20 pieces


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[ScriptedShard, int]]:
    with scripted_gateway(tmp_path, "--max-connections-per-ip", "20", "--header-timeout", "1", "--queue-size", "20",
                          "--allowed-origins", "https://ok.example") as running:
        yield running


class RawClient:
    """A WebSocket client on a plain socket, to stop reading and to send control frames at will."""

    def __init__(self, port: int, source: str = "127.0.0.1", rcvbuf: int | None = None, origin: str | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.bind((source, 0))
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        extra = f"Origin: {origin}\r\n" if origin else ""
        self.sock.sendall(f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n".encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        self.status = int(self.buf.split(b" ", 2)[1])
        self.buf = self.buf.split(b"\r\n\r\n", 1)[1]

    def send(self, payload: bytes, opcode: int = 1) -> None:
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
        self.sock.sendall(head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload)))

    def frames(self, timeout: float = 10) -> Iterator[tuple[int, bytes]]:
        """(opcode, payload) of the frames received, in order, until the connection ends."""
        self.sock.settimeout(timeout)
        while True:
            while len(self.buf) >= 2:
                n, head = self.buf[1] & 0x7F, 2
                if n == 126:
                    n, head = struct.unpack("!H", self.buf[2:4])[0], 4
                elif n == 127:
                    n, head = struct.unpack("!Q", self.buf[2:10])[0], 10
                if len(self.buf) < head + n:
                    break
                yield self.buf[0] & 0x0F, self.buf[head : head + n]
                self.buf = self.buf[head + n :]
            try:
                data = self.sock.recv(1 << 20)
            except (ConnectionResetError, TimeoutError):
                return
            if not data:
                return
            self.buf += data


def test_slow_headers_and_too_many_connections_from_one_address(gateway: tuple[ScriptedShard, int]) -> None:
    shard, port = gateway
    slow = []
    for _ in range(30):  # headers a byte at a time: never complete
        s = socket.socket()
        s.bind(("127.0.0.3", 0))
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        slow.append(s)
    time.sleep(0.3)
    refused = []
    for s in slow:  # the 21st and later: answered 429 at once, not held
        s.settimeout(0.05)
        try:
            if s.recv(100).startswith(b"HTTP/1.1 429"):
                refused.append(s)
        except TimeoutError:
            pass
    assert len(refused) == 10
    status, _ = post_info(f"http://127.0.0.1:{port}", {"type": "allMids"})  # another address is served meanwhile
    assert status == 200
    time.sleep(1.5)  # the header deadline passes: the 20 held ones are dropped
    for s in slow:
        if s in refused:
            continue
        s.settimeout(2)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s.close()
    assert metric(port, "hlbook_gateway_refused_total", reason="header_timeout") == 20
    assert metric(port, "hlbook_gateway_refused_total", reason="too_many_connections") == 10
    assert get_from("127.0.0.3", f"http://127.0.0.1:{port}/health")[0] == 200  # the address has its budget back


def send_head(port: int, parts: Iterator[bytes]) -> bytes:
    """Send a request head piece by piece, as far as the gateway reads it; what it answered."""
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    try:
        for part in parts:
            s.sendall(part)
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused and closed before all was sent: the answer is still there to read
    answer = b""
    try:
        while chunk := s.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    s.close()
    return answer


def test_request_heads_are_bounded(gateway: tuple[ScriptedShard, int]) -> None:
    """A huge target is 414, a huge header or thousands of headers 431, refused as soon as the
    bound is passed (the rest is never parsed), and the gateway serves others meanwhile."""
    _, port = gateway

    def long_url() -> Iterator[bytes]:
        yield b"GET /"
        for _ in range(1000):  # 64 MB if it were all read
            yield b"a" * 65536

    def big_header() -> Iterator[bytes]:
        yield b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
        for _ in range(1000):
            yield b"b" * 65536

    def many_headers() -> Iterator[bytes]:
        yield b"GET /health HTTP/1.1\r\nHost: x\r\n"
        for i in range(1000):
            yield b"".join(b"X-%d-%d: 1\r\n" % (i, j) for j in range(100))

    started = time.monotonic()
    assert send_head(port, long_url()).startswith(b"HTTP/1.1 414 ")
    assert send_head(port, big_header()).startswith(b"HTTP/1.1 431 ")
    assert send_head(port, many_headers()).startswith(b"HTTP/1.1 431 ")
    assert time.monotonic() - started < 5  # refused at the bound, not after reading it all
    fine = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 500) for i in range(90))
    assert send_head(port, iter([fine + b"Connection: close\r\n\r\n"])).startswith(b"HTTP/1.1 200 ")
    assert metric(port, "hlbook_gateway_refused_total", reason="uri_too_long") == 1
    assert metric(port, "hlbook_gateway_refused_total", reason="head_too_large") == 2
    assert post_info(f"http://127.0.0.1:{port}", {"type": "allMids"})[0] == 200


def test_every_bad_request_gets_a_4xx_and_every_post_an_answer(gateway: tuple[ScriptedShard, int]) -> None:
    _, port = gateway
    base = f"http://127.0.0.1:{port}"
    assert post_info(base, {"type": "allMids", "pad": "x" * 100_000})[0] == 413
    deep = "[" * 20_000 + "]" * 20_000  # 40 kB: under the body limit, far deeper than any parser recurses
    request = urllib.request.Request(f"{base}/info", data=deep.encode(), method="POST")
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(request, timeout=10)
    assert bad.value.code == 400
    assert post_info(base, {"type": "orderStatus", "user": "0x" + "00" * 20, "oid": 2**64})[0] == 422
    assert post_info(base, {"type": "nope"})[0] == 422  # as the public API: 422 for a body that fits no request type
    assert post_info(base, {"type": "clearinghouseState", "user": "0x" + "00" * 20})[0] == 501  # needs a node; none configured

    async def run() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
            await ws.send(deep)
            assert json.loads(await ws.recv())["channel"] == "error"
            for n, payload in enumerate([{"type": "orderStatus", "user": "0x" + "00" * 20, "oid": 2**64}, "not a dict",
                                         {"type": "l2Book", "coin": 5}]):
                await ws.send(json.dumps({"method": "post", "id": n, "request": {"type": "info", "payload": payload}}))
                answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert answer["channel"] == "post" and answer["data"]["id"] == n
                assert answer["data"]["response"]["type"] == "error"

    asyncio.run(run())


def test_a_ping_flood_is_cut_off_and_others_keep_their_pongs(gateway: tuple[ScriptedShard, int]) -> None:
    _, port = gateway
    flood = RawClient(port)
    try:
        for _ in range(200):
            flood.send(b"p", opcode=9)
    except (ConnectionResetError, BrokenPipeError):
        pass  # cut off before the flood was all sent
    frames = list(flood.frames())
    closes = [payload for opcode, payload in frames if opcode == 8]
    assert closes and struct.unpack("!H", closes[0][:2])[0] == 1008 and b"Too many pings" in closes[0]
    assert sum(1 for opcode, _ in frames if opcode == 10) < 100  # answered until the budget (10/s) ran out, then closed

    async def polite() -> None:
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
            for _ in range(3):
                await asyncio.wait_for(await ws.ping(), 2)
                await asyncio.sleep(0.2)

    asyncio.run(polite())
    assert metric(port, "hlbook_gateway_errors_total", reason="ping_flood") == 1


def l4_client_served(shard: ScriptedShard, port: int, levels: list[Any], rcvbuf: int) -> RawClient:
    """A raw client subscribed to l4Book, whose snapshot the scripted shard answers with ``levels``."""
    client = RawClient(port, rcvbuf=rcvbuf)
    client.send(json.dumps({"method": "subscribe", "subscription": {"type": "l4Book", "coin": COIN}}).encode())
    shard.await_subscription(b"L4|" + COIN.encode() + b"|")
    shard.sync()
    envelope, _ = shard.query()
    shard.answer_l4(envelope, shard.height, levels)
    return client


def test_pongs_wait_for_the_big_message_being_written(gateway: tuple[ScriptedShard, int]) -> None:
    """A client pings while its l4Book snapshot (5 MB) is being written: the pongs follow
    the snapshot's frame, they are not written into it."""
    shard, port = gateway
    client = l4_client_served(shard, port, BIG_LEVELS, rcvbuf=64 << 10)
    time.sleep(0.5)  # the gateway fills this client's socket and waits for it to drain
    for _ in range(3):
        client.send(b"hello", opcode=9)
    time.sleep(0.3)
    received = []
    for opcode, payload in client.frames(timeout=3):
        received.append((opcode, payload))
        if len([1 for o, _ in received if o == 10]) == 3:
            break
    texts = [json.loads(p) for o, p in received if o == 1]
    snapshot = next(t["data"]["Snapshot"] for t in texts if t["channel"] == "l4Book")
    assert snapshot["levels"] == BIG_LEVELS
    assert [p for o, p in received if o == 10] == [b"hello"] * 3
    first_pong = next(i for i, (o, _) in enumerate(received) if o == 10)
    snapshot_at = next(i for i, (o, p) in enumerate(received) if o == 1 and b'"Snapshot"' in p[:60])
    assert first_pong > snapshot_at


def test_a_client_that_stops_reading_is_dropped_with_what_was_queued(gateway: tuple[ScriptedShard, int]) -> None:
    shard, port = gateway
    huge = [BIG_LEVELS[0] * 4, []]  # ~23 MB, like BTC's: more than the kernels' buffers hold
    stuck = l4_client_served(shard, port, huge, rcvbuf=32 << 10)
    time.sleep(0.3)
    for _ in range(40):  # more than --queue-size (20) updates pile up behind the snapshot
        shard.block(change=True)
    deadline = time.monotonic() + 10
    while metric(port, "hlbook_gateway_closed_total", reason="slow_client") < 1:
        assert time.monotonic() < deadline, "the stuck client was not cut off"
        time.sleep(0.1)
    stuck.sock.settimeout(5)
    received = len(stuck.buf)
    try:
        while data := stuck.sock.recv(1 << 20):
            received += len(data)
    except ConnectionResetError:
        pass
    # the connection ended with what the kernels held: the rest of the 5 MB snapshot and the
    # updates queued behind it were dropped with it, not kept for a client that does not read
    assert received < len(json.dumps(huge, separators=(",", ":"))) // 2


def test_origins_and_the_debug_view(gateway: tuple[ScriptedShard, int]) -> None:
    _, port = gateway
    assert RawClient(port, origin="https://evil.example").status == 403
    assert RawClient(port, origin="https://ok.example").status == 101
    assert RawClient(port).status == 101  # programs send no Origin
    assert get_from("127.0.0.2", f"http://127.0.0.1:{port}/debug/connections")[0] == 200  # loopback


def test_the_debug_view_answers_this_host_only_without_a_token(tmp_path: Path) -> None:
    """Every client's address and followed users: not for other hosts unless --token is set
    (the app called directly, as from 10.0.0.5)."""
    from hlbook.services.gateway.app import GatewayConfig, create_app

    async def get(app: Any, path: str, query: bytes = b"") -> int:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": path, "raw_path": path.encode(), "query_string": query,
                 "headers": [], "client": ("10.0.0.5", 40000), "server": ("127.0.0.1", 8000), "scheme": "http",
                 "http_version": "1.1", "root_path": ""}
        await app(scope, receive, send)
        return next(m["status"] for m in sent if m["type"] == "http.response.start")

    cfg = GatewayConfig(shards=1, ingest_pub=f"ipc://{tmp_path}/i", ingest_replay=f"ipc://{tmp_path}/r",
                        book_pubs=[f"ipc://{tmp_path}/p"], book_queries=[f"ipc://{tmp_path}/q"])
    assert asyncio.run(get(create_app(cfg), "/debug/connections")) == 403
    with_token = create_app(GatewayConfig(**{**cfg.__dict__, "token": "secret"}))
    assert asyncio.run(get(with_token, "/debug/connections", b"token=secret")) == 200
    assert asyncio.run(get(with_token, "/debug/connections")) == 401


def test_one_address_holds_its_share_of_subscriptions_and_followed_users(tmp_path: Path) -> None:
    """Budgets per address across all its connections: one address cannot follow every user the
    gateway can follow (locking others out of user feeds) nor pile up subscriptions over many
    connections; another address is served as before; a budget freed is usable again."""
    flags = ("--max-followed-users-per-ip", "5", "--max-subscriptions-per-ip", "8", "--max-followed-users", "8")
    with scripted_gateway(tmp_path, *flags) as (_, port):
        url = f"ws://127.0.0.1:{port}/ws"

        def follow(user: int) -> dict[str, Any]:
            return {"method": "subscribe", "subscription": {"type": "orderUpdates", "user": f"0x{user:040x}"}}

        async def answer(ws: Any, request: dict[str, Any]) -> dict[str, Any]:
            await ws.send(json.dumps(request))
            return json.loads(await asyncio.wait_for(ws.recv(), 5))

        async def run() -> None:
            greedy = [await websockets.connect(url) for _ in range(3)]  # one address, three connections
            for user in range(5):
                assert (await answer(greedy[user % 3], follow(user)))["channel"] == "subscriptionResponse"
            refused = await answer(greedy[2], follow(5))
            assert refused == {"channel": "error", "data": "Cannot follow more than 5 users from one address."}
            assert (await answer(greedy[1], follow(0)))["channel"] == "subscriptionResponse"  # a user it follows: no new one
            for kind in ("trades", "bbo"):  # 8 subscriptions in all now
                sub = {"method": "subscribe", "subscription": {"type": kind, "coin": COIN}}
                assert (await answer(greedy[1], sub))["channel"] == "subscriptionResponse"
            over = await answer(greedy[2], {"method": "subscribe", "subscription": {"type": "l2Book", "coin": COIN}})
            assert over == {"channel": "error", "data": "Cannot subscribe to more than 8 channels from one address."}

            other = await websockets.connect(url, local_addr=("127.0.0.2", 0))  # another address: its own budget
            for user in range(5, 8):  # the gateway-wide cap (8) still has room: the greedy one did not take it
                assert (await answer(other, follow(user)))["channel"] == "subscriptionResponse"
            await greedy[0].close()  # closing frees what that connection held (users 0 and 3; 0 is still followed on another)
            await asyncio.sleep(0.3)
            assert (await answer(greedy[2], follow(3)))["channel"] == "subscriptionResponse"
            for ws in [*greedy, other]:
                await ws.close()

        asyncio.run(run())

"""Gateway benchmark: WebSocket fan-out at mainnet rate.

The bench plays the upstream processes and the clients around one real
gateway process (``hlbook gateway``):

- a publisher process binds, on ipc endpoints in a temp dir, what one book
  shard binds (XPUB ``book-0-pub``: ``L2|<coin>|-|-|20|`` L2Book, the 20
  levels a side clients get, rendered as a shard renders them, ``BBO|<coin>|`` Bbo, ``S|0|`` ShardBlock every
  block with every coin ``live`` and its mid; ROUTER ``book-0-query``, answered
  like services/book/queries.py: ``coins`` is served, other ops get
  ``ok: false`` — the measured path sends none) and what ingest binds (XPUB
  ``ingest``: ``T|<coin>|`` Trades). Every message is a ``hlbook.common.wire``
  Struct with a valid ``prev`` chain. Each block (``--blocks-per-sec``, 15 =
  mainnet) changes the L2 of every coin, its BBO with probability
  ``--bbo-prob`` and has 1-3 trades of it with probability ``--trade-prob``.
- ``--client-procs`` processes each hold their share of ``--connections``
  WebSocket connections (a minimal asyncio client that parses frames itself,
  so that the clients cost as little CPU as possible: this machine's cores are
  shared by the gateway, the clients and the publisher). Every connection
  subscribes to l2Book + trades + bbo of the same ``--coins`` coins and does
  not negotiate compression (``--deflate`` makes it offer permessage-deflate,
  as browsers do).

**In this bench the ``time`` field of every message (L2Book, Bbo, each
Trade, ShardBlock) carries the publish instant in epoch milliseconds, not a
block time**: the publisher waits for the start of a millisecond, stamps every
message of the block with it and publishes them all at once (the spread, from
the stamp to the last send of the block, is printed: it bounds the error of
the stamp; typically < 0.5 ms). The gateway copies ``time`` into the data of
l2Book/bbo/trades and the client computes receipt - publish (same machine,
same clock), in µs. The receipt instant is taken once per ``data_received``
call (all frames of one read share it). Milliseconds, not µs, because the
gateway interprets trade times (candles).

After ``--warmup`` seconds the bench counts for ``--seconds``: frames
received per channel, the delay of every frame, the gateway's CPU (utime +
stime from /proc/<pid>/stat, % of one core) and RSS, the gateway's own
counters (/metrics: messages queued to clients, conflated), the offered
frames (messages published in the window x subscribed connections) and the
publisher's lateness (is the offered rate really offered?).

The baseline, measured in the same run with the same clients and publisher
schedule: a minimal broadcast server (Starlette + uvicorn with the same
WebSocket implementation, uvloop and per-message-deflate setting as the
gateway) that receives the identical JSON texts, pre-encoded by the publisher,
on a ZeroMQ SUB socket and queues each to every connection (one outbox and one
writer task per connection, nothing else: no msgpack, no subscriptions, no
conflation, no statistics). Printed: gateway / baseline frames/s.

    .venv/bin/python bench/gateway.py [--connections 1000] [--coins 5] [--blocks-per-sec 15]
        [--seconds 20] [--warmup 5] [--client-procs 4] [--no-baseline] [--deflate] [--py-spy SVG]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from array import array
from collections import deque
from pathlib import Path
from typing import Any

CHANNELS = ("l2Book", "bbo", "trades")
COIN_NAMES = ["BTC", "ETH", "SOL", "HYPE", "XRP", "DOGE", "SUI", "AVAX", "LINK", "BNB", "ADA", "LTC", "TRX", "TON", "DOT",
              "NEAR", "APT", "ARB", "OP", "INJ"]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PLACEHOLDER = 9_999_999_999_999  # epoch ms of a message's ``time`` until the block is stamped (same width as now: 13 digits, msgpack uint64)


def level_dicts(levels: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    return [{"px": px, "sz": sz, "n": n} for px, sz, n in levels]


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def now_us() -> int:
    return time.time_ns() // 1000


# ================================================================ publisher (shard + ingest, or baseline texts)


def make_books(coins: list[str], n_levels: int, variants: int, seed: int) -> dict[str, list[tuple[list, list]]]:
    """Per coin, ``variants`` L2 states ((px, sz, n) levels, best first) around a random walk, cycled by blocks."""
    rng = random.Random(seed)
    books: dict[str, list[tuple[list, list]]] = {}
    for k, coin in enumerate(coins):
        mid = [81307.0, 3120.5, 145.25, 38.125, 2.5125][k] if k < 5 else 10.0 + 7 * k
        tick = mid / 50_000
        decimals = max(0, min(6, 5 - len(str(int(mid)))))
        states = []
        for _ in range(variants):
            mid += rng.choice((-2, -1, 0, 1, 2)) * tick
            bids = [(f"{mid - tick * (i + 1):.{decimals}f}", f"{rng.uniform(0.001, 20):.5f}", rng.randint(1, 12)) for i in range(n_levels)]
            asks = [(f"{mid + tick * (i + 1):.{decimals}f}", f"{rng.uniform(0.001, 20):.5f}", rng.randint(1, 12)) for i in range(n_levels)]
            states.append((bids, asks))
        books[coin] = states
    return books


def publisher_main(cfg: dict[str, Any], stop: Any, pipe: Any) -> None:
    """Publish blocks at ``rate`` until ``stop`` is set; send back per-block records."""
    import msgspec
    import zmq

    from hlbook.common import topics, wire

    mode, coins, rate = cfg["mode"], cfg["coins"], cfg["rate"]
    rng = random.Random(cfg["seed"])
    books = make_books(coins, cfg["levels"], 64, cfg["seed"])
    ctx = zmq.Context()
    prev = wire.PrevTracker()
    if mode == "gateway":
        shard = ctx.socket(zmq.XPUB)
        ingest = ctx.socket(zmq.XPUB)
        router = ctx.socket(zmq.ROUTER)
        for sock, endpoint in ((shard, cfg["book_pub"]), (ingest, cfg["ingest_pub"]), (router, cfg["book_query"])):
            sock.setsockopt(zmq.LINGER, 0)
            if sock.socket_type == zmq.XPUB:
                sock.setsockopt(zmq.SNDHWM, 1_000_000)
            sock.bind(endpoint)
        poll_socks = [shard, ingest, router]
    else:
        from hlbook.services.gateway.protocol import message

        shard = ctx.socket(zmq.PUB)
        shard.setsockopt(zmq.LINGER, 0)
        shard.setsockopt(zmq.SNDHWM, 1_000_000)
        shard.bind(cfg["baseline_pub"])
        router = ingest = None
        poll_socks = []
    poller = zmq.Poller()
    for sock in poll_socks:
        poller.register(sock, zmq.POLLIN)
    states = {coin: "live" for coin in coins}
    users = ["0x" + os.urandom(20).hex() for _ in range(50)]
    height = 900_000_000
    tid = 1
    records = array("q")  # per block: scheduled µs, stamp µs, last send µs, n_l2, n_bbo, n_trades (flattened)
    start = time.time() + 0.05
    block = 0
    levels_n = cfg["client_levels"]

    while not stop.is_set():
        # build the block beforehand, its time a placeholder of the same encoded width as the stamp
        height += 1
        block += 1
        out: list[tuple[Any, bytes, bytes]] = []
        n_l2 = n_bbo = n_trades = 0
        mids = {}
        for coin in coins:
            bids, asks = books[coin][block % 64]
            mids[coin] = bids[0][0]
            if rng.random() < cfg["trade_prob"]:
                trades = []
                for _ in range(rng.randint(1, 3)):
                    side = rng.choice("BA")
                    trades.append(wire.Trade(coin, side, (asks if side == "B" else bids)[0][0], f"{rng.uniform(0.001, 2):.5f}",
                                             "0x" + os.urandom(32).hex(), PLACEHOLDER, tid, rng.sample(users, 2)))
                    tid += 1
                topic = topics.trades(coin)
                if mode == "gateway":
                    out.append((ingest, topic, wire.encode(wire.Trades(height, prev.next(topic, height), PLACEHOLDER, coin, trades))))
                else:
                    out.append((shard, b"J|", message("trades", trades).encode()))
                n_trades += 1
            topic = topics.l2(coin, None, None, levels_n)
            data = {"coin": coin, "time": PLACEHOLDER, "levels": [level_dicts(bids[:levels_n]), level_dicts(asks[:levels_n])]}
            if mode == "gateway":  # the shard renders the client's data once per topic
                out.append((shard, topic, wire.encode(wire.L2Book(height, prev.next(topic, height), PLACEHOLDER, coin, json_bytes(data)))))
            else:
                out.append((shard, b"J|", message("l2Book", data).encode()))
            n_l2 += 1
            if rng.random() < cfg["bbo_prob"]:
                topic = topics.bbo(coin)
                bbo = {"coin": coin, "time": PLACEHOLDER, "bbo": level_dicts([bids[0], asks[0]])}
                if mode == "gateway":
                    out.append((shard, topic, wire.encode(wire.Bbo(height, prev.next(topic, height), PLACEHOLDER, coin, json_bytes(bbo)))))
                else:
                    out.append((shard, b"J|", message("bbo", bbo).encode()))
                n_bbo += 1
        if mode == "gateway":
            topic = topics.shard_block(0)
            out.append((shard, topic, wire.encode(wire.ShardBlock(height, prev.next(topic, height), PLACEHOLDER, 0, mids, states))))
        placeholder = wire.encode(PLACEHOLDER) if mode == "gateway" else str(PLACEHOLDER).encode()
        text_placeholder = str(PLACEHOLDER).encode()  # in the rendered data of L2Book and Bbo
        due = start + block / rate
        while True:  # wait for the block's time, answering queries and draining XPUB subscriptions
            wait = due - time.time()
            if wait <= 0.002:
                break
            for sock, _ in poller.poll((wait - 0.002) * 1000) if poll_socks else ():
                frames = sock.recv_multipart()
                if sock is router:
                    query = msgspec.msgpack.decode(frames[-1])
                    if isinstance(query, dict) and query.get("op") == "coins":
                        reply = {"ok": True, "shard": 0, "height": height - 1, "phase": "live", "coins": states}
                    else:
                        reply = {"ok": False, "error": "not served by bench/gateway.py"}
                    router.send_multipart([*frames[:-1], msgspec.msgpack.encode(reply)])
            if not poll_socks:
                time.sleep(max(0.0, due - 0.002 - time.time()))
        # the first millisecond at or after ``due``: every message of the block carries it
        stamp = max(time.time_ns() // 1_000_000 + 1, -(-int(due * 1e6) // 1000))
        stamped = wire.encode(stamp) if mode == "gateway" else str(stamp).encode()
        text_stamped = str(stamp).encode()
        assert len(stamped) == len(placeholder) and len(text_stamped) == len(text_placeholder)
        while time.time_ns() < stamp * 1_000_000:
            pass
        for sock, topic, payload in out:
            sock.send_multipart([topic, payload.replace(placeholder, stamped).replace(text_placeholder, text_stamped)], copy=False)
        records.extend((int(due * 1e6), stamp * 1000, now_us(), n_l2, n_bbo, n_trades))
    pipe.send(records.tobytes())
    for sock in (shard, ingest, router):
        if sock is not None:
            sock.close(0)
    ctx.term()


# ================================================================ baseline server


def baseline_main(port: int, sub_endpoint: str, deflate: bool) -> None:
    """Minimal broadcast server: every text received on ``sub_endpoint`` goes to every connection."""
    import uvicorn
    import zmq
    import zmq.asyncio
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket

    class Conn:
        __slots__ = ("outbox", "wakeup")

        def __init__(self) -> None:
            self.outbox: deque[str] = deque()
            self.wakeup = asyncio.Event()

    conns: set[Conn] = set()

    async def pump() -> None:
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 500_000)
        sub.connect(sub_endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, b"J|")
        while True:
            _, payload = await sub.recv_multipart()
            text = payload.decode()
            for conn in conns:
                conn.outbox.append(text)
                conn.wakeup.set()

    async def serve(ws: WebSocket) -> None:
        await ws.accept()
        conn = Conn()

        async def reader() -> None:
            with contextlib.suppress(Exception):
                while (await ws.receive())["type"] != "websocket.disconnect":
                    pass

        async def writer() -> None:
            with contextlib.suppress(Exception):
                while True:
                    await conn.wakeup.wait()
                    conn.wakeup.clear()
                    while conn.outbox:
                        await ws.send_text(conn.outbox.popleft())

        conns.add(conn)
        tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            conns.discard(conn)
            for task in tasks:
                task.cancel()

    async def ready(request: Any) -> Response:
        return Response('{"ready":true}', media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        task = asyncio.create_task(pump())
        yield
        task.cancel()

    app = Starlette(routes=[WebSocketRoute("/ws", serve), Route("/ready", ready)], lifespan=lifespan)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", ws_max_size=1 << 20, ws_per_message_deflate=deflate,
                log_level="warning", access_log=False, lifespan="on")


# ================================================================ clients


def _mask(payload: bytes) -> bytes:
    """Mask bit, length, key and masked payload of a client frame (the caller adds the FIN/opcode byte)."""
    key = os.urandom(4)
    n = len(payload)
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes((key * (n // 4 + 1))[:n], "big")).to_bytes(n, "big") if n else b""
    if n < 126:
        header = bytes((0x80 | n,))
    elif n < 65536:
        header = bytes((0x80 | 126,)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | 127,)) + n.to_bytes(8, "big")
    return header + key + masked


def text_frame(text: str) -> bytes:
    return b"\x81" + _mask(text.encode())


class Stats:
    def __init__(self, t0: int, t1: int) -> None:
        self.t0, self.t1 = t0, t1
        self.counts = {c: 0 for c in CHANNELS}
        self.delays: list[array] = [array("q") for _ in range((t1 - t0) // 1_000_000 + 2)]  # per second of the window
        self.bytes = 0
        self.before = 0  # frames before the window (warm-up)
        self.after = 0


CHANNEL_AT = {ord("l"): "l2Book", ord("b"): "bbo", ord("t"): "trades"}
PREFIX = b'{"channel":"'


class Client(asyncio.Protocol):
    """One WebSocket connection: handshake, subscriptions, frame parsing, delay of every feed frame."""

    def __init__(self, proc: ClientProc, subscribe: list[bytes], deflate: bool) -> None:
        self.proc = proc
        self.subscribe = subscribe
        self.deflate = deflate
        self.inflate: Any = None
        self.no_takeover = False
        self.buf = bytearray()
        self.open = False
        self.acks = 0
        self.errors: list[str] = []
        self.transport: Any = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        ext = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if self.deflate else ""
        transport.write((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proc.lost += 1
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed during handshake: {exc}"))

    def data_received(self, data: bytes) -> None:
        received = now_us()
        buf = self.buf
        buf += data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            if " 101 " not in head.split("\r\n", 1)[0]:
                self.done.set_exception(ConnectionError(head.split("\r\n", 1)[0]))
                self.transport.close()
                return
            if "permessage-deflate" in head:
                self.inflate = zlib.decompressobj(-15)
                self.no_takeover = "server_no_context_takeover" in head
            self.open = True
            self.transport.write(b"".join(self.subscribe))
            if self.proc.wait_acks == 0:
                self.done.set_result(None)
        stats = self.proc.stats
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1] & 0x7F
            if b1 < 126:
                start, n = pos + 2, b1
            elif b1 == 126:
                if size - pos < 4:
                    break
                start, n = pos + 4, int.from_bytes(buf[pos + 2 : pos + 4], "big")
            else:
                if size - pos < 10:
                    break
                start, n = pos + 10, int.from_bytes(buf[pos + 2 : pos + 10], "big")
            end = start + n
            if end > size:
                break
            opcode = b0 & 0x0F
            pos = end
            if opcode == 1 or opcode == 0:
                if b0 & 0x40:  # compressed (permessage-deflate); the server sends unfragmented frames
                    if self.no_takeover:
                        self.inflate = zlib.decompressobj(-15)
                    frame = self.inflate.decompress(bytes(buf[start:end]) + b"\x00\x00\xff\xff")
                    s, e = 0, len(frame)
                else:
                    frame, s, e = buf, start, end
                channel = CHANNEL_AT.get(frame[s + 12]) if frame.startswith(PREFIX, s) else None
                if channel is None:
                    if frame.startswith(b'{"channel":"subscriptionResponse"', s):
                        self.acks += 1
                        if self.acks == self.proc.wait_acks and not self.done.done():
                            self.done.set_result(None)
                    elif frame.startswith(b'{"channel":"error"', s):
                        self.errors.append(bytes(frame[s:e][:300]).decode(errors="replace"))
                    continue
                if stats is None:
                    continue
                if received < stats.t0:
                    stats.before += 1
                    continue
                if received >= stats.t1:
                    stats.after += 1
                    continue
                stats.counts[channel] += 1
                stats.bytes += e - s
                i = frame.find(b'"time":', s, e) + 7
                sent = int(frame[i : frame.find(b",", i)])
                stats.delays[(received - stats.t0) // 1_000_000].append(received - sent * 1000)
            elif opcode == 9:  # ping -> pong with the same payload
                self.transport.write(b"\x8a" + _mask(bytes(buf[start:end])))
            elif opcode == 8:
                self.errors.append(f"close frame {bytes(buf[start:end])[:120]!r}")
        del buf[:pos]


class ClientProc:
    def __init__(self, wait_acks: int) -> None:
        self.wait_acks = wait_acks
        self.stats: Stats | None = None
        self.lost = 0


async def client_async(cfg: dict[str, Any], pipe: Any) -> None:
    loop = asyncio.get_running_loop()
    proc = ClientProc(cfg["wait_acks"])
    subscribe = [text_frame(json.dumps({"method": "subscribe", "subscription": sub})) for sub in cfg["subs"]]
    clients: list[Client] = []
    gate = asyncio.Semaphore(64)
    failures: list[str] = []

    async def connect() -> None:
        async with gate:
            try:
                _, client = await loop.create_connection(lambda: Client(proc, subscribe, cfg["deflate"]), "127.0.0.1", cfg["port"])
                clients.append(client)
                await asyncio.wait_for(asyncio.shield(client.done), 60)
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                failures.append(repr(exc)[:200])

    started = time.time()
    await asyncio.gather(*(connect() for _ in range(cfg["n"])))
    ready = sum(1 for c in clients if c.done.done() and not c.done.cancelled() and c.done.exception() is None)
    pipe.send(("ready", ready, failures[:5], time.time() - started))

    async def pings() -> None:  # the gateway closes clients silent for 60 s
        while True:
            await asyncio.sleep(20)
            for client in clients:
                if client.open and not client.closed:
                    client.transport.write(text_frame('{"method":"ping"}'))

    ping_task = asyncio.create_task(pings())
    t0, t1 = await loop.run_in_executor(None, pipe.recv)
    proc.stats = Stats(t0, t1)
    cpu0 = os.times()
    await asyncio.sleep(max(0.0, t1 / 1e6 - time.time()) + 0.3)
    cpu1 = os.times()
    ping_task.cancel()
    stats = proc.stats
    errors = [e for c in clients for e in c.errors][:5]
    result = {"counts": stats.counts, "delays": [d.tobytes() for d in stats.delays], "bytes": stats.bytes,
              "before": stats.before, "after": stats.after, "lost": proc.lost, "errors": errors,
              "n_errors": sum(len(c.errors) for c in clients),
              "cpu": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)}
    for client in clients:
        if not client.closed:
            client.transport.abort()
    pipe.send(("result", result))


def client_main(cfg: dict[str, Any], pipe: Any) -> None:
    import uvloop

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(client_async(cfg, pipe))


# ================================================================ orchestration


def raise_nofile(need: int) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, need)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores (/proc/stat)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def gateway_metrics(port: int) -> dict[str, float]:
    """The gateway's fan-out counters (sent by channel, conflated, closed)."""
    try:
        _, text = http_get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("hlbook_gateway_messages_sent_total", "hlbook_gateway_conflated_total", "hlbook_gateway_closed_total",
                            "hlbook_gateway_upstream_gaps_total")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def percentile(sorted_values: Any, q: float) -> float:
    if not len(sorted_values):
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_target(kind: str, args: argparse.Namespace, tmp: Path, coins: list[str]) -> dict[str, Any]:
    """One measured run against the gateway or the baseline server."""
    ctx = mp.get_context("spawn")
    port = free_port()
    endpoints = {"book_pub": f"ipc://{tmp}/book-0-pub", "book_query": f"ipc://{tmp}/book-0-query",
                 "ingest_pub": f"ipc://{tmp}/ingest", "baseline_pub": f"ipc://{tmp}/baseline"}
    pub_cfg = {"mode": kind, "coins": coins, "rate": args.blocks_per_sec, "levels": args.levels, "client_levels": 20,
               "trade_prob": args.trade_prob, "bbo_prob": args.bbo_prob, "seed": args.seed, **endpoints}
    stop = ctx.Event()
    pub_parent, pub_child = ctx.Pipe()
    publisher = ctx.Process(target=publisher_main, args=(pub_cfg, stop, pub_child), daemon=True)
    publisher.start()
    log = open(tmp / f"{kind}.log", "wb")
    if kind == "gateway":
        launcher = [args.gateway_launcher] if args.gateway_launcher else ["-m", "hlbook.cli"]
        cmd = [sys.executable, *launcher, "gateway", "--port", str(port), "--shards", "1",
               "--ingest-pub", endpoints["ingest_pub"], "--book-pub", endpoints["book_pub"],
               "--book-query", endpoints["book_query"], "--max-connections-per-ip", "100000", "--log-level", "WARNING"]
    else:
        cmd = [sys.executable, __file__, "--serve-baseline", str(port), "--baseline-sub", endpoints["baseline_pub"]]
    env = {**os.environ, "HLBOOK_MAX_SUBSCRIPTIONS_PER_IP": "10000000"}  # every bench client comes from 127.0.0.1 (older gateways ignore it)
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    clients: list[Any] = []
    try:
        deadline = time.time() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"{kind} exited with {server.returncode}: {(tmp / f'{kind}.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if http_get(f"http://127.0.0.1:{port}/ready", timeout=2)[0] == 200:
                    break
            if time.time() > deadline:
                raise RuntimeError(f"{kind} not ready in 60 s")
            time.sleep(0.2)
        subs = [{"type": t, "coin": c} for c in coins for t in CHANNELS]
        share = [args.connections // args.client_procs + (i < args.connections % args.client_procs) for i in range(args.client_procs)]
        for n in share:
            parent, child = ctx.Pipe()
            cfg = {"port": port, "n": n, "subs": subs, "wait_acks": len(subs) if kind == "gateway" else 0, "deflate": args.deflate}
            p = ctx.Process(target=client_main, args=(cfg, child), daemon=True)
            p.start()
            clients.append((p, parent))
        connected = 0
        connect_s = 0.0
        failures: list[str] = []
        for p, pipe in clients:
            if not pipe.poll(180):
                raise RuntimeError("a client process did not connect in 180 s")
            _, ok, failed, took = pipe.recv()
            connected += ok
            failures += failed
            connect_s = max(connect_s, took)
        t0 = time.time() + args.warmup
        t1 = t0 + args.seconds
        for _, pipe in clients:
            pipe.send((int(t0 * 1e6), int(t1 * 1e6)))
        time.sleep(max(0.0, t0 - time.time()))
        cpu0, busy0, m0 = proc_cpu(server.pid), machine_busy(), (gateway_metrics(port) if kind == "gateway" else {})
        profiler = None
        if args.py_spy and kind == "gateway":
            spy = Path(sys.executable).with_name("py-spy")
            profiler = subprocess.Popen([str(spy), "record", "-p", str(server.pid), "-d", str(int(args.seconds)), "-r", "200", "--nonblocking",
                                         "-o", args.py_spy, "--format", "raw" if args.py_spy.endswith(".txt") else "flamegraph"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        rss_max = 0.0
        while time.time() < t1:
            rss_max = max(rss_max, proc_rss_mb(server.pid))
            time.sleep(min(0.5, max(0.0, t1 - time.time())))
        cpu1, busy1, m1 = proc_cpu(server.pid), machine_busy(), (gateway_metrics(port) if kind == "gateway" else {})
        rss = proc_rss_mb(server.pid)
        if profiler is not None:
            profiler.wait(60)
        results = []
        for p, pipe in clients:
            if not pipe.poll(120):
                raise RuntimeError("a client process did not report in 120 s")
            results.append(pipe.recv()[1])
            p.join(10)
    finally:
        stop.set()
        for p, _ in clients:
            if p.is_alive():
                p.kill()
        stop_process(server)
        log.close()
    records = array("q")
    if pub_parent.poll(10):
        records.frombytes(pub_parent.recv())
    publisher.join(5)

    # ---- aggregate
    t0_us, t1_us = int(t0 * 1e6), int(t1 * 1e6)
    rows = [records[i : i + 6] for i in range(0, len(records), 6)]
    window = [r for r in rows if t0_us <= r[1] < t1_us]
    offered_msgs = {"l2Book": sum(r[3] for r in window), "bbo": sum(r[4] for r in window), "trades": sum(r[5] for r in window)}
    late = sorted((r[1] - r[0]) / 1000 for r in window)
    spread = sorted((r[2] - r[1]) / 1000 for r in window)
    counts = {c: sum(r["counts"][c] for r in results) for c in CHANNELS}
    n_seconds = len(results[0]["delays"])
    per_second = []
    all_delays = array("q")
    for k in range(n_seconds):
        sec = array("q")
        for r in results:
            sec.frombytes(r["delays"][k])
        all_delays.extend(sec)
        per_second.append(sorted(sec))
    delays = sorted(all_delays)
    sent = {c: m1.get(f'hlbook_gateway_messages_sent_total{{channel="{c}"}}', 0) - m0.get(f'hlbook_gateway_messages_sent_total{{channel="{c}"}}', 0)
            for c in CHANNELS}
    closed = {k: v - m0.get(k, 0) for k, v in m1.items() if k.startswith("hlbook_gateway_closed_total") and v - m0.get(k, 0)}
    return {
        "kind": kind, "connected": connected, "failures": failures, "connect_s": connect_s,
        "seconds": args.seconds, "counts": counts, "frames": sum(counts.values()),
        "offered": {c: offered_msgs[c] * connected for c in CHANNELS}, "blocks": len(window),
        "publish_late_ms": (percentile(late, 0.5), percentile(late, 0.99), late[-1] if late else float("nan")),
        "publish_spread_ms": (percentile(spread, 0.5), spread[-1] if spread else float("nan")),
        "delay_ms": tuple(percentile(delays, q) / 1000 for q in (0.5, 0.99)) + ((delays[-1] / 1000) if delays else float("nan"),),
        "per_second": [(percentile(s, 0.5) / 1000, percentile(s, 0.99) / 1000, len(s)) for s in per_second[: int(args.seconds)]],
        "cpu_pct": 100 * (cpu1 - cpu0) / args.seconds, "rss_mb": rss, "rss_max_mb": rss_max,
        "machine_busy_pct": 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        "client_cpu_pct": 100 * sum(r["cpu"] for r in results) / args.seconds,
        "mbytes": sum(r["bytes"] for r in results) / 1e6,
        "lost": sum(r["lost"] for r in results), "errors": [e for r in results for e in r["errors"]][:3],
        "n_errors": sum(r["n_errors"] for r in results),
        "sent": sent, "conflated": m1.get("hlbook_gateway_conflated_total", 0) - m0.get("hlbook_gateway_conflated_total", 0),
        "closed": closed,
        "gaps": sum(v - m0.get(k, 0) for k, v in m1.items() if k.startswith("hlbook_gateway_upstream_gaps_total")),
    }


def report(r: dict[str, Any]) -> None:
    s = r["seconds"]
    fps = r["frames"] / s
    offered = sum(r["offered"].values())
    print(f"--- {r['kind']}: {r['connected']} connections (connected in {r['connect_s']:.1f} s"
          f"{', failures: ' + '; '.join(r['failures']) if r['failures'] else ''}), {r['blocks']} blocks in {s:g} s "
          f"({r['blocks'] / s:.2f}/s; publisher late p50 {r['publish_late_ms'][0]:.2f} ms, p99 {r['publish_late_ms'][1]:.2f} ms, "
          f"max {r['publish_late_ms'][2]:.2f} ms; stamp to last send of a block p50 {r['publish_spread_ms'][0]:.2f} ms, "
          f"max {r['publish_spread_ms'][1]:.2f} ms)")
    print(f"frames delivered: {fps:,.0f}/s of {offered / s:,.0f}/s offered ({100 * r['frames'] / max(1, offered):.1f} %), "
          f"{r['mbytes'] / s:.1f} MB/s of JSON")
    for c in CHANNELS:
        print(f"  {c:7s} {r['counts'][c] / s:>10,.0f}/s of {r['offered'][c] / s:>10,.0f}/s offered"
              + (f"; gateway queued {r['sent'][c] / s:,.0f}/s" if r["kind"] == "gateway" else ""))
    d = r["delay_ms"]
    print(f"delay publish -> client: p50 {d[0]:.2f} ms, p99 {d[1]:.2f} ms, max {d[2]:.2f} ms")
    print("  by second (p50/p99 ms): " + " ".join(f"{p50:.1f}/{p99:.1f}" for p50, p99, _ in r["per_second"]))
    print(f"server CPU {r['cpu_pct']:.0f} % of a core, RSS {r['rss_mb']:.0f} MB (max {r['rss_max_mb']:.0f} MB); "
          f"clients CPU {r['client_cpu_pct']:.0f} %; machine busy {r['machine_busy_pct']:.0f} % of {os.cpu_count()} cores")
    if r["kind"] == "gateway":
        print(f"gateway: conflated {r['conflated'] / s:,.0f}/s (l2Book/bbo replaced before a slow client got them), "
              f"closed {r['closed'] or 'none'}, upstream gaps {r['gaps']:.0f}")
    if r["lost"] or r["n_errors"]:
        print(f"connections lost during the run: {r['lost']}, error/close frames: {r['n_errors']} {r['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--coins", type=int, default=5, help="coins per connection (all connections: the same coins)")
    parser.add_argument("--blocks-per-sec", type=float, default=15.0)
    parser.add_argument("--seconds", type=float, default=20.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--levels", type=int, default=100, help="levels a side of the books the bench makes (clients get 20)")
    parser.add_argument("--trade-prob", type=float, default=0.8, help="probability that a block has trades of a coin (1-3)")
    parser.add_argument("--bbo-prob", type=float, default=0.7, help="probability that a block changes a coin's BBO")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--baseline-only", action="store_true")
    parser.add_argument("--deflate", action="store_true", help="clients offer permessage-deflate (the servers accept it)")
    parser.add_argument("--py-spy", metavar="FILE", help="profile the gateway during the window (py-spy record; .svg or .txt)")
    parser.add_argument("--gateway-launcher", metavar="SCRIPT", help="run the gateway as `python SCRIPT gateway ...` "
                        "instead of `python -m hlbook.cli gateway ...` (to try a patched gateway)")
    parser.add_argument("--serve-baseline", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-sub", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        baseline_main(args.serve_baseline, args.baseline_sub, True)  # offered like the gateway's default; clients decide
        return
    if args.coins > len(COIN_NAMES):
        parser.error(f"at most {len(COIN_NAMES)} coins")
    soft, hard = raise_nofile(args.connections * 2 + 1000)
    coins = COIN_NAMES[: args.coins]
    per_conn = args.coins * (1 + args.bbo_prob + args.trade_prob) * args.blocks_per_sec
    print(f"gateway bench: {args.connections} connections x (l2Book + trades + bbo) x {args.coins} coins, "
          f"{args.blocks_per_sec:g} blocks/s -> ~{per_conn * args.connections:,.0f} frames/s offered; "
          f"{args.client_procs} client processes; {os.cpu_count()} cores; RLIMIT_NOFILE {soft}/{hard}; "
          f"compression {'permessage-deflate' if args.deflate else 'none'}")
    if soft < args.connections + 500:
        print(f"warning: RLIMIT_NOFILE {soft} may be too low for {args.connections} connections")
    results = {}
    with tempfile.TemporaryDirectory(prefix="hlbook-bench-gw-") as tmp:
        for kind in (["gateway"] if not args.baseline_only else []) + ([] if args.no_baseline else ["baseline"]):
            results[kind] = run_target(kind, args, Path(tmp), coins)
            report(results[kind])
    if "gateway" in results and "baseline" in results:
        g, b = results["gateway"], results["baseline"]
        print(f"ratio gateway / baseline frames/s: {g['frames'] / max(1, b['frames']):.2f} "
              f"({g['frames'] / g['seconds']:,.0f} vs {b['frames'] / b['seconds']:,.0f}); "
              f"server CPU per frame delivered: gateway {1e4 * g['cpu_pct'] / max(1, g['frames'] / g['seconds']):.1f} µs, "
              f"baseline {1e4 * b['cpu_pct'] / max(1, b['frames'] / b['seconds']):.1f} µs")


if __name__ == "__main__":
    main()

"""End-to-end benchmark: a block's lines appended to the node files -> a WebSocket
client receives that block's ``bbo`` / ``l2Book`` / ``trades``, through the real
``hlbook up`` (ingest, book shards, gateway, supervised) on this machine, while
``l4Book`` subscribers come and go.

How it runs (per profile):

1. **Node files, generated beforehand** into a staging directory, with a
   snapshot file for the shards:

   - ``btc``: real mainnet data. The fixture ``tests/data/mainnet_btc_985148181_985148206``
     (BTC, 51,351 resting orders, ~990 statuses of ~470 kB, ~44 diffs and
     ~0.5 fills a block, 14.7 blocks/s) played by ``services/nodesim/replay.py``:
     its 25 blocks as recorded, then backward with every diff inverted, then
     forward again…, so the run can last as long as needed on real line
     sizes, a real 51k-order book and the real status mix.
   - ``mainnet`` / ``3x``: the node simulator's engine and writer
     (``services/nodesim``) over 50 coins, ``--prewarm`` blocks run first (not
     written) so the books have their steady size; ``mainnet`` = 15 blocks/s,
     ``--volume 4`` (~1,130 statuses, 195 diffs, 30 fills a block, ~40 coins
     with diffs, ~20k resting orders), ``3x`` = ``--volume 12``.

   Generating beforehand keeps the generator's CPU off the two cores the
   pipeline is measured on; a real node has its own cores.
2. ``hlbook up --no-simulate --data-dir LIVE --snapshot-file SNAP --shards N``
   starts on an empty ``LIVE`` directory.
3. A **writer** process appends each block's three lines (order statuses, raw
   book diffs, fills, in that order, one ``write`` each, unbuffered) to the
   hourly file paths under ``LIVE``, on the schedule of the blocks'
   ``block_time``. **Append instant of a block** = wall clock right after the
   write of its last line returned: from then on ingest can read the whole block.
4. **Clients**: ``--clients`` WebSocket connections in ``--client-procs``
   processes (a minimal asyncio client that parses frames itself, no
   compression), each subscribed to ``--channels`` of ``--coins-per-client``
   coins (round-robin, so every coin has the same number of subscribers).
   Frames are stamped at receipt and matched to their block by ``time`` (the
   block time in ms, unique per block; a trade's ``time`` too).
   **Latency of a frame** = receipt stamp - append instant of its block.
5. **Phases**, each ``--seconds`` long after ``--warmup``:
   A (baseline: those clients only), B (+ ``--l4-subscribers`` clients on
   ``l4Book`` of the busiest coin, joined at its start, and
   ``--l4-joins-per-sec`` new ``l4Book`` clients a second, each staying
   ``--l4-stay`` s), C (``--l4-storm`` clients join ``l4Book`` within one
   second at its start). Phase A is the baseline the others are compared to,
   measured in the same run. An ``l4Book`` client checks that the first
   ``l4Book`` message is a snapshot and that the ``Updates`` heights follow it
   one by one; **subscribe -> snapshot** = from sending the subscribe to
   receiving the snapshot's last byte (a ~19 MB frame for BTC).
6. A **tap** process subscribes (ZeroMQ SUB, same ipc endpoints) to ingest's
   ``H|`` headers, the shards' ``L2|``, ``BBO|`` and ``S|k|`` messages and
   stamps their arrival: append -> ingest published the block; -> the last
   shard finished it (its messages are published before that). These split
   the latency into ingest, shards, and gateway + client. The tap's
   ``L2|``/``BBO|`` messages also say which blocks changed each coin's book:
   a client's **delivery** of l2Book (bbo) = blocks of the phase whose l2Book
   (bbo) it received / blocks that changed it.
7. Per phase: latency percentiles, delivery (worst client and mean), lag
   (blocks written - lowest shard height, every second), CPU (% of one core,
   ms per block) of every process, RSS; the machine's busy and steal time.

    .venv/bin/python bench/e2e.py [--profile btc|mainnet|3x] [--seconds 20] [--warmup 5]
        [--clients 200] [--client-procs 2] [--channels bbo,l2Book,trades] [--coins-per-client 1]
        [--l4-subscribers 10] [--l4-joins-per-sec 1] [--l4-stay 5] [--l4-storm 100] [--shards 2]
        [--python OTHER/.venv/bin/python]  (run another checkout's hlbook under the same harness)
        [--py-spy DIR]  (py-spy records every hlbook process during phase A: DIR/<process>.txt, and a
                         table per process of where its samples are; profiling costs CPU: measure without it)
        [--py-spy-native]  (C frames too: py-spy then pauses each process at every sample, which
                            delays the pipeline by seconds; read its shares, not its latencies)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
from array import array
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "mainnet_btc_985148181_985148206.tar.gz"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILES = {"btc": (None, None), "mainnet": (15.0, 4.0), "3x": (15.0, 12.0), "full": (12.0, 1.0), "full3x": (12.0, 3.0)}
FULL_PREWARM = 24  # the full profile's books start deep: a few blocks are enough
CHANNEL_IDS = {"bbo": 0, "l2Book": 1, "trades": 2}
PHASES = "ABC"
SO_TIMESTAMPNS = 35  # Linux: receive timestamps (not in Python's socket module)
BIG = 1 << 16  # frames larger than this are counted, not kept, by the clients (l4Book snapshots)
_HEIGHT = re.compile(rb'"block_number":(\d+)')
_L4_HEAD = re.compile(rb'{"channel":"l4Book","data":{"(Snapshot|Updates)":{[^\[]*?"height":(\d+)')


# ================================================================ node files


def generate_sim(stage: Path, snapshot: Path, n_blocks: int, coins: int, seed: int, rate: float, volume: float,
                 lead_s: float, prewarm: int, profile: str = "default") -> tuple[list[int], list[int], list[str]]:
    """Simulator blocks: ``prewarm`` not written (the books fill up), the state as ``snapshot``,
    then ``n_blocks`` into ``stage``, block times starting ``lead_s`` from now."""
    from hlbook.services.nodesim.engine import Simulator
    from hlbook.services.nodesim.info_server import render
    from hlbook.services.nodesim.writer import NodeWriter

    start = datetime.now(timezone.utc) + timedelta(seconds=lead_s - prewarm / rate)
    sim = Simulator(seed=seed, coins=coins, blocks_per_sec=rate, volume=volume, start_time=start, profile=profile)
    for _ in range(prewarm):
        sim.step()
    height, body = sim.snapshot()
    snapshot.write_bytes(render(height, body, True, True))
    heights, times = [], []
    with NodeWriter(stage, ("by-block",), partial_p=0.0, seed=seed) as writer:
        for _ in range(n_blocks):
            block = sim.step()
            writer.write_block(block)
            heights.append(block.height)
            times.append(block.time_ns)
    return heights, times, [c.name for c in sim.coins]


def generate_btc(tmp: Path, stage: Path, snapshot: Path, n_blocks: int, lead_s: float) -> tuple[list[int], list[int], list[str]]:
    """The real BTC fixture played forward and backward (services/nodesim/replay.py)."""
    from hlbook.services.nodesim.replay import Replay, load
    from hlbook.services.nodesim.writer import NodeWriter

    fixture = tmp / "fixture"
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(fixture, filter="data")
    shutil.copy(next(fixture.glob("snapshot_*.json")), snapshot)
    replay = Replay(load(fixture, snapshot), start_ns=time.time_ns() + int(lead_s * 1e9))
    heights, times = [], []
    with NodeWriter(stage, ("by-block",), partial_p=0.0) as writer:
        for block, _ in zip(replay.blocks(), range(n_blocks)):
            writer.write_block(block)
            heights.append(block.height)
            times.append(block.time_ns)
    shutil.rmtree(fixture)
    return heights, times, ["BTC"]


def build_index(stage: Path, heights: list[int]) -> tuple[list[str], list[list[tuple[int, int, int]]]]:
    """Staged files (relative paths) and, per block in order, its lines as (file index, offset, length),
    in stream order (statuses, diffs, fills)."""
    from hlbook.common.models import STREAMS
    from hlbook.common.nodefiles import hour_files

    files: list[str] = []
    where: dict[int, list[tuple[int, int, int]]] = {h: [] for h in heights}
    for stream in STREAMS:
        for path in hour_files(stage, stream, "by-block"):
            files.append(str(path.relative_to(stage)))
            data = path.read_bytes()
            pos = 0
            while pos < len(data):
                end = data.index(b"\n", pos) + 1
                height = int(_HEIGHT.search(data, pos, pos + 200).group(1))
                where[height].append((len(files) - 1, pos, end - pos))
                pos = end
            del data
    index = [where[h] for h in heights]
    assert all(len(lines) == len(STREAMS) for lines in index), "a block without one line per stream"
    return files, index


def verify_files(data_dir: Path, first: int, last: int) -> dict[str, Any]:
    """Read back the node files written: events per block per stream, coins with diffs per block."""
    from hlbook.common.models import STREAMS
    from hlbook.common.nodefiles import hour_files

    per: dict[str, list[int]] = {s: [] for s in STREAMS}
    coins: list[int] = []
    size = 0
    for stream in STREAMS:
        for path in hour_files(data_dir, stream, "by-block"):
            with open(path, "rb") as fh:
                for line in fh:
                    size += len(line)
                    block = orjson.loads(line)
                    if not first <= block["block_number"] <= last:
                        continue
                    per[stream].append(len(block["events"]))
                    if stream == "raw_book_diffs":
                        coins.append(len({e["coin"] for e in block["events"]}))
    n = len(per["order_statuses"])
    return {"blocks": n, "bytes_per_block": size / max(n, 1),
            **{s: (sum(v) / max(len(v), 1), min(v, default=0), max(v, default=0)) for s, v in per.items()},
            "coins_with_diffs": sum(coins) / max(len(coins), 1)}


def writer_main(stage: str, live: str, files: list[str], index: list[list[tuple[int, int, int]]], times: list[int],
                t0: float, stamps: Any, late: Any, written: Any, stop: Any) -> None:
    """Append each block's lines to ``live`` at t0 + (block time - first block time); stamp the end."""
    fds = [os.open(os.path.join(stage, rel), os.O_RDONLY) for rel in files]
    outs: dict[int, Any] = {}
    for i, lines in enumerate(index):
        chunks = [(f, os.pread(fds[f], length, offset)) for f, offset, length in lines]
        due = t0 + (times[i] - times[0]) / 1e9
        while True:
            wait = due - time.time()
            if wait <= 0 or stop.is_set():
                break
            time.sleep(min(wait, 0.05))
        if stop.is_set():
            break
        begin = time.time_ns()
        for f, data in chunks:
            out = outs.get(f)
            if out is None:
                path = os.path.join(live, files[f])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                out = outs[f] = open(path, "ab", buffering=0)
            out.write(data)
        stamps[i] = time.time_ns()
        late[i] = begin - int(due * 1e9)
        written.value = i + 1
    for out in outs.values():
        out.close()


# ================================================================ tap: ingest and shard progress


def tap_main(sockets: str, shards: int, coins: list[str], depth_topics: bool, first: int, n: int, ingest_ns: Any,
             shard_ns: Any, conn: Any, stop: Any) -> None:
    """Stamps ingest's headers and the shards' block-done messages; sends back which blocks
    changed the L2 (as the clients see it: 20 levels) and BBO of each coin the clients
    follow: {(kind, coin): [heights]}. It subscribes to exactly those topics, so that the
    shards compute nothing more for it than for the clients (``depth_topics``: the hlbook
    under test names the depth in L2 topics, ``L2|<coin>|-|-|20|``; older ones did not)."""
    import msgspec
    import zmq

    from hlbook.common import topics

    class Height(msgspec.Struct):
        height: int

    heights = msgspec.msgpack.Decoder(Height)  # the rest of each message is skipped, not built: the tap keeps up
    ctx = zmq.Context()
    poller = zmq.Poller()
    socks = {}
    header = ctx.socket(zmq.SUB)
    header.connect(f"ipc://{sockets}/ingest-pub")
    header.setsockopt(zmq.SUBSCRIBE, topics.HEADER)
    poller.register(header, zmq.POLLIN)
    socks[header] = -1
    for k in range(shards):
        sub = ctx.socket(zmq.SUB)
        sub.connect(f"ipc://{sockets}/book-{k}-pub")
        sub.setsockopt(zmq.SUBSCRIBE, topics.shard_block(k))
        for coin in coins:
            if topics.shard_of(coin, shards) == k:
                sub.setsockopt(zmq.SUBSCRIBE, topics.bbo(coin))
                sub.setsockopt(zmq.SUBSCRIBE, topics.l2(coin) + (b"20|" if depth_topics else b""))
        poller.register(sub, zmq.POLLIN)
        socks[sub] = k
    changed: dict[tuple[int, str], list[int]] = {}
    while not stop.is_set():
        for sock, _ in poller.poll(100):
            while True:
                try:
                    topic, payload = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.time_ns()
                k = socks[sock]
                if k >= 0 and not topic.startswith(topics.SHARD_PREFIX):
                    if topic.startswith(topics.BBO_PREFIX) or topic.startswith(topics.L2_PREFIX):
                        kind = CHANNEL_IDS["bbo" if topic.startswith(topics.BBO_PREFIX) else "l2Book"]
                        changed.setdefault((kind, topics.coin_of(topic)), []).append(heights.decode(payload).height)
                    continue
                i = heights.decode(payload).height - first
                if 0 <= i < n:
                    if k < 0:
                        ingest_ns[i] = ingest_ns[i] or now
                    else:
                        shard_ns[k * n + i] = shard_ns[k * n + i] or now
    conn.send(changed)
    ctx.destroy(linger=0)


# ================================================================ WebSocket clients


def _frame(text: bytes) -> bytes:
    """A masked client text frame."""
    mask = os.urandom(4)
    n = len(text)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(text))
    return head + mask + body


class Client:
    """A WebSocket connection on a plain non-blocking socket that parses frames itself.

    Every read takes the kernel's receive timestamp of the data (``SO_TIMESTAMPNS``: when the
    bytes reached this machine's socket, whatever this busy client process does meanwhile)
    and the instant this process read it. Frames above ``BIG`` bytes are not kept: their first
    bytes go to ``on_big`` when their last byte arrived."""

    def __init__(self, host: str, port: int, subs: list[bytes]) -> None:
        self.host, self.port, self.subs = host, port, subs
        self.buf = bytearray()
        self.upgraded = False
        self.sock: socket.socket | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self.parts: list[bytes] = []
        self.skip = 0  # bytes of a big frame still to come
        self.big_head = b""

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        await loop.sock_connect(sock, (self.host, self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.send(f"GET /ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        assert self.sock is not None
        user_ns = time.time_ns()
        while True:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(1 << 18, 64)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(exc)
                return
            if not data:
                self.close(None)
                return
            kernel_ns = user_ns
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    kernel_ns = sec * 1_000_000_000 + nsec
            self.data_received(data, (kernel_ns, user_ns))

    def close(self, exc: Exception | None = None) -> None:
        if self.sock is not None:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if not self.closed.done():
            self.closed.set_result(exc)

    def send(self, text: bytes) -> None:
        if self.sock is not None:
            self.sock.send(_frame(text))

    def data_received(self, data: bytes, now: tuple[int, int]) -> None:
        if self.skip:
            take = min(self.skip, len(data))
            self.skip -= take
            if len(self.big_head) < 256:
                self.big_head += data[: 256 - len(self.big_head)]
            if not self.skip:
                self.on_big(self.big_head, now)
            data = data[take:]
            if not data:
                return
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                print("handshake refused:", bytes(buf[: buf.find(b"\r\n")]).decode(), file=sys.stderr)
                self.close()
                return
            self.upgraded = True
            del buf[: end + 4]
            self.on_open(now)
        pos, size = 0, len(buf)
        while size - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if n > BIG and size - pos < head + n:  # a big frame: keep its head, count the rest
                self.big_head = bytes(buf[pos + head : pos + head + 256])
                self.skip = n - (size - pos - head)
                pos = size
                break
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            opcode = b0 & 0x0F
            if opcode == 9:  # ping
                if self.sock is not None:
                    self.sock.send(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode == 8:
                self.close()
                return
            if n > BIG:
                self.on_big(payload[:256], now)
                continue
            self.parts.append(payload)
            if b0 & 0x80:
                self.message(b"".join(self.parts), now)
                self.parts = []
        del buf[:pos]

    def on_open(self, now: tuple[int, int]) -> None:
        for sub in self.subs:
            self.send(sub)

    def on_big(self, head: bytes, now: tuple[int, int]) -> None:
        pass

    def message(self, text: bytes, now: tuple[int, int]) -> None:
        pass


class FeedClient(Client):
    """Records (connection, channel, block time, kernel receipt, read) of every bbo / l2Book / trades frame."""

    def __init__(self, host: str, port: int, subs: list[bytes], conn_id: int, rec: array, acked: list[int]) -> None:
        super().__init__(host, port, subs)
        self.conn_id, self.rec, self.acked = conn_id, rec, acked

    def message(self, text: bytes, now: tuple[int, int]) -> None:
        msg = orjson.loads(text)
        channel = CHANNEL_IDS.get(msg.get("channel"))
        if channel is not None:
            data = msg["data"]
            ms = data[0]["time"] if channel == 2 else data["time"]
            self.rec.extend((self.conn_id, channel, ms, *now))
        elif msg.get("channel") == "subscriptionResponse":
            self.acked[0] += 1
        elif msg.get("channel") == "error":
            print("client error:", msg, file=sys.stderr)


def client_main(port: int, gateways: int, plan: list[tuple[int, list[str]]], channels: list[str], conn: Any, stop: Any) -> None:
    """Connection i goes to gateway i % gateways (ports port, port+1, …)."""
    async def run() -> None:
        rec = array("q")
        acked = [0]
        clients = []
        for conn_id, coins in plan:
            subs = [orjson.dumps({"method": "subscribe", "subscription": {"type": ch, "coin": c}}) for c in coins for ch in channels]
            client = FeedClient("127.0.0.1", port + conn_id % gateways, subs, conn_id, rec, acked)
            await client.connect()
            clients.append(client)
        want = sum(len(c) * len(channels) for _, c in plan)
        while acked[0] < want:
            if any(c.closed.done() for c in clients):
                conn.send(("failed", sum(1 for c in clients if c.closed.done())))
                return
            await asyncio.sleep(0.05)
        conn.send(("subscribed", len(clients)))
        await _keep_alive(clients, stop)
        lost = sum(1 for c in clients if c.closed.done())
        for c in clients:
            c.close()
        conn.send(("done", rec.tobytes(), lost))

    asyncio.run(run())


async def _keep_alive(clients: list[Client], stop: Any) -> None:
    """Ping every 20 s (the gateway closes connections silent for 60 s) until ``stop``."""
    last_ping = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.1)
        if time.monotonic() - last_ping > 20:
            last_ping = time.monotonic()
            for c in clients:
                if not c.closed.done():
                    c.send(b'{"method":"ping"}')


class L4Client(Client):
    """One l4Book subscriber: when it subscribed, when its snapshot was complete, whether the
    Updates heights follow the snapshot one by one."""

    def __init__(self, host: str, port: int, coin: str, phase: str) -> None:
        super().__init__(host, port, [orjson.dumps({"method": "subscribe", "subscription": {"type": "l4Book", "coin": coin}})])
        self.phase = phase
        self.subscribed = self.snapshot_at = 0
        self.height = -1
        self.updates = self.broken = self.snapshots = 0

    def on_open(self, now: tuple[int, int]) -> None:
        self.subscribed = time.time_ns()
        super().on_open(now)

    def on_big(self, head: bytes, now: tuple[int, int]) -> None:
        """A frame too big to keep (a snapshot, or the Updates of a busy block): its head says what it is."""
        match = _L4_HEAD.match(head)
        if match is None:
            self.broken += 1
            return
        self.l4(match.group(1), int(match.group(2)), now)

    def message(self, text: bytes, now: tuple[int, int]) -> None:
        match = _L4_HEAD.match(text)
        if match is not None:
            self.l4(match.group(1), int(match.group(2)), now)

    def l4(self, kind: bytes, height: int, now: tuple[int, int]) -> None:
        if kind == b"Snapshot":
            self.snapshots += 1
            self.snapshot_at = self.snapshot_at or now[1]
        else:
            if self.height < 0 or height != self.height + 1:
                self.broken += 1
            self.updates += 1
        self.height = height

    def result(self) -> tuple[Any, ...]:
        return (self.phase, self.subscribed, self.snapshot_at, self.snapshots, self.updates, self.broken, self.closed.done())


def l4_main(port: int, coin: str, conn: Any, stop: Any) -> None:
    """l4Book clients on command: ("subscribers", phase, n), ("joins", phase, per_sec, seconds, stay), ("storm", phase, n)."""
    async def run() -> None:
        loop = asyncio.get_running_loop()
        done: list[L4Client] = []
        tasks: list[asyncio.Task[None]] = []

        async def one(phase: str, stay: float | None) -> None:
            client = L4Client("127.0.0.1", port, coin, phase)
            await client.connect()
            done.append(client)
            if stay is not None:
                await asyncio.sleep(stay)
                client.close()

        async def joins(phase: str, per_sec: float, seconds: float, stay: float) -> None:
            start = time.monotonic()
            k = 0
            while time.monotonic() - start < seconds and not stop.is_set():
                tasks.append(asyncio.create_task(one(phase, stay)))
                k += 1
                await asyncio.sleep(max(0.0, start + k / per_sec - time.monotonic()))

        while not stop.is_set():
            if conn.poll():
                command = conn.recv()
                if command[0] == "subscribers":
                    tasks.extend(asyncio.create_task(one(command[1], None)) for _ in range(command[2]))
                elif command[0] == "joins":
                    tasks.append(asyncio.create_task(joins(*command[1:])))
                elif command[0] == "storm":
                    _, phase, n = command
                    for i in range(n):
                        loop.call_later(i / n, lambda p=phase: tasks.append(asyncio.create_task(one(p, None))))
            await asyncio.sleep(0.05)
        for client in done:
            client.close()
        conn.send([c.result() for c in done])

    asyncio.run(run())


# ================================================================ measuring


def free_port(n: int = 1) -> int:
    """A port p with p .. p+n-1 free."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65535:
            continue
        try:
            for p in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue


def proc_cpu_s(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, all cores (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / CLK_TCK, fields[7] / CLK_TCK


def up_children(root: int) -> dict[str, int]:
    """Service name -> pid of ``hlbook up``'s children."""
    named = {"up (supervisor)": root}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            args = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) != root or b"hlbook.cli" not in args:
            continue
        command = args[args.index(b"hlbook.cli") + 1].decode()
        if command == "book":
            command = f"book-{args[args.index(b'--shard') + 1].decode()}"
        elif command == "gateway":
            command = f"gateway :{args[args.index(b'--port') + 1].decode()}"
        named[command] = int(p.name)
    return named


def metrics(port: int, tries: int = 1) -> dict[str, float]:
    """A process's /metrics ({} when it does not answer ``tries`` times in 2 s: busy)."""
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(tries):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            break
        except OSError:
            time.sleep(0.5)  # busy, or not listening yet
    else:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def every_shard_live(base: str) -> bool:
    """/ready is 200 with one shard live of several: start-up is over when every shard is."""
    try:
        with urllib.request.urlopen(f"{base}/ready", timeout=2) as r:
            body = json.loads(r.read())
    except (OSError, ValueError):
        return False
    return all(shard.get("live") for shard in body.get("shards", [])) and bool(body.get("shards"))


def wait_for(what: str, condition: Any, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise SystemExit(f"hlbook up exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def start_profilers(out: str, pids: dict[str, int], seconds: float, native: bool = False) -> dict[str, subprocess.Popen[bytes]]:
    """py-spy record (raw collapsed stacks, 100 Hz, idle samples left out) of every hlbook process;
    ``native``: C frames too (uvloop's, msgspec's, pyzmq's), which py-spy reads only by pausing the process."""
    spy = Path(sys.executable).with_name("py-spy")
    Path(out).mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, pid in pids.items():
        if name.startswith("up"):
            continue
        path = Path(out) / f"{name.split()[0]}.txt"
        procs[name] = subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "100",
                                        "-f", "raw", "-o", str(path)] + (["--native"] if native else ["--nonblocking"]), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return procs


def summarise_profiles(out: Path, top: int = 14) -> None:
    """Per process: the functions holding the most samples (inclusive, a function counted once a stack)."""
    for path in sorted(out.glob("*.txt")):
        inclusive: dict[str, int] = {}
        total = 0
        for row in path.read_text().splitlines():
            stack, _, count = row.rpartition(" ")
            if not count.isdigit():
                continue
            total += int(count)
            for frame in {f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")" for f in stack.split(";")}:
                inclusive[frame] = inclusive.get(frame, 0) + int(count)
        print(f"profile {path.stem}: {total:,} samples (100 Hz, active only)")
        for frame, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
            print(f"    {count / max(total, 1) * 100:5.1f} %  {frame}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def ms_summary(ns: list[int]) -> str:
    if not ns:
        return "no samples"
    v = sorted(ns)
    return (f"p50 {pct(v, 50) / 1e6:.2f} ms, p90 {pct(v, 90) / 1e6:.2f}, p99 {pct(v, 99) / 1e6:.2f}, "
            f"p99.9 {pct(v, 99.9) / 1e6:.2f}, max {v[-1] / 1e6:.2f} ms (n={len(v):,})")


class StartupWatch:
    """Peak RSS of the shards from `hlbook up`'s start until ready (a thread sampling /proc)."""

    def __init__(self, up_pid: int) -> None:
        self.up_pid = up_pid
        self.peak: dict[str, float] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.ready_s = 0.0

    def __enter__(self) -> StartupWatch:
        self.started = time.monotonic()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.ready_s = time.monotonic() - self.started
        self.stopped.set()
        self.thread.join()

    def _sample(self) -> None:
        while not self.stopped.wait(0.05):
            for name, pid in up_children(self.up_pid).items():
                if name.startswith("book"):
                    self.peak[name] = max(self.peak.get(name, 0.0), proc_rss_mb(pid))

    def report(self, up_started: float, snap: Path, shard_metrics: list[dict[str, float]], line: Any) -> None:
        """Start-up time, each shard's orders, peak and steady RSS, bytes per order."""
        line(f"start-up: snapshot file {snap.stat().st_size / 1e6:.0f} MB on disk; every shard live and the gateway ready "
             f"{time.monotonic() - up_started:.1f} s after `hlbook up` started")
        steady = {name: proc_rss_mb(pid) for name, pid in up_children(self.up_pid).items() if name.startswith("book")}
        for k, m in enumerate(shard_metrics):
            name = f"book-{k}"
            orders, coins = m.get("hlbook_book_orders", 0.0), m.get("hlbook_book_coins", 0.0)
            per_order = (steady.get(name, 0.0) - EMPTY_SHARD_MB) * 1e6 / orders if orders else 0.0
            line(f"  {name}: {coins:.0f} coins, {orders:,.0f} orders; RSS peak during start-up {self.peak.get(name, 0.0):.0f} MB, "
                 f"once live {steady.get(name, 0.0):.0f} MB (ratio {self.peak.get(name, 0.0) / max(steady.get(name, 1.0), 1.0):.2f}); "
                 f"{per_order:.0f} bytes an order above an empty shard's {EMPTY_SHARD_MB:.0f} MB")


EMPTY_SHARD_MB = 45.0  # RSS of a shard holding no coin (the btc profile's second shard)


class Sampler:
    """CPU and RSS of every process, and the machine's busy time, over one phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.cpu0 = {name: proc_cpu_s(pid) for name, pid in pids.items()}
        self.machine0 = machine_cpu_s()
        self.t0 = time.monotonic()
        self.rss = dict.fromkeys(pids, 0.0)
        self.cpu1: dict[str, float | None] = {}
        self.machine1 = self.machine0
        self.t1 = self.t0

    def sample_rss(self) -> None:
        for name, pid in self.pids.items():
            self.rss[name] = max(self.rss[name], proc_rss_mb(pid))

    def stop(self) -> None:
        self.cpu1 = {name: proc_cpu_s(pid) for name, pid in self.pids.items()}
        self.machine1 = machine_cpu_s()
        self.t1 = time.monotonic()

    def report(self, blocks: int, line: Any) -> None:
        window = self.t1 - self.t0 or 1.0
        busy = (self.machine1[0] - self.machine0[0]) / window * 100
        steal = (self.machine1[1] - self.machine0[1]) / window * 100
        total = 0.0
        line(f"  CPU (% of one core; ms of CPU per block, {blocks} blocks) and RSS (max, MB):")
        for name in self.pids:
            c0, c1 = self.cpu0.get(name), self.cpu1.get(name)
            if c0 is None or c1 is None:
                continue
            total += (c1 - c0) / window * 100
            line(f"    {name:<22} {(c1 - c0) / window * 100:6.1f} %  {(c1 - c0) * 1000 / max(blocks, 1):6.2f} ms/block"
                 f"  {self.rss[name]:7.1f} MB")
        line(f"    {'total':<22} {total:6.1f} %; machine: {busy:.0f} % of one core busy (other work {busy - total:.0f} %), "
             f"steal {steal:.0f} %")


# ================================================================ one profile


def run_profile(name: str, rate: float | None, volume: float | None, args: argparse.Namespace) -> None:
    ctx = mp.get_context("fork")
    tmp = Path(tempfile.mkdtemp(prefix="hle2e-", dir=args.tmp))
    stage, live, sockets, snap = tmp / "stage", tmp / "node", tmp / "zmq", tmp / "snapshot.json"
    live.mkdir()
    phases = [p for p in PHASES if p == "A" or (p == "B" and (args.l4_subscribers or args.l4_joins_per_sec))
              or (p == "C" and args.l4_storm)]
    seconds = args.warmup + args.seconds * len(phases) + args.slack
    n_blocks = int((15 if name == "btc" else rate or 0) * seconds)
    cache = None
    if args.stage_cache:  # the same blocks for every run (a baseline and a change compared on identical input)
        cache = Path(args.stage_cache) / f"{name}-{rate}-{volume}-{args.coins}-{args.seed}-{n_blocks}"
        stage, snap = cache / "stage", cache / "snapshot.json"
        cache.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    if cache is not None and (cache / "meta.json").exists():
        heights, times, coin_names = orjson.loads((cache / "meta.json").read_bytes())
        print(f"\n=== profile {name}: {n_blocks} blocks from {cache}", flush=True)
    elif name == "btc":
        print(f"\n=== profile btc: the real BTC fixture, replayed; {n_blocks} blocks ...", flush=True)
        heights, times, coin_names = generate_btc(tmp, stage, snap, n_blocks, lead_s=n_blocks / 150 + 8)
    else:
        assert rate is not None and volume is not None
        print(f"\n=== profile {name}: {rate:g} blocks/s, volume {volume:g}, {args.coins} coins; generating {n_blocks} blocks ...",
              flush=True)
        full = name.startswith("full")
        prewarm = min(args.prewarm, FULL_PREWARM) if full else args.prewarm
        est_gen = (n_blocks + prewarm / 2) * volume * (0.2 if full else 1 / 300) + (10 if full else 0)  # s, encoding included
        heights, times, coin_names = generate_sim(stage, snap, n_blocks, args.coins, args.seed, rate, volume, est_gen + 8,
                                                  prewarm, "full" if full else "default")
    if cache is not None and not (cache / "meta.json").exists():
        (cache / "meta.json").write_bytes(orjson.dumps([heights, times, coin_names]))
    files, index = build_index(stage, heights)
    print(f"generated in {time.monotonic() - t:.1f} s ({sum(l for b in index for _, _, l in b) / 1e6:.0f} MB staged)", flush=True)
    first = heights[0]
    by_time = {ns // 1_000_000: i for i, ns in enumerate(times)}
    assert len(by_time) == len(times), "two blocks share a block time in ms"
    channels = args.channels.split(",")

    port, mport = free_port(args.gateways), free_port(2 + args.shards) + 1  # history: mport - 1
    log = tmp / "up.log"
    up_started = time.monotonic()
    up = subprocess.Popen(
        [args.python, "-m", "hlbook.cli", "up", "--no-simulate", "--data-dir", str(live), "--snapshot-file", str(snap),
         "--shards", str(args.shards), "--gateways", str(args.gateways), "--port", str(port), "--metrics-base-port", str(mport),
         "--sockets", str(sockets), "--history" if args.history else "--no-history",
         "--log-level", "WARNING"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,  # no checkout's hlbook/ shadows
        env={**os.environ, "PYTHONUNBUFFERED": "1",
             "HLBOOK_MAX_CONNECTIONS_PER_IP": str(args.clients + args.l4_subscribers + args.l4_storm + 100),
             "HLBOOK_MAX_SUBSCRIPTIONS_PER_IP": "10000000"})  # every bench client comes from 127.0.0.1
    base = f"http://127.0.0.1:{port}"
    stop = ctx.Event()
    n = len(index)
    stamps, late, written = ctx.Array("q", n, lock=False), ctx.Array("q", n, lock=False), ctx.Value("q", 0, lock=False)
    ingest_ns, shard_ns = ctx.Array("q", n, lock=False), ctx.Array("q", n * args.shards, lock=False)
    procs: list[Any] = []
    pipes: list[Any] = []
    tap_parent = l4_parent = None
    bounds: list[int] = []  # phase boundaries (time_ns)
    samplers: list[Sampler] = []
    lags: list[list[int]] = []
    try:
        wait_for("gateway /health", lambda: http_status(f"{base}/health") == 200, 120, up, log)
        wait_for("shard metrics", lambda: all(metrics(mport + 1 + k) for k in range(args.shards)), 120, up, log)
        tap_parent, tap_child = ctx.Pipe()
        followed = sorted({coin_names[k % len(coin_names)] for k in range(args.clients * args.coins_per_client)})
        depth_topics = subprocess.run([args.python, "-c", "from hlbook.common import topics; topics.l2('X', None, None, 20)"],
                                      capture_output=True, cwd="/").returncode == 0
        tap = ctx.Process(target=tap_main, args=(str(sockets), args.shards, followed, depth_topics, first, n, ingest_ns, shard_ns,
                                                  tap_child, stop), daemon=True)
        tap.start()
        procs.append(tap)
        time.sleep(0.3)
        writer = ctx.Process(target=writer_main, args=(str(stage), str(live), files, index, times, time.time() + 0.2, stamps,
                                                        late, written, stop), daemon=True)
        writer.start()
        procs.append(writer)
        with StartupWatch(up.pid) as startup:
            wait_for("every shard live", lambda: every_shard_live(base), 300, up, log)
        ready_at = written.value
        startup.report(up_started, snap, [metrics(mport + 1 + k, tries=5) for k in range(args.shards)], print)

        plan = [(i, [coin_names[(i * args.coins_per_client + j) % len(coin_names)] for j in range(args.coins_per_client)])
                for i in range(args.clients)]
        clients = []
        for k in range(args.client_procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(port, args.gateways, plan[k :: args.client_procs], channels, child, stop),
                            daemon=True)
            p.start()
            procs.append(p)
            pipes.append(parent)
            clients.append(p)
        for pipe in pipes:
            if not pipe.poll(120):
                raise SystemExit("clients did not subscribe in 120 s")
            message = pipe.recv()
            if message[0] != "subscribed":
                raise SystemExit(f"clients: {message[1]} connections closed before subscribing")
        l4_parent, l4_child = ctx.Pipe()
        l4 = ctx.Process(target=l4_main, args=(port, args.l4_coin or coin_names[0], l4_child, stop), daemon=True)
        l4.start()
        procs.append(l4)
        print(f"ready at block {ready_at}; {args.clients} clients subscribed at block {written.value}; "
              f"warming up {args.warmup:g} s", flush=True)
        time.sleep(args.warmup)

        pids = {**up_children(up.pid), "writer (bench)": writer.pid, "tap (bench)": tap.pid, "l4 clients (bench)": l4.pid,
                **{f"clients-{k} (bench)": p.pid for k, p in enumerate(clients)}}
        profilers = start_profilers(args.py_spy, up_children(up.pid), args.seconds, args.py_spy_native) if args.py_spy else {}
        for phase in phases:
            if phase == "B":
                l4_parent.send(("subscribers", "B", args.l4_subscribers))
                if args.l4_joins_per_sec:
                    l4_parent.send(("joins", "B", args.l4_joins_per_sec, args.seconds, args.l4_stay))
            elif phase == "C":
                l4_parent.send(("storm", "C", args.l4_storm))
            bounds.append(time.time_ns())
            samplers.append(Sampler(pids))
            lags.append([])
            end = time.monotonic() + args.seconds
            while time.monotonic() < end and written.value < n:
                heights_now = [metrics(mport + 1 + k).get("hlbook_book_height", 0.0) for k in range(args.shards)]
                lags[-1].append(int(first - 1 + written.value - min(heights_now)))
                samplers[-1].sample_rss()
                time.sleep(max(0.0, min(1.0, end - time.monotonic())))
            samplers[-1].stop()
            for profiler in profilers.values():
                profiler.wait(60)
            profilers = {}
            if written.value >= n:
                print("WARNING: the staged blocks ran out (raise --slack)", flush=True)
                break
        bounds.append(time.time_ns())
        gw = {}
        for g in range(args.gateways):
            for name_, value in metrics(port + g).items():
                gw[name_] = gw.get(name_, 0.0) + value
        restarts = up_children(up.pid)
    finally:
        stop.set()
        records = array("q")
        lost = 0
        for pipe in pipes:
            if pipe.poll(60):
                message = pipe.recv()
                if message[0] == "done":
                    records.frombytes(message[1])
                    lost += message[2]
        l4_results = l4_parent.recv() if l4_parent is not None and l4_parent.poll(60) else []
        changed = tap_parent.recv() if tap_parent is not None and tap_parent.poll(30) else {}
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        try:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            print("hlbook up did not stop in 30 s after SIGTERM; killing it", flush=True)
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(5)

    if args.py_spy:
        summarise_profiles(Path(args.py_spy))
    report(name, args, first, n, by_time, stamps, late, ingest_ns, shard_ns, records, lost, l4_results, changed, bounds,
           samplers, lags, gw, restarts, pids, channels, live, plan)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")


def report(name: str, args: argparse.Namespace, first: int, n: int, by_time: dict[int, int], stamps: Any, late: Any,
           ingest_ns: Any, shard_ns: Any, records: array, lost: int, l4_results: list[tuple[Any, ...]],
           changed: dict[tuple[int, str], list[int]], bounds: list[int], samplers: list[Sampler], lags: list[list[int]],
           gw: dict[str, float], restarts: dict[str, int], pids: dict[str, int], channels: list[str], live: Path,
           plan: list[tuple[int, list[str]]]) -> None:
    def line(s: str) -> None:
        print(s, flush=True)

    names = {v: k for k, v in CHANNEL_IDS.items()}
    written = max((i for i in range(n) if stamps[i]), default=-1) + 1
    files_check = verify_files(live, first, first + written - 1)
    st, df, fi = files_check["order_statuses"], files_check["raw_book_diffs"], files_check["fills"]
    line(f"--- {name}: {args.clients} clients x {args.coins_per_client} coins x ({', '.join(channels)}), "
         f"{args.client_procs} client processes, {args.shards} shards")
    line(f"node files read back ({files_check['blocks']} blocks): statuses/block {st[0]:.0f} (min {st[1]}, max {st[2]}), "
         f"diffs/block {df[0]:.0f} (min {df[1]}, max {df[2]}), fills/block {fi[0]:.1f}, coins with diffs/block "
         f"{files_check['coins_with_diffs']:.1f}, {files_check['bytes_per_block'] / 1e3:.0f} kB/block")
    for phase, (t_a, t_b) in zip(PHASES, zip(bounds, bounds[1:])):
        in_window = [i for i in range(n) if stamps[i] and t_a <= stamps[i] <= t_b]
        if not in_window:
            continue
        blocks = len(in_window)
        lat: dict[int, list[int]] = {0: [], 1: [], 2: []}  # kernel receipt, per channel
        read: list[int] = []  # read by the client process
        got: dict[tuple[int, int], set[int]] = {}  # (connection, channel) -> block heights received
        for j in range(0, len(records), 5):
            conn_id, ch, ms, kernel_ns, user_ns = records[j : j + 5]
            i = by_time.get(ms)
            if i is not None and stamps[i] and t_a <= stamps[i] <= t_b:
                lat[ch].append(kernel_ns - stamps[i])
                read.append(user_ns - stamps[i])
                got.setdefault((conn_id, ch), set()).add(first + i)
        window = (t_b - t_a) / 1e9
        ingest_d = [ingest_ns[i] - stamps[i] for i in in_window if ingest_ns[i]]
        shard_d = [max(shard_ns[k * n + i] for k in range(args.shards)) - stamps[i] for i in in_window
                   if all(shard_ns[k * n + i] for k in range(args.shards))]
        lateness = sorted(late[i] for i in in_window)
        heights = {first + i for i in in_window[:-8]}  # the last blocks of the window may still be on their way
        line(f"[phase {phase}] {window:.1f} s, {blocks} blocks ({blocks / window:.2f}/s written; writer late p50 "
             f"{pct(lateness, 50) / 1e6:.2f} ms, max {lateness[-1] / 1e6:.2f} ms); lag max {max(lags[PHASES.index(phase)], default=0)}")
        every = [d for ch in lat for d in lat[ch]]
        line(f"  append -> client socket, all frames: {ms_summary(every)}")
        for ch in sorted(lat):
            if lat[ch]:
                line(f"  append -> client socket, {names[ch]:<7}: {ms_summary(lat[ch])}")
        line(f"  append -> read by the client process: {ms_summary(read)}")
        line(f"  append -> ingest published block: {ms_summary(ingest_d)}")
        line(f"  append -> last shard finished:    {ms_summary(shard_d)}")
        for ch in (0, 1):
            if names[ch] not in channels:
                continue
            ratios = []
            for conn_id, coins in plan:
                want = set().union(*(heights.intersection(changed.get((ch, coin), ())) for coin in coins))
                if want:
                    ratios.append(len(want & got.get((conn_id, ch), set())) / len(want))
            if ratios:
                line(f"  delivery of {names[ch]} (blocks that changed it, received / changed): worst client "
                     f"{min(ratios) * 100:.2f} %, mean {sum(ratios) / len(ratios) * 100:.2f} % ({len(ratios)} clients)")
        l4 = [r for r in l4_results if r[0] == phase]
        if l4:
            waits = sorted(r[2] - r[1] for r in l4 if r[2] and r[1])
            line(f"  l4Book clients joined: {len(l4)}; snapshot received by {len(waits)}; subscribe -> snapshot "
                 f"{ms_summary(waits)}; Updates received {sum(r[4] for r in l4):,}, height breaks {sum(r[5] for r in l4)}, "
                 f"more than one snapshot {sum(1 for r in l4 if r[3] > 1)}")
            if phase == "C" and waits:
                line(f"  storm: the last of {len(l4)} clients had its snapshot {(max(r[2] for r in l4 if r[2]) - min(r[1] for r in l4 if r[1])) / 1e9:.2f} s "
                     f"after the first subscribed")
        samplers[PHASES.index(phase)].report(blocks, line)
    line(f"gateway: frames queued {gw.get('hlbook_gateway_messages_sent_total', 0):,.0f}, conflated "
         f"{gw.get('hlbook_gateway_conflated_total', 0):,.0f}, upstream gaps {gw.get('hlbook_gateway_upstream_gaps_total', 0):.0f}, "
         f"l4 resyncs {gw.get('hlbook_gateway_l4_resyncs_total', 0):.0f}; connections lost {lost}")
    if any(pids.get(k) != v for k, v in restarts.items()):
        line(f"WARNING: a child of hlbook up restarted during the run: {restarts}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="btc")
    parser.add_argument("--blocks-per-sec", type=float, help="override the profile's block rate (simulator profiles)")
    parser.add_argument("--volume", type=float, help="override the profile's simulator volume")
    parser.add_argument("--coins", type=int, default=50, help="simulator profiles")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--gateways", type=int, default=1, help="gateway processes; clients spread over them")
    parser.add_argument("--history", action=argparse.BooleanOptionalAction, default=True, help="run the history service")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--channels", default="bbo,l2Book,trades")
    parser.add_argument("--coins-per-client", type=int, default=1)
    parser.add_argument("--l4-coin", default=None, help="default: the first coin (BTC in the btc profile)")
    parser.add_argument("--l4-subscribers", type=int, default=10)
    parser.add_argument("--l4-joins-per-sec", type=float, default=1.0)
    parser.add_argument("--l4-stay", type=float, default=5.0)
    parser.add_argument("--l4-storm", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0, help="per phase")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--prewarm", type=int, default=750,
                        help="simulator blocks run (not written) before the snapshot, so the books have their steady size")
    parser.add_argument("--slack", type=float, default=40.0, help="seconds of extra blocks (start-up, connecting)")
    parser.add_argument("--tmp", default=None, help="directory for the temporary files (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--stage-cache", metavar="DIR", help="keep the generated node files in DIR and use them again in later runs "
                        "with the same profile and length (remove DIR when done)")
    parser.add_argument("--py-spy", metavar="DIR", help="profile every hlbook process during phase A into DIR (py-spy)")
    parser.add_argument("--py-spy-native", action="store_true", help="with --py-spy: record C frames too")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter whose hlbook runs as the system under test (e.g. an older checkout's .venv/bin/python)")
    args = parser.parse_args()
    commit = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    print(f"bench/e2e.py at {commit or '?'} ({ROOT}), {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    if args.python != sys.executable:
        tested = subprocess.run([args.python, "-c", "import hlbook.services, os; print(os.path.dirname(hlbook.services.__path__[0]))"],
                                capture_output=True, text=True, cwd="/").stdout.strip()
        print(f"system under test: {args.python} ({tested})", flush=True)
    rate, volume = PROFILES[args.profile]
    run_profile(args.profile, args.blocks_per_sec or rate, args.volume or volume, args)


if __name__ == "__main__":
    main()

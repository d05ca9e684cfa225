"""End-to-end benchmark: a block's line appended to the node files -> a WebSocket
client receives that block's ``bbo`` / ``l2Book``, through the real ``hlbook up``
(ingest, book shards, gateway, supervised) on this machine.

How it runs (per profile):

1. **Node files, generated beforehand.** The node simulator's engine and writer
   (``services/nodesim``: ``Simulator`` + ``NodeWriter``, by-block mode, no
   partial writes) run ``--prewarm`` blocks (750, not written: resting orders
   accumulate from the simulator's initial books to their steady count, so the
   load is the same from the first block of the run to the last), then the
   state is written as a node ``fileSnapshot`` file
   (``[height, [[coin, [bids, asks]], …]]``) and the next
   ``blocks/s x (--warmup + --seconds + --slack)`` blocks into a staging
   directory. Generating beforehand keeps the
   simulator's own CPU (a Python order-flow model: ~20 % of a core at the
   mainnet profile, ~75 % at 3x) off the two cores the pipeline is measured
   on; a real node has its own cores.
2. ``hlbook up --no-simulate --data-dir LIVE --snapshot-file SNAP --shards N``
   starts on an empty ``LIVE`` directory (ingest waits for the first file and
   reads it from its start; the shards start from the snapshot file).
3. A **writer** process appends each block's three lines (order statuses, raw
   book diffs, fills, in that order, one ``write`` each, unbuffered) to the
   same hourly file paths under ``LIVE``, on the schedule of the blocks'
   ``block_time`` (mean ``--blocks-per-sec``, the simulator's jitter kept).
   **Append instant of a block** = wall clock (``time.time_ns``) right after the
   write of its last line (fills) returned: from then on ingest can read the
   whole block. The line's own ``local_time`` is the simulator's model of the
   node (block time + ~350 ms), not a wall-clock stamp, so it is not used.
4. **Clients**: ``--clients`` WebSocket connections in ``--client-procs``
   processes (a minimal asyncio client that parses frames itself, no
   compression). Client *i* subscribes ``bbo`` and ``l2Book`` (default
   aggregation, 20 levels) of ``--coins-per-client`` coins, assigned round-robin
   so every coin has the same number of subscribers (the gateway's per-IP
   connection cap is raised for them: ``HLBOOK_MAX_CONNECTIONS_PER_IP``).
   Each frame is stamped at receipt (one stamp per ``data_received`` call) and matched to its block by
   the ``time`` field (the block time in ms, unique per block).
   **Latency of a frame** = receipt stamp - append instant of its block (same
   machine, same clock).
5. A **tap** process subscribes to ingest's ``H|`` block headers, every
   shard's ``S|k|`` block-done messages and ``BBO|`` messages (ZeroMQ SUB over
   the same ipc endpoints) and stamps their arrival: append -> ingest
   published the block (header first, then the slices in the same burst),
   append -> the first bbo of the block from any shard, append -> the last
   shard finished it (its bbo / l2 messages are published before that). These
   split the latency into ingest, shards, and gateway + client.
6. After ``--warmup`` s the bench measures for ``--seconds`` s: frames received
   in the window, their latency; blocks/s written and finished by every shard;
   lag (blocks written - lowest shard height) sampled every second, and the
   median latency per fifth of the window (does it grow?); CPU (utime + stime
   from /proc/<pid>/stat, % of one core, and ms of CPU per block) and RSS
   (VmRSS, max of the samples) of every process, and the whole machine's busy
   and steal time (/proc/stat): the cores are shared with other work.
   Afterwards the node files written are read back to check the profile
   (statuses, diffs, fills and coins with diffs per block).

Profiles (``--profile``): ``mainnet`` = 15 blocks/s, ``--volume 4`` (about
1,130 statuses, 195 diffs, 30 fills per block over 50 coins, ~40 coins with
diffs per block, ~20k resting orders), ``3x`` = the same block rate with 3x
the events per block (``--volume 12``: ~3,400 statuses, ~590 diffs, ~48
coins with diffs, ~60k resting orders). ``both`` runs the two. The read-back
line prints the counts of the files actually written.

    .venv/bin/python bench/e2e.py [--profile mainnet|3x|both] [--seconds 30] [--warmup 5]
        [--clients 200] [--client-procs 2] [--coins-per-client 5] [--shards 2] [--coins 50]
        [--blocks-per-sec R --volume V]  (overrides the profile's rate/volume)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from array import array
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILES = {"mainnet": (15.0, 4.0), "3x": (15.0, 12.0)}
CHANNELS = ("bbo", "l2Book")
_HEIGHT = re.compile(rb'"block_number":(\d+)')


# ================================================================ node files


def generate(stage: Path, snapshot: Path, n_blocks: int, coins: int, seed: int, rate: float, volume: float,
             lead_s: float, prewarm: int) -> tuple[list[int], list[int], list[str]]:
    """Run the simulator ``prewarm`` blocks (not written: the books fill up to their steady size), then
    write the state into ``snapshot`` and the next ``n_blocks`` blocks into ``stage``.
    Returns (heights, block times ns, coin names). The written block times start ``lead_s`` from now."""
    from hlbook.services.nodesim.engine import Simulator
    from hlbook.services.nodesim.info_server import render
    from hlbook.services.nodesim.writer import NodeWriter

    start = datetime.now(timezone.utc) + timedelta(seconds=lead_s - prewarm / rate)
    sim = Simulator(seed=seed, coins=coins, blocks_per_sec=rate, volume=volume, start_time=start)
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


def tap_main(sockets: str, shards: int, first: int, n: int, ingest_ns: Any, bbo_ns: Any, shard_ns: Any, stop: Any) -> None:
    import zmq

    from hlbook.common import topics, wire

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
        sub.setsockopt(zmq.SUBSCRIBE, topics.BBO_PREFIX)  # the clients subscribe every coin's bbo anyway
        poller.register(sub, zmq.POLLIN)
        socks[sub] = k
    while not stop.is_set():
        for sock, _ in poller.poll(100):
            while True:
                try:
                    topic, payload = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.time_ns()
                k = socks[sock]
                if k >= 0 and topic.startswith(topics.BBO_PREFIX):
                    i = wire.decode(payload, wire.Bbo).height - first
                    if 0 <= i < n:
                        bbo_ns[i] = min(bbo_ns[i], now) if bbo_ns[i] else now
                    continue
                kind = wire.BlockHeader if k < 0 else wire.ShardBlock
                i = wire.decode(payload, kind).height - first
                if 0 <= i < n:
                    if k < 0:
                        ingest_ns[i] = ingest_ns[i] or now
                    else:
                        shard_ns[k * n + i] = shard_ns[k * n + i] or now
    ctx.destroy(linger=0)


# ================================================================ WebSocket clients


def _frame(text: bytes) -> bytes:
    """A masked client text frame."""
    mask = os.urandom(4)
    n = len(text)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big"))
    body = bytes(b ^ mask[i & 3] for i, b in enumerate(text))
    return head + mask + body


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int, subs: list[bytes], rec: array, acked: list[int]) -> None:
        self.host, self.port, self.subs, self.rec, self.acked = host, port, subs, rec, acked
        self.buf = b""
        self.upgraded = False
        self.transport: Any = None
        self.closed = asyncio.get_running_loop().create_future()
        self.parts: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(f"GET /ws HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        buf = self.buf + data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                print("handshake refused:", buf[: buf.find(b"\r\n")].decode(), file=sys.stderr)
                self.transport.close()
                return
            self.upgraded = True
            buf = buf[end + 4 :]
            for sub in self.subs:
                self.transport.write(_frame(sub))
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
            if size - pos < head + n:
                break
            payload = buf[pos + head : pos + head + n]
            pos += head + n
            opcode = b0 & 0x0F
            if opcode == 9:  # ping
                self.transport.write(bytes([0x8A, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)
                continue
            if opcode == 8:
                self.transport.close()
                return
            self.parts.append(payload)
            if b0 & 0x80:
                self.message(b"".join(self.parts), now)
                self.parts = []
        self.buf = buf[pos:]

    def message(self, text: bytes, now: int) -> None:
        msg = orjson.loads(text)
        channel = msg.get("channel")
        if channel == "bbo" or channel == "l2Book":
            self.rec.append(0 if channel == "bbo" else 1)
            self.rec.append(msg["data"]["time"])
            self.rec.append(now)
        elif channel == "subscriptionResponse":
            self.acked[0] += 1
        elif channel == "error":
            print("client error:", msg, file=sys.stderr)


def client_main(port: int, plan: list[list[str]], conn: Any, stop: Any) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        rec = array("q")
        acked = [0]
        clients = []
        for coins in plan:
            subs = [orjson.dumps({"method": "subscribe", "subscription": {"type": ch, "coin": c}}) for c in coins for ch in CHANNELS]
            _, proto = await loop.create_connection(lambda s=subs: Client("127.0.0.1", port, s, rec, acked), "127.0.0.1", port)
            clients.append(proto)
        want = sum(len(c) * len(CHANNELS) for c in plan)
        while acked[0] < want:
            if any(c.closed.done() for c in clients):
                conn.send(("failed", sum(1 for c in clients if c.closed.done())))
                return
            await asyncio.sleep(0.05)
        conn.send(("subscribed", len(clients)))
        ping = _frame(b'{"method":"ping"}')
        last_ping = time.monotonic()
        while not stop.is_set():
            await asyncio.sleep(0.1)
            if time.monotonic() - last_ping > 20:  # the gateway closes connections silent for 60 s
                last_ping = time.monotonic()
                for c in clients:
                    c.transport.write(ping)
        lost = sum(1 for c in clients if c.closed.done())
        for c in clients:
            c.transport.close()
        conn.send(("done", rec.tobytes(), lost))

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
    """(busy, steal) CPU seconds of the whole machine since boot, all cores (/proc/stat): busy =
    user + nice + system + irq + softirq; steal = time the hypervisor gave this VM's vCPUs to others."""
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
        named[command] = int(p.name)
    return named


def metrics(port: int) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            base = name.split("{")[0]
            out[base] = out.get(base, 0.0) + float(value)
    return out


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def wait_for(what: str, condition: Any, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise SystemExit(f"hlbook up exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


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


# ================================================================ one profile


def run_profile(name: str, rate: float, volume: float, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    tmp = Path(tempfile.mkdtemp(prefix="hle2e-", dir=args.tmp))
    stage, live, sockets, snap = tmp / "stage", tmp / "node", tmp / "zmq", tmp / "snapshot.json"
    live.mkdir()
    n_blocks = int(rate * (args.warmup + args.seconds + args.slack))
    print(f"\n=== profile {name}: {rate:g} blocks/s, volume {volume:g}, {args.coins} coins; generating {n_blocks} blocks ...",
          flush=True)
    t = time.monotonic()
    est_gen = (n_blocks + args.prewarm / 2) * volume / 300  # ~300 blocks/s at volume 1 incl. encoding
    heights, times, coin_names = generate(stage, snap, n_blocks, args.coins, args.seed, rate, volume, est_gen + 8,
                                          args.prewarm)
    files, index = build_index(stage, heights)
    print(f"generated in {time.monotonic() - t:.1f} s ({sum(l for b in index for _, _, l in b) / 1e6:.0f} MB staged)", flush=True)
    first = heights[0]
    by_time = {ns // 1_000_000: i for i, ns in enumerate(times)}
    assert len(by_time) == len(times), "two blocks share a block time in ms"

    port, mport = free_port(), free_port(1 + args.shards)
    log = tmp / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "up", "--no-simulate", "--data-dir", str(live), "--snapshot-file", str(snap),
         "--shards", str(args.shards), "--port", str(port), "--metrics-base-port", str(mport), "--sockets", str(sockets),
         "--log-level", "WARNING"],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "HLBOOK_MAX_CONNECTIONS_PER_IP": str(args.clients + 10)})
    base = f"http://127.0.0.1:{port}"
    stop = ctx.Event()
    n = len(index)
    stamps, late, written = ctx.Array("q", n, lock=False), ctx.Array("q", n, lock=False), ctx.Value("q", 0, lock=False)
    ingest_ns, bbo_ns = ctx.Array("q", n, lock=False), ctx.Array("q", n, lock=False)
    shard_ns = ctx.Array("q", n * args.shards, lock=False)
    procs: list[Any] = []
    pipes: list[Any] = []
    try:
        wait_for("gateway /health", lambda: http_status(f"{base}/health") == 200, 60, up, log)
        wait_for("shard metrics", lambda: all(metrics(mport + 1 + k) for k in range(args.shards)), 60, up, log)
        tap = ctx.Process(target=tap_main, args=(str(sockets), args.shards, first, n, ingest_ns, bbo_ns, shard_ns, stop), daemon=True)
        tap.start()
        procs.append(tap)
        time.sleep(0.3)
        writer = ctx.Process(target=writer_main, args=(str(stage), str(live), files, index, times, time.time() + 0.2, stamps,
                                                        late, written, stop), daemon=True)
        writer.start()
        procs.append(writer)
        wait_for("/ready", lambda: http_status(f"{base}/ready") == 200, 60, up, log)
        ready_at = written.value

        plan = [[coin_names[(i * args.coins_per_client + j) % len(coin_names)] for j in range(args.coins_per_client)]
                for i in range(args.clients)]
        clients = []
        for k in range(args.client_procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=client_main, args=(port, plan[k :: args.client_procs], child, stop), daemon=True)
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
        print(f"ready at block {ready_at}; {args.clients} clients subscribed at block {written.value}; "
              f"warming up {args.warmup:g} s", flush=True)
        time.sleep(args.warmup)

        pids = {**up_children(up.pid), "writer (bench)": writer.pid, "tap (bench)": tap.pid,
                **{f"clients-{k} (bench)": p.pid for k, p in enumerate(clients)}}
        cpu0 = {name_: proc_cpu_s(pid) for name_, pid in pids.items()}
        machine0 = machine_cpu_s()
        t_a = time.time_ns()
        samples = []  # (t, written, ingest head, [shard heights])
        rss_max = {name_: 0.0 for name_ in pids}
        end = time.monotonic() + args.seconds
        next_sample = time.monotonic()
        while time.monotonic() < end and written.value < n:
            im = metrics(mport)
            heights_now = [metrics(mport + 1 + k).get("hlbook_book_height", 0.0) for k in range(args.shards)]
            samples.append((time.time_ns(), first - 1 + written.value, im.get("hlbook_ingest_head_height", 0.0), heights_now))
            for name_, pid in pids.items():
                rss_max[name_] = max(rss_max[name_], proc_rss_mb(pid))
            next_sample += 1.0
            time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
        t_b = time.time_ns()
        cpu1 = {name_: proc_cpu_s(pid) for name_, pid in pids.items()}
        machine1 = machine_cpu_s()
        window = (t_b - t_a) / 1e9
        gw = metrics(port)
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

    # ---------------------------------------------------------------- figures
    lat: dict[int, list[int]] = {0: [], 1: []}
    unmatched = 0
    per_fifth: list[list[int]] = [[] for _ in range(5)]
    for j in range(0, len(records), 3):
        ch, ms, recv = records[j], records[j + 1], records[j + 2]
        if not t_a <= recv <= t_b:
            continue
        i = by_time.get(ms)
        if i is None or not stamps[i]:
            unmatched += 1
            continue
        d = recv - stamps[i]
        lat[ch].append(d)
        per_fifth[min(4, int(5 * (recv - t_a) / (t_b - t_a)))].append(d)
    all_lat = lat[0] + lat[1]
    in_window = [i for i in range(n) if stamps[i] and t_a <= stamps[i] <= t_b]
    ingest_d = [ingest_ns[i] - stamps[i] for i in in_window if ingest_ns[i]]
    bbo_d = [bbo_ns[i] - stamps[i] for i in in_window if bbo_ns[i]]
    shard_d = [max(shard_ns[k * n + i] for k in range(args.shards)) - stamps[i] for i in in_window
               if all(shard_ns[k * n + i] for k in range(args.shards))]
    lateness = sorted(late[i] for i in in_window)
    s0, s1 = samples[0], samples[-1]
    span = (s1[0] - s0[0]) / 1e9 or 1.0
    lags = [w - min(hs) for _, w, _, hs in samples]
    ingest_lags = [w - ih for _, w, ih, _ in samples]
    files_check = verify_files(live, first, first + written.value - 1)

    def line(s: str) -> None:
        print(s, flush=True)

    if window < args.seconds - 1:
        line(f"WARNING: the staged blocks ran out after {window:.1f} s of the window (raise --slack)")
    line(f"--- {name}: {rate:g} blocks/s, volume {volume:g}; window {window:.1f} s after {args.warmup:g} s warm-up; "
         f"{args.clients} clients x {args.coins_per_client} coins x (bbo + l2Book), {args.client_procs} client processes, "
         f"{args.shards} shards")
    st, df, fi = files_check["order_statuses"], files_check["raw_book_diffs"], files_check["fills"]
    line(f"node files read back ({files_check['blocks']} blocks): statuses/block {st[0]:.0f} (min {st[1]}, max {st[2]}), "
         f"diffs/block {df[0]:.0f} (min {df[1]}, max {df[2]}), fills/block {fi[0]:.1f}, coins with diffs/block "
         f"{files_check['coins_with_diffs']:.1f}, {files_check['bytes_per_block'] / 1e3:.0f} kB/block")
    line(f"blocks/s: written {(s1[1] - s0[1]) / span:.2f}, ingest {(s1[2] - s0[2]) / span:.2f}, "
         f"shards {', '.join(f'{(s1[3][k] - s0[3][k]) / span:.2f}' for k in range(args.shards))}; "
         f"writer lateness p50 {pct(lateness, 50) / 1e6:.2f} ms, max {lateness[-1] / 1e6 if lateness else 0:.2f} ms")
    line(f"lag (blocks written - lowest shard height, every 1 s): first {lags[0]}, last {lags[-1]}, max {max(lags)}, "
         f"mean {sum(lags) / len(lags):.2f}; ingest lag max {max(ingest_lags):.0f}")
    line("lag series: " + " ".join(f"{x:.0f}" for x in lags))
    line(f"frames in window: bbo {len(lat[0]):,}, l2Book {len(lat[1]):,} ({len(all_lat) / window:,.0f}/s), "
         f"unmatched {unmatched}, connections lost {lost}")
    line(f"append -> client, all frames: {ms_summary(all_lat)}")
    line(f"append -> client, bbo:        {ms_summary(lat[0])}")
    line(f"append -> client, l2Book:     {ms_summary(lat[1])}")
    line(f"append -> ingest published block header: {ms_summary(ingest_d)}")
    line(f"append -> first bbo of the block from a shard: {ms_summary(bbo_d)}")
    line(f"append -> last shard finished block:     {ms_summary(shard_d)}")
    line("median append -> client per fifth of the window: "
         + ", ".join(f"{pct(sorted(f), 50) / 1e6:.2f}" for f in per_fifth) + " ms")

    def fifths(delays: list[tuple[int, int]]) -> str:
        parts: list[list[int]] = [[] for _ in range(5)]
        for stamp, d in delays:
            parts[min(4, int(5 * (stamp - t_a) / (t_b - t_a)))].append(d)
        return ", ".join(f"{pct(sorted(f), 50) / 1e6:.2f}" for f in parts)

    line("  ... append -> ingest header: " + fifths([(stamps[i], ingest_ns[i] - stamps[i]) for i in in_window if ingest_ns[i]])
         + " ms; append -> last shard done: "
         + fifths([(stamps[i], max(shard_ns[k * n + i] for k in range(args.shards)) - stamps[i]) for i in in_window
                   if all(shard_ns[k * n + i] for k in range(args.shards))]) + " ms")
    line(f"gateway: messages queued {gw.get('hlbook_gateway_messages_sent_total', 0):,.0f}, conflated "
         f"{gw.get('hlbook_gateway_conflated_total', 0):,.0f}, upstream gaps {gw.get('hlbook_gateway_upstream_gaps_total', 0):.0f}")
    if any(pids.get(k) != v for k, v in restarts.items()):
        line(f"WARNING: a child of hlbook up restarted during the run: {restarts}")
    blocks_in_window = max(1, len(in_window))
    line(f"CPU (% of one core over the window; ms of CPU per block, {blocks_in_window} blocks) and RSS (max, MB):")
    total = 0.0
    for name_ in pids:
        c0, c1 = cpu0.get(name_), cpu1.get(name_)
        cpu = (c1 - c0) / window * 100 if c0 is not None and c1 is not None else float("nan")
        total += cpu if cpu == cpu else 0
        per_block = (c1 - c0) * 1000 / blocks_in_window if c0 is not None and c1 is not None else float("nan")
        line(f"  {name_:<22} {cpu:6.1f} %  {per_block:6.2f} ms/block  {rss_max[name_]:7.1f} MB")
    busy = (machine1[0] - machine0[0]) / window * 100
    steal = (machine1[1] - machine0[1]) / window * 100
    line(f"  {'total':<22} {total:6.1f} %")
    line(f"machine: {os.cpu_count()} cores; over the window {busy:.0f} % of one core busy, of which other work on the box "
         f"{busy - total:.0f} %; steal {steal:.0f} %; load average {os.getloadavg()[0]:.2f}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        line(f"kept {tmp}")
    return {"name": name, "p50": pct(sorted(all_lat), 50), "p99": pct(sorted(all_lat), 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=[*PROFILES, "both"], default="both")
    parser.add_argument("--blocks-per-sec", type=float, help="override the profile's block rate")
    parser.add_argument("--volume", type=float, help="override the profile's simulator volume")
    parser.add_argument("--coins", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--coins-per-client", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--prewarm", type=int, default=750,
                        help="simulator blocks run (not written) before the snapshot, so the books have their steady size")
    parser.add_argument("--slack", type=float, default=25.0, help="seconds of extra blocks (start-up, connecting)")
    parser.add_argument("--tmp", default=None, help="directory for the temporary files (default: the system's)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    names = list(PROFILES) if args.profile == "both" else [args.profile]
    root = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    print(f"bench/e2e.py at {commit or '?'} ({root}), {os.cpu_count()} cores, Python {sys.version.split()[0]}, "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
    for name in names:
        rate, volume = PROFILES[name]
        run_profile(name, args.blocks_per_sec or rate, args.volume or volume, args)


if __name__ == "__main__":
    main()

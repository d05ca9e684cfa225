"""Attack benchmark: what huge request heads from one address cost everyone else.

Starts ``hlbook up --simulate`` (1 shard, 12 coins, history off) and a polite
client that, one request after another on a kept-alive connection, posts
``/info {"type": "l2Book", "coin": ...}`` and gets ``/ready``, recording each
latency. Rounds alternate a quiet phase (the polite client alone) with an
attack phase: ``--attackers`` connections from one address (a separate
process, so the client's timing does not share its interpreter), each sending
one of these heads as fast as the gateway reads it, and starting again when
refused:

- ``url``: ``GET /aaaa…`` — a request target of up to 64 MB;
- ``header``: one header whose value is up to 64 MB;
- ``headers``: up to 1,000,000 small header fields;
- ``bigline``: not a client: one valid fills line of ``--fills-trades`` trades (67,390: ~45 MB) of one
  coin appended to the simulator's live fills file as the next block's line. The polite client is then
  a WebSocket on every other coin's ``bbo``; its latency is a message's arrival minus its block time, and
  the attacked coin's trades are counted (all must come). Printed with ingest's RSS before and after.
- ``subscriptions``: each attacking connection a WebSocket holding every market feed
  of every coin it may (7 l2Book aggregations, bbo, trades, l4Book, activeAssetCtx:
  132 a connection with 12 coins), reading all it is sent, until the per-address
  budgets refuse more (``--max-subscriptions-per-ip``, connections per address).

Printed per phase: the polite client's requests, p50/p99/max latency and
failures (timeouts count as failures), the gateway's CPU (% of one core) and
peak RSS, and the bytes the attackers sent (into their sockets: what the gateway read, discarded or refused). The quiet
phases are the baseline, measured in the same run.

    .venv/bin/python bench/attack.py [--attack url,header,headers,subscriptions] [--attackers 20] [--seconds 8]
        [--rounds 1] [--python PY]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import free_port, proc_cpu_s, proc_rss_mb  # noqa: E402

from hlbook.common import nodefiles  # noqa: E402

CHUNK = 65536
MARK = 1 << 62  # tids of the big line's trades from here


def heads(kind: str) -> Iterator[bytes]:
    """The pieces of one hostile request head."""
    if kind == "url":
        yield b"GET /"
        for _ in range(1000):
            yield b"a" * CHUNK
    elif kind == "header":
        yield b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
        for _ in range(1000):
            yield b"b" * CHUNK
    else:
        yield b"GET /health HTTP/1.1\r\nHost: x\r\n"
        for i in range(10_000):
            yield b"".join(b"X-%d-%d: 1\r\n" % (i, j) for j in range(100))


def attacker(port: int, kind: str, sent: Any, stop: Any) -> None:
    """One connection after another, each sending a hostile head until refused or cut."""
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2, source_address=("127.0.0.9", 0)) as s:
                for piece in heads(kind):
                    if stop.is_set():
                        break
                    s.sendall(piece)
                    with sent.get_lock():
                        sent.value += len(piece)
        except OSError:
            time.sleep(0.01)  # refused or reset: start again


def feeds(coins: list[str]) -> list[dict[str, Any]]:
    """Every market feed of every coin an attacker can hold on one connection (history is off)."""
    books = [{"nSigFigs": None}, *({"nSigFigs": n} for n in (2, 3, 4, 5)), {"nSigFigs": 5, "mantissa": 2}, {"nSigFigs": 5, "mantissa": 5}]
    out: list[dict[str, Any]] = []
    for coin in coins:
        out += [{"type": "l2Book", "coin": coin, **b} for b in books]
        out += [{"type": kind, "coin": coin} for kind in ("bbo", "trades", "l4Book", "activeAssetCtx")]
    return out


def subscriber(port: int, coins: list[str], accepted: Any, stop: Any) -> None:
    """One WebSocket connection holding every market feed it is allowed, reading all it is sent
    (a client that keeps up: it costs the server the most); again when cut."""
    from websockets.sync.client import connect

    while not stop.is_set():
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.9", 0))
            with connect(f"ws://127.0.0.1:{port}/ws", sock=sock, max_size=None, open_timeout=5) as ws:
                for sub in feeds(coins):
                    ws.send(json.dumps({"method": "subscribe", "subscription": sub}))
                while not stop.is_set():
                    try:
                        text = ws.recv(timeout=0.5)
                    except TimeoutError:
                        continue
                    if isinstance(text, str) and text.startswith('{"channel":"subscriptionResponse"'):
                        with accepted.get_lock():
                            accepted.value += 1
        except Exception:
            time.sleep(0.05)  # refused (429, budget) or cut: again


def attack_main(port: int, kind: str, n: int, sent: Any, stop: Any, coins: list[str]) -> None:
    if kind == "subscriptions":
        target, args = subscriber, (port, coins, sent, stop)
    else:
        target, args = attacker, (port, kind, sent, stop)
    threads = [threading.Thread(target=target, args=args, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class Polite:
    """Sequential requests on one kept-alive connection; latencies in ms, failures counted."""

    def __init__(self, port: int, coin: str) -> None:
        self.port, self.coin = port, coin
        self.conn: http.client.HTTPConnection | None = None

    def one(self, method: str, path: str, body: bytes | None) -> float | None:
        started = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = self.conn.getresponse()
            response.read()
            ok = response.status == 200
        except (OSError, http.client.HTTPException):
            ok = False
        if not ok and self.conn is not None:
            self.conn.close()
            self.conn = None
        return (time.perf_counter() - started) * 1000 if ok else None

    def run(self, seconds: float) -> tuple[list[float], int]:
        body = json.dumps({"type": "l2Book", "coin": self.coin}).encode()
        latencies: list[float] = []
        failures = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for method, path, data in (("POST", "/info", body), ("GET", "/ready", None)):
                ms = self.one(method, path, data)
                if ms is None:
                    failures += 1
                else:
                    latencies.append(ms)
            time.sleep(0.005)
        return latencies, failures


def stop_up(up: subprocess.Popen[bytes]) -> None:
    """Stop ``hlbook up`` and its children (SIGINT, then SIGKILL after 20 s)."""
    os.killpg(up.pid, signal.SIGINT)
    try:
        up.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()


def gateway_pid(up_pid: int, name: bytes = b"gateway") -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == up_pid and name in cmd:
            return int(pid)
    raise RuntimeError(f"no {name.decode()} child of hlbook up")


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def phase(name: str, port: int, gw: int, seconds: float, attack: str | None, attackers: int, coins: list[str]) -> None:
    ctx = mp.get_context("fork")
    stop, sent = ctx.Event(), ctx.Value("q", 0)
    proc = None
    if attack:
        proc = ctx.Process(target=attack_main, args=(port, attack, attackers, sent, stop, coins), daemon=True)
        proc.start()
        time.sleep(3.0 if attack == "subscriptions" else 0.5)  # the attack is under way before the timing starts
    cpu0, rss = proc_cpu_s(gw) or 0.0, 0.0
    sampler_stop = threading.Event()

    def sample() -> None:
        nonlocal rss
        while not sampler_stop.wait(0.1):
            rss = max(rss, proc_rss_mb(gw))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    started = time.monotonic()
    latencies, failures = Polite(port, "BTC").run(seconds)
    elapsed = time.monotonic() - started
    cpu = ((proc_cpu_s(gw) or 0.0) - cpu0) / elapsed * 100
    sampler_stop.set()
    t.join()
    stop.set()
    if proc:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    print(f"{name:<16} requests {len(latencies):>6}  p50 {pct(latencies, 0.5):8.2f} ms  p99 {pct(latencies, 0.99):8.2f} ms  "
          f"max {max(latencies, default=float('nan')):8.1f} ms  failed {failures:>4}  gateway CPU {cpu:5.1f} %  "
          f"RSS peak {rss:7.1f} MB  " + (f"subscriptions accepted {sent.value:,}" if attack == "subscriptions" else
                                          f"attack sent {sent.value / 1e6:8.1f} MB"), flush=True)


def fills_events(coin: str, trades: int) -> bytes:
    """The ``"events":[...]}`` of a fills line holding ``trades`` trades (two fills each) of ``coin``, time ``{MS}``."""
    fill = ('{"coin":"%s","px":"100.5","sz":"0.01","side":"%s","time":{MS},"startPosition":"0.0","dir":"Open Long",'
            '"closedPnl":"0.0","hash":"0x%064x","oid":%d,"crossed":%s,"fee":"0.001","tid":%d,"feeToken":"USDC"}')
    events = []
    for i in range(trades):
        tid = MARK + i
        events.append('["0x%040x",%s]' % (i, fill % (coin, "B", tid, tid, "true", tid)))
        events.append('["0x%040x",%s]' % (i + 1, fill % (coin, "A", tid, tid + 1, "false", tid)))
    return ('"events":[' + ",".join(events) + "]}\n").encode()


def last_line(path: Path) -> dict[str, Any]:
    """The last complete line of a node file, decoded."""
    line = nodefiles.last_line(path)[1]
    if line is None:
        raise SystemExit(f"{path}: no complete line")
    return dict(json.loads(line))


def inject(data: Path, events: bytes, ahead: int = 10) -> int:
    """Append ``events`` as a fills line of the block ``ahead`` blocks on, right after the simulator
    wrote the one before it (its own line of that block comes after: a duplicate, dropped); returns its height."""
    path = max(data.glob("hl/data/node_fills_by_block/hourly/*/*"), key=lambda p: (p.parent.name, int(p.name)))
    last = last_line(path)
    height = int(last["block_number"]) + ahead
    when = datetime.fromisoformat(last["block_time"][:26]).replace(tzinfo=timezone.utc) + timedelta(milliseconds=100 * ahead)
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000"
    head = json.dumps({"local_time": stamp, "block_time": stamp, "block_number": height})[:-1] + ","
    line = head.encode() + events.replace(b"{MS}", str(int(when.timestamp() * 1000)).encode())
    while int(last_line(path)["block_number"]) < height - 1:
        time.sleep(0.002)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return height


def watch_feeds(port: int, coins: list[str], attacked: str, seconds: float, out: dict[str, Any]) -> None:
    """A WebSocket on every other coin's bbo and the attacked coin's trades, for ``seconds``."""
    from websockets.sync.client import connect

    delays: list[float] = []
    trades = 0
    with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=5) as ws:
        for coin in coins:
            sub = {"type": "trades", "coin": coin} if coin == attacked else {"type": "bbo", "coin": coin}
            ws.send(json.dumps({"method": "subscribe", "subscription": sub}))
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            try:
                message = json.loads(ws.recv(timeout=left))
            except TimeoutError:
                break
            if message["channel"] == "bbo":
                delays.append(time.time() * 1000 - message["data"]["time"])
            elif message["channel"] == "trades":
                trades += sum(1 for t in message["data"] if t["tid"] >= MARK)
    out.update(delays=delays, trades=trades)


def ingest_pid(up_pid: int) -> int:
    return gateway_pid(up_pid, b"ingest")


def profile(up_pid: int, seconds: float, into: str | None) -> list[subprocess.Popen[bytes]]:
    """``py-spy record --idle -f speedscope`` (samples in time order) of ingest, the shard and the gateway for
    ``seconds`` into folder ``into`` (None: none)."""
    if not into:
        return []
    spy = str(Path(sys.executable).with_name("py-spy"))
    return [subprocess.Popen([spy, "record", "-r", "200", "--idle", "-f", "speedscope", "-d", str(int(seconds)), "-o", f"{into}/{name}.txt",
                              "-p", str(gateway_pid(up_pid, name.encode()))], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name in ("ingest", "book", "gateway")]


def bigline(port: int, up_pid: int, data: Path, coins: list[str], seconds: float, trades: int, into: str | None) -> None:
    """A quiet phase and one with the big fills line appended 1 s in; the bbo of the other coins timed."""
    attacked = "BTC" if "BTC" in coins else coins[0]
    events = fills_events(attacked, trades)
    ingest = ingest_pid(up_pid)
    for name in ("quiet", "attack bigline"):
        out: dict[str, Any] = {}
        t = threading.Thread(target=watch_feeds, args=(port, coins, attacked, seconds, out))
        rss0 = proc_rss_mb(ingest)
        t.start()
        if name != "quiet":
            spies = profile(up_pid, seconds, into)
            time.sleep(1.0)
            inject(data, events)
        t.join()
        for spy in spies if name != "quiet" else []:
            spy.wait()
        time.sleep(2.0)
        delays = out["delays"]
        print(f"{name:<16} bbo messages {len(delays):>6}  p50 {pct(delays, 0.5):8.1f} ms  p99 {pct(delays, 0.99):8.1f} ms  "
              f"max {max(delays, default=float('nan')):8.1f} ms  {attacked} trades of the line {out['trades']:,}/"
              f"{trades if name != 'quiet' else 0:,}  ingest RSS {rss0:6.1f} -> {proc_rss_mb(ingest):6.1f} MB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", default="url,header,headers")
    parser.add_argument("--attackers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--fills-trades", type=int, default=67_390, help="bigline: trades in the line")
    parser.add_argument("--profile", help="bigline: a folder for py-spy speedscope profiles of ingest, book and gateway")
    parser.add_argument("--python", default=sys.executable, help="interpreter whose hlbook runs (a baseline checkout's)")
    args = parser.parse_args()
    port, info, mport = free_port(), free_port(), free_port(8)
    with tempfile.TemporaryDirectory(prefix="hlbook-attack-") as tmp:
        log = Path(tmp) / "up.log"
        up = subprocess.Popen(
            [args.python, "-m", "hlbook.cli", "up", "--simulate", "--shards", "1", "--coins", "12", "--port", str(port),
             "--info-port", str(info), "--metrics-base-port", str(mport), "--no-history", "--state-dir", str(Path(tmp) / "state"),
             "--log-level", "WARNING"],
            stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
            env={**os.environ, "TMPDIR": tmp, "HLBOOK_PARTIAL_WRITE_P": "0"})
        try:
            polite = Polite(port, "BTC")
            deadline = time.monotonic() + 120
            while polite.one("GET", "/ready", None) is None:
                if up.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"hlbook up did not get ready:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            gw = gateway_pid(up.pid)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("POST", "/info", body=b'{"type":"allMids"}', headers={"Content-Type": "application/json"})
            coins = sorted(json.loads(conn.getresponse().read()))
            conn.close()
            print(f"hlbook up --simulate (1 shard, 12 coins) with {args.python}; {args.attackers} attacking connections "
                  f"from one address; {args.seconds:.0f} s a phase", flush=True)
            if args.attack == "bigline":
                data = next(Path(tmp).glob("hlbook-sim-*"))
                for r in range(args.rounds):
                    bigline(port, up.pid, data, coins, args.seconds, args.fills_trades, args.profile)
                print("".join(line for line in log.read_text().splitlines(keepends=True) if "WARNING" in line or "ERROR" in line)[-2000:])
                return
            for r in range(args.rounds):
                for kind in args.attack.split(","):
                    phase("quiet", port, gw, args.seconds, None, 0, coins)
                    phase(f"attack {kind}", port, gw, args.seconds, kind, args.attackers, coins)
        finally:
            stop_up(up)


if __name__ == "__main__":
    main()

"""/info flood benchmark: what a flood of history queries costs everyone else, and
whether any answer is lost or an empty snapshot passed off as data.

Starts ``hlbook up --simulate`` (1 shard, 12 coins, the history service on),
waits until its users have fills, and takes up to ``--users`` real users from
the coins' recent trades. Rounds alternate a quiet phase with a flood phase:

- **polite client** (both phases): one kept-alive connection, one request after
  another: ``userFills`` of a user (answered by the history service) and
  ``l2Book`` of BTC (the shard); latency of each, failures (not 200, timeouts).
- **flood** (flood phase): ``--flooders`` kept-alive connections from one
  address (a separate process) posting ``userFills``, ``historicalOrders``,
  ``userFillsByTime`` and ``candleSnapshot`` of the users as fast as they are
  answered; answers counted by status, and 400 "did not answer" apart (a
  finished answer the gateway gave up on).
- **userFills subscriptions** (both phases, while the flood runs): every user's
  ``userFills`` subscribed at once over WebSocket (50 a connection); each
  user's first answer is a snapshot with fills, an empty snapshot for a user
  without fills before the phase, or an ``error`` naming the user. An empty
  snapshot for a user who had fills before is data lost and passed off as
  valid: counted as such.

The quiet phases are the baseline, measured in the same run.

    .venv/bin/python bench/info_flood.py [--flooders 16] [--users 200] [--seconds 10] [--rounds 1] [--python PY]
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attack import gateway_pid, pct, stop_up  # noqa: E402
from e2e import free_port, proc_cpu_s  # noqa: E402

HISTORY_TYPES = ("userFills", "historicalOrders", "userFillsByTime", "candleSnapshot")
PER_CONNECTION = 50  # userFills subscriptions a WebSocket connection makes


def post(conn: http.client.HTTPConnection, body: dict[str, Any]) -> tuple[int, bytes]:
    conn.request("POST", "/info", body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def query(kind: str, user: str, coin: str) -> dict[str, Any]:
    now = int(time.time() * 1000)
    if kind == "userFillsByTime":
        return {"type": kind, "user": user, "startTime": now - 3_600_000}
    if kind == "candleSnapshot":
        return {"type": kind, "req": {"coin": coin, "interval": "1m", "startTime": now - 3_600_000, "endTime": now}}
    return {"type": kind, "user": user}


def flooder(port: int, users: list[str], coins: list[str], counts: Any, lock: Any, stop: Any) -> None:
    """One kept-alive connection posting history queries until ``stop``; outcomes into ``counts``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    rng = random.Random(os.getpid() ^ threading.get_ident())
    local: Counter[str] = Counter()
    while not stop.is_set():
        try:
            status, body = post(conn, query(rng.choice(HISTORY_TYPES), rng.choice(users), rng.choice(coins)))
            local["did not answer" if status == 400 and b"did not answer" in body else str(status)] += 1
        except (OSError, http.client.HTTPException):
            local["connection error"] += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    with lock:
        for key, n in local.items():
            counts[key] = counts.get(key, 0) + n


def flood_main(port: int, n: int, users: list[str], coins: list[str], counts: Any, lock: Any, stop: Any) -> None:
    threads = [threading.Thread(target=flooder, args=(port, users, coins, counts, lock, stop)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def polite(port: int, user: str, seconds: float) -> tuple[list[float], int]:
    """Sequential userFills + l2Book requests for ``seconds``: latencies (ms), failures."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    latencies: list[float] = []
    failures = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for body in ({"type": "userFills", "user": user}, {"type": "l2Book", "coin": "BTC"}):
            started = time.perf_counter()
            try:
                status, _ = post(conn, body)
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            if status == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                failures += 1
        time.sleep(0.005)
    return latencies, failures


def subscribe_all(port: int, had: dict[str, int], timeout: float = 15.0) -> Counter[str]:
    """Every user's userFills subscribed at once; each user's first answer classified."""
    outcome: Counter[str] = Counter()
    users = list(had)
    groups = [users[i:i + PER_CONNECTION] for i in range(0, len(users), PER_CONNECTION)]

    def one_connection(group: list[str]) -> None:
        waiting = set(group)
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=10) as ws:
            for user in group:
                ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "userFills", "user": user}}))
            deadline = time.monotonic() + timeout
            while waiting and (left := deadline - time.monotonic()) > 0:
                try:
                    msg = json.loads(ws.recv(timeout=left))
                except TimeoutError:
                    break
                data = msg.get("data")
                if msg.get("channel") == "userFills" and isinstance(data, dict) and data.get("isSnapshot"):
                    user = data.get("user", "").lower()
                    if user in waiting:
                        waiting.discard(user)
                        fills = len(data.get("fills", []))
                        outcome["snapshot with fills" if fills else
                                "EMPTY snapshot, had fills" if had[user] else "empty snapshot, had none"] += 1
                elif msg.get("channel") == "error":
                    named = [u for u in waiting if u in str(data).lower()]
                    for user in named[:1]:
                        waiting.discard(user)
                        outcome["error told"] += 1
        outcome["no answer"] += len(waiting)

    threads = [threading.Thread(target=one_connection, args=(g,)) for g in groups]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcome


def fills_known(port: int, users: list[str]) -> dict[str, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        return {u: len(json.loads(post(conn, {"type": "userFills", "user": u})[1])) for u in users}
    finally:
        conn.close()


def phase(name: str, port: int, gw: int, seconds: float, flooders: int, users: list[str], coins: list[str]) -> None:
    had = fills_known(port, users)
    ctx = mp.get_context("fork")
    stop, lock, counts = ctx.Event(), ctx.Lock(), ctx.Manager().dict()
    proc = None
    if flooders:
        proc = ctx.Process(target=flood_main, args=(port, flooders, users, coins, counts, lock, stop), daemon=True)
        proc.start()
        time.sleep(1.0)  # the flood is under way before the timing starts
    cpu0, started = proc_cpu_s(gw) or 0.0, time.monotonic()
    subscribed: Counter[str] = Counter()
    sub_thread = threading.Thread(target=lambda: subscribed.update(subscribe_all(port, had)))
    sub_thread.start()
    latencies, failures = polite(port, users[0], seconds)
    sub_thread.join()
    elapsed = time.monotonic() - started
    cpu = ((proc_cpu_s(gw) or 0.0) - cpu0) / elapsed * 100
    stop.set()
    if proc:
        proc.join(15)
        if proc.is_alive():
            proc.kill()
    flood = dict(counts)
    total = sum(flood.values())
    print(f"{name:<6} polite: {len(latencies):>5} answers  p50 {pct(latencies, 0.5):7.2f} ms  p99 {pct(latencies, 0.99):8.2f} ms  "
          f"max {max(latencies, default=float('nan')):8.1f} ms  failed {failures:>3}  gateway CPU {cpu:5.1f} %", flush=True)
    if flooders:
        print(f"       flood: {total / (elapsed + 1.0):,.0f} requests/s, answers by status {dict(sorted(flood.items()))}", flush=True)
    print(f"       userFills subscriptions of {len(users)} users: {dict(sorted(subscribed.items()))}", flush=True)


def real_users(port: int, coins: list[str], limit: int) -> list[str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    users: dict[str, None] = {}
    try:
        for coin in coins:
            for trade in json.loads(post(conn, {"type": "recentTrades", "coin": coin})[1]):
                users.update(dict.fromkeys(u.lower() for u in trade.get("users", [])))
    finally:
        conn.close()
    return list(users)[:limit]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flooders", type=int, default=16)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--python", default=sys.executable, help="interpreter whose hlbook runs (a baseline checkout's)")
    args = parser.parse_args()
    port, info, mport = free_port(), free_port(), free_port(8)
    with tempfile.TemporaryDirectory(prefix="hlbook-flood-") as tmp:
        log = Path(tmp) / "up.log"
        with open(log, "wb") as out:
            up = subprocess.Popen(
                [args.python, "-m", "hlbook.cli", "up", "--simulate", "--shards", "1", "--coins", "12", "--port", str(port),
                 "--info-port", str(info), "--metrics-base-port", str(mport), "--state-dir", str(Path(tmp) / "state"),
                 "--log-level", "WARNING"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
        try:
            deadline = time.monotonic() + 120
            users: list[str] = []
            coins: list[str] = []
            while len(users) < args.users:
                if up.poll() is not None or time.monotonic() > deadline:
                    if users:
                        break
                    raise SystemExit(f"hlbook up did not serve trades:\n{log.read_text()[-3000:]}")
                time.sleep(2)
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    coins = sorted(json.loads(post(conn, {"type": "allMids"})[1]))
                    conn.close()
                    users = real_users(port, coins, args.users)
                except (OSError, http.client.HTTPException, ValueError):
                    continue
            gw = gateway_pid(up.pid)
            print(f"hlbook up --simulate (1 shard, 12 coins, history on) with {args.python}; {len(users)} users; "
                  f"{args.flooders} flooding connections from one address; {args.seconds:.0f} s a phase", flush=True)
            for _ in range(args.rounds):
                phase("quiet", port, gw, args.seconds, 0, users, coins)
                phase("flood", port, gw, args.seconds, args.flooders, users, coins)
        finally:
            stop_up(up)


if __name__ == "__main__":
    main()

"""l4 snapshot cost: what one ``l4Book`` subscriber costs the shard's block loop
and the gateway's event loop, on the real mainnet BTC book of the fixture
``mainnet_btc_985148181_985148206`` (51,351 orders).

- **baseline** (the path before forked renders, measured in the same run): the
  shard builds the levels as dicts (``Book.l4_levels``) and msgpack-encodes
  them in its loop; the gateway decodes them and JSON-encodes the client
  message in its event loop.
- **now**: the shard forks (``services/book/jobs.py``) and the child renders
  the clients' JSON (``services/book/l4.py``); the parent only forks and reads
  the pipe; the gateway wraps the bytes (``frames.Blob``) with no decode.

Printed: time in the shard's loop (fork; the pipe reads, 1 MB a loop turn),
time in the child, time in the gateway's loop, bytes, the copy-on-write cost
to the parent of applying blocks while a child is alive, and the ratio of the
loops' time to the baseline's. Each figure is the median of ``--repeat`` runs.

    .venv/bin/python bench/l4.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "mainnet_btc_985148181_985148206.tar.gz"


def main() -> None:
    from hlbook.common import wire
    from hlbook.services.book import jobs, l4, snapshot
    from hlbook.services.gateway.feeds import snapshot_message
    from hlbook.services.gateway.protocol import message

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(FIXTURE) as tar:
            tar.extractall(tmp, filter="data")
        height, books = snapshot.load_file(str(Path(tmp) / "snapshot_985148181.json"))
    book = books["BTC"]
    gc.collect()
    rss = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    print(f"bench/l4.py: BTC book of {len(book):,} orders, process RSS {rss:.0f} MB (a shard holding it: ~110 MB), "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}")

    def baseline() -> tuple[float, float, int]:
        t0 = time.perf_counter()
        payload = wire.encode({"ok": True, "coin": "BTC", "height": height, "time": 0, "levels": book.l4_levels()})
        t1 = time.perf_counter()
        reply = wire.decode(payload)
        text = message("l4Book", {"Snapshot": {"coin": reply["coin"], "time": reply["time"], "height": reply["height"],
                                               "levels": reply["levels"]}})
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, len(text.encode())

    def forked() -> tuple[float, float, float, float, int]:
        runner = jobs.Jobs()
        got: list[list[bytes]] = []
        t0 = time.perf_counter()
        runner.start("l4", lambda: l4.render(book), lambda chunks, error: got.append(chunks or []))
        t_fork = time.perf_counter() - t0
        fd = runner.fds()[0]
        reading, turns = 0.0, 0
        while runner.running:
            ta = time.perf_counter()
            n = runner.read(fd)
            reading += time.perf_counter() - ta
            turns += n > 0
            if runner.running and n == 0:
                time.sleep(0.0005)
        t_child = time.perf_counter() - t0
        t2 = time.perf_counter()
        blob = snapshot_message({"coin": "BTC", "time": 0, "height": height}, [memoryview(c) for c in got[0]])
        t_gateway = time.perf_counter() - t2
        return t_fork, reading / max(turns, 1), t_child, t_gateway, blob.size

    sample = list(itertools.islice(book.orders.values(), 0, None, 1000))  # 52 orders spread over the book

    def cow() -> float:
        """What changing as many orders as a busy block does costs the parent while a child holds the pages."""
        def idle() -> list[bytes]:
            time.sleep(0.3)
            return [b""]

        runner = jobs.Jobs()
        runner.start("idle", idle, lambda c, e: None)
        t0 = time.perf_counter()
        for order in sample:
            order.sz += 1
        elapsed = time.perf_counter() - t0
        for order in sample:
            order.sz -= 1
        while runner.running:
            runner.read(runner.fds()[0])
            time.sleep(0.01)
        return elapsed

    base = [baseline() for _ in range(args.repeat)]
    now = [forked() for _ in range(args.repeat)]
    touch = [cow() for _ in range(args.repeat)]
    med = statistics.median
    shard_base, gw_base, size_base = med(b[0] for b in base), med(b[1] for b in base), base[0][2]
    fork, read_turn, child, gw_now, size_now = (med(n[i] for n in now) for i in range(5))
    fork_max = max(n[0] for n in now)
    print(f"baseline (dicts + msgpack in the shard's loop, decode + JSON in the gateway's): shard loop {shard_base * 1e3:.0f} ms, "
          f"gateway loop {gw_base * 1e3:.0f} ms, {size_base / 1e6:.1f} MB to each client")
    print(f"now: shard loop: fork {fork * 1e3:.2f} ms (max {fork_max * 1e3:.2f}), then pipe reads of {jobs.READ_BUDGET >> 20} MB at most "
          f"{read_turn * 1e3:.2f} ms a turn; child (render, {jobs.CHILD_NICENESS} niceness) {child * 1e3:.0f} ms; "
          f"gateway loop {gw_now * 1e3:.3f} ms; {size_now / 1e6:.1f} MB to each client")
    print(f"copy-on-write while a child lives: changing 52 orders spread over the book costs the parent "
          f"{med(touch) * 1e3:.3f} ms")
    print(f"longest hold of the shard's loop: {max(fork, read_turn) * 1e3:.2f} ms vs {shard_base * 1e3:.0f} ms "
          f"(ratio {max(fork, read_turn) / shard_base:.4f}); gateway loop: {gw_now * 1e3:.3f} ms vs {gw_base * 1e3:.0f} ms "
          f"(ratio {gw_now / gw_base:.5f})")


if __name__ == "__main__":
    main()

"""Point-in-time books (``/info`` l4Snapshot, l2Book with a time): what one rebuild costs
(``services/replay/asof.py``, the work a gateway's worker process does) on the simulator's
whole market.

The simulator (``--profile full``) writes by-block files; its fileSnapshot becomes a checkpoint;
after ``--seconds`` more of blocks the simulator stops and the book as of the block three before
the last is rebuilt for BTC (orders created in every block: every status line parsed) and for the
quietest coin with orders (most status lines left unparsed). Printed: the checkpoint's load,
each rebuild's time (``--repeat`` times), blocks and megabytes of status lines read.

    .venv/bin/python bench/past.py [--seconds 45] [--repeat 2] [--dir DIR]

Everything goes in a temporary folder under ``--dir`` (~45 MB of files a second of blocks),
removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    from hlbook.common import nodefiles
    from hlbook.common.models import block_time_ms
    from hlbook.services.book import checkpoint, snapshot
    from hlbook.services.book.checkpoint import Header
    from hlbook.services.replay.asof import Source, book_at

    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--port", type=int, default=3917)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hlbook-bench-past-", dir=args.dir))
    data, folder = root / "node", root / "checkpoints"

    def time_of(height: int) -> int:
        return block_time_ms(json.loads(next(nodefiles.lines_between(data, "raw_book_diffs", "by-block", height, height)))["block_time"])

    sim = subprocess.Popen([sys.executable, "-m", "hlbook.cli", "sim", "--profile", "full", "--data-dir", str(data),
                            "--info-port", str(args.port), "--mode", "by-block"], env={**os.environ, "TMPDIR": str(root)},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                height, books = snapshot.load(snapshot.fetch(f"http://127.0.0.1:{args.port}/info", timeout=180, directory=str(root)))
                break
            except snapshot.SnapshotError:
                assert time.monotonic() < deadline and sim.poll() is None, "the simulator never served a snapshot"
                time.sleep(2)
        path = checkpoint.write(folder, Header(height, time_of(height), 0, 1, 0, ""), books)
        time.sleep(args.seconds)
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)
    try:
        last = max(h for f in nodefiles.hour_files(data, "raw_book_diffs", "by-block") if (h := nodefiles.tail(f)[1]) is not None)
        target = last - 3
        statuses = sum(p.stat().st_size for p in nodefiles.hour_files(data, "order_statuses", "by-block"))
        print(f"{len(books)} coins, {sum(len(b) for b in books.values()):,} orders; {target - height} blocks after the checkpoint, "
              f"{statuses / 1e6:,.0f} MB of status lines")
        started = time.perf_counter()
        checkpoint.load_file(path, "BTC".__eq__)
        print(f"checkpoint load (one coin decoded): {time.perf_counter() - started:.2f} s")
        quiet = min((c for c, b in books.items() if len(b)), key=lambda c: len(books[c]))
        for coin in ["BTC", quiet] * args.repeat:
            started = time.perf_counter()
            asof = book_at(Source(str(folder), str(data), "by-block"), coin, time_of(target), time.monotonic() + 3600)
            took = time.perf_counter() - started
            print(f"{coin}: {len(asof.book):,} orders as of block {asof.height}: {took:.2f} s, "
                  f"{took / (target - height) * 1000:.1f} ms a block")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

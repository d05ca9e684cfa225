"""History service figures.

1. Backfill speed on node files already on disk, against a bare parse of the
   same files measured in the same run (read + ``orjson.loads`` of every line):
   - ``real``: the mainnet BTC fixture replicated (renumbered) to --mb MB of
     order statuses (statuses-heavy: ~1,000 a block, 95 % rejections);
   - ``sim``: --sim-blocks blocks of ``hlbook sim`` (50 coins: fills-heavy).
2. Store size per million fills (and per million orders), from SQLite's dbstat.
3. Query latency under live load: a store holding a user with --user-fills
   fills and a coin with 5,000 one-minute candles; ``hlbook history`` serves it
   while a fake ingest publishes ``HIST|`` blocks of the sim at 15 blocks/s;
   ``userFills`` (2,000 newest) and ``candleSnapshot`` (5,000 candles) p50/p99
   over its ROUTER, against the same queries with no live load (same run).

    .venv/bin/python bench/history.py [--mb 100] [--sim-blocks 1500] [--queries 300]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import orjson
import zmq

from hlbook.common import nodefiles, topics, wire
from hlbook.common.models import DECODERS, STATUS_HEADS, Fill, block_time_ms
from hlbook.services.history.backfill import STREAMS, Backfill
from hlbook.services.history.store import Store
from ingest import FIXTURE, replicate

USER = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20
COIN = "BENCH"


def bare_parse(data: Path) -> tuple[float, int]:
    """Seconds to read and orjson.loads every line of the streams history reads; bytes."""
    size = 0
    start = time.perf_counter()
    for stream in STREAMS:
        for path in nodefiles.hour_files(data, stream, "by-block"):
            with open(path, "rb") as fh:
                for line in fh:
                    size += len(line)
                    orjson.loads(line)
    return time.perf_counter() - start, size


def backfill(data: Path, db: Path) -> tuple[float, int, Store]:
    store = Store(db, days=1e6)
    work = Backfill(data, "by-block", store)
    start = time.perf_counter()
    while work.busy:
        work.step(0.5)
        store.commit()
    return time.perf_counter() - start, work.stored, store


def report_backfill(name: str, data: Path, tmp: Path) -> Store:
    base_s, size = bare_parse(data)
    base_s = min(base_s, bare_parse(data)[0])  # warm cache, best of two
    seconds, blocks, store = backfill(data, tmp / f"{name}.sqlite")
    mb = size / 1e6
    print(f"backfill {name}: {mb:.0f} MB, {blocks} blocks in {seconds:.2f} s = {mb / seconds:.0f} MB/s, {blocks / seconds:.0f} blocks/s; "
          f"bare parse {mb / base_s:.0f} MB/s, {blocks / base_s:.0f} blocks/s; ratio {base_s / seconds:.2f}")
    return store


def report_size(store: Store) -> None:
    pages = dict(store.db.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"))
    for table, indexes in (("fills", ("fills_by_time",)), ("orders", ("orders_by_user", "orders_by_cloid", "orders_by_time")),
                           ("trades", ("trades_by_time",))):
        (rows,) = store.db.execute(f"SELECT count(*) FROM {table}").fetchone()
        size = pages.get(table, 0) + sum(pages.get(i, 0) for i in indexes)
        if rows:
            print(f"store: {table}: {rows} rows, {size / rows:.0f} bytes a row with its indexes = {size / rows:.0f} MB per million")
    print(f"store: {store.size() / 1e6:.1f} MB on disk in all")


def sim_data(tmp: Path, blocks: int) -> Path:
    data = tmp / "sim"
    subprocess.run([sys.executable, "-m", "hlbook.cli", "sim", "--data-dir", str(data), "--blocks", str(blocks),
                    "--blocks-per-sec", "10000", "--coins", "50", "--info-port", "0", "--log-level", "WARNING"], check=True)
    return data


def synthetic_store(db: Path, fills: int) -> None:
    """A store with ``fills`` trades of USER (taker) against OTHER on COIN, one a minute: 5,000+ 1m candles."""
    store = Store(db, days=1e6)
    start = 1_700_000_000_000
    for i in range(fills):
        t = start + i * 60_000
        px, tid = f"{100 + i % 50}.5", 10_000_000 + i
        taker = Fill(COIN, px, "1.25", "B", t, "0.0", "Open Long", "0.0", "0x" + "00" * 32, 1000 + i, True, "0.01", tid, feeToken="USDC", twapId=None)
        maker = Fill(COIN, px, "1.25", "A", t, "0.0", "Open Short", "0.0", "0x" + "00" * 32, 500_000 + i, False, "-0.001", tid, feeToken="USDC", twapId=None)
        store.add_block(i + 1, t, [], [(USER, taker), (OTHER, maker)])
        if i % 1000 == 999:
            store.commit()
    store.commit()
    store.close()


def live_blocks(data: Path) -> list[bytes]:
    """The sim's blocks as ingest's HIST| payloads (non-rejected statuses, every fill)."""
    by_height: dict[int, list] = {}
    for stream in STREAMS:
        for path in nodefiles.hour_files(data, stream, "by-block"):
            for line in path.read_bytes().splitlines():
                if stream == "order_statuses":
                    row = STATUS_HEADS.decode(line).resolve(None)[0]
                else:
                    row = DECODERS[stream].decode(line)
                slot = by_height.setdefault(row.block_number, [block_time_ms(row.block_time), [], []])
                slot[1 if stream == "order_statuses" else 2] = row.events
    return [wire.encode(wire.HistoryBlock(h, h - 1, ms, statuses, fills)) for h, (ms, statuses, fills) in sorted(by_height.items())]


def latencies(query: str, n: int) -> dict[str, list[float]]:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.connect(query)
    asks = {
        "userFills": wire.UserFillsQuery(user=USER),
        "candleSnapshot": wire.CandlesQuery(coin=COIN, interval="1m", start=0, end=2**62),
    }
    out: dict[str, list[float]] = {k: [] for k in asks}
    for i in range(n):
        for name, q in asks.items():
            start = time.perf_counter()
            sock.send(wire.encode(q))
            frames = sock.recv_multipart()
            out[name].append(time.perf_counter() - start)
            if i == 0:
                assert len(orjson.loads(frames[1])) >= (2000 if name == "userFills" else 5000), name
        time.sleep(0.05)
    sock.close(0)
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] * 1000


def report_queries(tmp: Path, data: Path, fills: int, n: int) -> None:
    db = tmp / "queries.sqlite"
    synthetic_store(db, fills)
    payloads = live_blocks(data)
    sockets = tempfile.mkdtemp(prefix="hlbook-bench-")
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{sockets}/ingest")
    empty = tmp / "empty"
    empty.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "hlbook.cli", "history", "--data-dir", str(empty), "--db", str(db),
                             "--history-days", "1000000", "--niceness", "0", "--ingest-pub", f"ipc://{sockets}/ingest",
                             "--pub", f"ipc://{sockets}/pub", "--query", f"ipc://{sockets}/query", "--log-level", "WARNING"])
    try:
        query = f"ipc://{sockets}/query"
        latencies(query, 5)  # warm
        idle = latencies(query, n)
        stop = threading.Event()

        def feed() -> None:
            start = time.monotonic()
            for i, payload in enumerate(payloads):
                if stop.is_set():
                    return
                time.sleep(max(0.0, start + i / 15 - time.monotonic()))
                pub.send_multipart([topics.HISTORY, payload])

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        time.sleep(0.5)
        loaded = latencies(query, n)
        stop.set()
        feeder.join()
    finally:
        proc.terminate()
        proc.wait(10)
        pub.close(0)
    for name in idle:
        a, b = idle[name], loaded[name]
        print(f"{name}: idle p50 {pct(a, .5):.2f} / p99 {pct(a, .99):.2f} ms; with 15 live blocks/s (sim, 50 coins) "
              f"p50 {pct(b, .5):.2f} / p99 {pct(b, .99):.2f} ms; ratio p99 {pct(b, .99) / pct(a, .99):.2f} ({n} queries each)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--sim-blocks", type=int, default=1500)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--user-fills", type=int, default=6000)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; sqlite {sqlite3.sqlite_version}")
    with tempfile.TemporaryDirectory(prefix="hlbook-bench-history-") as tmp_name:
        tmp = Path(tmp_name)
        fixture, real = tmp / "fixture", tmp / "real"
        with tarfile.open(FIXTURE) as tar:
            tar.extractall(fixture, filter="data")
        replicate(fixture, real, args.mb)
        report_backfill("real", real, tmp).close()
        data = sim_data(tmp, args.sim_blocks)
        store = report_backfill("sim", data, tmp)
        report_size(store)
        store.close()
        report_queries(tmp, data, args.user_fills, args.queries)


if __name__ == "__main__":
    main()

"""Book shard benchmark on the real mainnet BTC book (51k orders).

Prints, each with a baseline measured in the same run:
- snapshot load time (vs. a bare ``orjson.loads`` of the same file);
- diffs applied per second (synthetic new/update/remove blocks around the
  top of the real book, generated beforehand; vs. a naive dict book);
- p50/p99 µs to produce top-20 L2 + BBO after a block, depth-100 L2, and
  aggregations from incremental views and by scanning levels (vs. a naive
  aggregate-and-sort of the whole book);
- resident bytes per order (tracemalloc; vs. keeping the node's decoded
  order objects).

    .venv/bin/python bench/book.py [--snapshot PATH] [--blocks 4000] [--diffs-per-block 50]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import msgspec
import orjson

from hlbook.common import fixed
from hlbook.common.models import BookDiff, DiffBody, NewDiff, Order as NodeOrder, OrderStatus, UpdateDiff
from hlbook.services.book import l2, snapshot
from hlbook.services.book.book import Book

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "data" / "mainnet_btc_985148181_985148206.tar.gz"
Block = tuple[list[BookDiff], list[OrderStatus]]


def snapshot_path(arg: str | None) -> str:
    if arg:
        return arg
    target = tempfile.mkdtemp(prefix="hlbook-bench-")
    with tarfile.open(FIXTURE) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".json"))
        tar.extractall(target, members=[member], filter="data")
    return os.path.join(target, member.name)


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------ synthetic blocks


def generate(book: Book, n_blocks: int, per_block: int, seed: int = 1) -> list[Block]:
    """Blocks of new/update/remove diffs that fit ``book`` (shadow model, not timed).

    Mix like mainnet BTC: ~45 % new near the top (exponential depth, mean 25
    ticks), ~45 % remove (80 % of them of orders placed during the run),
    ~10 % update. Removes from the middle of long levels (the real book has
    levels of 4,468 orders) cost a list scan, so they are in."""
    rng = random.Random(seed)
    live = {oid: (o.kind[0], o.px, o.sz) for oid, o in book.orders.items()}
    oids = list(live)
    recent: list[int] = []
    next_oid = max(live) + 1
    best_bid, best_ask = book.bids.best().px, book.asks.best().px
    tick = fixed.ONE
    blocks: list[Block] = []
    for _ in range(n_blocks):
        diffs: list[BookDiff] = []
        statuses: list[OrderStatus] = []
        for _ in range(per_block):
            r = rng.random()
            if r < 0.45 or len(live) < 1000:
                side = "B" if rng.random() < 0.5 else "A"
                depth = min(int(rng.expovariate(1 / 25)), 3000) * tick  # most orders within a few $ of the top
                px = best_bid - depth if side == "B" else best_ask + depth
                sz = rng.randrange(1, 200_000) * 10**5
                oid, next_oid = next_oid, next_oid + 1
                live[oid] = (side, px, sz)
                oids.append(oid)
                recent.append(oid)
                px_s, sz_s = fixed.fmt(px), fixed.fmt(sz)
                diffs.append(BookDiff("0x%040x" % rng.randrange(5000), oid, "BTC", side, px_s, DiffBody(new=NewDiff(sz_s))))
                order = NodeOrder("BTC", side, px_s, sz_s, oid, 1778002736649, "N/A", False, "0.0", [], False, False, "Limit", sz_s, "Alo", "0x%032x" % oid)
                statuses.append(OrderStatus("t", diffs[-1].user, None, None, "open", order))
                continue
            oid = _pick(rng, live, oids, recent)
            side, px, sz = live[oid]
            if r < 0.9:
                del live[oid]
                diffs.append(BookDiff("0x0", oid, "BTC", side, fixed.fmt(px), "remove"))
            else:
                new_sz = max(sz // 2, 10**5)
                live[oid] = (side, px, new_sz)
                diffs.append(BookDiff("0x0", oid, "BTC", side, fixed.fmt(px), DiffBody(update=UpdateDiff(fixed.fmt(sz), fixed.fmt(new_sz)))))
        blocks.append((diffs, statuses))
    return blocks


def _pick(rng: random.Random, live: dict, oids: list[int], recent: list[int]) -> int:
    pool = recent if recent and rng.random() < 0.8 else oids
    while True:
        i = rng.randrange(len(pool))
        oid = pool[i]
        pool[i] = pool[-1]
        pool.pop()
        if oid in live:
            return oid


# ------------------------------------------------------------ naive baseline


class NaiveBook:
    """What one writes first: oid -> (side, px, sz) dict; levels by aggregate and sort."""

    def __init__(self, book: Book) -> None:
        self.orders = {oid: (o.kind[0], fixed.fmt(o.px), o.sz) for oid, o in book.orders.items()}

    def apply(self, diffs: list[BookDiff]) -> None:
        for d in diffs:
            body = d.raw_book_diff
            if body == "remove":
                del self.orders[d.oid]
            elif body.new is not None:
                self.orders[d.oid] = (d.side, d.px, fixed.parse(body.new.sz))
            else:
                side, px, _ = self.orders[d.oid]
                self.orders[d.oid] = (side, px, fixed.parse(body.update.newSz))

    def top(self, n: int) -> tuple[list, list]:
        agg: dict[tuple[str, int], list[int]] = {}
        for side, px, sz in self.orders.values():
            lv = agg.setdefault((side, fixed.parse(px)), [0, 0])
            lv[0] += sz
            lv[1] += 1
        bids = sorted((k[1] for k in agg if k[0] == "B"), reverse=True)[:n]
        asks = sorted(k[1] for k in agg if k[0] == "A")[:n]
        return (
            [(fixed.fmt(p), fixed.fmt(agg["B", p][0]), agg["B", p][1]) for p in bids],
            [(fixed.fmt(p), fixed.fmt(agg["A", p][0]), agg["A", p][1]) for p in asks],
        )


# ------------------------------------------------------------ measurements


def bench_load(data: bytes) -> None:
    ours = best_of(5, lambda: snapshot.load(data))
    base = best_of(5, lambda: orjson.loads(data))
    print(f"snapshot load: {ours * 1000:.0f} ms ({len(data) / 1e6:.1f} MB); bare orjson.loads {base * 1000:.0f} ms; ratio {ours / base:.2f}")


def bench_memory(data: bytes) -> None:
    gc.collect()
    tracemalloc.start()
    _, books = snapshot.load(data)
    gc.collect()
    ours = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    n = len(books["BTC"])
    del books
    gc.collect()
    decoder = msgspec.json.Decoder(tuple[int, list[tuple[str, tuple[list[tuple[str, NodeOrder]], list[tuple[str, NodeOrder]]]]]])
    tracemalloc.start()
    kept = decoder.decode(data)
    gc.collect()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del kept
    print(f"resident per order: {ours / n:.0f} B ({n} orders, tracemalloc); node Order structs kept as decoded {base / n:.0f} B; ratio {ours / base:.2f}")


def bench_apply(data: bytes, n_blocks: int, per_block: int) -> None:
    _, books = snapshot.load(data)
    book = books["BTC"]
    blocks = generate(book, n_blocks, per_block)
    naive = NaiveBook(book)
    n_diffs = sum(len(d) for d, _ in blocks)
    gc.collect()
    start = time.perf_counter()
    for height, (diffs, statuses) in enumerate(blocks, 1):
        book.apply(height, 0, diffs, statuses)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    for diffs, _ in blocks:
        naive.apply(diffs)
    base = time.perf_counter() - start
    assert l2.levels(book, 20) == naive.top(20), "bench book diverged from the naive book"
    print(f"diffs applied: {n_diffs / ours:,.0f}/s ({n_diffs} diffs, {len(blocks)} blocks, book {len(book)} orders after); naive dict {n_diffs / base:,.0f}/s; ratio {base / ours:.2f}")
    _, books = snapshot.load(data)
    book = books["BTC"]
    l2.sync_views(book, {(2, None), (3, None), (5, 5)})
    gc.collect()
    start = time.perf_counter()
    for height, (diffs, statuses) in enumerate(blocks, 1):
        book.apply(height, 0, diffs, statuses)
    print(f"diffs applied with 3 aggregated views attached: {n_diffs / (time.perf_counter() - start):,.0f}/s")


def bench_reads(data: bytes, n_blocks: int, per_block: int) -> None:
    _, books = snapshot.load(data)
    book = books["BTC"]
    blocks = generate(book, n_blocks, per_block, seed=2)
    naive = NaiveBook(book)
    l2.sync_views(book, {(5, 5), (2, None)})  # as the publisher does for subscribed aggregations
    reads = {
        "top-20 L2 + BBO": lambda: (l2.levels(book, 20), l2.bbo(book)),
        "depth-100 L2 + BBO": lambda: (l2.levels(book, 100), l2.bbo(book)),
        "nSigFigs 5 mantissa 5, 100 buckets (view)": lambda: l2.levels(book, 100, 5, 5),
        "nSigFigs 2, 100 buckets (view)": lambda: l2.levels(book, 100, 2),
        "nSigFigs 5 mantissa 5, 100 buckets (scan)": lambda: (l2.side_levels(book.bids, 100, 5, 5), l2.side_levels(book.asks, 100, 5, 5)),
        "nSigFigs 2, 100 buckets (scan)": lambda: (l2.side_levels(book.bids, 100, 2), l2.side_levels(book.asks, 100, 2)),
    }
    series: dict[str, list[float]] = {name: [] for name in reads}
    series["naive top-20 (aggregate + sort)"] = []
    gc.disable()
    try:
        for height, (diffs, statuses) in enumerate(blocks, 1):
            book.apply(height, 0, diffs, statuses)
            for name, fn in reads.items():
                start = time.perf_counter()
                fn()
                series[name].append(time.perf_counter() - start)
            if height % 20 == 0:  # the naive one is slow: sample it
                naive.orders = {oid: (o.kind[0], fixed.fmt(o.px), o.sz) for oid, o in book.orders.items()}
                start = time.perf_counter()
                naive.top(20)
                series["naive top-20 (aggregate + sort)"].append(time.perf_counter() - start)
    finally:
        gc.enable()
    p50 = {}
    for name, values in series.items():
        values.sort()
        p50[name] = statistics.median(values)
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        print(f"{name}: p50 {p50[name] * 1e6:.1f} µs, p99 {p99 * 1e6:.1f} µs ({len(values)} blocks)")
    print(f"ratio naive/ours (p50, top-20): {p50['naive top-20 (aggregate + sort)'] / p50['top-20 L2 + BBO']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshot", help="node fileSnapshot JSON (default: the fixture, extracted to a temp dir)")
    parser.add_argument("--blocks", type=int, default=4000)
    parser.add_argument("--diffs-per-block", type=int, default=50)
    args = parser.parse_args()
    data = Path(snapshot_path(args.snapshot)).read_bytes()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    bench_load(data)
    bench_memory(data)
    bench_apply(data, args.blocks, args.diffs_per_block)
    bench_reads(data, args.blocks // 2, args.diffs_per_block)


if __name__ == "__main__":
    main()

"""CPU per block of each stage of the pipeline, in one process, on whole-market blocks.

The real classes, real sockets (ipc), no other process competing for the
measured one's core, so a change to one stage shows as a stable figure
(bench/e2e.py measures the whole pipeline as users see it; this finds which
stage moved and by how much):

1. **Node files**: ``--blocks`` blocks of the simulator's full profile (every market of
   mainnet, ~8,000 statuses, ~700 diffs, ~70 fills a block) written once into
   ``--stage`` with a snapshot (kept there for the next run: ``--stage DIR``).
2. **ingest**: the real ``Ingest`` follows node files to which the staged blocks are
   appended one at a time, as a node writes them, and publishes on XPUB; a SUB takes every
   message the shards, the gateway and the history service would (``H|``, ``B|``, ``T|``,
   ``HIST|``). CPU of ``Ingest.step`` per block.
3. **shard**: for each shard of ``--shards``, the real ``Stream`` (books from the
   snapshot) applies ingest's messages and publishes on an XPUB to a SUB subscribed as
   the bench's clients are (bbo and l2Book of ``--subscribed`` coins). CPU per block.
4. **history**: the real ``Store`` stores every ``HIST|`` block, committing as the
   service does by default (every COMMIT_EVERY s of the blocks' time), and at each
   ``--commit-every`` interval too. CPU per block.

    .venv/bin/python bench/stages.py [--blocks 120] [--stage DIR] [--shards 2] [--subscribed 200] [--followed 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import zmq

ROOT = Path(__file__).resolve().parents[1]


def generate(stage: Path, n_blocks: int) -> None:
    from hlbook.services.nodesim.engine import Simulator
    from hlbook.services.nodesim.info_server import render
    from hlbook.services.nodesim.writer import NodeWriter

    start = datetime.now(timezone.utc) - timedelta(seconds=n_blocks / 12 + 10)
    sim = Simulator(seed=1, coins=50, blocks_per_sec=12.0, volume=1.0, start_time=start, profile="full")
    for _ in range(24):
        sim.step()
    height, body = sim.snapshot()
    (stage / "snapshot.json").write_bytes(render(height, body, True, True))
    with NodeWriter(stage / "node", ("by-block",), partial_p=0.0, seed=1) as writer:
        for _ in range(n_blocks):
            writer.write_block(sim.step())
    (stage / "first").write_text(str(height + 1))


def cpu() -> float:
    return time.process_time()


def node_lines(node: Path) -> tuple[list[Path], dict[int, list[tuple[int, int, int]]]]:
    """The staged files and, per height, its lines as (file index, offset, length) in stream order."""
    from hlbook.common.models import STREAMS
    from hlbook.common.nodefiles import hour_files, line_height

    files: list[Path] = []
    where: dict[int, list[tuple[int, int, int]]] = {}
    for stream in STREAMS:
        for path in hour_files(node, stream, "by-block"):
            files.append(path)
            offset = 0
            with open(path, "rb") as fh:
                for line in fh:
                    height = line_height(line)
                    assert height is not None
                    where.setdefault(height, []).append((len(files) - 1, offset, len(line)))
                    offset += len(line)
    return files, where


def run_ingest(stage: Path, sockets: Path, first: int, n_blocks: int) -> tuple[list[tuple[bytes, bytes]], float]:
    """Ingest as it runs live: each block's three lines appended to the node files (as a node
    writes them), then ingest's loop until it published that block."""
    from hlbook.common import topics
    from hlbook.services.ingest.service import Ingest, IngestConfig

    files, where = node_lines(stage / "node")
    live = sockets.parent / "live"
    outs = {}
    for index, path in enumerate(files):
        target = live / path.relative_to(stage / "node")
        target.parent.mkdir(parents=True, exist_ok=True)
        outs[index] = open(target, "ab", buffering=0)
    sources = {index: open(path, "rb") for index, path in enumerate(files)}

    def append(height: int) -> None:
        for index, offset, length in where[height]:
            sources[index].seek(offset)
            outs[index].write(sources[index].read(length))

    append(first)
    cfg = IngestConfig(data_dir=str(live), from_height=first, pub=f"ipc://{sockets}/pub", replay=f"ipc://{sockets}/replay",
                       watch=False, block_timeout=3600)
    ctx = zmq.Context.instance()
    ingest = Ingest(cfg, ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(cfg.pub)
    for prefix in (topics.HEADER, topics.BOOK_PREFIX, topics.TRADES_PREFIX, topics.DETAILS_PREFIX, topics.BLOCK_END, topics.HISTORY):
        sub.setsockopt(zmq.SUBSCRIBE, prefix)
    deadline = time.monotonic() + 5
    while ingest.subs.history <= 0 and time.monotonic() < deadline:  # the SUB's subscriptions, before any block
        if ingest.pub.poll(100):
            ingest.subs.handle(ingest.pub.recv())
    messages: list[tuple[bytes, bytes]] = []
    spent = 0.0
    for height in range(first, first + n_blocks):
        if height > first:
            append(height)
        while (ingest.published or 0) < height:
            t = cpu()
            ingest.step()
            spent += cpu() - t
        while sub.poll(0):
            messages.append(tuple(sub.recv_multipart()))  # type: ignore[arg-type]
    while sub.poll(100):
        messages.append(tuple(sub.recv_multipart()))  # type: ignore[arg-type]
    ingest.close()
    sub.close(0)
    for fh in [*outs.values(), *sources.values()]:
        fh.close()
    return messages, spent


def run_shard(k: int, shards: int, stage: Path, sockets: Path, messages: list[tuple[bytes, bytes]],
              subscribed: list[str], followed: int = 0) -> tuple[float, int]:
    from hlbook.common import topics
    from hlbook.common.wire import CoinState
    from hlbook.services.book import snapshot
    from hlbook.services.book.publisher import Publisher
    from hlbook.services.book.recovery import Recovery, Replayer
    from hlbook.services.book.state import Coin, ShardState
    from hlbook.services.book.stream import Stream

    ctx = zmq.Context.instance()
    state = ShardState(k, shards)
    height, books = snapshot.load_file(str(stage / "snapshot.json"), state.owns)
    state.coins = {coin: Coin(book) for coin, book in books.items()}
    state.height = state.base = height
    state.phase = CoinState.LIVE
    xpub = ctx.socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
    xpub.setsockopt(zmq.SNDHWM, 0)
    xpub.bind(f"ipc://{sockets}/book-{k}-{followed}")
    publisher = Publisher(xpub, k)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(f"ipc://{sockets}/book-{k}-{followed}")
    wanted = [topics.shard_block(k)] + [t for coin in subscribed if state.owns(coin) for t in (topics.bbo(coin), topics.l2(coin, None, None, 20))]
    for t in wanted + [topics.user("0x%040x" % n) for n in range(followed)]:  # a gateway's SUB subscribes every publisher
        sub.setsockopt(zmq.SUBSCRIBE, t)
    deadline = time.monotonic() + 5
    while len(publisher.subs.exact) < len(wanted) and time.monotonic() < deadline:
        if xpub.poll(100):
            publisher.subs.handle(xpub.recv())
    while xpub.poll(0):
        publisher.subs.handle(xpub.recv())
    recovery = Recovery(state, publisher, Replayer(ctx, f"ipc://{sockets}/none", 0.1), None, 1.0)
    stream = Stream(state, publisher, recovery)
    stream.start_at(height)
    received = 0
    spent = 0.0
    for topic, payload in messages:
        if topic in (topics.HEADER, topics.BLOCK_END) or topic.startswith((topics.BOOK_PREFIX, topics.DETAILS_PREFIX)):
            t = cpu()
            stream.on_message(topic, payload)
            spent += cpu() - t
            while sub.poll(0):
                sub.recv_multipart()
                received += 1
    xpub.close(0)
    sub.close(0)
    recovery.replayer.close()
    return spent, received


def run_apply(stage: Path, messages: list[tuple[bytes, bytes]], deep: int) -> float:
    """Book.apply alone over every coin's slices (one process, no publishing), levels kept
    as lists up to ``deep`` orders (book.DEEP), dicts past it."""
    from hlbook.common import topics, wire
    from hlbook.services.book import book as book_module, snapshot

    default, book_module.DEEP = book_module.DEEP, deep
    try:
        _, books = snapshot.load_file(str(stage / "snapshot.json"))  # levels built under this DEEP
        slices = [(topics.coin_of(t), wire.decode(p, wire.BookSlice)) for t, p in messages if t.startswith(topics.BOOK_PREFIX)]
        t = cpu()
        for coin, s in slices:
            book = books.get(coin)
            if book is not None and s.height > book.height:
                book.apply(s.height, s.time, s.diffs)
        return cpu() - t
    finally:
        book_module.DEEP = default


def run_history(tmp: Path, messages: list[tuple[bytes, bytes]], commit_every: float) -> float:
    from hlbook.common import topics, wire
    from hlbook.services.history.store import Store

    path = tmp / f"history-{commit_every}.sqlite"
    store = Store(path)
    spent = 0.0
    last_commit_ms = None
    for topic, payload in messages:
        if topic != topics.HISTORY:
            continue
        t = cpu()
        block = wire.decode(payload, wire.HistoryBlock)
        store.add_block(block.height, block.time, block.statuses, block.fills)
        if last_commit_ms is None or block.time - last_commit_ms >= commit_every * 1000:
            store.commit()
            last_commit_ms = block.time
        spent += cpu() - t
    store.close()
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=120)
    parser.add_argument("--stage", default=None, help="where the node files are kept between runs (default: a temporary directory)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--subscribed", type=int, default=200, help="coins whose bbo and l2Book a client subscribes to")
    parser.add_argument("--only", default="ingest,shard,history", help="stages to run, of ingest,shard,apply,history")
    parser.add_argument("--commit-every", type=float, nargs="*", default=[1.0],
                        help="also measure history committing every S seconds of block time (the default interval always runs)")
    parser.add_argument("--followed", type=int, default=0,
                        help="also run shard 0 with this many users followed through the gateway (their U| topics reach every shard)")
    args = parser.parse_args()
    only = args.only.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="hlstages-"))
    stage = Path(args.stage) if args.stage else tmp / "stage"
    try:
        if not (stage / "first").exists():
            stage.mkdir(parents=True, exist_ok=True)
            t = time.monotonic()
            generate(stage, args.blocks)
            print(f"generated {args.blocks} blocks in {time.monotonic() - t:.0f} s into {stage}", flush=True)
        first = int((stage / "first").read_text())
        from hlbook.services.nodesim.universe import full_universe

        coins = [c.name for c in full_universe()][: args.subscribed]
        sockets = tmp / "zmq"
        sockets.mkdir()
        messages, spent = run_ingest(stage, sockets, first, args.blocks)
        n = args.blocks
        print(f"ingest: {spent * 1000 / n:6.2f} ms CPU a block ({len(messages):,} messages out)", flush=True)
        if "shard" in only:
            for k in range(args.shards):
                spent, received = run_shard(k, args.shards, stage, sockets, messages, coins)
                print(f"shard {k}/{args.shards}: {spent * 1000 / n:6.2f} ms CPU a block ({received:,} messages to subscribers)", flush=True)
            if args.followed:
                base = spent if args.shards == 1 else run_shard(0, args.shards, stage, sockets, messages, coins)[0]
                more, _ = run_shard(0, args.shards, stage, sockets, messages, coins, args.followed)
                print(f"shard 0/{args.shards} with {args.followed:,} users followed: {more * 1000 / n:6.2f} ms CPU a block "
                      f"(x{more / base:.2f} the same shard with none, same run)", flush=True)
        if "apply" in only:
            from hlbook.services.book.book import DEEP

            for deep in (10**9, DEEP, 10**9, DEEP):  # alternated: every level a list, then the default
                spent = run_apply(stage, messages, deep)
                print(f"apply, levels {'as lists' if deep > DEEP else f'as dicts past {DEEP} orders'}: {spent * 1000 / n:6.2f} ms CPU a block (every coin)", flush=True)
        if "history" in only:
            from hlbook.services.history.service import COMMIT_EVERY

            for every in sorted({COMMIT_EVERY, *args.commit_every}):
                spent = run_history(tmp, messages, every)
                print(f"history, a commit every {every:g} s: {spent * 1000 / n:6.2f} ms CPU a block", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()

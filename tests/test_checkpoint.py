"""L4 checkpoints (services/book/checkpoint.py): exact, verified on load, written by a live shard."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from hlbook.services.book import checkpoint, snapshot
from hlbook.services.book.book import Book
from hlbook.services.book.checkpoint import CheckpointError, Header
from test_book_shard import ShardProcess
from test_book_sim import Sim, first_difference, normal, wait_live

HEIGHT = 985148181


def test_a_checkpoint_of_the_real_snapshot_is_the_node_file_and_loads_back_equal(btc_data: Path, tmp_path: Path) -> None:
    node_file = btc_data / f"snapshot_{HEIGHT}.json"
    height, books = snapshot.load_file(str(node_file))
    assert b"".join(checkpoint.body(height, books)) == node_file.read_bytes()  # byte for byte the node's document
    path = checkpoint.write(tmp_path, Header(height, 1_700_000_000_000, 0, 1, 0, ""), books)
    assert path.name == f"l4-{HEIGHT}-0of1.ckpt" and path.stat().st_size < node_file.stat().st_size / 8
    got_height, got_time, got = checkpoint.load_file(path)
    assert (got_height, got_time, sorted(got)) == (HEIGHT, 1_700_000_000_000, ["BTC"])
    assert got["BTC"].l4_levels() == books["BTC"].l4_levels()  # every order, in time priority, every field
    assert got["BTC"].height == HEIGHT and len(got["BTC"]) == 51_351
    assert checkpoint.load_file(path, lambda coin: False)[2] == {}

    damaged = bytearray(path.read_bytes())
    damaged[-100] ^= 1
    with pytest.raises(CheckpointError):
        checkpoint.load(bytes(damaged))
    header = checkpoint.read_header(path)
    header.sha256 = "0" * 64
    with pytest.raises(CheckpointError, match="checksum"):
        checkpoint.load(checkpoint.encode_header(header) + path.read_bytes()[checkpoint.HEADER_SIZE:])


def test_listing_and_retention(tmp_path: Path) -> None:
    for height, shard, shards in ((5, 0, 1), (8, 0, 1), (10, 0, 2), (10, 1, 2), (20, 0, 2), (30, 0, 2)):
        checkpoint.write(tmp_path, Header(height, height * 1000, shard, shards, 0, ""), {"BTC": Book("BTC", height)})
    old = time.time() - 3600
    for name in ("l4-5-0of1.ckpt", "l4-10-0of2.ckpt", "l4-20-0of2.ckpt", "l4-30-0of2.ckpt"):
        os.utime(tmp_path / name, (old, old))
    assert [(h, k) for _, h, k, _ in checkpoint.listing(tmp_path)] == [(5, 0), (8, 0), (10, 0), (10, 1), (20, 0), (30, 0)]
    removed = checkpoint.prune(tmp_path, keep_s=60)
    assert sorted(p.name for p in removed) == ["l4-10-0of2.ckpt", "l4-20-0of2.ckpt", "l4-5-0of1.ckpt"]  # each newest stays
    assert [(h, k, n) for _, h, k, n in checkpoint.listing(tmp_path)] == [(8, 0, 1), (10, 1, 2), (30, 0, 2)]


def test_a_live_shards_checkpoint_equals_the_node_at_its_height(tmp_path: Path) -> None:
    """The simulator gives the truth: its fileSnapshot, moved to the checkpoint's height with its files."""
    sim = Sim(tmp_path)
    shard = None
    try:
        base, truth = sim.snapshot()
        directory = tmp_path / "checkpoints"
        shard = ShardProcess(tmp_path, "s0", 0, 1, sim.ingest_eps, "--info-url", sim.url,
                             "--checkpoint-every", str(1 / 60), "--checkpoint-dir", str(directory), production=True)
        wait_live(shard)
        deadline = time.monotonic() + 20
        while len(checkpoint.listing(directory)) < 2:  # the second: written with blocks flowing for a while
            assert time.monotonic() < deadline, shard.log_text()[-2000:]
            time.sleep(0.1)
        path, height, _, _ = checkpoint.listing(directory)[-1]
        assert height > base
        got_height, got_time, books = checkpoint.load_file(path)
        assert got_height == height and got_time > 0
        coins = sorted(set(books) | {c for c in truth if c in books or truth[c].bids.levels or truth[c].asks.levels})
        assert len(coins) >= 8
        for coin in coins:
            want = sim.advance(truth.get(coin) or Book(coin, base), base, height)
            mine, node = normal(books.get(coin, Book(coin)).l4_levels()), normal(want.l4_levels())
            assert mine == node, (coin, height, first_difference(mine, node))
        assert shard.metrics()['hlbook_book_checkpoints_total{result="ok"}'] >= 2
    finally:
        if shard is not None:
            shard.stop()
        sim.stop()


def test_up_gives_each_shard_a_checkpoint_folder_per_node_in_its_state_dir_and_the_gateways_read_it(tmp_path: Path) -> None:
    from hlbook.common import config
    from hlbook.services.supervisor.pipeline import Pipeline

    pipeline = Pipeline(simulate=False, data_dir=str(tmp_path / "node"), info_url=None, snapshot_file="snap.json",
                        mode="by-block", shards=2, gateways=1, host="127.0.0.1", port=8000, info_port=3001,
                        blocks_per_sec=None, coins=50, seed=1, metrics_base_port=0, log_level="INFO",
                        state_dir=str(tmp_path / "state"), history_days=3.0, checkpoint_every=5.0)
    folder = str(config.state_file(tmp_path / "state", "checkpoints", tmp_path / "node", "by-block", ""))
    books = [spec.args for spec in pipeline.specs(str(tmp_path / "node"), str(tmp_path / "zmq")) if spec.name.startswith("book-")]
    assert len(books) == 2
    for args in books:
        flags = dict(zip(args, args[1:]))
        assert (flags["--checkpoint-dir"], flags["--checkpoint-every"], flags["--history-days"]) == (folder, "5.0", "3.0")
    (gateway,) = [spec.args for spec in pipeline.specs(str(tmp_path / "node"), str(tmp_path / "zmq")) if spec.name.startswith("gateway")]
    flags = dict(zip(gateway, gateway[1:]))  # point-in-time books: the same checkpoints, the node's files
    assert (flags["--checkpoint-dir"], flags["--data-dir"], flags["--mode"]) == (folder, str(tmp_path / "node"), "by-block")

"""The whole market (``hlbook sim --profile full``: ~450 perps, HIP-3 perps and spot
pairs, HIP-2 orders), scaled down for the suite (``--depth 5000``: ~62,000 resting
orders instead of ~620,000; ``--volume 0.2``), through real processes: the
simulator, ingest and two book shards.

- Both shards start from ONE snapshot request to the node (the second reads the
  file the first fetched) and each keeps only its coins.
- Every coin of the market goes live and a validation against the simulator's own
  later snapshot (also shared by the two shards) finds nothing to repair.
- Every coin is where ``topics.shard_of`` puts it, and the majors are spread.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import free_port
from hlbook.common import topics
from hlbook.services.nodesim.universe import full_universe
from test_book_shard import ShardProcess
from hlbook.services.book.book import Book
from test_book_sim import Sim, normal, wait_live

SHARDS = 2


class FullSim(Sim):
    """`hlbook sim --profile full` (scaled) and `hlbook ingest`."""

    def __init__(self, tmp: Path) -> None:  # noqa: super().__init__ would start the default profile
        self.data = tmp / "node"
        self.data.mkdir()  # as a node's (mounted) data directory: there before ingest starts, which refuses a missing one
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/info"
        self.ingest_eps = (f"ipc://{tmp}/ingest-pub", f"ipc://{tmp}/ingest-replay")
        self.log_path = tmp / "sim.log"
        self.logs = [open(self.log_path, "wb"), open(tmp / "ingest.log", "wb")]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "hlbook.cli", "sim", "--profile", "full", "--depth", "5000", "--volume", "0.2",
             "--data-dir", str(self.data), "--info-port", str(self.port), "--seed", "3"],
            env=env, stdout=self.logs[0], stderr=subprocess.STDOUT)
        self.ingest = subprocess.Popen(
            [sys.executable, "-m", "hlbook.cli", "ingest", "--data-dir", str(self.data), "--state-dir", "",
             "--pub", self.ingest_eps[0], "--replay", self.ingest_eps[1]], env=env, stdout=self.logs[1], stderr=subprocess.STDOUT)

    def snapshot_requests(self) -> int:
        return self.log_path.read_text().count("fileSnapshot at height")


def test_the_whole_market_starts_from_one_snapshot_and_validates_clean(tmp_path: Path) -> None:
    sim = FullSim(tmp_path)
    shared = tmp_path / "snapshots"  # the shards' TMPDIR: where the node writes snapshots, shared on one host
    shared.mkdir()
    shards: list[ShardProcess] = []
    try:
        deadline = time.monotonic() + 60
        while "writing" not in sim.log_path.read_text():  # the simulator's books are built and its info server up
            assert sim.sim.poll() is None and time.monotonic() < deadline, sim.log_path.read_text()[-2000:]
            time.sleep(0.2)
        shards = [ShardProcess(tmp_path, f"s{k}", k, SHARDS, sim.ingest_eps, "--info-url", sim.url, "--validate-every", "4",
                               env={"TMPDIR": str(shared)}) for k in range(SHARDS)]
        states = [wait_live(s, timeout=90) for s in shards]
        assert sim.snapshot_requests() == 1, "each shard asked the node for its own snapshot"

        coins = {c.name for c in full_universe(3)}
        owned = [set(state["coins"]) for state in states]
        assert owned[0] | owned[1] == coins and not owned[0] & owned[1]
        assert all(topics.shard_of(c, SHARDS) == k for k in range(SHARDS) for c in owned[k])
        weight = [sum(w for c, w in topics.MAJORS if c in owned[k]) for k in range(SHARDS)]
        assert min(weight) >= 0.45 * sum(weight), weight  # the majors spread by weight (by crc32 alone: 65 / 35)
        assert any(":" in c for c in coins) and any(c.startswith("@") for c in coins)

        deadline = time.monotonic() + 60
        while not all(s.metrics().get('hlbook_book_validations_total{result="compared"}', 0) >= 1 for s in shards):
            assert time.monotonic() < deadline, "no validation compared"
            time.sleep(0.5)
        for shard in shards:
            metrics = shard.metrics()
            assert not any(k.startswith("hlbook_book_validation_mismatches_total{") for k in metrics), metrics
            assert metrics.get('hlbook_book_out_of_sync_total{reason="unknown_oid"}', 0.0) == 0.0
        assert sim.snapshot_requests() <= 3  # start-up, then one per validation round, not one per shard
        base, books = sim.snapshot()  # a few coins order by order: a major, a HIP-3 perp, a spot pair of the tail
        picked = [c for c in sorted(owned[1], key=lambda c: (":" not in c, not c.startswith("@"), c))][:2]
        picked.append(next(c for c, _ in topics.MAJORS if c in owned[1]))
        for coin in picked:
            got = shards[1].wait(lambda r: r["height"] >= base, 10) and shards[1].ask(op="l4", coin=coin)
            assert got["height"] >= base
            truth = sim.advance(books.get(coin) or Book(coin, base), base, got["height"])
            assert normal(got["levels"]) == normal(truth.l4_levels()), coin
    finally:
        for shard in shards:
            shard.stop()
        sim.stop()

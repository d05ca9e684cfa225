"""Book shards in the whole pipeline with real processes: the node simulator
(`hlbook sim`, files + info server), `hlbook ingest` and two `hlbook book`
shards over ipc. Ground truth is the simulator's own fileSnapshot plus its
node files up to the shard's height."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from conftest import free_port
from hlbook.common import nodefiles, topics, wire
from hlbook.common.models import ASSISTANCE_FUND_USER, DECODERS, HIP2_USER, block_time_ms
from hlbook.services.book import snapshot
from hlbook.services.book.book import Book
from test_book_shard import ShardProcess, await_topic

SHARDS = 2


class Sim:
    """`hlbook sim` + `hlbook ingest` on a temporary node directory."""

    def __init__(self, tmp: Path) -> None:
        self.data = tmp / "node"
        self.data.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/info"
        self.ingest_eps = (f"ipc://{tmp}/ingest-pub", f"ipc://{tmp}/ingest-replay")
        self.logs = [open(tmp / "sim.log", "wb"), open(tmp / "ingest.log", "wb")]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.sim = subprocess.Popen(
            [sys.executable, "-m", "hlbook.cli", "sim", "--data-dir", str(self.data), "--info-port", str(self.port),
             "--seed", "7", "--blocks-per-sec", "15", "--coins", "8"], env=env, stdout=self.logs[0], stderr=subprocess.STDOUT)
        try:
            self._wait_for_info()
        except BaseException:
            self.sim.kill()
            self.sim.wait()
            raise
        self.ingest = subprocess.Popen(
            [sys.executable, "-m", "hlbook.cli", "ingest", "--data-dir", str(self.data),
             "--pub", self.ingest_eps[0], "--replay", self.ingest_eps[1]], env=env, stdout=self.logs[1], stderr=subprocess.STDOUT)

    def _wait_for_info(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.sim.poll() is None, "sim exited"
            try:
                self.snapshot()
                return
            except (snapshot.SnapshotError, OSError, ValueError):
                assert time.monotonic() < deadline, "the simulator's info server never answered"
                time.sleep(0.2)

    def snapshot(self) -> tuple[int, dict[str, Book]]:
        """The simulator's fileSnapshot, loaded."""
        with tempfile.TemporaryDirectory() as tmp:
            return snapshot.load(snapshot.fetch(self.url, timeout=10, directory=tmp))

    def advance(self, book: Book, base: int, height: int) -> Book:
        """``book`` (at ``base``) moved to ``height`` with the node files' diffs."""
        return advance(self.data, book, base, height)

    def stop(self) -> None:
        for proc in (self.ingest, self.sim):
            proc.send_signal(signal.SIGTERM)
        for proc in (self.ingest, self.sim):
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs:
            log.close()


def node_lines(data: Path, stream: str, after: int = 0, upto: int = 1 << 62) -> Iterator[Any]:
    """Complete by-block lines of ``stream`` for blocks in (after, upto], in file order."""
    for path in nodefiles.hour_files(data, stream, "by-block"):
        for raw in path.read_bytes().splitlines(keepends=True):
            if raw.endswith(b"\n"):
                line = DECODERS[stream].decode(raw)
                if after < line.block_number <= upto:
                    yield line


def advance(data: Path, book: Book, base: int, height: int) -> Book:
    """``book`` (at ``base``) moved to ``height`` with the diffs of the node files in ``data``."""
    statuses = {line.block_number: line.events for line in node_lines(data, "order_statuses", base, height)}
    for line in node_lines(data, "raw_book_diffs", base, height):
        diffs = [d for d in line.events if d.coin == book.coin]
        if diffs:
            mine = [st for st in statuses.get(line.block_number, []) if st.order.coin == book.coin]
            book.apply(line.block_number, block_time_ms(line.block_time), diffs, mine)
    return book


@pytest.fixture()
def sim(tmp_path: Path):
    s = Sim(tmp_path)
    yield s
    s.stop()


def wait_live(shard: ShardProcess, timeout: float = 40) -> dict:
    return shard.wait(lambda r: r["phase"] == "live" and r["coins"] and set(r["coins"].values()) == {"live"}, timeout)


def assert_equal_to_truth(sim: Sim, shard: ShardProcess) -> None:
    """Every coin of the shard equals the simulator's ground truth at the shard's height:
    a simulator snapshot taken first, moved forward with the node files."""
    base, books = sim.snapshot()
    for coin in sorted(shard.ask(op="coins")["coins"]):
        got = shard.ask(op="l4", coin=coin)
        deadline = time.monotonic() + 5
        while got["height"] < base:  # the shard trails the node by a few ms
            assert time.monotonic() < deadline
            time.sleep(0.05)
            got = shard.ask(op="l4", coin=coin)
        truth = sim.advance(books.get(coin) or Book(coin, base), base, got["height"])
        mine, node = normal(got["levels"]), normal(truth.l4_levels())
        assert mine == node, (coin, base, got["height"], first_difference(mine, node))


def first_difference(a: list[list[dict]], b: list[list[dict]]) -> object:
    for side_a, side_b in zip(a, b):
        for i, (x, y) in enumerate(zip(side_a, side_b)):
            if x != y:
                return i, {k: (x.get(k), y.get(k)) for k in x.keys() | y.keys() if x.get(k) != y.get(k)}
        if len(side_a) != len(side_b):
            return "lengths", len(side_a), len(side_b)
    return None


def normal(levels) -> list[list[dict]]:
    """l4 levels with the details of status-less orders (HIP-2, assistance fund) left out:
    the node knows them, the diffs do not carry them."""
    keep = ("user", "coin", "side", "limitPx", "sz", "oid")
    return [[{k: o[k] for k in keep} if o["user"] in (HIP2_USER, ASSISTANCE_FUND_USER) else o for o in side] for side in levels]


def test_killed_shard_restarts_and_validation_repairs_one_coin(sim: Sim, tmp_path: Path) -> None:
    args = ("--info-url", sim.url, "--validate-every", "1")
    shards = [ShardProcess(tmp_path, f"s{k}", k, SHARDS, sim.ingest_eps, *args, env={"HLBOOK_TEST_HOOKS": "1"}) for k in range(SHARDS)]
    try:
        states = [wait_live(s) for s in shards]
        owned = [sorted(r["coins"]) for r in states]
        assert all(owned) and not set(owned[0]) & set(owned[1])
        assert all(topics.shard_of(c, SHARDS) == k for k in range(SHARDS) for c in owned[k])

        # shard 0: SIGKILL, blocks go on, restart (dropping every 5th slice it receives): live and equal
        shards[0].proc.kill()
        shards[0].proc.wait()
        shards[0].stop()
        time.sleep(1.0)
        shards[0] = ShardProcess(tmp_path, "s0b", 0, SHARDS, sim.ingest_eps, *args, env={"HLBOOK_TEST_DROP_EVERY": "5"})
        wait_live(shards[0])
        time.sleep(1.5)
        assert_equal_to_truth(sim, shards[0])
        lossy = shards[0].metrics()
        assert lossy['hlbook_book_gaps_total{kind="slice"}'] + lossy['hlbook_book_gaps_total{kind="header"}'] >= 3
        assert lossy.get('hlbook_book_resets_total{reason="gap"}', 0.0) == 0.0  # every loss repaired by replay
        assert not any(k.startswith("hlbook_book_validation_mismatches_total{") for k in lossy)

        # shard 1: corrupt one coin; validation finds and repairs it while the others keep publishing
        victim, other = owned[1][0], owned[1][1]
        sub = shards[1].ctx.socket(zmq.SUB)
        sub.connect(shards[1].pub)
        for topic in (topics.RESET_PREFIX, topics.l4(other), topics.shard_block(1), topics.bbo(other)):
            sub.subscribe(topic)
        await_topic(sub, topics.bbo(other))  # exact BBO: its value comes at once, so the subscriptions arrived
        bids, asks = shards[1].ask(op="l4", coin=victim)["levels"]
        for order in bids[-5:] + asks[-5:]:  # the far ends: one of them at least still rests at the next validation
            assert shards[1].ask(op="test_corrupt", coin=victim, oid=order["oid"]) == {"ok": True, "oid": order["oid"]}
        resets, other_heights, shard_blocks = [], [], 0
        start = time.monotonic()
        while (len(resets) < 2 or time.monotonic() < start + 1.5) and time.monotonic() < start + 20:
            if sub.poll(200):
                topic, payload = sub.recv_multipart()
                message = wire.decode(payload)
                if topic == topics.reset(victim) and message["reason"] in ("validation_size", "resync"):
                    resets.append((message["reason"], message["state"]))
                elif topic == topics.l4(other):
                    other_heights.append(message["height"])
                elif topic == topics.shard_block(1):
                    shard_blocks += 1
                    assert message["states"][other] == "live"
        assert resets == [("validation_size", "resyncing"), ("resync", "live")]  # found in a child, rebuilt from a snapshot
        assert shard_blocks >= 10 and other_heights == sorted(other_heights) and len(other_heights) >= 2  # the others went on
        metrics = shards[1].metrics()
        assert metrics['hlbook_book_validation_mismatches_total{reason="size"}'] == 1.0
        assert metrics['hlbook_book_validations_total{result="compared"}'] >= 3  # snapshots rolled forward to the shard's height
        assert_equal_to_truth(sim, shards[1])
    finally:
        for s in shards:
            s.stop()

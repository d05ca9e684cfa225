"""The real `hlbook book` shard processes behind a real `hlbook ingest`, fed the
mainnet BTC fixture block by block as a node writes it: init from the snapshot
file plus replay, live blocks, lost messages repaired by replay, publishing and
queries, ownership filtering."""

from __future__ import annotations

import http.server
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import zmq

from conftest import free_port, metric_samples
from hlbook.common import topics, wire
from hlbook.common.chain import Chains, Step
from hlbook.common.models import DECODERS
from hlbook.services.book import hooks, l2, snapshot

HOUR = Path("hourly/20260505/17")
FIRST, LAST = 985148182, 985148206
STREAMS = ("order_statuses", "raw_book_diffs", "fills")


def request(query: dict) -> bytes:
    """The wire bytes of a shard request given as a dict (``op`` and its fields): its typed
    struct (the test ops too), or the dict itself for an op no struct has (to test the refusal)."""
    try:
        return wire.encode(msgspec.convert(query, wire.ShardQuery | hooks.HookQuery))
    except msgspec.ValidationError:
        return wire.encode(query)


class ShardProcess:
    """A real `hlbook book` subprocess and a DEALER socket for queries (with ``env``: the
    test entry point, which alone reads the test hooks' variables)."""

    def __init__(self, tmp: Path, name: str, shard: int, shards: int, ingest: tuple[str, str], *args: str, env: dict | None = None,
                 production: bool = False) -> None:
        self.pub, self.query = f"ipc://{tmp}/{name}-pub", f"ipc://{tmp}/{name}-query"
        self.metrics_port = free_port()
        self.log = open(tmp / f"{name}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", *(["hlbook.services.book.hooks"] if env and not production else ["hlbook.cli", "book"]),
             "--shard", str(shard), "--shards", str(shards),
             "--ingest-pub", ingest[0], "--ingest-replay", ingest[1], "--pub", self.pub, "--query", self.query,
             "--metrics-port", str(self.metrics_port), "--replay-timeout", "1", *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=self.log, stderr=subprocess.STDOUT,
        )
        self.ctx = zmq.Context()
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(self.query)

    def ask(self, timeout: float = 10, **query) -> dict:
        """The reply as a dict (an l4 reply's JSON levels frames decoded into ``levels``)."""
        self.dealer.send_multipart([b"", request(query)])
        assert self.dealer.poll(int(timeout * 1000)), f"no answer to {query}"
        header, *levels = self.dealer.recv_multipart()[1:]
        reply = msgspec.msgpack.decode(header)
        if levels:
            assert reply["size"] == sum(map(len, levels))
            reply["levels"] = orjson.loads(b"".join(levels))
        return reply

    def wait(self, predicate, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"shard exited: {self.log_text()[-2000:]}"
            reply = self.ask(op="coins")
            if predicate(reply):
                return reply
            assert time.monotonic() < deadline, f"timed out; last {reply}; log: {self.log_text()[-2000:]}"
            time.sleep(0.05)

    def metrics(self) -> dict[str, float]:
        return metric_samples(self.metrics_port)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ctx.destroy(linger=0)
        self.log.close()


@dataclass
class Pipeline:
    data: Path
    ingest: tuple[str, str]
    write: Callable[..., None]
    shards: list[ShardProcess]
    info: NodeInfo


def fixture_lines(data: Path) -> dict[str, list[bytes]]:
    return {s: (data / "hl" / "data" / f"node_{s}_by_block" / HOUR).read_bytes().splitlines(keepends=True) for s in STREAMS}


def expected_book(data: Path, upto: int):
    """The BTC book after block ``upto``, built in-process (tests/test_book.py checks it against a reference)."""
    _, books = snapshot.load_file(str(data / "snapshot_985148181.json"))
    book = books["BTC"]
    lines = fixture_lines(data)
    statuses = {d.block_number: d.events for d in map(DECODERS["order_statuses"].decode, lines["order_statuses"])}
    for line in map(DECODERS["raw_book_diffs"].decode, lines["raw_book_diffs"]):
        if line.block_number <= upto:
            book.apply(line.block_number, 0, line.events, statuses[line.block_number])
    return book


def node_snapshot(book, height: int) -> bytes:
    """A node fileSnapshot document of ``book`` at ``height``."""
    sides = [[[o.pop("user"), o] for o in side] for side in book.l4_levels()]
    return msgspec.json.encode([height, [[book.coin, sides]]])


class NodeInfo:
    """The node's info server for these tests: answers fileSnapshot with the
    fixture's BTC book after the last block written to the node files."""

    def __init__(self, btc_data: Path) -> None:
        self.btc_data = btc_data
        self.height = FIRST - 1
        self.requests = 0
        self._cache: dict[int, bytes] = {}
        info = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = orjson.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert body["type"] == "fileSnapshot" and body["request"]["type"] == "l4Snapshots"
                assert body["includeHeightInOutput"] and body["request"]["includeUsers"]
                Path(body["outPath"]).write_bytes(info.snapshot())
                info.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"null")

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/info"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self) -> bytes:
        height = self.height
        if height not in self._cache:
            self._cache[height] = node_snapshot(expected_book(self.btc_data, height), height)
        return self._cache[height]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def pipeline(tmp_path: Path, btc_data: Path):
    """Empty node files, a real ingest, and a function appending the fixture's blocks."""
    data = tmp_path / "node"
    for s in STREAMS:
        path = data / "hl" / "data" / f"node_{s}_by_block" / HOUR
        path.parent.mkdir(parents=True)
        path.touch()
    ingest_eps = (f"ipc://{tmp_path}/ingest-pub", f"ipc://{tmp_path}/ingest-replay")
    log = open(tmp_path / "ingest.log", "wb")
    ingest = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "ingest", "--data-dir", str(data), "--from-height", str(FIRST),
         "--pub", ingest_eps[0], "--replay", ingest_eps[1]],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )
    lines = fixture_lines(btc_data)
    info = NodeInfo(btc_data)

    def write(first: int, last: int, pause: float = 0.0) -> None:
        for i in range(first - FIRST, last - FIRST + 1):
            for s in STREAMS:
                with open(data / "hl" / "data" / f"node_{s}_by_block" / HOUR, "ab") as fh:
                    fh.write(lines[s][i])
            info.height = FIRST + i
            time.sleep(pause)

    shards: list[ShardProcess] = []
    yield Pipeline(data, ingest_eps, write, shards, info)
    info.close()
    for shard in shards:
        shard.stop()
    ingest.terminate()
    ingest.wait(5)
    log.close()


def test_shards_follow_live_blocks_and_repair_lost_messages(pipeline, btc_data: Path, tmp_path: Path) -> None:
    ingest_eps, write, shards = pipeline.ingest, pipeline.write, pipeline.shards
    snap = shutil.copy(btc_data / "snapshot_985148181.json", tmp_path / "snapshot.json")
    clean = ShardProcess(tmp_path, "clean", 0, 1, ingest_eps, "--snapshot-file", str(snap))
    lossy = ShardProcess(tmp_path, "lossy", 0, 1, ingest_eps, "--snapshot-file", str(snap), env={"HLBOOK_TEST_DROP_EVERY": "5"})
    other = ShardProcess(tmp_path, "other", 1, 2, ingest_eps, "--snapshot-file", str(snap))  # BTC is shard 0 of 2
    shards += [clean, lossy, other]

    sub = clean.ctx.socket(zmq.SUB)
    sub.connect(clean.pub)
    for topic in (topics.l2("BTC", None, None, 100), topics.l2("BTC", None, None, 3), topics.l2("BTC", 5, 5, 100), topics.bbo("BTC"),
                  topics.l4("BTC"), topics.shard_block(0), topics.RESET_PREFIX):
        sub.subscribe(topic)

    write(FIRST, FIRST + 2)  # before the shards are live: they come by replay
    for shard in shards:
        shard.wait(lambda r: r["height"] >= FIRST - 1 and r.get("coins", {}).get("BTC", "live") == "live" and r["height"] > 0)
    early = await_topic(sub, topics.bbo("BTC"))  # the subscriptions reached the shard (exact BBO: value at once)
    write(FIRST + 3, LAST, pause=0.03)  # live, block by block

    want = expected_book(btc_data, LAST)
    for shard in (clean, lossy):
        reply = shard.wait(lambda r: r["height"] == LAST)
        assert reply["coins"] == {"BTC": "live"} and reply["shard"] == 0
        full = shard.ask(op="l2", coin="BTC", n_levels=100_000)
        assert full["ok"] and full["height"] == LAST
        assert [list(map(tuple, side)) for side in full["levels"]] == list(l2.levels(want, 100_000))
        l4 = shard.ask(op="l4", coin="BTC")
        assert l4["levels"] == list(want.l4_levels())
        agg = shard.ask(op="l2", coin="BTC", n_levels=7, n_sig_figs=3)
        assert [list(map(tuple, side)) for side in agg["levels"]] == list(l2.levels(want, 7, 3))
    deadline = time.monotonic() + 5  # the gauges are set with each heartbeat (every second)
    while (lossy_metrics := lossy.metrics()).get('hlbook_book_orders') != len(want) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert lossy_metrics['hlbook_book_coins{state="live"}'] == 1.0 and lossy_metrics['hlbook_book_orders'] == len(want)
    assert lossy_metrics['hlbook_book_gaps_total{kind="slice"}'] >= 1
    assert lossy_metrics['hlbook_book_gaps_total{kind="header"}'] >= 1
    assert lossy_metrics['hlbook_book_replays_total{result="ok"}'] >= 3
    assert clean.metrics().get('hlbook_book_gaps_total{kind="slice"}', 0.0) == 0.0

    other_reply = other.wait(lambda r: r["height"] == LAST)
    assert other_reply["phase"] == "live"
    assert other_reply["coins"] == {} and other_reply["shard"] == 1
    assert other.ask(op="l4", coin="BTC") == {"ok": False, "error": "coin 'BTC' is not held by shard 1"}

    check_published(sub, want, early)
    check_queries(clean, want)


def level_dicts(levels: list[tuple[str, str, int]]) -> list[dict[str, Any]]:
    return [{"px": px, "sz": sz, "n": n} for px, sz, n in levels]


def await_topic(sub: zmq.Socket, topic: bytes, timeout: float = 15) -> list[list[bytes]]:
    """Read until a message on ``topic`` came; returns every message read."""
    read = []
    deadline = time.monotonic() + timeout
    while not read or read[-1][0] != topic:
        assert time.monotonic() < deadline, f"nothing on {topic!r}"
        if sub.poll(100):
            read.append(sub.recv_multipart())
    return read


def check_published(sub: zmq.Socket, want, early: list[list[bytes]]) -> None:
    """What the clean shard published: contiguous chains, the final L2/BBO equal to the book."""
    last: dict[bytes, object] = {}
    chains = Chains(dense_prefixes=(topics.SHARD_PREFIX,))
    heights: dict[bytes, list[int]] = {}
    deadline = time.monotonic() + 5
    frames = iter(early)
    while time.monotonic() < deadline:
        pair = next(frames, None)
        if pair is None:
            if not sub.poll(300):
                break
            pair = sub.recv_multipart()
        topic, payload = pair
        message = wire.decode(payload)
        last[topic] = message
        if message.get("type") == "L4Sync":  # a subscription's position, not a chain message
            continue
        if "prev" in message:
            assert chains[topic].check(message["height"], message["prev"]) is Step.NEXT, topic
            heights.setdefault(topic, []).append(message["height"])
    shard_heights = heights[topics.shard_block(0)]
    assert shard_heights[-1] == LAST and shard_heights == list(range(shard_heights[0], LAST + 1))
    assert last[topics.shard_block(0)]["mids"] == {"BTC": "81307.5"} and last[topics.shard_block(0)]["states"] == {"BTC": "live"}
    for (nsf, man, n), message in ((agg, last[topics.l2("BTC", *agg)]) for agg in ((None, None, 100), (None, None, 3), (5, 5, 100))):
        data = orjson.loads(message["data"])  # the client's l2Book data, rendered by the shard
        assert data == {"coin": "BTC", "time": message["time"], "levels": [level_dicts(side) for side in l2.levels(want, n, nsf, man)]}
    # 3 levels change less often than 100: the shard sends a depth only when its levels changed
    assert 0 < len(heights[topics.l2("BTC", None, None, 3)]) < len(heights[topics.l2("BTC", None, None, 100)])
    bid, ask = l2.bbo(want)
    assert orjson.loads(last[topics.bbo("BTC")]["data"]) == {"coin": "BTC", "time": last[topics.bbo("BTC")]["time"],
                                                             "bbo": level_dicts([bid, ask])}
    l4_heights = heights[topics.l4("BTC")]
    assert l4_heights[-1] == LAST and len(l4_heights) >= 15


def check_queries(shard: ShardProcess, want) -> None:
    oid, order = next(iter(want.orders.items()))
    got = shard.ask(op="order", oid=oid)
    assert got["ok"] and got["order"] == order.to_dict("BTC")
    assert shard.ask(op="order", oid=1)["order"] is None
    mine = shard.ask(op="open_orders", user=order.user.upper().replace("0X", "0x"))
    assert {o["oid"] for o in mine["orders"]} == {k for k, o in want.orders.items() if o.user == order.user}
    assert shard.ask(op="l2", coin="BTC", n_sig_figs=4, mantissa=2) == {"ok": False, "error": "mantissa is only allowed with nSigFigs 5"}
    assert shard.ask(op="bogus")["ok"] is False
    shard.dealer.send_multipart([b"", b"\xc1garbage"])
    assert shard.dealer.poll(5000) and msgspec.msgpack.decode(shard.dealer.recv_multipart()[-1])["ok"] is False
    assert shard.ask(op="coins")["ok"]  # still serving


def hooked_shard(p, tmp_path: Path, name: str, *args: str) -> tuple[ShardProcess, zmq.Socket]:
    """A shard with the test hooks, initialised by the info server and live at FIRST + 4,
    and a SUB to its resets and BTC BBO."""
    shard = ShardProcess(tmp_path, name, 0, 1, p.ingest, "--info-url", p.info.url, *args, env={"HLBOOK_TEST_HOOKS": "1"})
    p.shards.append(shard)
    sub = shard.ctx.socket(zmq.SUB)
    sub.connect(shard.pub)
    sub.subscribe(topics.RESET_PREFIX)
    sub.subscribe(topics.bbo("BTC"))
    p.write(FIRST, FIRST + 4)
    shard.wait(lambda r: r["height"] == FIRST + 4 and r["coins"] == {"BTC": "live"})
    return shard, sub


def test_validation_repairs_a_corrupted_book_while_blocks_flow(pipeline, btc_data: Path, tmp_path: Path) -> None:
    """Validation runs in a forked child; the coin it finds different is resynced."""
    p = pipeline
    shard, sub = hooked_shard(p, tmp_path, "v", "--validate-every", "0.3")  # init by the info server + replay
    assert p.info.requests >= 1
    await_topic(sub, topics.bbo("BTC"))

    # an order no later diff touches, so only validation can find the damage
    touched = {d.oid for line in fixture_lines(btc_data)["raw_book_diffs"] for d in DECODERS["raw_book_diffs"].decode(line).events}
    at = expected_book(btc_data, FIRST + 4)
    oid = next(o for o in at.orders if o not in touched)
    assert shard.ask(op="test_corrupt", coin="BTC", oid=oid) == {"ok": True, "oid": oid}
    p.write(FIRST + 5, LAST, pause=0.05)

    deadline = time.monotonic() + 20
    while shard.metrics().get('hlbook_book_validation_mismatches_total{reason="size"}', 0.0) < 1:
        assert time.monotonic() < deadline, shard.log_text()[-3000:]
        time.sleep(0.1)
    resets = []  # the diverged coin stops being served, then comes back rebuilt from a fresh snapshot
    deadline = time.monotonic() + 30  # the fresh snapshot (51k orders) takes seconds on a loaded machine
    while len(resets) < 2 and sub.poll(max(1, int((deadline - time.monotonic()) * 1000))):
        topic, payload = sub.recv_multipart()
        message = wire.decode(payload)
        if topic == topics.reset("BTC") and message["reason"] != "init":
            resets.append((message["reason"], message["state"]))
    assert resets == [("validation_size", "resyncing"), ("resync", "live")], shard.log_text()[-3000:]
    shard.wait(lambda r: r["height"] == LAST and r["coins"] == {"BTC": "live"})
    want = expected_book(btc_data, LAST)
    assert shard.ask(op="l4", coin="BTC")["levels"] == list(want.l4_levels())
    assert shard.metrics()['hlbook_book_validations_total{result="compared"}'] >= 1


def test_killed_shard_comes_back_live_and_equal(pipeline, btc_data: Path, tmp_path: Path) -> None:
    p = pipeline
    args = ("--info-url", p.info.url)
    first = ShardProcess(tmp_path, "k", 0, 1, p.ingest, *args)
    p.shards.append(first)
    p.write(FIRST, FIRST + 8, pause=0.02)
    first.wait(lambda r: r["height"] == FIRST + 8 and r["coins"] == {"BTC": "live"})
    first.proc.kill()
    first.proc.wait()
    first.stop()
    p.write(FIRST + 9, FIRST + 14, pause=0.02)  # blocks while it is down
    again = ShardProcess(tmp_path, "k", 0, 1, p.ingest, *args)
    p.shards.append(again)
    p.write(FIRST + 15, LAST, pause=0.05)
    again.wait(lambda r: r["height"] == LAST and r["coins"] == {"BTC": "live"})
    want = expected_book(btc_data, LAST)
    assert again.ask(op="l4", coin="BTC")["levels"] == list(want.l4_levels())
    # and equal to what the node's info server says at the same height
    _, node = snapshot.load(p.info.snapshot())
    assert again.ask(op="l4", coin="BTC")["levels"] == list(node["BTC"].l4_levels())


def test_the_shared_snapshot_goes_when_its_shards_stop(pipeline, tmp_path: Path) -> None:
    """Two shards of one host share one node snapshot in their private folder of the temporary
    directory; it is removed (with its lock, and the folder) when they stop, so restarts leave
    nothing behind."""
    p, scratch = pipeline, tmp_path / "scratch"
    scratch.mkdir()
    shards = [ShardProcess(tmp_path, f"t{k}", k, 2, p.ingest, "--info-url", p.info.url, env={"TMPDIR": str(scratch)},
                           production=True) for k in range(2)]
    p.shards.extend(shards)
    p.write(FIRST, FIRST + 3)
    for shard in shards:
        shard.wait(lambda r: r["height"] == FIRST + 3 and r["phase"] == "live")
    assert p.info.requests == 1  # the second shard read the first one's file
    private = scratch / f"hlbook-{os.getuid()}"
    assert list(scratch.iterdir()) == [private] and private.stat().st_mode & 0o777 == 0o700
    assert {f.suffix for f in private.iterdir()} == {".json", ".owner", ".lock"}
    for shard in shards:
        shard.stop()
    assert list(scratch.iterdir()) == []


def await_resets(sub: zmq.Socket, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The next ``count`` RESET messages other than the initial ones (fewer after ``timeout``)."""
    resets: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(resets) < count and time.monotonic() < deadline:
        if sub.poll(200):
            topic, payload = sub.recv_multipart()
            if topic.startswith(topics.RESET_PREFIX) and (reset := wire.decode(payload))["reason"] != "init":
                resets.append(reset)
    return resets


def test_unknown_oid_resyncs_the_coin_from_a_fresh_snapshot(pipeline, btc_data: Path, tmp_path: Path) -> None:
    p = pipeline
    shard, sub = hooked_shard(p, tmp_path, "r")
    # an order that block FIRST + 8 removes or updates disappears from the shard's book
    diffs = DECODERS["raw_book_diffs"].decode(fixture_lines(btc_data)["raw_book_diffs"][8])
    at = expected_book(btc_data, FIRST + 4)
    victim = next(d.oid for d in diffs.events if d.raw_book_diff == "remove" and d.oid in at.orders)
    assert shard.ask(op="test_drop", coin="BTC", oid=victim) == {"ok": True, "oid": victim}
    await_topic(sub, topics.bbo("BTC"))  # the subscriptions reached the shard
    p.write(FIRST + 5, LAST, pause=0.05)

    resets = await_resets(sub, 2)
    assert [(r["reason"], r["state"]) for r in resets] == [("unknown_oid", "resyncing"), ("resync", "live")], shard.log_text()[-3000:]
    assert resets[0]["height"] == FIRST + 7
    assert resets[1]["height"] >= FIRST + 8
    assert sub.poll(2000) and sub.recv_multipart()[0] == topics.bbo("BTC")  # the rebuilt coin's BBO follows its RESET
    shard.wait(lambda r: r["height"] == LAST and r["coins"] == {"BTC": "live"})
    assert shard.ask(op="l4", coin="BTC")["levels"] == list(expected_book(btc_data, LAST).l4_levels())
    assert shard.metrics()['hlbook_book_out_of_sync_total{reason="unknown_oid"}'] == 1.0


def test_damaged_blocks_rebuild_the_coin_from_a_snapshot(pipeline, btc_data: Path, tmp_path: Path) -> None:
    """A block whose diffs line never came (a truncated file) and a diff with a negative
    size: the coin is rebuilt from a fresh node snapshot each time, counted as bad input,
    and ends equal to the node's book."""
    p = pipeline
    shard, sub = hooked_shard(p, tmp_path, "d")
    await_topic(sub, topics.bbo("BTC"))
    lines = fixture_lines(btc_data)
    node = p.data / "hl" / "data"

    def append(stream: str, line: bytes) -> None:
        with open(node / f"node_{stream}_by_block" / HOUR, "ab") as fh:
            fh.write(line)

    for s in STREAMS:  # FIRST + 5 without its diffs line
        if s != "raw_book_diffs":
            append(s, lines[s][5])
    p.info.height = FIRST + 5
    for i in range(6, 8):
        for s in STREAMS:
            line = lines[s][i]
            if i == 7 and s == "raw_book_diffs":
                assert b'{"new":{"sz":"' in line
                line = line.replace(b'{"new":{"sz":"', b'{"new":{"sz":"-', 1)
            append(s, line)
        p.info.height = FIRST + i
        time.sleep(0.3)  # the first resync is done before the next damage
    p.write(FIRST + 8, LAST, pause=0.05)
    resets = [(r["reason"], r["state"]) for r in await_resets(sub, 4)]
    assert resets == [("incomplete_block", "resyncing"), ("resync", "live"), ("bad_value", "resyncing"), ("resync", "live")], \
        shard.log_text()[-3000:]
    shard.wait(lambda r: r["height"] == LAST and r["coins"] == {"BTC": "live"})
    assert shard.ask(op="l4", coin="BTC")["levels"] == list(expected_book(btc_data, LAST).l4_levels())
    metrics = shard.metrics()
    assert metrics['hlbook_bad_input_total{reason="incomplete_block",service="book"}'] == 1
    assert metrics['hlbook_bad_input_total{reason="bad_value",service="book"}'] == 1


def test_the_production_command_never_enables_the_test_hooks(pipeline, btc_data: Path, tmp_path: Path) -> None:
    """`hlbook book` ignores the test hooks' variables (hlbook up passes its environment on)."""
    snap = shutil.copy(btc_data / "snapshot_985148181.json", tmp_path / "snapshot.json")
    shard = ShardProcess(tmp_path, "prod", 0, 1, pipeline.ingest, "--snapshot-file", str(snap),
                         env={"HLBOOK_TEST_HOOKS": "1", "HLBOOK_TEST_DROP_EVERY": "2"}, production=True)
    pipeline.shards.append(shard)
    pipeline.write(FIRST, FIRST + 6)
    shard.wait(lambda r: r["height"] == FIRST + 6 and r["coins"] == {"BTC": "live"})
    assert shard.ask(op="test_corrupt", coin="BTC")["error"].startswith("unknown op 'test_corrupt'")
    assert shard.metrics().get('hlbook_book_gaps_total{kind="slice"}', 0.0) == 0.0  # nothing dropped


def test_a_node_info_server_still_starting_is_waited_for_without_errors(pipeline, tmp_path: Path) -> None:
    """At start a shard whose node's info server does not answer yet (the node, or the simulator
    beside it, is starting) says once that it waits, then loads the snapshot when it answers:
    no ERROR line (six of them blamed the wrong thing at every `hlbook up --simulate`)."""
    port = free_port()
    shard = ShardProcess(tmp_path, "w", 0, 1, pipeline.ingest, "--info-url", f"http://127.0.0.1:{port}/info", production=True)
    pipeline.shards.append(shard)
    time.sleep(3.5)  # three attempts (1 s, 2 s backoff)
    log_text = shard.log_text()
    assert log_text.count("waiting for the node's info server") == 1 and " ERROR " not in log_text, log_text[-2000:]


def test_blocks_finished_by_the_init_replay_carry_every_coins_mid(tmp_path: Path) -> None:
    """A shard installing its snapshot replays the blocks after it; each block that replay finishes
    sends ``S|``, from which gateways answer allMids as soon as they see the shard live. Every coin's
    mid is in it, also a coin no replayed block touched (before, only the coins the replay changed:
    a client listing coins by allMids then missed the others, e.g. the fault test's trades client)."""
    from hlbook.common.models import BookDiff, DiffBody, NewDiff
    from hlbook.services.book.book import Book
    from hlbook.services.book.shard import Shard, ShardConfig

    def book(coin: str) -> Book:
        b = Book(coin, 100)
        b.apply(100, 0, [BookDiff("0xaa", oid, coin, side, px, DiffBody(new=NewDiff("1.0")))
                         for oid, side, px in ((1, "B", "10.0"), (2, "A", "11.0"))], [])
        return b

    shard = Shard(ShardConfig(0, 1, info_url="http://127.0.0.1:9/info", ingest_pub=f"ipc://{tmp_path}/ingest-pub",
                              ingest_replay=f"ipc://{tmp_path}/ingest-replay", pub=f"ipc://{tmp_path}/pub",
                              query=f"ipc://{tmp_path}/query"), zmq.Context())
    sent: list[dict[str, str]] = []
    shard.publisher.shard_block = lambda height, time, mids, states: sent.append(mids)  # type: ignore[method-assign]
    shard.recovery.replay = lambda *args, **kwargs: shard.stream.finish_block(101, 0) or True  # type: ignore[method-assign]
    try:
        shard.finish_init(100, {"ETH": book("ETH"), "SOL": book("SOL")})
    finally:
        shard.close()
    assert sent == [{"ETH": "10.5", "SOL": "10.5"}]

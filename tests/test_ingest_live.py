"""The real `hlbook ingest` process over files being written: rotation (hour and
midnight), partial lines, garbage lines, missing blocks, restart --from-height,
replay and per-user topics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import orjson
import pytest
import zmq

from conftest import free_port, metric
from hlbook.common import nodefiles, topics, wire

USER = "0x00000000000000000000000000000000000000aa"
OTHER = "0x00000000000000000000000000000000000000bb"
START = datetime(2026, 11, 22, 22, 59, 59)
STREAMS = ("order_statuses", "raw_book_diffs", "fills")


def _ts(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond:06d}123"


def block_lines(height: int, when: datetime) -> dict[str, bytes]:
    """One by-block line per stream: USER opens an order (status + new diff), and
    a trade between USER (maker, sells) and OTHER (taker, buys)."""
    ms = int(when.replace(tzinfo=None).timestamp() * 1000)
    order = {
        "coin": "BTC", "side": "A", "limitPx": "81308.0", "sz": "0.5", "oid": height, "timestamp": ms,
        "triggerCondition": "N/A", "isTrigger": False, "triggerPx": "0.0", "children": [], "isPositionTpsl": False,
        "reduceOnly": False, "orderType": "Limit", "origSz": "0.5", "tif": "Alo", "cloid": None,
    }
    status = {"time": _ts(when), "user": USER, "hash": None, "builder": None, "status": "open", "order": order}
    diff = {"user": USER, "oid": height, "coin": "BTC", "side": "A", "px": "81308.0", "raw_book_diff": {"new": {"sz": "0.5"}}}

    def fill(user: str, side: str, crossed: bool) -> list:
        return [user, {"coin": "BTC", "px": "81308.0", "sz": "0.1", "side": side, "time": ms, "startPosition": "0.0",
                       "dir": "Open Long", "closedPnl": "0.0", "hash": "0x" + "1" * 64, "oid": height, "crossed": crossed,
                       "fee": "0.01", "tid": height * 10, "feeToken": "USDC", "twapId": None}]

    events = {
        "order_statuses": [status],
        "raw_book_diffs": [diff],
        "fills": [fill(OTHER, "B", True), fill(USER, "A", False)],
    }
    head = {"local_time": _ts(when + timedelta(milliseconds=300)), "block_time": _ts(when), "block_number": height}
    return {s: orjson.dumps({**head, "events": e}) + b"\n" for s, e in events.items()}


class NodeWriter:
    """Appends by-block lines to the hourly files, as a node does."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def write(self, height: int, when: datetime, streams: tuple[str, ...] | None = None, cut: int | None = None) -> None:
        """Append block ``height``; ``cut`` writes only the first ``cut`` bytes of each line."""
        for stream, line in block_lines(height, when).items():
            if streams is None or stream in streams:
                self.append(stream, when, line if cut is None else line[:cut])

    def write_streaming(self, height: int, when: datetime, streams: tuple[str, ...]) -> None:
        """Append block ``height`` as a node in streaming mode does: one event a line."""
        for stream, line in block_lines(height, when).items():
            if stream in streams:
                doc = orjson.loads(line)
                for event in doc["events"]:
                    self.append(stream, when, orjson.dumps({**doc, "events": [event]}) + b"\n", "streaming")

    def append(self, stream: str, when: datetime, data: bytes, mode: str = "by-block") -> None:
        path = nodefiles.hour_file(self.data_dir, stream, mode, when)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(data)


class IngestProcess:
    """A real `hlbook ingest` subprocess with a SUB socket and a REQ socket on it."""

    def __init__(self, data_dir: Path, tmp: Path, *extra: str) -> None:
        self.pub, self.replay = f"ipc://{tmp}/pub", f"ipc://{tmp}/replay"
        self.metrics_port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hlbook.cli", "ingest", "--data-dir", str(data_dir), "--pub", self.pub,
             "--replay", self.replay, "--metrics-port", str(self.metrics_port), "--block-timeout", "0.3", *extra],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.ctx = zmq.Context()
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.connect(self.pub)
        for prefix in (b"H|", b"B|", b"T|", b"D|", b"E|", f"U|{USER}|".encode()):
            self.sub.subscribe(prefix)
        self.replay_request(0)  # returns once the process serves its sockets
        time.sleep(0.3)  # subscriptions reach the XPUB

    def replay_request(self, from_height: int, timeout: float = 20) -> list[bytes]:
        req = self.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.replay)
        req.send(wire.encode(wire.ReplayRequest(from_height=from_height)))
        deadline = time.monotonic() + timeout
        while not req.poll(100):
            assert self.proc.poll() is None, "ingest exited"
            assert time.monotonic() < deadline, "no replay reply"
        frames = req.recv_multipart()
        req.close()
        return frames

    def messages(self, until: int, timeout: float = 10, last: bytes = b"H|") -> Iterator[tuple[bytes, dict]]:
        """Messages received until the block ``until``'s ``last`` message (a header opens each
        block, an end closes it) and the ones after it in the same burst."""
        deadline = time.monotonic() + timeout
        seen = False
        while time.monotonic() < deadline:
            if not self.sub.poll(300 if seen else 100):
                if seen:
                    return
                continue
            topic, payload = self.sub.recv_multipart()
            message = wire.decode(payload)
            yield topic, message
            seen = seen or (topic == last and message["height"] >= until)
        raise AssertionError(f"no {last!r} for block {until} within {timeout}s")

    def headers(self, until: int) -> list[dict]:
        return [m for t, m in self.messages(until) if t == b"H|"]

    def blocks(self, until: int) -> list[dict]:
        """Each block's header (books phase) and end (details phase) in one dict: n_statuses from the end."""
        messages = list(self.messages(until))
        ends = {m["height"]: m for t, m in messages if t == b"E|"}
        return [{**m, "n_statuses": ends[m["height"]]["n_statuses"]} for t, m in messages if t == b"H|"]

    def metric(self, name: str, **labels: str) -> float:
        """Sum of ``name``'s samples with these labels (and any others); 0 when none."""
        return metric(self.metrics_port, name, **labels) or 0.0

    def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            assert self.proc.wait(10) == 0
            self.ctx.destroy(linger=0)


@pytest.fixture
def node(tmp_path: Path) -> NodeWriter:
    writer = NodeWriter(tmp_path / "data")
    for h in range(100, 103):
        writer.write(h, START - timedelta(seconds=1) + timedelta(milliseconds=70 * (h - 100)))
    return writer


@pytest.fixture
def ingest(node: NodeWriter, tmp_path: Path) -> Iterator[IngestProcess]:
    process = IngestProcess(node.data_dir, tmp_path)
    yield process
    process.stop()


def test_starts_live_and_follows_rotation_across_midnight(node: NodeWriter, ingest: IngestProcess) -> None:
    node.write(103, START)  # 22:59:59 -> file 20261122/22
    node.write(104, START + timedelta(seconds=1))  # 23:00:00 -> file 20261122/23
    node.write(105, datetime(2026, 11, 22, 23, 59, 59, 900000))
    node.write(106, datetime(2026, 11, 23, 0, 0, 0, 100000))  # midnight -> 20261123/0
    node.write(107, datetime(2026, 11, 23, 0, 0, 0, 200000))
    headers = ingest.headers(until=107)
    assert [h["height"] for h in headers] == [103, 104, 105, 106, 107]  # live: 100..102 were there before
    assert [h["prev"] for h in headers] == [None, 103, 104, 105, 106]
    assert headers[3]["block_time"] == "2026-11-23T00:00:00.100000123"
    assert ingest.metric("hlbook_ingest_file_events_total", event="rotated") == 6  # 2 rotations x 3 streams


def test_partial_line_waits_for_its_newline(node: NodeWriter, ingest: IngestProcess) -> None:
    when = START + timedelta(milliseconds=500)
    full = block_lines(103, when)
    for stream, line in full.items():
        node.append(stream, when, line[:150])
    time.sleep(0.5)
    assert not ingest.sub.poll(200), "a block was published from partial lines"
    for stream, line in full.items():
        node.append(stream, when, line[150:])
    messages = list(ingest.messages(until=103))
    topics = [t for t, _ in messages]
    assert topics == [b"H|", b"B|BTC|", b"T|BTC|", b"D|BTC|", b"E|", f"U|{USER}|".encode()]  # books, then details
    book = wire.decode(wire.encode(messages[1][1]), wire.BookSlice)
    details = wire.decode(wire.encode(messages[3][1]), wire.BookDetails)
    assert book.diffs[0].oid == 103 and details.statuses[0].status == "open" and details.statuses[0].order.oid == 103
    assert messages[4][1]["detail_coins"] == ["BTC"] and messages[4][1]["n_statuses"] == 1
    trade = messages[2][1]["trades"][0]
    assert trade["users"] == [OTHER, USER] and trade["side"] == "B" and trade["px"] == "81308.0"
    user_events = messages[5][1]
    assert len(user_events["statuses"]) == 1 and len(user_events["fills"]) == 1


def test_garbage_line_is_skipped_and_counted(node: NodeWriter, ingest: IngestProcess) -> None:
    node.write(103, START)
    node.append("order_statuses", START, b'{"local_time": garbage\n')
    node.append("raw_book_diffs", START, b"\x00\xff not json at all\n")
    node.write(104, START)
    assert [h["height"] for h in ingest.headers(until=104)] == [103, 104]
    assert ingest.metric("hlbook_ingest_bad_lines_total", reason="malformed", stream="order_statuses") == 1
    assert ingest.metric("hlbook_ingest_bad_lines_total", reason="malformed", stream="raw_book_diffs") == 1
    assert ingest.proc.poll() is None


def test_missing_block_is_detected_and_the_rest_goes_on(node: NodeWriter, ingest: IngestProcess) -> None:
    node.write(103, START)
    node.write(105, START)  # 104 never written
    node.write(106, START)
    node.write(107, START, streams=("order_statuses", "fills"))  # diffs line of 107 lost
    node.write(108, START)
    headers = ingest.blocks(until=108)
    assert [(h["height"], h["prev"]) for h in headers] == [(103, None), (105, 103), (106, 105), (107, 106), (108, 107)]
    assert headers[3]["n_diffs"] == 0 and headers[3]["n_statuses"] == 1
    assert ingest.metric("hlbook_ingest_block_anomalies_total", kind="gap") == 1
    assert ingest.metric("hlbook_ingest_block_anomalies_total", kind="incomplete") == 1


def test_restart_from_height_and_replay(node: NodeWriter, ingest: IngestProcess, tmp_path: Path) -> None:
    for h in range(103, 106):
        node.write(h, START)
    assert [h["height"] for h in ingest.headers(until=105)] == [103, 104, 105]
    frames = ingest.replay_request(104)
    reply = wire.decode(frames[0], wire.ReplayReply)
    assert reply.ok and (reply.oldest, reply.head) == (103, 105)
    replayed = list(zip(frames[1::2], frames[2::2]))
    assert [wire.decode(p)["height"] for t, p in replayed if t == b"H|"] == [104, 105]
    # the followed user's messages are kept too: a gateway that lost one gets it again
    assert {t for t, _ in replayed} == {b"H|", b"B|BTC|", b"T|BTC|", b"D|BTC|", b"E|", topics.user(USER)}
    too_old = wire.decode(ingest.replay_request(50)[0], wire.ReplayReply)
    assert not too_old.ok and "no longer held" in (too_old.error or "")
    ingest.stop()

    (tmp_path / "again").mkdir()
    restarted = IngestProcess(node.data_dir, tmp_path / "again", "--from-height", "101")
    try:
        # it re-reads 101..105 from the files, maybe before our SUB joined: its replay store has them
        frames = restarted.replay_request(101)
        assert wire.decode(frames[0], wire.ReplayReply).oldest == 101
        assert [wire.decode(p)["height"] for t, p in zip(frames[1::2], frames[2::2]) if t == b"H|"] == [101, 102, 103, 104, 105]
        node.write(106, START)
        live = [h["height"] for h in restarted.headers(until=106)]
        assert live == list(range(live[0], 107)) and live[0] >= 101
    finally:
        restarted.stop()


def test_streaming_mode_closes_blocks_when_streams_move_on(tmp_path: Path) -> None:
    node = NodeWriter(tmp_path / "data")
    node.write_streaming(100, START, ("order_statuses", "raw_book_diffs", "fills"))
    ingest = IngestProcess(node.data_dir, tmp_path, "--mode", "streaming")
    try:
        node.write_streaming(101, START, ("order_statuses", "raw_book_diffs", "fills"))
        # 102 writes no row at all (an empty block); 103 has no fills: the fills stream never moves past it
        node.write_streaming(103, START, ("order_statuses", "raw_book_diffs"))
        node.write_streaming(104, START, ("order_statuses", "raw_book_diffs"))
        messages = list(ingest.messages(until=103, last=b"E|"))
        ends = {m["height"]: m for t, m in messages if t == b"E|"}
        assert [(m["height"], ends[m["height"]]["n_statuses"], m["n_diffs"]) for t, m in messages if t == b"H|"] == [
            (101, 1, 1), (102, 0, 0), (103, 1, 1)
        ]
        # the books of a block go out once the diff stream moved past it; its trades after them, before its end
        # (which names them): here on timeout, the fill stream never moving past 101
        order = [(t, m["height"]) for t, m in messages if m["height"] == 101]
        assert order.index((b"H|", 101)) < order.index((b"T|BTC|", 101)) < order.index((b"E|", 101))
        assert [m["height"] for t, m in messages if t == b"T|BTC|"] == [101]
        assert [ends[h]["trade_coins"] for h in (101, 102, 103)] == [["BTC"], [], []]
        assert ingest.metric("hlbook_ingest_block_anomalies_total", kind="timeout") >= 1
        assert ingest.metric("hlbook_ingest_block_anomalies_total", kind="gap") == 0
    finally:
        ingest.stop()


def test_killed_ingest_resumes_where_it_stopped(node: NodeWriter, ingest: IngestProcess, tmp_path: Path) -> None:
    """SIGKILL, blocks written while it is down, restart: every block is published, in order,
    each topic's chain goes on from where it was (its position is kept in --state-dir), and
    the blocks published before the kill can still be replayed (rebuilt from the files: a
    consumer may have lost the ones queued when ingest died)."""
    for h in range(103, 106):
        node.write(h, START)
    assert [h["height"] for h in ingest.headers(until=105)] == [103, 104, 105]
    before = ingest.replay_request(103)[1:]
    time.sleep(0.5)  # the position is saved at most every 0.2 s
    ingest.proc.kill()
    ingest.proc.wait()
    ingest.ctx.destroy(linger=0)
    for h in range(106, 111):  # written while ingest is down
        node.write(h, START)
    (tmp_path / "again").mkdir()
    restarted = IngestProcess(node.data_dir, tmp_path / "again")
    try:
        node.write(111, START)
        restarted.headers(until=111)
        frames = restarted.replay_request(106)
        assert wire.decode(frames[0], wire.ReplayReply).ok
        stored = [(t, wire.decode(p)) for t, p in zip(frames[1::2], frames[2::2])]
        headers = [(m["height"], m["prev"]) for t, m in stored if t == b"H|"]
        assert [h for h, _ in headers] == list(range(106, 112))  # none lost, in order
        assert all(prev == height - 1 for height, prev in headers)  # the chain goes on across the restart
        trades = [(m["height"], m["prev"]) for t, m in stored if t == topics.trades("BTC")]
        assert [h for h, _ in trades] == [h for h, _ in headers] and all(p == h - 1 for h, p in trades)
        users = [m["height"] for t, m in stored if t == topics.user(USER)]
        assert users == [h for h, _ in headers]  # the followed user's events from the first block again
        rebuilt = restarted.replay_request(103)
        assert wire.decode(rebuilt[0], wire.ReplayReply).oldest == 100  # the files hold 100 on
        pairs = list(zip(rebuilt[1::2], rebuilt[2::2]))
        kept = list(zip(before[0::2], before[1::2]))

        def by_block(messages: list[tuple[bytes, bytes]], height: int) -> dict[bytes, bytes]:
            return {t: p for t, p in messages if wire.decode(p)["height"] == height}

        assert len(kept) == 3 * 6  # 103..105: H|, B|, T| (books), D|, E|, U| (details)
        for height in (104, 105):  # byte for byte as first sent
            assert by_block(pairs, height) == by_block(kept, height)
        # 103 too, but for its prev: the first ingest started there (None), the files go further back
        assert {t: {**wire.decode(p), "prev": None} for t, p in by_block(pairs, 103).items()} == \
               {t: wire.decode(p) for t, p in by_block(kept, 103).items()}
    finally:
        restarted.stop()


def test_a_restart_between_a_blocks_two_phases_sends_its_details_not_its_books_again(
        node: NodeWriter, ingest: IngestProcess, tmp_path: Path) -> None:
    """Killed after a block's books went out but before its status line came: the restarted
    ingest publishes that block's details (chains unbroken), and not its books a second time."""
    node.write(103, START)
    node.write(104, START, streams=("raw_book_diffs", "fills"))  # its status line is late
    books = [(t, m) for t, m in ingest.messages(until=104) if m["height"] == 104]
    assert [t for t, _ in books] == [b"H|", b"B|BTC|", b"T|BTC|"]
    time.sleep(0.5)  # the position is saved at most every 0.2 s
    ingest.proc.kill()
    ingest.proc.wait()
    ingest.ctx.destroy(linger=0)
    (tmp_path / "again").mkdir()
    restarted = IngestProcess(node.data_dir, tmp_path / "again")
    try:
        node.write(104, START, streams=("order_statuses",))
        node.write(105, START)
        messages = list(restarted.messages(until=105))
        assert [(t, m["height"]) for t, m in messages if m["height"] == 104] == \
               [(b"D|BTC|", 104), (b"E|", 104), (topics.user(USER), 104)]  # its details; its books went out already
        chains = {(t, m["height"]): m["prev"] for t, m in messages if t in (b"H|", b"B|BTC|", b"D|BTC|", b"E|")}
        assert chains == {(b"D|BTC|", 104): 103, (b"E|", 104): 103,  # the chains go on across the restart
                          (b"H|", 105): 104, (b"B|BTC|", 105): 104, (b"D|BTC|", 105): 104, (b"E|", 105): 104}
    finally:
        restarted.stop()


def test_a_streaming_restart_between_a_blocks_books_and_trades_sends_its_trades_not_its_books_again(tmp_path: Path) -> None:
    """Streaming: killed after a block's books went out (the diff stream moved past it) but
    before its trades (the fill stream had not): the restarted ingest publishes its trades and
    details, chains unbroken, and not its books a second time."""
    node = NodeWriter(tmp_path / "data")
    node.write_streaming(100, START, STREAMS)
    slow = ("--mode", "streaming", "--block-timeout", "30")  # no phase closes on timeout here
    ingest = IngestProcess(node.data_dir, tmp_path, *slow)
    try:
        node.write_streaming(101, START, STREAMS)
        node.write_streaming(102, START, STREAMS)
        node.write_streaming(103, START, ("order_statuses", "raw_book_diffs"))  # 102's fills not known whole yet
        assert [(t, m["height"]) for t, m in ingest.messages(until=102) if m["height"] == 102] == [(b"H|", 102), (b"B|BTC|", 102)]
        time.sleep(0.5)  # the position is saved at most every 0.2 s
        ingest.proc.kill()
        ingest.proc.wait()
    finally:
        ingest.ctx.destroy(linger=0)
    (tmp_path / "again").mkdir()
    restarted = IngestProcess(node.data_dir, tmp_path / "again", *slow)
    try:
        node.write_streaming(103, START, ("fills",))
        node.write_streaming(104, START, STREAMS)
        messages = list(restarted.messages(until=103, last=b"E|"))
        assert [(t, m["height"]) for t, m in messages if m["height"] == 102] == \
               [(b"T|BTC|", 102), (b"D|BTC|", 102), (b"E|", 102), (topics.user(USER), 102)]  # not its books again
        prev = {(t, m["height"]): m["prev"] for t, m in messages if t in (b"H|", b"T|BTC|", b"E|")}
        assert prev == {(b"T|BTC|", 102): 101, (b"E|", 102): 101, (b"H|", 103): 102, (b"T|BTC|", 103): 102, (b"E|", 103): 102}
        assert [m["trade_coins"] for t, m in messages if t == b"E|"] == [["BTC"], ["BTC"]]
    finally:
        restarted.stop()


def test_damaged_node_files_are_counted_and_the_rest_goes_on(node: NodeWriter, ingest: IngestProcess) -> None:
    """A next-hour file created early and empty, a line with a far-future height, an
    oid beyond int64, a block whose diffs line never came: each counted, none stops ingest,
    no block closes before its lines (the trades of every block are published)."""
    early = START + timedelta(seconds=1)  # the next hour
    for stream in ("order_statuses", "raw_book_diffs", "fills"):
        node.append(stream, early, b"")  # created, empty: ingest must stay on the current file
    node.write(103, START)
    node.append("fills", START, block_lines(10**12, START)["fills"])  # a damaged height: 10^12, same block time
    node.write(104, START)
    bad = block_lines(105, START)
    node.append("order_statuses", START, bad["order_statuses"])
    node.append("raw_book_diffs", START, bad["raw_book_diffs"].replace(b'"oid":105', b'"oid":18446744073709551616'))
    node.append("fills", START, bad["fills"])
    node.write(106, START, streams=("order_statuses", "fills"))  # its diffs line never comes
    node.write(107, START)
    messages = list(ingest.messages(until=107))
    headers = [m for t, m in messages if t == b"H|"]
    assert [h["height"] for h in headers] == [103, 104, 105, 106, 107]
    assert [h["incomplete"] for h in headers] == [[], [], ["raw_book_diffs"], ["raw_book_diffs"], []]
    assert [m["height"] for t, m in messages if t == topics.trades("BTC")] == [103, 104, 105, 106, 107]
    assert ingest.metric("hlbook_ingest_bad_lines_total", reason="implausible_height", stream="fills") == 1
    assert ingest.metric("hlbook_ingest_bad_lines_total", reason="malformed", stream="raw_book_diffs") == 1
    assert ingest.metric("hlbook_ingest_block_anomalies_total", kind="incomplete") == 2
    assert ingest.proc.poll() is None


def test_an_early_empty_next_hour_file_is_not_taken_at_start(tmp_path: Path) -> None:
    node = NodeWriter(tmp_path / "data")
    node.write(100, START)
    for stream in ("order_statuses", "raw_book_diffs", "fills"):
        node.append(stream, START + timedelta(seconds=1), b"")
    ingest = IngestProcess(node.data_dir, tmp_path)
    try:
        node.write(101, START)  # still the current hour's file
        assert [h["height"] for h in ingest.headers(until=101)] == [101]
    finally:
        ingest.stop()


def test_a_data_dir_without_node_files_is_said_and_a_missing_one_refused(tmp_path: Path) -> None:
    """No node files where --data-dir and --mode say: after a few seconds ingest says where it
    looked (once, and hlbook_ingest_waiting_for_files is 1) and takes the files when they come; a
    data directory that does not exist is refused at once."""
    home = tmp_path / "home"
    home.mkdir()
    ingest = IngestProcess(home, tmp_path)
    try:
        deadline = time.monotonic() + 15
        while ingest.metric("hlbook_ingest_waiting_for_files") != 1:
            assert time.monotonic() < deadline, "ingest did not say it waits for node files"
            time.sleep(0.2)
        node = NodeWriter(home)
        node.write(100, START)
        node.write(101, START)
        assert [h["height"] for h in ingest.headers(until=101)][-1] == 101
        assert ingest.metric("hlbook_ingest_waiting_for_files") == 0
    finally:
        ingest.stop()
    refused = subprocess.run([sys.executable, "-m", "hlbook.cli", "ingest", "--data-dir", str(tmp_path / "nowhere"),
                              "--pub", f"ipc://{tmp_path}/p2", "--replay", f"ipc://{tmp_path}/r2"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "no such directory" in refused.stderr


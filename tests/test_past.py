"""Point-in-time books on the live server (gateway/past.py, replay/asof.py) over the real fixture
(mainnet_btc_985148181_985148206): `hlbook up` serves the blocks as the node writes them while a
client records every l2Book; checkpoints at 985148181 (the node snapshot) and 985148200 are in its
state dir. `l2Book` with the time of a block between them equals the book the live server sent for
that block, `l4Snapshot` every order of the book rebuilt to that height; times the checkpoints and
files do not cover are refused, and so is a request past the concurrency limit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import websockets

from conftest import metric
from hlbook.common import config, nodefiles
from hlbook.services.book import checkpoint, snapshot
from hlbook.services.book.book import Book
from hlbook.services.book.checkpoint import Header
from hlbook.services.gateway.past import Past, Refused
from hlbook.services.replay import asof
from hlbook.services.replay.asof import Ask, PastError, Source
from pipeline import post_info, stop_group
from test_book_sim import advance
from test_replay import FIRST, SNAPSHOT, block_lines, block_times, collect, start_live, writer

SECOND = 985148200  # the second checkpoint's height


def fixture_book(btc_data: Path, height: int) -> Book:
    """BTC's book at ``height``: the node snapshot moved forward with the fixture's files."""
    return advance(btc_data, snapshot.load_file(str(btc_data / f"snapshot_{SNAPSHOT}.json"))[1]["BTC"], SNAPSHOT, height)


def write_checkpoints(btc_data: Path, folder: Path, times: list[int]) -> None:
    """At the snapshot's height (its time: just before the first block's) and at ``SECOND``."""
    _, books = snapshot.load_file(str(btc_data / f"snapshot_{SNAPSHOT}.json"))
    checkpoint.write(folder, Header(SNAPSHOT, times[0] - 70, 0, 1, 0, ""), books)
    checkpoint.write(folder, Header(SECOND, times[SECOND - FIRST], 0, 1, 0, ""), {"BTC": fixture_book(btc_data, SECOND)})


def ask(port: int, payload: dict[str, Any]) -> tuple[int, Any]:
    return post_info(f"http://127.0.0.1:{port}", payload)


async def post(port: int, payload: dict[str, Any]) -> Any:
    """A WebSocket ``post`` of an info request: its answer's data."""
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws", max_size=None) as ws:
        await ws.send(json.dumps({"method": "post", "id": 7, "request": {"type": "info", "payload": payload}}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["channel"] == "post":
                return message["data"]


def rebuilders() -> set[int]:
    """Pids of the point-in-time worker processes of this checkout's interpreter."""
    found = set()
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(sys.executable.encode() + b"\0") and b"spawn_main" in cmdline:
            found.add(int(proc.name))
    return found


def test_point_in_time_books_equal_what_the_live_server_served(btc_data: Path, tmp_path: Path) -> None:
    lines = block_lines(btc_data)
    times = block_times(lines)
    data, state = tmp_path / "live", tmp_path / "state"
    data.mkdir()
    write_checkpoints(btc_data, config.state_file(state, "checkpoints", data, "by-block", ""), times)
    up, port = start_live(btc_data, tmp_path, data)
    try:
        live = asyncio.run(collect(f"ws://127.0.0.1:{port}/ws", writer(data, lines, 0.1), times[-1]))["l2Book"]
        served = {d["time"]: d for d in live if times[0] <= d["time"] < times[-1]}
        assert len(served) >= 15

        # l2Book as of each block the live server sent a book for (some from each checkpoint): that book
        for at in sorted(served)[::3] + [max(served)]:
            status, got = ask(port, {"type": "l2Book", "coin": "BTC", "time": at})
            assert (status, got) == (200, served[at]), at
        at = max(served)  # the same through a WebSocket post
        assert asyncio.run(post(port, {"type": "l2Book", "coin": "BTC", "time": at})) == \
            {"id": 7, "response": {"type": "info", "payload": {"type": "l2Book", "data": served[at]}}}
        between = times[985148195 - FIRST]  # block 985148195: from the checkpoint at 985148181
        status, got = ask(port, {"type": "l2Book", "coin": "BTC", "time": between + 10, "nSigFigs": 3})
        assert status == 200 and got["time"] == between and len(got["levels"][0]) >= 1

        # l4Snapshot: every order of the book rebuilt to that height, in time priority, every field
        status, got = ask(port, {"type": "l4Snapshot", "coin": "BTC", "time": between + 10})
        assert status == 200 and (got["coin"], got["height"], got["time"]) == ("BTC", 985148195, between)
        want = fixture_book(btc_data, 985148195)
        assert [got["levels"][0], got["levels"][1]] == [*want.l4_levels()] and len(want) > 50_000

        # times the checkpoints and files do not cover: clear errors, never an empty book
        for at, why in ((times[0] - 1000, "before the oldest checkpoint"), (times[-1], "not before the newest block"),
                        (times[-1] + 60_000, "not before the newest block")):
            for kind in ("l4Snapshot", "l2Book"):
                status, text = ask(port, {"type": kind, "coin": "BTC", "time": at})
                assert status == 400 and why in text, (kind, at, status, text)
        assert ask(port, {"type": "l4Snapshot", "coin": "BTC"})[0] == 422  # no time
        assert ask(port, {"type": "l4Snapshot", "coin": "NOPE", "time": between})[0] == 400

        # one rebuild at a time (--past-workers 1): a second one at once is refused, not queued
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            both = list(pool.map(lambda _: ask(port, {"type": "l4Snapshot", "coin": "BTC", "time": between}), range(2)))
        assert sorted(status for status, _ in both) == [200, 503], [(s, str(b)[:100]) for s, b in both]
        def counted(kind: str, outcome: str) -> float | None:
            return metric(port, "hlbook_gateway_past_requests_total", type=kind, outcome=outcome)

        assert counted("l4Snapshot", "busy") == 1 and counted("l2Book", "too_old") == 1
        assert counted("l2Book", "ok") == len(sorted(served)[::3]) + 3 and counted("l4Snapshot", "too_new") == 2
        workers = rebuilders()
        assert workers
    finally:
        stop_group(up)
    assert "Traceback" not in (tmp_path / "up.log").read_text()
    deadline = time.monotonic() + 10
    while workers & rebuilders():  # the gateway's worker went with it
        assert time.monotonic() < deadline, workers & rebuilders()
        time.sleep(0.1)


def test_a_rebuild_is_bounded(btc_data: Path, tmp_path: Path) -> None:
    times = block_times(block_lines(btc_data))
    write_checkpoints(btc_data, tmp_path, times)
    source = Source(str(tmp_path), str(btc_data), "by-block")
    between = times[985148203 - FIRST]
    got = asof.book_at(source, "BTC", between, time.monotonic() + 30)  # from the checkpoint at 985148200
    assert got.height == 985148203 and got.book.l4_levels() == fixture_book(btc_data, 985148203).l4_levels()
    assert asof.book_at(source, "ETH", between, time.monotonic() + 30).book.l4_levels() == ([], [])  # no such book then
    with pytest.raises(PastError) as refused:
        asof.answer(source, Ask("l4Snapshot", "BTC", times[985148198 - FIRST]), timeout=0)
    assert (refused.value.outcome, refused.value.status) == ("timeout", 504)
    with pytest.raises(PastError) as refused:
        asof.answer(Source(str(tmp_path), str(btc_data), "by-block", max_span_s=0.5), Ask("l2Book", "BTC", times[985148198 - FIRST]), 30)
    assert refused.value.outcome == "too_far"
    with pytest.raises(PastError) as refused:
        asof.answer(Source(str(tmp_path), str(tmp_path / "nothing"), "by-block"), Ask("l2Book", "BTC", times[985148198 - FIRST]), 30)
    assert refused.value.outcome == "too_old" and "no longer hold" in refused.value.text

    # a damaged line between the checkpoint and the time: refused, never a book missing a block
    damaged = tmp_path / "damaged"
    shutil.copytree(btc_data / "hl", damaged / "hl")
    (diffs,) = nodefiles.hour_files(damaged, "raw_book_diffs", "by-block")
    lines = diffs.read_bytes().splitlines(keepends=True)
    lines[985148190 - FIRST] = lines[985148190 - FIRST][:300] + b"\n"
    diffs.write_bytes(b"".join(lines))
    with pytest.raises(PastError) as refused:
        asof.answer(Source(str(tmp_path), str(damaged), "by-block"), Ask("l2Book", "BTC", times[985148195 - FIRST]), 30)
    assert (refused.value.outcome, refused.value.status) == ("damaged", 500)


def test_a_gateway_without_the_node_files_says_so() -> None:
    with pytest.raises(Refused) as refused:
        asyncio.run(Past(None, None, "by-block").ask("l4Snapshot", "BTC", 1))
    assert refused.value.status == 501 and "--data-dir" in refused.value.text

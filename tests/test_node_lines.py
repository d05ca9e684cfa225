"""Damaged node lines against every reader of the node's files: ingest's live path, its
restart rebuild of recent blocks and history's backfill. Each fault is written into a copy
of the real mainnet fixture's fills file; every reader must still give every trade of the
node's (undamaged) files, once, and drop and count the damaged line."""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from hlbook.common import nodefiles, topics, wire
from hlbook.common.models import block_time_ms
from hlbook.services.history.backfill import Backfill
from hlbook.services.history.store import Store
from hlbook.services.ingest.service import Ingest, IngestConfig

FUTURE_MS = 4102444800000  # 2100-01-01
FUTURE_TIME = "2100-01-01T00:00:00.000000000"
Lines = list[bytes]
Trades = dict[int, list[int]]  # height -> tids of its trades


def _row(line: bytes) -> dict[str, Any]:
    return orjson.loads(line)


def _at(lines: Lines, height: int) -> int:
    """Index of the last line of block ``height``."""
    return max(i for i, line in enumerate(lines) if _row(line)["block_number"] == height)


def _with(line: bytes, **changes: Any) -> bytes:
    return orjson.dumps({**_row(line), **changes}) + b"\n"


def _fake_fills(row: dict[str, Any], tid: int, when: int) -> list[Any]:
    user, fill = row["events"][0]
    return [[user, {**fill, "tid": tid, "time": when, "crossed": c, "side": s}] for c, s in ((True, "B"), (False, "A"))]


def future_fill(lines: Lines, streaming: bool) -> Lines:
    """A trade timed 2100 among block 191's fills."""
    i = _at(lines, 985148191)
    row = _row(lines[i])
    fake = _fake_fills(row, 7777, FUTURE_MS)
    if streaming:
        return [*lines[: i + 1], *(_with(lines[i], events=[f]) for f in fake), *lines[i + 1:]]
    return [*lines[:i], _with(lines[i], events=row["events"] + fake), *lines[i + 1:]]


def future_line(lines: Lines, streaming: bool) -> Lines:
    """A line of block 192 timed 2100 (block and fills), before the real one."""
    i = min(i for i, line in enumerate(lines) if _row(line)["block_number"] == 985148192)
    row = _row(lines[i])
    fake = _with(lines[i], block_time=FUTURE_TIME, local_time=FUTURE_TIME, events=_fake_fills(row, 7778, FUTURE_MS)[:1])
    return [*lines[:i], fake, *lines[i:]]


def jump(lines: Lines, streaming: bool) -> Lines:
    """Block 191's line again, numbered 500 blocks later, right after it."""
    i = _at(lines, 985148191)
    return [*lines[: i + 1], _with(lines[i], block_number=985148191 + 500), *lines[i + 1:]]


def duplicate(lines: Lines, streaming: bool) -> Lines:
    """Block 192's (last) line twice."""
    i = _at(lines, 985148192)
    return [*lines[: i + 1], lines[i], *lines[i + 1:]]


def late(lines: Lines, streaming: bool) -> Lines:
    """191, 192, then 191's (last) line again."""
    i, j = _at(lines, 985148191), _at(lines, 985148192)
    return [*lines[: j + 1], lines[i], *lines[j + 1:]]


FAULTS: dict[str, tuple[Callable[[Lines, bool], Lines], str]] = {
    "future_fill": (future_fill, "event_time"),
    "future_line": (future_line, "future_time"),
    "jump": (jump, "implausible_height"),
    "duplicate": (duplicate, "duplicate"),
    "late": (late, "late"),
}


def node_trades(data: Path, mode: str) -> Trades:
    """What the files say: each block's trades (fills paired by tid), computed here."""
    out: Trades = {}
    for path in nodefiles.hour_files(data, "fills", mode):
        for line in path.read_bytes().splitlines():
            row = _row(line)
            out.setdefault(row["block_number"], []).extend(f["tid"] for _, f in row["events"] if f["crossed"])
    return {h: sorted(t) for h, t in out.items() if t}


def damaged_copy(src: Path, dst: Path, mode: str, fault: str) -> Path:
    shutil.copytree(src / "hl", dst / "hl")
    (path,) = nodefiles.hour_files(dst, "fills", mode)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(FAULTS[fault][0](lines, mode == "streaming")))
    return dst


def bad_lines(metric: str, reason: str) -> float:
    return REGISTRY.get_sample_value(metric, {"stream": "fills", "reason": reason}) or 0.0


def published_trades(ingest: Ingest) -> Trades:
    out: Trades = {}
    for height, messages in ingest.store.blocks:
        for topic, payload in messages:
            if topic == topics.trades("BTC"):
                out.setdefault(height, []).extend(t["tid"] for t in wire.decode(payload)["trades"])
    return {h: sorted(t) for h, t in out.items()}


def published_drops(ingest: Ingest) -> list[wire.Dropped]:
    """What the ``E|`` messages ingest published say it dropped."""
    return [d for _, messages in ingest.store.blocks for topic, payload in messages if topic == topics.BLOCK_END
            for d in wire.decode(payload, wire.BlockEnd).dropped]


def live(data: Path, mode: str, tmp: Path, result: Callable[[Ingest], Any] = published_trades) -> Any:
    """Ingest's live path from the fixture's first block until every fill block closed."""
    cfg = IngestConfig(str(data), mode, from_height=985148182, pub=f"ipc://{tmp}/pub", replay=f"ipc://{tmp}/replay",
                       block_timeout=0.05, watch=False)
    ingest = Ingest(cfg)
    try:
        deadline = time.monotonic() + 10
        while (ingest.published or 0) < 985148200 and time.monotonic() < deadline:
            ingest.step()
        return result(ingest)
    finally:
        ingest.close()


def rebuilt(data: Path, mode: str, tmp: Path) -> Trades:
    """Ingest's restart rebuild of the blocks it had published (the whole fixture)."""
    cfg = IngestConfig(str(data), mode, from_height=985148207, pub=f"ipc://{tmp}/pub", replay=f"ipc://{tmp}/replay",
                       watch=False)
    ingest = Ingest(cfg)
    try:
        ingest._warm_store(985148206, 985148206)
        return published_trades(ingest)
    finally:
        ingest.close()


def backfilled(data: Path, mode: str, tmp: Path) -> Trades:
    """History's backfill of the files into a new store; checks no candle or retention moved."""
    store = Store(tmp / "history.db", days=100_000)
    backfill = Backfill(data, mode, store, hours=1e9)
    while backfill.busy:
        backfill.step(1.0)
    store.commit()
    store.prune()
    db = sqlite3.connect(tmp / "history.db")
    try:
        assert db.execute("SELECT count(*) FROM candles WHERE t > ?", (FUTURE_MS - 86_400_000 * 400,)).fetchone() == (0,)
        out: Trades = {}
        for time_ms, tid in db.execute("SELECT time, tid FROM trades ORDER BY tid"):
            out.setdefault(time_ms, []).append(tid)
        return out
    finally:
        db.close()
        store.db.close()


def by_time(data: Path, mode: str, trades: Trades) -> Trades:
    """Each block's trades keyed by the block's time (what the store keeps)."""
    times = {}
    for path in nodefiles.hour_files(data, "fills", mode):
        for line in path.read_bytes().splitlines():
            row = _row(line)
            for _, f in row["events"]:
                times[row["block_number"]] = f["time"]
    out: Trades = {}
    for height, tids in trades.items():
        out.setdefault(times[height], []).extend(tids)
    return out


READERS = {"live": live, "rebuild": rebuilt, "backfill": backfilled}


@pytest.mark.parametrize("mode", ["by-block", "streaming"])
@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("reader", list(READERS))
def test_a_damaged_fills_line_is_dropped_counted_and_loses_no_trade(
        btc_data: Path, tmp_path: Path, reader: str, fault: str, mode: str) -> None:
    data = damaged_copy(btc_data, tmp_path / "node", mode, fault)
    want = node_trades(btc_data, mode)
    if mode == "streaming":  # a streaming block may go on: the backfill leaves the last one to the next pass
        want = {h: t for h, t in want.items() if h < 985148199}
    metric = "hlbook_history_bad_lines_total" if reader == "backfill" else "hlbook_ingest_bad_lines_total"
    before = bad_lines(metric, FAULTS[fault][1])
    got = READERS[reader](data, mode, tmp_path)
    if reader == "backfill":
        want = by_time(btc_data, mode, want)
    else:
        got = {h: t for h, t in got.items() if h in want or h > 985148206}
    assert got == want
    assert bad_lines(metric, FAULTS[fault][1]) > before


@pytest.mark.parametrize("reader", ["live", "backfill"])
def test_a_status_timed_2100_is_dropped_and_counted(btc_data: Path, tmp_path: Path, reader: str) -> None:
    """An order status timed 2100 in block 191's status line: dropped alone (no order row timed
    after now), the block's other statuses and every trade kept."""
    shutil.copytree(btc_data / "hl", tmp_path / "node" / "hl")
    (path,) = nodefiles.hour_files(tmp_path / "node", "order_statuses", "by-block")
    lines = path.read_bytes().splitlines(keepends=True)
    i = _at(lines, 985148191)
    row = _row(lines[i])
    place = next(n for n, s in enumerate(row["events"]) if not s["status"].endswith("Rejected"))
    row["events"][place] = {**row["events"][place], "time": FUTURE_TIME}
    lines[i] = orjson.dumps(row) + b"\n"
    path.write_bytes(b"".join(lines))
    metric = "hlbook_history_bad_lines_total" if reader == "backfill" else "hlbook_ingest_bad_lines_total"
    labels = {"stream": "order_statuses", "reason": "event_time"}
    before = REGISTRY.get_sample_value(metric, labels) or 0.0
    got = READERS[reader](tmp_path / "node", "by-block", tmp_path)
    want = node_trades(btc_data, "by-block")
    assert got == (by_time(btc_data, "by-block", want) if reader == "backfill" else want)
    assert (REGISTRY.get_sample_value(metric, labels) or 0.0) == before + 1
    if reader == "backfill":
        db = sqlite3.connect(tmp_path / "history.db")
        try:
            assert db.execute("SELECT count(*) FROM orders WHERE time > ?", (time.time() * 1000,)).fetchone() == (0,)
            assert db.execute("SELECT count(*) FROM orders").fetchone()[0] > 0
        finally:
            db.close()


@pytest.mark.parametrize("mode", ["by-block", "streaming"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_dropped_line_is_named_in_the_next_block_end(btc_data: Path, tmp_path: Path, fault: str, mode: str) -> None:
    """Ingest's E| names what it dropped (stream, reason, block, coins) for the gateway to tell the
    clients; a duplicate is a copy of what was joined and is not named."""
    data = damaged_copy(btc_data, tmp_path / "node", mode, fault)
    dropped = live(data, mode, tmp_path, published_drops)
    if fault == "duplicate":
        assert dropped == []
        return
    assert dropped and {(d.stream, d.reason, tuple(d.coins or ())) for d in dropped} == {("fills", FAULTS[fault][1], ("BTC",))}
    assert all(d.height in (985148191, 985148192, 985148191 + 500) and d.users for d in dropped), dropped


def test_books_delay_counts_from_the_nodes_write_not_the_block_time(btc_data: Path, tmp_path: Path) -> None:
    """``hlbook_ingest_books_delay_seconds``: the wall clock, as a block's books went out, minus
    the node's ``local_time`` of that block (the fixture's blocks were written ~0.37 s after their
    block time: the chain's part of the lag, which this gauge leaves out)."""
    def delay(ingest: Ingest) -> tuple[float | None, float, int | None]:
        return REGISTRY.get_sample_value("hlbook_ingest_books_delay_seconds"), time.time(), ingest.books_published

    got, now, height = live(btc_data, "by-block", tmp_path, delay)
    (path,) = nodefiles.hour_files(btc_data, "raw_book_diffs", "by-block")
    row = next(_row(line) for line in path.read_bytes().splitlines() if _row(line)["block_number"] == height)
    wrote, made = (block_time_ms(row["local_time"]) / 1000, block_time_ms(row["block_time"]) / 1000)
    assert wrote - made > 0.1  # the fixture tells the two apart
    assert got is not None and now - wrote - 1.0 < got <= now - wrote, (got, now - wrote, now - made)

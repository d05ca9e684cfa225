"""Block joining rules: completion per mode, timeout, duplicates, out-of-order, gaps."""

from __future__ import annotations

from prometheus_client import REGISTRY

from hlbook.common.models import DiffLine, FillLine, StatusLine
from hlbook.services.ingest.joiner import Joiner

LINE = {"order_statuses": StatusLine, "raw_book_diffs": DiffLine, "fills": FillLine}


def line(stream: str, height: int) -> StatusLine | DiffLine | FillLine:
    return LINE[stream]("2026-11-22T00:00:00.1", "2026-11-22T00:00:00.0", height, [])


def anomalies(kind: str) -> float:
    return REGISTRY.get_sample_value("hlbook_ingest_block_anomalies_total", {"kind": kind}) or 0.0


def add_block(joiner: Joiner, height: int, streams: tuple[str, ...] = tuple(LINE)) -> None:
    for stream in streams:
        joiner.add(stream, line(stream, height))


def test_by_block_closes_when_every_stream_reached_it() -> None:
    joiner = Joiner("by-block", timeout=10)
    add_block(joiner, 5, ("order_statuses", "raw_book_diffs"))
    assert joiner.ready(now=0) == []
    add_block(joiner, 5, ("fills",))
    assert [b.height for b in joiner.ready(now=0)] == [5]


def test_streaming_closes_when_every_stream_moved_past_or_after_timeout() -> None:
    joiner = Joiner("streaming", timeout=0.5)
    add_block(joiner, 5)
    add_block(joiner, 5, ("order_statuses",))  # more rows of block 5
    assert joiner.ready(now=0) == []
    add_block(joiner, 6, ("order_statuses", "raw_book_diffs"))
    assert joiner.ready(now=1.0) == []  # fills has not moved past 5; its timeout starts now
    before = anomalies("timeout")
    blocks = joiner.ready(now=1.6)
    assert [b.height for b in blocks] == [5] and anomalies("timeout") == before + 1
    add_block(joiner, 8)
    assert [b.height for b in joiner.ready(now=1.7)] == [6]
    add_block(joiner, 9)
    assert [b.height for b in joiner.ready(now=1.8)] == [7, 8]  # 7 had no rows: an empty block


def test_duplicates_out_of_order_and_gaps_are_counted() -> None:
    joiner = Joiner("by-block", timeout=10)
    add_block(joiner, 1)
    assert [b.height for b in joiner.ready(now=0)] == [1]
    dup, ooo, gap = anomalies("duplicate"), anomalies("out_of_order"), anomalies("gap")
    add_block(joiner, 1)  # the whole block again
    add_block(joiner, 4)
    add_block(joiner, 3)  # after 4
    add_block(joiner, 4, ("fills",))  # a second line for 4 in one stream
    assert [b.height for b in joiner.ready(now=0)] == [3, 4]
    assert anomalies("duplicate") == dup + 4
    assert anomalies("out_of_order") == ooo + 3
    assert anomalies("gap") == gap + 1  # block 2

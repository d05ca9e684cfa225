"""Block joining rules: each block's books phase (diffs and fills) and details phase
(statuses) close per mode, on timeout; duplicates, out-of-order lines and gaps are counted."""

from __future__ import annotations

from prometheus_client import REGISTRY

from hlbook.common.models import DiffLine, FillLine
from hlbook.services.ingest.joiner import MAX_DROPS, Joiner, LineHead, Phase, line_head

BOOK_LINES = {"raw_book_diffs": DiffLine, "fills": FillLine}
STREAMS = ("order_statuses", *BOOK_LINES)


def status_line(height: int, row: int = 1) -> bytes:
    """``row``: which row of the block (streaming: rows of a block differ, one read twice is a duplicate)."""
    return b'{"local_time":"2026-11-22T00:00:00.%d","block_time":"2026-11-22T00:00:00.0","block_number":%d,"events":[]}\n' % (
        row, height)


def anomalies(kind: str) -> float:
    return REGISTRY.get_sample_value("hlbook_ingest_block_anomalies_total", {"kind": kind}) or 0.0


def dropped(reason: str) -> float:
    return sum(REGISTRY.get_sample_value("hlbook_ingest_bad_lines_total", {"stream": s, "reason": reason}) or 0.0
               for s in STREAMS)


def add_block(joiner: Joiner, height: int, streams: tuple[str, ...] = STREAMS, row: int = 1) -> None:
    for stream in streams:
        if stream == "order_statuses":
            line = status_line(height, row)
            head = line_head(line)
            assert head is not None
            joiner.add_statuses(head, line)
        else:
            joiner.add(stream, BOOK_LINES[stream](f"2026-11-22T00:00:00.{row}", "2026-11-22T00:00:00.0", height, []))


def closed(joiner: Joiner, now: float) -> list[tuple[str, int]]:
    return [(phase.value, block.height) for phase, block in joiner.ready(now=now)]


def test_line_head_is_read_without_decoding_the_events() -> None:
    assert line_head(status_line(7)) == LineHead("2026-11-22T00:00:00.1", "2026-11-22T00:00:00.0", 7)
    assert line_head(b'{"events":[],"block_number":7}') is None


def test_books_close_without_waiting_for_the_statuses() -> None:
    joiner = Joiner("by-block", timeout=10)
    add_block(joiner, 5, ("raw_book_diffs",))
    assert closed(joiner, 0) == []
    add_block(joiner, 5, ("fills",))
    assert closed(joiner, 0) == [("books", 5)]  # the status line has not come: its details wait for it
    add_block(joiner, 6, ("raw_book_diffs", "fills"))
    assert closed(joiner, 0) == [("books", 6)]
    add_block(joiner, 5, ("order_statuses",))
    add_block(joiner, 6, ("order_statuses",))
    events = joiner.ready(now=0)
    assert [(p.value, b.height) for p, b in events] == [("details", 5), ("details", 6)]
    assert events[0][1].status_lines == [status_line(5)] and events[0][1].decode_statuses(None) == []


def test_a_status_line_first_closes_both_phases_at_once() -> None:
    joiner = Joiner("by-block", timeout=10)
    add_block(joiner, 5, ("order_statuses", "raw_book_diffs"))
    assert closed(joiner, 0) == []
    add_block(joiner, 5, ("fills",))
    assert closed(joiner, 0) == [("books", 5), ("details", 5)]


def test_a_status_line_that_never_comes_closes_the_details_after_the_timeout() -> None:
    joiner = Joiner("by-block", timeout=0.5)
    add_block(joiner, 5, ("raw_book_diffs", "fills"))
    add_block(joiner, 6, ("raw_book_diffs", "fills"))
    assert closed(joiner, 0) == [("books", 5), ("books", 6)]
    assert closed(joiner, 0.1) == []  # 5's status line is late: its timeout starts
    events = joiner.ready(now=0.7)
    assert [(p.value, b.height, b.statuses_missing) for p, b in events] == [("details", 5, True)]
    add_block(joiner, 6, ("order_statuses",))
    assert closed(joiner, 0.7) == [("details", 6)]
    add_block(joiner, 8, ("order_statuses",))  # 7's never came: a jump no other stream reached yet waits
    add_block(joiner, 7, ("raw_book_diffs", "fills"))
    assert closed(joiner, 0.7) == [("books", 7)]
    add_block(joiner, 8, ("raw_book_diffs", "fills"))  # they reach 8: the status stream is past 7 (by-block: in order)
    events = joiner.ready(now=0.7)
    assert [(p.value, b.height) for p, b in events] == [("books", 8), ("details", 7), ("details", 8)]
    assert events[1][1].statuses_missing


def test_streaming_closes_each_phase_when_its_stream_moved_past_or_after_timeout() -> None:
    """Books once the diff stream moved past the block (fills are sparse: they do not hold
    the books back), trades once the fill stream did, details once the status stream did
    and its trades closed."""
    joiner = Joiner("streaming", timeout=0.5)
    add_block(joiner, 5)
    add_block(joiner, 5, ("order_statuses",), row=2)  # more rows of block 5
    add_block(joiner, 5, ("order_statuses",), row=2)  # one read twice: dropped
    assert closed(joiner, 0) == []
    add_block(joiner, 6, ("order_statuses", "raw_book_diffs"))
    assert closed(joiner, 1.0) == [("books", 5)]  # fills has not moved past 5: its trades wait, timeout from now
    before = anomalies("timeout")
    events = joiner.ready(now=1.6)
    assert [(p.value, b.height) for p, b in events] == [("trades", 5), ("details", 5)] and anomalies("timeout") == before + 1
    assert len(events[1][1].status_lines) == 2
    add_block(joiner, 8)
    assert closed(joiner, 1.7) == [("books", 6), ("trades", 6), ("details", 6)]
    add_block(joiner, 9)
    assert closed(joiner, 1.8) == [("books", 7), ("books", 8), ("trades", 7), ("trades", 8),  # 7 had no rows: an empty block
                                   ("details", 7), ("details", 8)]


def test_streaming_rows_after_a_blocks_books_join_its_trades_and_details() -> None:
    """A fill or status row of a block whose books are out still belongs to it; a fill row of a
    block whose trades closed (on timeout) is late: dropped and counted, never merged elsewhere."""
    joiner = Joiner("streaming", timeout=0.5)
    add_block(joiner, 5, ("raw_book_diffs",))
    add_block(joiner, 6, ("raw_book_diffs",))
    assert closed(joiner, 0) == [("books", 5)]
    add_block(joiner, 5, ("fills", "order_statuses"))
    assert closed(joiner, 0) == []  # the fill stream has not moved past 5
    events = joiner.ready(now=0.6)
    assert [(p.value, b.height) for p, b in events] == [("trades", 5)]  # timed out; the statuses are not past 5
    assert events[0][1].streams_seen == {"raw_book_diffs", "fills", "order_statuses"} and len(events[0][1].status_lines) == 1
    late = anomalies("late_row")
    add_block(joiner, 5, ("fills",), row=2)
    assert anomalies("late_row") == late + 1
    add_block(joiner, 7)
    assert closed(joiner, 0.6) == [("books", 6), ("trades", 6), ("details", 5), ("details", 6)]


def test_streaming_trades_time_out_together_not_one_timeout_after_another() -> None:
    """Blocks without fills wait the timeout from when the next block came, each its own: the
    trades (and so the details) of a quiet stretch do not fall further behind with every block."""
    joiner = Joiner("streaming", timeout=0.5)
    for height in (5, 6, 7):
        add_block(joiner, height, ("order_statuses", "raw_book_diffs"))
    add_block(joiner, 8, ("order_statuses", "raw_book_diffs"))
    assert closed(joiner, 0) == [("books", 5), ("books", 6), ("books", 7)]
    assert closed(joiner, 0.6) == [("trades", 5), ("trades", 6), ("trades", 7), ("details", 5), ("details", 6), ("details", 7)]


def test_duplicates_late_lines_and_gaps_are_dropped_and_counted() -> None:
    joiner = Joiner("by-block", timeout=10)
    add_block(joiner, 1)
    assert closed(joiner, 0) == [("books", 1), ("details", 1)]
    dup, late, gap = dropped("duplicate"), dropped("late"), anomalies("gap")
    add_block(joiner, 1)  # the whole block again
    add_block(joiner, 4)
    add_block(joiner, 3)  # after 4: late, never merged
    add_block(joiner, 4, ("fills",))  # a second line for 4 in one stream
    assert closed(joiner, 0) == [("books", 4), ("details", 4)]
    add_block(joiner, 2, ("order_statuses",))  # a status line of a block that closed missing
    assert dropped("duplicate") == dup + 4
    assert dropped("late") == late + 4
    assert anomalies("gap") == gap + 2  # blocks 2 and 3


def test_a_jump_no_other_stream_reaches_is_held_then_dropped() -> None:
    """A fills line 500 blocks ahead does not close the blocks before it without their fills."""
    joiner = Joiner("by-block", timeout=10)
    add_block(joiner, 1)
    assert closed(joiner, 0) == [("books", 1), ("details", 1)]
    jumps = dropped("implausible_height")
    add_block(joiner, 501, ("fills",))
    add_block(joiner, 2, ("order_statuses", "raw_book_diffs"))
    assert closed(joiner, 0) == []  # 2's fills line has not come: 501 did not move the fills stream past it
    add_block(joiner, 2, ("fills",))
    assert closed(joiner, 0) == [("books", 2), ("details", 2)]
    assert dropped("implausible_height") == jumps + 1


def test_a_stream_that_stops_is_said_and_not_waited_for_until_it_comes_back() -> None:
    """The fills file deleted under a running node: every block waited the timeout for its fills
    line, so the lag grew by the timeout a block without end; after a few such blocks the stream
    is stalled (said, a metric), blocks close at once without it, and it is waited for again
    as soon as a line of it comes."""
    from hlbook.services.ingest.joiner import STALL_AFTER

    joiner = Joiner("by-block", timeout=0.5)
    stalled = lambda: REGISTRY.get_sample_value("hlbook_ingest_stream_stalled", {"stream": "fills"})  # noqa: E731
    now = 0.0
    for height in range(10, 10 + STALL_AFTER):  # no fills line: each block's books wait the timeout
        add_block(joiner, height, ("order_statuses", "raw_book_diffs"))
        add_block(joiner, height + 1, ("raw_book_diffs",))  # the diffs stream moved past it
        assert closed(joiner, now) == []
        now += 0.6
        assert ("books", height) in closed(joiner, now)
    assert "fills" in joiner.stalled and stalled() == 1
    height += 1
    add_block(joiner, height, ("order_statuses",))
    add_block(joiner, height + 1, ("raw_book_diffs",))
    assert [p for p, h in closed(joiner, now) if h == height] == ["books", "details"]  # at once, no wait
    add_block(joiner, height + 1, ("fills", "order_statuses"))  # fills again
    assert "fills" not in joiner.stalled and stalled() == 0
    assert closed(joiner, now) == [("books", height + 1), ("details", height + 1)]
    add_block(joiner, height + 2, ("raw_book_diffs", "order_statuses"))
    add_block(joiner, height + 3, ("raw_book_diffs",))
    assert closed(joiner, now) == []  # waited for once more


def test_streaming_fills_of_a_block_before_the_first_one_are_late_not_a_new_block() -> None:
    """Started with nothing before it (no position, no files yet): a fill row of a block older
    than the first block whose books went out is late (dropped, counted), never a block of its
    own that moves the books back and publishes the first block again without its fills."""
    joiner = Joiner("streaming", timeout=0.5)
    add_block(joiner, 10, ("raw_book_diffs",))
    add_block(joiner, 11, ("raw_book_diffs",))
    assert closed(joiner, 0) == [("books", 10)]
    late = anomalies("late_row")
    add_block(joiner, 9, ("fills",))
    assert anomalies("late_row") == late + 1
    add_block(joiner, 10, ("fills",))
    add_block(joiner, 12, ("raw_book_diffs", "fills"))
    events = joiner.ready(now=0)
    assert [(p.value, b.height) for p, b in events] == [("books", 11), ("trades", 10), ("trades", 11)]
    assert joiner.last_closed == 11


def test_the_replay_store_names_as_oldest_a_block_it_holds_whole() -> None:
    """Streaming: later blocks' books go out before an earlier block's trades and details, so
    when the store is full the entries dropped first may be books of blocks after the oldest
    entry left: those blocks are no longer whole, and a replay from them would lack them."""
    from hlbook.common import topics
    from hlbook.services.ingest.replay import ReplayStore

    store = ReplayStore(capacity=2, phases=2)  # 4 entries
    books = lambda h: [(topics.HEADER, b"%d" % h)]  # noqa: E731
    details = lambda h: [(topics.BLOCK_END, b"%d" % h)]  # noqa: E731
    for height, messages in [(1, books(1)), (2, books(2)), (3, books(3)), (1, details(1)), (2, details(2))]:
        store.add(height, messages)
    assert [h for h, _ in store.blocks] == [2, 3, 1, 2] and store.oldest == 2  # books of 1 dropped
    store.add(3, details(3))
    store.add(4, books(4))  # books of 2 and 3 dropped: the details of 1, 2 and 3 are left first
    assert [h for h, _ in store.blocks] == [1, 2, 3, 4] and store.oldest == 4


def test_drops_are_noted_for_the_next_block_end_and_a_flood_names_no_one() -> None:
    """A damaged fills line (its coins unknown) is noted for the next E|; a duplicate is not (a copy
    of what was joined); a flood of damaged lines stays one entry per stream and reason past
    ``MAX_DROPS``, naming no one (every feed of the stream is told)."""
    joiner = Joiner("by-block", timeout=10, start_height=100)
    joiner.feed("fills", b'{"local_time": garbage')
    assert [(d.stream, d.reason, d.coins) for d in joiner.take_dropped()] == [("fills", "malformed", None)]
    add_block(joiner, 100)
    add_block(joiner, 100)  # the same lines again
    assert joiner.take_dropped() == []
    for _ in range(MAX_DROPS + 50):
        joiner.feed("fills", b'{"local_time": garbage')
    joiner.feed("raw_book_diffs", b'{"local_time": garbage')
    flood = joiner.take_dropped()
    assert len(flood) == MAX_DROPS + 1 and flood[-1].stream == "raw_book_diffs" and flood[-1].coins is None

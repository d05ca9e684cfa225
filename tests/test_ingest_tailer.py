"""Tailer: start positions, partial lines, truncation, rotation."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from prometheus_client import REGISTRY

from hlbook.common import nodefiles
from hlbook.common.nodefiles import line_height, offset_of
from hlbook.services.ingest.tailer import WRITE_WAIT, Tailer

HOUR = datetime(2026, 11, 22, 23)
NEXT = datetime(2026, 11, 23, 0)


def node_line(height: int, pad: int = 0) -> bytes:
    return b'{"local_time":"x","block_time":"y","block_number":%d,"events":[%s]}\n' % (height, b"0," * pad + b"0")


def append(tmp: Path, when: datetime, data: bytes) -> Path:
    path = nodefiles.hour_file(tmp, "fills", "by-block", when)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(data)
    return path


def heights(lines: list[bytes]) -> list[int | None]:
    return [line_height(line) for line in lines]


def test_start_at_end_keeps_a_partial_last_line(tmp_path: Path) -> None:
    append(tmp_path, HOUR, node_line(1) + node_line(2, pad=40_000) + node_line(3)[:20])
    tailer = Tailer(tmp_path, "fills", "by-block")
    assert tailer.start_at_end() == 2
    assert tailer.poll() == []
    append(tmp_path, HOUR, node_line(3)[20:])
    assert heights(tailer.poll()) == [3]


def test_a_line_being_written_is_read_once_whole(tmp_path: Path) -> None:
    append(tmp_path, HOUR, node_line(1))
    tailer = Tailer(tmp_path, "fills", "by-block")
    assert tailer.start_at_end() == 1
    big = node_line(2, pad=300_000)
    step = len(big) // 7
    for start in range(0, 7 * step, step):  # the node is still writing it: nothing is read
        append(tmp_path, HOUR, big[start : start + step])
        assert tailer.poll() == [] and tailer._fh is not None and tailer._fh.tell() == len(node_line(1))
    append(tmp_path, HOUR, big[7 * step :] + node_line(3))
    assert tailer.poll() == [big[:-1], node_line(3)[:-1]]
    # a node that stops mid-line: after WRITE_WAIT its start is read, and the line comes once whole
    append(tmp_path, HOUR, node_line(4)[:10])
    assert tailer.poll() == []
    time.sleep(WRITE_WAIT + 0.05)
    assert tailer.poll() == [] and tailer._fh.tell() > len(node_line(1)) + len(big) + len(node_line(3))
    append(tmp_path, HOUR, node_line(4)[10:])
    assert tailer.poll() == [node_line(4)]


def test_start_from_scans_back_to_the_file_holding_the_height(tmp_path: Path) -> None:
    append(tmp_path, datetime(2026, 11, 22, 22), node_line(1) + node_line(2))
    append(tmp_path, HOUR, node_line(3) + node_line(4))
    append(tmp_path, NEXT, node_line(5))
    tailer = Tailer(tmp_path, "fills", "by-block")
    assert tailer.start_from(4)
    assert heights(tailer.poll()) == [4]
    assert tailer.poll() == []  # end of the hour file: rotates
    assert heights(tailer.poll()) == [5]
    assert not Tailer(tmp_path, "fills", "by-block").start_from(0)  # older than every file


def test_lines_between_two_heights_across_an_hour_rotation(tmp_path: Path) -> None:
    append(tmp_path, HOUR, b"".join(node_line(h) for h in range(1, 5)))
    append(tmp_path, NEXT, b"".join(node_line(h) for h in range(5, 9)) + node_line(9)[:-1])  # 9 not complete yet
    assert heights(list(nodefiles.lines_between(tmp_path, "fills", "by-block", 3, 6))) == [3, 4, 5, 6]
    assert heights(list(nodefiles.lines_between(tmp_path, "fills", "by-block", 6, 20))) == [6, 7, 8]
    assert heights(list(nodefiles.lines_between(tmp_path, "fills", "by-block", 0, 2))) == [1, 2]  # before the oldest file
    assert list(nodefiles.lines_between(tmp_path, "fills", "by-block", 2, 1)) == []


def test_start_from_finds_the_line_in_a_big_file_by_bisection(tmp_path: Path) -> None:
    """An hour of status lines is gigabytes: the position of a height is bisected, not scanned."""
    lines = [node_line(h, pad=(h * 7919) % 9000) for h in range(100, 4100)]  # 36 MB, lines of unequal length
    path = append(tmp_path, HOUR, b"".join(lines) + node_line(4100)[:30])
    for height in (100, 101, 2345, 4099, 4100):
        tailer = Tailer(tmp_path, "fills", "by-block")
        assert tailer.start_from(height)
        assert tailer._fh is not None and tailer._fh.tell() == sum(map(len, lines[: height - 100]))
        tailer.close()
    assert offset_of(path, 3000) == sum(map(len, lines[:2900]))
    assert offset_of(path, 5000) == path.stat().st_size - 30  # not written yet: the partial line's start


def test_a_damaged_height_where_the_bisection_looks_does_not_skip_blocks(tmp_path: Path) -> None:
    """A late line (an old height again) and a height 500 blocks ahead, each the first line
    after the middle of the file, where the bisection looks first: the position of every
    height near them is never after the height's line, and the lines read from there hold
    every block of the range, each once."""
    width = 1000

    def sized(height: int) -> bytes:
        return node_line(height)[:-1].ljust(width - 1) + b"\n"

    real = [sized(h) for h in range(1000, 4999)]  # 3,999 lines of one size
    for damaged in (sized(1005), sized(3499)):
        data = b"".join([*real[:2000], damaged, *real[2000:]])
        path = append(tmp_path / str(line_height(damaged)), HOUR, data)
        assert len(data) // 2 == 2000 * width  # the damaged line is the one the first step probes
        for height in range(2990, 3010):
            at = offset_of(path, height)
            assert at <= data.index(real[height - 1000])
            got = [h for h, _ in nodefiles.lines_from([path], height, height + 5)]
            assert got == list(range(height, height + 6)), (damaged[:70], height)


def test_truncated_file_is_reread_and_counted(tmp_path: Path) -> None:
    path = append(tmp_path, HOUR, node_line(1) + node_line(2))
    tailer = Tailer(tmp_path, "fills", "by-block")
    assert heights(tailer.poll()) == [1, 2]
    before = REGISTRY.get_sample_value("hlbook_ingest_file_events_total", {"stream": "fills", "event": "truncated"}) or 0
    path.write_bytes(node_line(7))
    assert heights(tailer.poll()) == [7]
    assert REGISTRY.get_sample_value("hlbook_ingest_file_events_total", {"stream": "fills", "event": "truncated"}) == before + 1


def test_unterminated_line_at_rotation_is_dropped_and_counted(tmp_path: Path) -> None:
    append(tmp_path, HOUR, node_line(1) + node_line(2)[:30])
    tailer = Tailer(tmp_path, "fills", "by-block")
    assert tailer.poll() == []  # the node may still be writing line 2 ...
    time.sleep(WRITE_WAIT + 0.05)
    assert heights(tailer.poll()) == [1]  # ... but it stopped there
    append(tmp_path, NEXT, node_line(3))
    before = REGISTRY.get_sample_value("hlbook_ingest_bad_lines_total", {"stream": "fills", "reason": "unterminated"}) or 0
    assert tailer.poll() == []  # rotates
    assert heights(tailer.poll()) == [3]
    assert REGISTRY.get_sample_value("hlbook_ingest_bad_lines_total", {"stream": "fills", "reason": "unterminated"}) == before + 1

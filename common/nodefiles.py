"""Where a node writes its streams: ``<data-dir>/hl/data/node_<stream>_<mode>/hourly/YYYYMMDD/H``
(hour not zero-padded)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

MODES = ("by-block", "streaming")
_HEIGHT = re.compile(rb'"block_number":(\d+)')
BISECT_WINDOW = 1 << 20  # bytes below which offset_of scans instead of bisecting
PROBE_LINES = 3  # lines whose median height a bisection step goes by (one damaged line cannot mislead it)
STOP_AFTER = 2  # lines in a row past a range that end reading it (one damaged line does not)
_MODE_SUFFIX = {"by-block": "by_block", "streaming": "streaming"}


def stream_dir(data_dir: str | Path, stream: str, mode: str) -> Path:
    """Folder of one stream's hourly files; ``stream`` is one of models.STREAMS."""
    return Path(data_dir) / "hl" / "data" / f"node_{stream}_{_MODE_SUFFIX[mode]}" / "hourly"


def hour_file(data_dir: str | Path, stream: str, mode: str, when: datetime) -> Path:
    """The file a node writes ``stream`` into during the hour of ``when`` (node local time)."""
    return stream_dir(data_dir, stream, mode) / when.strftime("%Y%m%d") / str(when.hour)


def hour_key(path: Path) -> tuple[str, int]:
    """Sort key of an hourly file: (YYYYMMDD, hour)."""
    return path.parent.name, int(path.name)


def hour_files(data_dir: str | Path, stream: str, mode: str) -> list[Path]:
    """All hourly files of a stream, oldest first (hours sort numerically, across days)."""
    root = stream_dir(data_dir, stream, mode)
    if not root.is_dir():
        return []
    files = [
        f
        for day in root.iterdir()
        if day.is_dir() and day.name.isdigit()
        for f in day.iterdir()
        if f.is_file() and f.name.isdigit()
    ]
    return sorted(files, key=hour_key)


def _hours(day: Path) -> list[Path]:
    return sorted((f for f in day.iterdir() if f.name.isdigit() and f.is_file()), key=lambda f: int(f.name))


def next_hour_file(path: Path) -> Path | None:
    """The first hourly file after ``path`` (same day, else the next day that has
    one), listing only the current day and the day folders: cheap to poll."""
    day = path.parent
    later = [f for f in _hours(day) if int(f.name) > int(path.name)] if day.is_dir() else []
    if later:
        return later[0]
    for next_day in sorted(d for d in day.parent.iterdir() if d.name.isdigit() and d.name > day.name):
        hours = _hours(next_day)
        if hours:
            return hours[0]
    return None


# ---------------------------------------------------------------- heights in a file


def line_height(line: bytes) -> int | None:
    """Block number of a node line, read from its prefix without decoding the line."""
    match = _HEIGHT.search(line, 0, 256)
    return int(match.group(1)) if match else None


def block_lines(data_dir: str | Path, streams: Iterable[str], mode: str) -> dict[int, dict[str, bytes]]:
    """Height -> stream -> that block's lines (streaming: rows) of the stream, joined as the node
    wrote them, from every hourly file (a small data dir: fixtures, benches)."""
    out: dict[int, dict[str, bytes]] = {}
    for stream in streams:
        for path in hour_files(data_dir, stream, mode):
            for line in path.read_bytes().splitlines(keepends=True):
                height = line_height(line)
                if height is not None:
                    row = out.setdefault(height, {})
                    row[stream] = row.get(stream, b"") + line
    return out


def first_height(path: Path) -> int | None:
    """Block number of a node file's first line (None: empty or no height in it)."""
    with open(path, "rb") as fh:
        return line_height(fh.read(256))


def last_line(path: Path) -> tuple[int, bytes | None]:
    """(offset just after the last newline, the last complete line without it; None: no line
    is complete) of a node file, read from its end."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        window = 1 << 16
        while True:
            start = max(0, size - window)
            fh.seek(start)
            data = fh.read(size - start)
            end = data.rfind(b"\n")
            if end < 0 and start == 0:
                return 0, None
            line_start = data.rfind(b"\n", 0, end) + 1 if end >= 0 else 0
            if end >= 0 and (line_start > 0 or start == 0):
                return start + end + 1, data[line_start:end]
            window *= 4


def tail(path: Path) -> tuple[int, int | None]:
    """(offset just after the last newline, height of the last complete line) of a node file."""
    offset, line = last_line(path)
    return offset, None if line is None else line_height(line)


def line_after(fh: BinaryIO, pos: int) -> tuple[int, int | None]:
    """(start of the first complete line at or after ``pos``, its height); (size, None) when there is none."""
    fh.seek(max(pos - 1, 0))
    head = b"" if pos == 0 else fh.read(1)
    start = pos
    if head not in (b"", b"\n"):  # inside a line: skip to the next one
        while True:
            chunk = fh.read(1 << 16)
            if not chunk:
                return fh.tell(), None
            cut = chunk.find(b"\n")
            if cut >= 0:
                start = fh.tell() - len(chunk) + cut + 1
                break
    fh.seek(start)
    prefix = fh.read(256)
    return start, line_height(prefix) if b"\n" in prefix or len(prefix) == 256 else None


def _probe(fh: BinaryIO, pos: int) -> tuple[int, int | None]:
    """(start of the first complete line at or after ``pos``, the median height of it and the
    ``PROBE_LINES - 1`` lines after it): a line out of order (a damaged height) does not count."""
    start, first = line_after(fh, pos)
    heights, at = [first], start
    while first is not None and len(heights) < PROBE_LINES:
        at, found = line_after(fh, at + 1)
        if found is None:
            break
        heights.append(found)
    known = sorted(h for h in heights if h is not None)
    return start, known[len(known) // 2] if known else None


def offset_of(path: Path, height: int) -> int:
    """Offset of the first line whose block is ``height`` or later (the end when none is); a
    damaged line may make it earlier, never later."""
    with open(path, "rb") as fh:
        lo, hi = 0, fh.seek(0, os.SEEK_END)  # the answer is in [lo, hi]; lo is a line start below ``height``
        while hi - lo > BISECT_WINDOW:
            mid = (lo + hi) // 2
            start, found = _probe(fh, mid)
            if found is not None and found < height:
                lo = start
            else:
                hi = mid
        pos = lo
        while True:  # a short scan from ``lo``
            start, found = line_after(fh, pos)
            if found is None or found >= height:
                return start
            fh.seek(start)
            line_end = fh.readline()
            pos = start + len(line_end)


def holding(files: list[Path], height: int) -> Path | None:
    """The newest of ``files`` (hour order) whose first block is ``height`` or earlier
    (None: every one starts after it)."""
    for path in reversed(files):
        first = first_height(path)
        if first is not None and first <= height:
            return path
    return None


Bad = Callable[[str, "int | None", bytes], None]  # (reason, height, line) of a line skipped as damaged


def within(lines: Iterable[bytes], first: int, last: int, bad: Bad | None = None) -> Iterator[tuple[int, bytes]]:
    """(height, line) of the complete ``lines`` of blocks ``first..last``; reading ends once
    ``STOP_AFTER`` lines in a row are past ``last``: a line past it followed by one within is
    a damaged height (told to ``bad``, as are lines without a height)."""
    beyond: list[tuple[int, bytes]] = []
    for line in lines:
        if not line.endswith(b"\n"):
            continue  # being written (a file's last line): read once it is whole
        height = line_height(line)
        if height is None:
            if bad is not None:
                bad("no_height", None, line)
            continue
        if height > last:
            beyond.append((height, line))
            if len(beyond) >= STOP_AFTER:
                return
            continue
        if beyond and bad is not None:
            bad("implausible_height", *beyond[0])
        beyond = []
        if height >= first:
            yield height, line


def lines_from(files: list[Path], first: int, last: int, bad: Bad | None = None) -> Iterator[tuple[int, bytes]]:
    """(height, line) of the blocks ``first..last`` in ``files`` (hour order), in file order:
    from the newest file starting at or before ``first``, bisected to it."""
    start = holding(files, first)

    def read() -> Iterator[bytes]:
        for path in files[files.index(start) if start is not None else 0 :]:
            if path != start and (first_height(path) or 0) > last:
                return
            with open(path, "rb") as fh:
                if path == start:
                    fh.seek(offset_of(path, first))
                yield from fh

    return within(read(), first, last, bad)


def lines_between(data_dir: str | Path, stream: str, mode: str, first: int, last: int,
                  bad: Bad | None = None) -> Iterator[bytes]:
    """The complete lines of blocks ``first``..``last`` of one stream, in file order."""
    return (line for _, line in lines_from(hour_files(data_dir, stream, mode), first, last, bad))

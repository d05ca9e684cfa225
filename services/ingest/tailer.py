"""Follow one node stream through its hourly files.

Returns complete lines only (a partial last line waits for its newline),
switches to the next hourly file once the current one is finished (also across
midnight), reopens a file that shrank (truncated/rewritten) from its start,
and reads in bounded chunks so catching up from an old height never loads a
whole hour into memory.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

from hlbook.common import nodefiles
from hlbook.services.ingest import metrics

log = logging.getLogger(__name__)

CHUNK = 16 << 20  # bytes read per poll (a whole-market status line is ~4 MB, three times that at 3x the flow)
MAX_PARTIAL = 64 << 20  # a "line" longer than this is garbage
WRITE_WAIT = 0.2  # seconds a line being written is waited for before its start is read (a node that stopped mid-line)
_ROTATION_CHECK_S = 0.05


class Tailer:
    """Tails ``node_<stream>_<mode>`` hourly files."""

    def __init__(self, data_dir: str | Path, stream: str, mode: str) -> None:
        self.data_dir = data_dir
        self.stream = stream
        self.mode = mode
        self.path: Path | None = None
        self._fh: BinaryIO | None = None
        self._partial: list[bytes] = []  # the pieces read of a line whose newline has not come yet
        self._writing_since: float | None = None  # since when the file has ended inside a line
        self._next_rotation_check = 0.0
        self.at_eof = False
        self.lost: Callable[[str, int | None, list[Any]], None] | None = None  # told of a line dropped (reason, height, [])

    # -------------------------------------------------------------- start positions

    def files(self) -> list[Path]:
        return nodefiles.hour_files(self.data_dir, self.stream, self.mode)

    def start_at_end(self) -> int | None:
        """Open the newest file that holds a complete line, after its last one (a partial
        one will be completed by the node and read); return that line's height. A newer
        file still empty (a node may create the next hour's early) is not taken."""
        files = self.files()
        if not files:
            return None
        for path in reversed(files):
            offset, height = nodefiles.tail(path)
            if height is not None or path == files[0]:
                break
        self._open(path)
        assert self._fh is not None
        self._fh.seek(offset)
        return height

    def start_from(self, height: int) -> bool:
        """Open the newest file whose first block is <= height (scanning back) at the
        first line of block ``height`` or later (found by bisection: an hour of status
        lines is gigabytes). False when every file starts after ``height`` (blocks are missing)."""
        files = self.files()
        path = nodefiles.holding(files, height)
        if path is not None:
            self._open(path)
            assert self._fh is not None
            self._fh.seek(nodefiles.offset_of(path, height))
            return True
        if files:
            self._open(files[0])
        return False

    def _open(self, path: Path) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(path, "rb")
        self.path = path
        self._partial = []

    # -------------------------------------------------------------- reading

    def poll(self) -> list[bytes]:
        """Complete lines appended since the last poll (at most about one chunk)."""
        if self._fh is None:
            files = self.files()
            if not files:
                self.at_eof = True
                return []
            self._open(files[0])
        assert self._fh is not None
        available = self._check_truncated()
        if self.mode == "by-block" and 0 < available <= CHUNK and self._writing():
            self.at_eof = True  # the node is writing a block's line: read it once it is whole
            return []
        data = self._fh.read(min(available, CHUNK)) if available > 0 else b""
        if not data:
            self.at_eof = True
            self._maybe_rotate()
            return []
        self.at_eof = len(data) < CHUNK
        return self._split(data)

    def _writing(self) -> bool:
        """Whether the file ends inside a line the node is still writing (its last byte is not a
        newline, for less than ``WRITE_WAIT``): read in pieces, a 4 MB line would be copied twice.
        By-block mode only: there a line is a block, and the next one starts a block later
        (in streaming mode rows follow each other and a file often ends inside one)."""
        assert self._fh is not None
        try:
            ends_line = os.pread(self._fh.fileno(), 1, os.fstat(self._fh.fileno()).st_size - 1) == b"\n"
        except OSError:
            ends_line = True
        now = time.monotonic()
        if ends_line:
            self._writing_since = None
            return False
        if self._writing_since is None:
            self._writing_since = now
        return now - self._writing_since < WRITE_WAIT

    def _split(self, data: bytes) -> list[bytes]:
        """Complete lines: a line read in pieces (the node was writing it) is joined once, when
        its newline came; one whole line, as a node appends them, is not copied (decoders skip
        the newline)."""
        last = data.rfind(b"\n")
        if last < 0:
            self._keep(data)
            return []
        if self._partial:
            return self._finish(data, last)
        if last == len(data) - 1 and data.find(b"\n", 0, last) < 0:
            return [data] if last else []
        lines = data.split(b"\n")
        self._keep(lines.pop())
        return [line for line in lines if line]

    def _finish(self, data: bytes, last: int) -> list[bytes]:
        """The line read in pieces, joined once, then the lines after it: a line of tens of
        megabytes is copied once, not again by a split."""
        first = data.find(b"\n")
        if first == len(data) - 1:  # the read ends with it: kept with its newline (decoders skip it), not sliced
            line, self._partial = b"".join([*self._partial, data]), []
            return [line]
        line, self._partial = b"".join([*self._partial, memoryview(data)[:first]]), []
        if first == last:
            self._keep(data[last + 1 :])
            return [line]
        rest = data[first + 1 : last].split(b"\n")
        self._keep(data[last + 1 :])
        return [line, *(r for r in rest if r)]

    def _keep(self, piece: bytes) -> None:
        """A piece of a line still being written (dropped past ``MAX_PARTIAL``: not a line)."""
        if not piece:
            return
        self._partial.append(piece)
        size = sum(len(p) for p in self._partial)
        if size > MAX_PARTIAL:
            metrics.BAD_LINES.labels(self.stream, "oversize").inc()
            self._tell("oversize")
            log.error("%s: dropping %d bytes without a newline in %s", self.stream, size, self.path)
            self._partial = []

    def _check_truncated(self) -> int:
        """Bytes to read from the current position (the file is reread from its start if it shrank)."""
        assert self._fh is not None and self.path is not None
        pos = self._fh.tell()
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return CHUNK  # gone: read what the open file still holds
        if size < pos:
            metrics.FILE_EVENTS.labels(self.stream, "truncated").inc()
            log.error("%s: %s shrank from %d to %d bytes; rereading it from the start", self.stream, self.path, pos, size)
            self._fh.seek(0)
            self._partial = []
            return size
        return size - pos

    def _maybe_rotate(self) -> None:
        """At EOF: switch to the next hourly file once one exists."""
        now = time.monotonic()
        if now < self._next_rotation_check:
            return
        self._next_rotation_check = now + _ROTATION_CHECK_S
        assert self.path is not None and self._fh is not None
        newer = nodefiles.next_hour_file(self.path)
        if newer is None or nodefiles.first_height(newer) is None:
            return  # none yet, or created early and still empty: the node still writes here
        if self._fh.read(1):  # the writer appended after our last read: finish this file first
            self._fh.seek(-1, os.SEEK_CUR)
            return
        if self._partial:
            metrics.BAD_LINES.labels(self.stream, "unterminated").inc()
            self._tell("unterminated")
            log.error("%s: %s ended with %d bytes without a newline; dropped", self.stream, self.path, sum(map(len, self._partial)))
        metrics.FILE_EVENTS.labels(self.stream, "rotated").inc()
        log.info("%s: rotating %s -> %s", self.stream, self.path, newer)
        self._open(newer)

    def _tell(self, reason: str) -> None:
        if self.lost is not None:
            self.lost(reason, None, [])

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

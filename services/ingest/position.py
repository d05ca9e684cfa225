"""Where ingest stopped, kept on disk so a restart loses nothing.

After publishing blocks ingest writes (atomically: a temporary file renamed
over the old one, at most every ``SAVE_EVERY`` seconds) the last height it
published whole and the last whose books phase it published (a block's books go
out before its details; in streaming mode also the last whose trades went out), the ``prev`` of every topic (so the messages it publishes after a
restart continue each consumer's chain) and the users followed downstream (so
their messages are built from the first block again, before the subscribers
have reconnected). A restart resumes at the next height: every block written
while ingest was down is published, in order (the books phases it had published
already are not sent again, their details are); the few it may publish twice
(those after the last save) carry the same heights and ``prev`` as before, so
consumers see them as already held (``common.chain``: ``SEEN``).

The file is per data directory and mode (its name holds a hash of both), in
``--state-dir``. A writer thread writes it: a write and a rename can wait on the
disk for milliseconds (ext4 flushes a file renamed over another), and ingest's
loop must not.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

SAVE_EVERY = 0.2  # seconds between saves (a restart publishes again at most the blocks of this span)


class Position(msgspec.Struct):
    height: int  # the last block published whole (its details phase too)
    prev: dict[str, int] = {}  # topic (latin-1) -> its last height
    users: list[str] = []  # followed downstream
    books_height: int | None = None  # the last block whose books phase was published (None: ``height``)
    trades_height: int | None = None  # streaming: the last block whose trades phase was published (None: ``books_height``)


class PositionFile:
    """Reads and writes one ingest's position (writes in a thread: the newest wins)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved_at = 0.0
        self._pending: bytes | None = None  # the newest position not written yet
        self._wake = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="position-writer", daemon=True)
        self._writer.start()

    def load(self) -> Position | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.error("cannot read the position file %s: %s; starting at the end of the files", self.path, exc)
            return None
        try:
            return msgspec.json.decode(data, type=Position)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("position file %s is damaged (%s); starting at the end of the files", self.path, exc)
            return None

    def due(self) -> bool:
        return time.monotonic() - self.saved_at >= SAVE_EVERY

    def save(self, position: Position) -> None:
        """Hand the position to the writer (a newer one replaces one it has not written yet)."""
        self.saved_at = time.monotonic()
        with self._wake:
            self._pending = msgspec.json.encode(position)
            self._wake.notify()

    def close(self) -> None:
        """Write what is pending, then stop the writer."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._writer.join()

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                data, self._pending = self._pending, None
                closed = self._closed
            if data is not None:
                self._write(data)
            if closed and data is None:
                return

    def _write(self, data: bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not stop publishing; the next save tries again
            log.error("cannot save the position to %s: %s", self.path, exc)

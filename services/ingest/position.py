"""Where ingest stopped, kept on disk so a restart loses nothing.

After publishing blocks ingest writes (atomically: a temporary file renamed
over the old one, at most every ``SAVE_EVERY`` seconds) the last height it
published, the ``prev`` of every topic (so the messages it publishes after a
restart continue each consumer's chain) and the users followed downstream (so
their messages are built from the first block again, before the subscribers
have reconnected). A restart resumes at the next height: every block written
while ingest was down is published, in order; the few it may publish twice
(those after the last save) carry the same heights and ``prev`` as before, so
consumers see them as already held (``common.chain``: ``SEEN``).

The file is per data directory and mode (its name holds a hash of both), in
``--state-dir``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec

log = logging.getLogger(__name__)

SAVE_EVERY = 0.2  # seconds between saves (a restart publishes again at most the blocks of this span)


class Position(msgspec.Struct):
    height: int  # the last block published
    prev: dict[str, int] = {}  # topic (latin-1) -> its last height
    users: list[str] = []  # followed downstream


class PositionFile:
    """Reads and writes one ingest's position."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.saved_at = 0.0

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
        self.saved_at = time.monotonic()
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(msgspec.json.encode(position))
            os.replace(tmp, self.path)
        except OSError as exc:  # a full disk must not stop publishing; the next save tries again
            log.error("cannot save the position to %s: %s", self.path, exc)

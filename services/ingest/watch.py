"""Wake ingest when the node writes: Linux inotify on the directories of the
hourly files, as a file descriptor in ingest's ZeroMQ poller.

Watching a directory reports writes to the files in it (``IN_MODIFY``) and
new files or day folders (``IN_CREATE``, ``IN_MOVED_TO``), so ingest reads a
block as soon as its line is appended instead of on its next poll. Events are
not parsed: any event means "read the streams". Where inotify is not
available (another OS, a network file system that does not report writes)
:func:`Watcher.open` returns None and ingest polls.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

IN_MODIFY = 0x2
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_IGNORED = 0x8000  # a watched directory went away
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = IN_MODIFY | IN_CREATE | IN_MOVED_TO


class Watcher:
    """An inotify descriptor and the directories it watches."""

    def __init__(self, libc: ctypes.CDLL, fd: int) -> None:
        self._libc = libc
        self.fd = fd
        self.watched: set[str] = set()

    @classmethod
    def open(cls) -> Watcher | None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        except (OSError, AttributeError) as exc:
            log.info("inotify unavailable (%s): polling the node files", exc)
            return None
        if fd < 0:
            log.info("inotify_init1 failed (%s): polling the node files", os.strerror(ctypes.get_errno()))
            return None
        return cls(libc, fd)

    def watch(self, directory: Path) -> None:
        """Watch ``directory`` (once; a missing one is tried again on the next call)."""
        path = str(directory)
        if path in self.watched:
            return
        if self._libc.inotify_add_watch(self.fd, os.fsencode(path), MASK) < 0:
            return  # not there yet: the caller asks again
        self.watched.add(path)

    def drain(self) -> None:
        """Consume the pending events: which file changed does not matter, only that a
        watched directory went away (watched again once it is back)."""
        try:
            while data := os.read(self.fd, 1 << 16):
                pos = 0
                while pos + 16 <= len(data):  # struct inotify_event: wd, mask, cookie, len, name[len]
                    wd, mask, _, length = struct.unpack_from("iIII", data, pos)
                    if mask & IN_IGNORED:
                        self.watched.clear()
                    pos += 16 + length
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.fd)

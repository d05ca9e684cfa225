"""hlbook's own folder in the temporary directory: readable and writable by its user alone.

Shards share a node snapshot and take turns on a lock file there; in a world-writable
temporary directory another local user could hold that lock, or plant the file. The folder is
``$TMPDIR/hlbook-<uid>``, made with mode 0700, and used only while it is a real directory
of this user that no one else can write into or read (else a fresh private one is made).
Whoever leaves it empty removes it (:func:`remove_if_empty`); one who finds it gone between
making it and using it makes it again (:func:`in_private_dir`)."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def private_path() -> Path:
    """Where this user's private folder is (made or not)."""
    return Path(tempfile.gettempdir()) / f"hlbook-{os.getuid()}"


def private_dir() -> Path:
    """This user's private folder under the temporary directory (made if missing)."""
    path = private_path()
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    if is_private(path):
        return path
    fallback = Path(tempfile.mkdtemp(prefix=f"hlbook-{os.getuid()}-"))
    log.error("%s is not a private folder of this user (a link, another owner, or open to others): using %s, "
              "so shards do not share snapshots", path, fallback)
    return fallback


def in_private_dir(use: Callable[[Path], T]) -> T:
    """``use(private_dir())``, once more if the folder went in between (removed by whoever
    left it empty just then: ``FileNotFoundError``)."""
    try:
        return use(private_dir())
    except FileNotFoundError:
        return use(private_dir())


def is_private(path: Path) -> bool:
    """A directory, not a link, owned by this user, with no access for group or others."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o077


def remove_if_empty(path: Path) -> None:
    """Remove the folder unless something is still in it (another process's file)."""
    with contextlib.suppress(OSError):
        path.rmdir()


def pid_alive(pid: int) -> bool:
    """Whether a process of that number runs (another user's counts: not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

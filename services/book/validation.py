"""Comparing books with a node snapshot, and fetching snapshots off the loop.

Validation compares each owned coin at the snapshot's exact height: the
orders (oid, user, px, sz) of each side in book order, so a lost diff, a wrong
size, a wrong price or a wrong time priority all show. Order details that
come with no status (HIP-2 orders) are not compared.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hlbook.services.book import snapshot
from hlbook.services.book.book import Book

log = logging.getLogger(__name__)


def difference(ours: Book | None, theirs: Book | None) -> str | None:
    """Why two books of one coin differ (``None`` when equal); a missing book is empty."""
    a = ours.fingerprint() if ours is not None else ([], [])
    b = theirs.fingerprint() if theirs is not None else ([], [])
    if a == b:
        return None
    for mine, node in zip(a, b):
        if mine == node:
            continue
        if {o[0] for o in mine} != {o[0] for o in node}:
            return "orders"  # an order is missing or extra
        if sorted(o[:3] for o in mine) != sorted(o[:3] for o in node):
            return "price"
        if sorted(mine) != sorted(node):
            return "size"
        return "priority"
    return "orders"  # not reached: some side differs


@dataclass
class Fetched:
    """A snapshot fetched for ``purpose``: its height and the owned coins' books."""

    purpose: str
    height: int = 0
    books: dict[str, Book] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


class Fetcher:
    """Fetches and decodes node snapshots in a helper thread, one at a time, so
    the shard's loop keeps applying blocks meanwhile (a mainnet snapshot takes
    seconds). The loop polls :meth:`result`; the handoff holds at most one result."""

    def __init__(self, info_url: str, want: Callable[[str], bool]) -> None:
        self.info_url = info_url
        self.want = want
        self.results: queue.Queue[Fetched] = queue.Queue(maxsize=1)
        self.busy: str | None = None

    def start(self, purpose: str) -> bool:
        """Start a fetch unless one is in flight; False when busy."""
        if self.busy is not None:
            return False
        self.busy = purpose
        threading.Thread(target=self._run, args=(purpose,), name=f"snapshot-{purpose}", daemon=True).start()
        return True

    def _run(self, purpose: str) -> None:
        started = time.monotonic()
        result = Fetched(purpose)
        try:
            result.height, result.books = snapshot.load(snapshot.fetch(self.info_url), self.want)
        except snapshot.SnapshotError as exc:
            result.error = str(exc)
        except Exception as exc:  # never let the helper die silently
            log.exception("snapshot fetch failed")
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        self.results.put(result)

    def result(self) -> Fetched | None:
        """The finished fetch, if any (non-blocking)."""
        try:
            fetched = self.results.get_nowait()
        except queue.Empty:
            return None
        self.busy = None
        return fetched

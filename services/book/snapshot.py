"""Node ``fileSnapshot`` (``l4Snapshots``) loading, and fetching one from the
node's info server (:class:`Fetcher`: in a helper thread).

File shape: ``[height, [[coin, [[[user, order], …bids best first], [[user, order], …asks]]], …]]``,
orders of a level in time priority. Each coin's body is decoded only when the
caller wants the coin (the rest is skipped as raw JSON), into typed Structs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgspec

from hlbook.common import fixed
from hlbook.common.private import in_private_dir, pid_alive, private_path, remove_if_empty
from hlbook.services.book.book import ASK, BID, Book, Level, Order, Side, children_bytes, intern_kind, parse_cloid

log = logging.getLogger(__name__)

SHARE_AGE = 5.0  # seconds a snapshot one shard fetched serves the other shards of the host (they start, and validate, together)


class SnapOrder(msgspec.Struct):
    """An order of the snapshot; ``children`` stays raw JSON (rarely non-empty)."""

    coin: str
    side: str
    limitPx: str
    sz: str
    oid: int
    timestamp: int
    triggerCondition: str
    isTrigger: bool
    triggerPx: str
    children: msgspec.Raw
    isPositionTpsl: bool
    reduceOnly: bool
    orderType: str
    origSz: str
    tif: str | None = None
    cloid: str | None = None


Entry = tuple[str, SnapOrder]
_outer = msgspec.json.Decoder(tuple[int, list[tuple[str, msgspec.Raw]]])
_piece = msgspec.json.Decoder(tuple[str, msgspec.Raw])
_HEAD = re.compile(rb"\s*\[\s*(\d+)\s*,\s*\[\s*")  # "[height,[" before the first coin
COIN_END = b']]],["'  # where one coin's entry ends and the next one's begins
CHUNK = 16 << 20  # bytes read at a time
_coin = msgspec.json.Decoder(tuple[list[Entry], list[Entry]])

SNAPSHOT_REQUEST: dict[str, Any] = {
    "type": "fileSnapshot",
    "request": {"type": "l4Snapshots", "includeUsers": True, "includeTriggerOrders": False},
    "includeHeightInOutput": True,
}


class SnapshotError(Exception):
    """The snapshot could not be fetched or read (``unreachable``: nothing answered at the URL)."""

    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def load(source: bytes | IO[bytes], want: Callable[[str], bool] = lambda coin: True) -> tuple[int, dict[str, Book]]:
    """(height, books) of the coins ``want`` accepts, from a snapshot's bytes or its open file
    (read a coin at a time, then closed: a whole-market file is ~220 MB, which would otherwise
    be held beside the books being built, doubling a shard's memory at start)."""
    fh = io.BytesIO(source) if isinstance(source, bytes) else source
    with fh:
        try:
            return _load_by_coin(fh, want)
        except _Unsplit:
            pass  # not cut where coins meet: decoded whole, once the attempt's buffers are gone
        fh.seek(0)
        return _load_whole(fh.read(), want)


def load_file(path: str, want: Callable[[str], bool] = lambda coin: True) -> tuple[int, dict[str, Book]]:
    return load(open(path, "rb"), want)


class _Unsplit(Exception):
    """The file could not be cut into coins where they meet."""


def _load_whole(data: bytes, want: Callable[[str], bool]) -> tuple[int, dict[str, Book]]:
    try:
        height, coins = _outer.decode(data)
        books: dict[str, Book] = {}
        for coin, body in coins:
            if want(coin):
                books[coin] = _built(coin, height, body)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise SnapshotError(f"malformed snapshot: {exc}") from exc
    return height, books


def _load_by_coin(fh: IO[bytes], want: Callable[[str], bool]) -> tuple[int, dict[str, Book]]:
    """Read ``CHUNK`` at a time, cut where one coin's entry ends and the next begins
    (``COIN_END``: its asks, its sides and itself close, the next opens with its name; no
    string of a snapshot holds it), and decode each coin's entry alone. _Unsplit when the
    file does not read as such pieces."""
    buf = fh.read(CHUNK)
    head = _HEAD.match(buf)
    if head is None:
        raise _Unsplit
    height, start, searched = int(head.group(1)), head.end(), head.end()
    books: dict[str, Book] = {}
    while True:
        end = buf.find(COIN_END, searched)
        if end >= 0:
            _take(buf[start:end + 3], height, want, books)
            start = searched = end + len(COIN_END) - 2  # at the next entry's "["
            continue
        more = fh.read(CHUNK)
        if not more:
            break
        buf, searched, start = buf[start:] + more, max(len(buf) - start - len(COIN_END), 0), 0
    tail = buf[start:].rstrip()
    if not tail.endswith(b"]]"):
        raise _Unsplit
    if tail[:-2].strip():
        _take(tail[:-2], height, want, books)
    return height, books


def _take(piece: bytes, height: int, want: Callable[[str], bool], books: dict[str, Book]) -> None:
    try:
        coin, body = _piece.decode(piece)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _Unsplit from exc
    if want(coin):
        try:
            books[coin] = _built(coin, height, body)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            raise SnapshotError(f"malformed snapshot: {coin}: {exc}") from exc


def _built(coin: str, height: int, body: msgspec.Raw | bytes) -> Book:
    bids, asks = _coin.decode(body)
    return build(coin, height, bids, asks)


def build(coin: str, height: int, bids: list[Entry], asks: list[Entry]) -> Book:
    """A Book from snapshot entries (each side best first, time priority)."""
    book = Book(coin, height)
    _fill(book, book.bids, bids, BID)
    _fill(book, book.asks, asks, ASK)
    return book


def _fill(book: Book, side: Side, entries: list[Entry], side_name: str) -> None:
    orders = book.orders
    intern = sys.intern
    parse = fixed.parse
    level: Level | None = None
    px_text = ""
    px = 0
    kinds: dict[tuple[Any, ...], Any] = {}
    for user, o in entries:
        if level is None or o.limitPx != px_text:
            px_text = o.limitPx
            px = parse(px_text)
            level = side.level_for(px)
            px = level.px  # one int object per level
        children = children_bytes(msgspec.json.decode(o.children)) if len(o.children) > 2 else None
        key = (o.tif, o.orderType, o.triggerCondition, o.triggerPx, o.isTrigger, o.reduceOnly, o.isPositionTpsl)
        kind = kinds.get(key) if children is None else None
        if kind is None:
            kind = intern_kind((side_name, *key, children))
            if children is None:
                kinds[key] = kind
        sz = parse(o.sz)
        orig = sz if o.origSz == o.sz else parse(o.origSz)
        oid = o.oid
        order = Order(oid, intern(user), px, sz, o.timestamp, orig, parse_cloid(o.cloid), kind)
        if oid in orders:
            raise SnapshotError(f"{book.coin}: oid {oid} twice in the snapshot")
        orders[oid] = order
        level.add(order)


def shared_paths(info_url: str, directory: str | None = None) -> tuple[Path, Path, Path]:
    """(the shared snapshot, who fetched it, the lock the shards take turns on) for one node
    (in ``directory``, or the private folder, made or not)."""
    stem = Path(directory or private_path()) / f"hlbook-snapshot-{hashlib.sha256(info_url.encode()).hexdigest()[:12]}"
    return stem.with_suffix(".json"), stem.with_suffix(".owner"), stem.with_suffix(".lock")


def fetch_shared(info_url: str, owner: str, not_before: float = 0.0, timeout: float = 60.0,
                 directory: str | None = None) -> tuple[IO[bytes], bool]:
    """(a node snapshot's open file, whether another shard fetched it). The shards of one host take turns
    on a lock file: one asks the node, the others read its file when it is at most
    ``SHARE_AGE`` old and written after ``not_before`` (epoch s) (a full mainnet snapshot costs
    the node seconds and hundreds of MB each time). ``owner`` (the shard) never reuses its own:
    when it asks again it needs a newer one. A shared file too old to serve is removed by
    whoever takes the lock next (its fetcher may have been killed); its fetcher removes it
    when it stops (:func:`remove_shared`)."""
    def open_lock(folder: Path) -> tuple[Path, Path, Path, IO[str]]:
        latest, by, lock_path = shared_paths(info_url, str(folder))
        return latest, by, lock_path, open(lock_path, "a+")

    latest, by, lock_path, lock = open_lock(Path(directory)) if directory else in_private_dir(open_lock)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when closed
        try:
            written = latest.stat().st_mtime
            if written >= not_before and time.time() - written <= SHARE_AGE and by.read_text() != owner:
                return open(latest, "rb"), True
            if time.time() - written > SHARE_AGE:
                _unlink(latest, by)
        except FileNotFoundError:
            pass
        fetched = fetch(info_url, timeout, directory, keep=latest)
        try:
            by.write_text(owner)
        except OSError:
            fetched.close()
            raise
        return fetched, False


def remove_shared(info_url: str, owner: str, directory: str | None = None) -> None:
    """``owner`` stops: remove the snapshot it shared, and the lock when no other shard holds it."""
    latest, by, lock_path = shared_paths(info_url, directory)
    sweep_dead_fetches(str(lock_path.parent))
    try:
        with open(lock_path, "r") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another shard is fetching: it owns what is there now
            try:
                if by.read_text() == owner:
                    _unlink(latest, by)
            except FileNotFoundError:
                pass
            if not latest.exists():
                _unlink(lock_path)
                if directory is None:
                    remove_if_empty(lock_path.parent)
    except FileNotFoundError:
        pass


def _unlink(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def fetch(info_url: str, timeout: float = 60.0, directory: str | None = None, keep: Path | None = None) -> IO[bytes]:
    """Ask the node's info server for a fresh fileSnapshot and return the file, open for
    reading (its name is then removed, or renamed to ``keep``; :func:`load` reads and closes it)."""
    import httpx

    def new_file(folder: Path) -> tuple[int, str]:
        return tempfile.mkstemp(prefix=f"{FETCHING}{os.getpid()}-", suffix=".json", dir=folder)

    fd, path = new_file(Path(directory)) if directory else in_private_dir(new_file)
    os.close(fd)
    sweep_dead_fetches(os.path.dirname(path))
    try:
        request = dict(SNAPSHOT_REQUEST, outPath=os.path.abspath(path))
        try:
            response = httpx.post(info_url, json=request, timeout=timeout)
        except httpx.HTTPError as exc:
            raise SnapshotError(f"snapshot request to {info_url} failed: {exc}", isinstance(exc, httpx.ConnectError)) from exc
        if response.status_code != 200:
            raise SnapshotError(f"snapshot request to {info_url}: HTTP {response.status_code} {response.text[:200]}")
        fh = open(path, "rb")
        try:
            if os.fstat(fh.fileno()).st_size == 0:
                raise SnapshotError(f"snapshot request to {info_url} wrote nothing to {path}")
            if keep is not None:
                os.replace(path, keep)
        except BaseException:
            fh.close()
            raise
        return fh
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        if directory is None:
            remove_if_empty(Path(path).parent)


FETCHING = "hlbook-snapshot-fetch-"  # + the fetcher's pid: a file the node is writing for it


def sweep_dead_fetches(folder: str) -> None:
    """Remove the files of fetches whose process is gone (a shard killed while the node wrote)."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(FETCHING)]
    except OSError:
        return
    for name in names:
        pid = name[len(FETCHING):].partition("-")[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))


@dataclass
class Fetched:
    """A snapshot fetched for ``purpose``: its height and the wanted coins' books."""

    purpose: str
    height: int = 0
    books: dict[str, Book] = field(default_factory=dict)
    error: str | None = None
    unreachable: bool = False  # the error: nothing answered at the URL
    seconds: float = 0.0
    shared: bool = False  # another shard of this host had fetched it


class Fetcher:
    """Fetches and decodes node snapshots in a helper thread, one at a time, so the
    shard's loop keeps applying blocks meanwhile (a mainnet snapshot takes seconds).
    The loop polls :meth:`result`."""

    def __init__(self, info_url: str, want: Callable[[str], bool], owner: str) -> None:
        self.info_url = info_url
        self.want = want
        self.owner = owner  # who fetches, for fetch_shared
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="snapshot")
        self.future: Future[Fetched] | None = None
        self.purpose: str | None = None  # of the fetch in flight

    @property
    def busy(self) -> bool:
        return self.future is not None

    def start(self, purpose: str, not_before: float = 0.0) -> bool:
        """Start a fetch unless one is in flight; False when busy."""
        if self.future is not None:
            return False
        self.purpose = purpose
        self.future = self.pool.submit(self._run, purpose, not_before)
        return True

    def _run(self, purpose: str, not_before: float) -> Fetched:
        started = time.monotonic()
        result = Fetched(purpose)
        try:
            data, result.shared = fetch_shared(self.info_url, self.owner, not_before)
            result.height, result.books = load(data, self.want)
        except SnapshotError as exc:
            result.error, result.unreachable = str(exc), exc.unreachable
        except Exception as exc:  # never let the helper die silently
            log.exception("snapshot fetch failed")
            result.error = f"{type(exc).__name__}: {exc}"
        result.seconds = time.monotonic() - started
        return result

    def close(self) -> None:
        """Stop: wait for a fetch in flight, then remove the snapshot this shard shared."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        remove_shared(self.info_url, self.owner)

    def result(self) -> Fetched | None:
        """The finished fetch, if any (non-blocking)."""
        future = self.future
        if future is None or not future.done():
            return None
        self.future = self.purpose = None
        return future.result()

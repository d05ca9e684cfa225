"""Exact L4 checkpoints of a shard's books, written while live and loaded to start a shard.

A file ``<dir>/l4-<height>-<k>of<n>.ckpt`` (``HEADER_SIZE`` bytes of header, then the body
compressed with xz, ``lzma`` preset 0). The header is one JSON line (padded): height and block time of the
shard's last finished block, the shard, the body's size and sha256. The body is exactly a
node ``fileSnapshot`` with users and height (``[height, [[coin, [[[user, order], …], […]]], …]]``,
levels best first, orders in time priority, every field): :func:`load` checks the size and
checksum, then reads it with ``snapshot.load``, so a checkpoint loads into the same books
(and ``--snapshot-file`` takes either).

While live, :class:`Checkpointer` forks a child (``jobs.py``) every ``every_s`` seconds at a
moment with no block half applied (``Jobs.ready``); the child renders, compresses and writes
the file (temp file + rename), the loop never stops. Files older than ``keep_s`` go.
"""

from __future__ import annotations

import hashlib
import json
import logging
import lzma
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import msgspec

from hlbook.common.wire import CoinState
from hlbook.services.book import l4, metrics, snapshot
from hlbook.services.book.book import Book
from hlbook.services.book.jobs import Jobs, JobsBusy
from hlbook.services.book.state import ShardState

log = logging.getLogger(__name__)

MAGIC = b"HLBOOK-L4-CHECKPOINT "
HEADER_SIZE = 512
PRESET = 0  # xz preset: on the BTC fixture (51k orders, 18.9 MB of JSON) 1.54 MB, ~0.3 s to write and to load;
# zlib level 6: 2.09 MB in about the same times, level 1: 2.59 MB (docs/OPERATIONS.md)
RETRY_S = 1.0  # a checkpoint put off (a coin resyncing) is tried again this much later
_NAME = re.compile(r"^l4-(\d+)-(\d+)of(\d+)\.ckpt$")


class CheckpointError(snapshot.SnapshotError):
    """Not a checkpoint, or a damaged one (size or checksum wrong)."""


@dataclass
class Header:
    height: int
    time: int  # block time (ms) of ``height``
    shard: int
    shards: int
    size: int  # bytes of the uncompressed body
    sha256: str  # of the uncompressed body
    version: int = 1


def name(height: int, shard: int, shards: int) -> str:
    return f"l4-{height}-{shard}of{shards}.ckpt"


def body(height: int, books: dict[str, Book]) -> Iterator[bytes]:
    """The node fileSnapshot document of ``books`` in chunks (coins sorted)."""
    yield b"[%d,[" % height
    for i, coin in enumerate(sorted(books)):
        yield b"%s[%s," % (b"," if i else b"", msgspec.json.encode(coin))
        yield from l4.render(books[coin], l4.NODE_ORDER)
        yield b"]"
    yield b"]]\n"


def write(directory: str | Path, header: Header, books: dict[str, Book], preset: int = PRESET) -> Path:
    """Write ``books`` as a checkpoint (``header``'s size and sha256 are filled in); its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name(header.height, header.shard, header.shards)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest, size = hashlib.sha256(), 0
    squeeze = lzma.LZMACompressor(preset=preset)
    try:
        with open(tmp, "wb") as fh:
            fh.write(b"\0" * HEADER_SIZE)
            for chunk in body(header.height, books):
                digest.update(chunk)
                size += len(chunk)
                fh.write(squeeze.compress(chunk))
            fh.write(squeeze.flush())
            header.size, header.sha256 = size, digest.hexdigest()
            fh.seek(0)
            fh.write(encode_header(header))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def encode_header(header: Header) -> bytes:
    line = MAGIC + json.dumps(asdict(header), separators=(",", ":")).encode()
    if len(line) >= HEADER_SIZE:
        raise ValueError("checkpoint header too long")
    return line.ljust(HEADER_SIZE - 1) + b"\n"


def read_header(path: str | Path) -> Header:
    with open(path, "rb") as fh:
        return decode_header(fh.read(HEADER_SIZE))


def decode_header(raw: bytes) -> Header:
    if not raw.startswith(MAGIC) or len(raw) < HEADER_SIZE:
        raise CheckpointError("not an hlbook checkpoint")
    try:
        return Header(**json.loads(raw[len(MAGIC):HEADER_SIZE]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"bad checkpoint header: {exc}") from exc


def load(data: bytes, want: Callable[[str], bool] = lambda coin: True) -> tuple[Header, dict[str, Book]]:
    """A checkpoint's header and books (verified: size, sha256, height)."""
    header = decode_header(data[:HEADER_SIZE])
    try:
        doc = lzma.decompress(data[HEADER_SIZE:])
    except lzma.LZMAError as exc:
        raise CheckpointError(f"damaged checkpoint: {exc}") from exc
    if len(doc) != header.size or hashlib.sha256(doc).hexdigest() != header.sha256:
        raise CheckpointError("damaged checkpoint: size or checksum differs")
    height, books = snapshot.load(doc, want)
    if height != header.height:
        raise CheckpointError(f"checkpoint body at {height}, header says {header.height}")
    for book in books.values():
        book.time = header.time
    return header, books


def load_file(path: str | Path, want: Callable[[str], bool] = lambda coin: True) -> tuple[int, int, dict[str, Book]]:
    """(height, time, books) of a checkpoint or of a node fileSnapshot (time 0: it has none)."""
    fh = open(path, "rb")
    if fh.read(len(MAGIC)) == MAGIC:
        with fh:
            fh.seek(0)
            header, books = load(fh.read(), want)
        return header.height, header.time, books
    fh.seek(0)
    height, books = snapshot.load(fh, want)  # read a coin at a time, and closed
    return height, 0, books


def listing(directory: str | Path) -> list[tuple[Path, int, int, int]]:
    """(path, height, shard, shards) of the checkpoints in ``directory``, oldest first."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(Path(directory, n), int(m[1]), int(m[2]), int(m[3])) for n in names if (m := _NAME.match(n))]
    return sorted(found, key=lambda f: (f[1], f[2]))


def prune(directory: str | Path, keep_s: float, now: float | None = None) -> list[Path]:
    """Remove the checkpoints written more than ``keep_s`` ago, but never a shard's newest (of
    any shard count: those of an earlier ``--shards`` go too)."""
    now = time.time() if now is None else now
    found = listing(directory)
    newest = {(k, n): path for path, _, k, n in found}  # the listing is oldest first
    removed = []
    for path in [f[0] for f in found if f[0] not in newest.values()]:
        try:
            if path.stat().st_mtime < now - keep_s:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            pass
    return removed


class Checkpointer:
    """Writes the shard's checkpoint every ``every_s`` seconds, in a forked child."""

    def __init__(self, state: ShardState, jobs: Jobs, directory: str, every_s: float, keep_s: float) -> None:
        self.state, self.jobs, self.directory = state, jobs, directory
        self.every_s, self.keep_s = every_s, keep_s
        self.due = time.monotonic() + every_s
        self.busy = False

    def tick(self, now: float) -> None:
        if self.every_s <= 0 or self.busy or now < self.due or self.state.phase != CoinState.LIVE:
            return
        self.busy = True
        self.due = now + self.every_s
        try:
            self.jobs.submit("checkpoint", self._fork)
        except JobsBusy:
            self.busy, self.due = False, now + RETRY_S

    def _fork(self) -> tuple[Callable[[], Iterator[bytes]], Callable[[list[bytes] | None, str | None], None]] | None:
        """At fork time (no block half applied): the work, unless a coin is not live (put off)."""
        state = self.state
        if any(c.state != CoinState.LIVE for c in state.coins.values()):
            self.busy, self.due = False, time.monotonic() + RETRY_S
            return None
        header = Header(state.height, state.time, state.shard, state.shards, 0, "")
        books = {coin: c.book for coin, c in state.coins.items()}
        started = time.monotonic()

        def work() -> Iterator[bytes]:
            path = write(self.directory, header, books)
            yield json.dumps({"path": str(path), "bytes": path.stat().st_size}).encode()

        def done(chunks: list[bytes] | None, error: str | None) -> None:
            self.busy = False
            if chunks is None:
                metrics.CHECKPOINTS.labels("error").inc()
                log.error("checkpoint at %d failed: %s", header.height, error)
                return
            result = json.loads(b"".join(chunks))
            metrics.CHECKPOINTS.labels("ok").inc()
            metrics.CHECKPOINT_BYTES.set(result["bytes"])
            log.info("checkpoint at %d: %s (%d bytes, %.2f s)", header.height, result["path"], result["bytes"],
                     time.monotonic() - started)
            prune(self.directory, self.keep_s)

        return work, done

"""The book shard process: one loop (zmq Poller) over ingest's stream, the
replay socket, the XPUB (publish + subscriptions) and the query ROUTER.

Lifecycle (docs/ARCHITECTURE.md):

1. Subscribe to ingest's ``H|`` and ``B|`` first. While initialising the SUB
   socket is not read: ZeroMQ queues what arrives (bounded by ``RCVHWM``;
   anything dropped beyond it shows as a gap later and is repaired).
2. Load the node snapshot (``--snapshot-file``, or ``--info-url`` fetched in a
   helper thread), keep the owned coins (``crc32(coin) % N == K``).
3. Replay ``H|``/``B|`` from snapshot height + 1 from ingest's ROUTER, then
   read the queued live messages, skipping what was applied: live, no gap.

Every chain is checked: ``H|`` and each ``B|<coin>|`` carry ``prev``. A coin
is ``initialising``, ``live`` or ``resyncing``; only live coins are served or
published. A gap on a coin → replay its slices; if ingest no longer holds
them (or a diff does not fit the book) → the coin resyncs from a fresh node
snapshot, then ``RESET|<coin>|``. Validation (``--validate-every``) fetches a
snapshot, compares each owned coin at exactly the snapshot's height and
replaces only the coins that differ.

Test hooks (never for production): ``HLBOOK_TEST_DROP_EVERY=N`` drops every
Nth ``H|`` or owned ``B|`` message as if the PUB socket had dropped it;
``HLBOOK_TEST_HOOKS=1`` enables the query ops ``test_corrupt`` / ``test_drop``
(change one order's size / remove it silently, for validation and resync tests).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import zmq

from hlbook.common import config, fixed, logs, topics, wire
from hlbook.common.metrics import BAD_INPUT, serve
from hlbook.common.signals import stop_on_signals
from hlbook.services.book import metrics, queries, snapshot
from hlbook.services.book.book import Book, OutOfSync
from hlbook.services.book.publisher import Publisher
from hlbook.services.book.validation import Fetched, Fetcher, difference

log = logging.getLogger(__name__)

INITIALISING, LIVE, RESYNCING = "initialising", "live", "resyncing"
RCVHWM = 500_000  # messages queued from ingest (while initialising, or a slow loop)
BLOCK_WAIT = 0.25  # seconds a block's slices may trail its header (ingest sends them back to back)
BATCH = 2000  # messages read from ingest per loop iteration before serving other sockets


@dataclass
class ShardConfig:
    shard: int
    shards: int
    info_url: str | None = None
    snapshot_file: str | None = None
    ingest_pub: str = config.INGEST_PUB
    ingest_replay: str = config.INGEST_REPLAY
    pub: str | None = None  # default: config.book_endpoints(shard)[0]
    query: str | None = None  # default: config.book_endpoints(shard)[1]
    validate_every: float = 0.0
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    replay_timeout: float = 5.0
    retry_every: float = 1.0
    test_drop_every: int = 0
    test_hooks: bool = False


class Coin:
    """A coin's book and where its ``B|<coin>|`` chain stands.

    ``last`` is the height of the last slice applied, or the height of the
    snapshot the book came from (``exact`` False): then any ``prev`` up to it
    is fine, since the snapshot holds every block up to its height."""

    __slots__ = ("book", "state", "last", "exact")

    def __init__(self, book: Book, state: str = LIVE) -> None:
        self.book = book
        self.state = state
        self.last = book.height
        self.exact = False

    def fits(self, prev: int | None) -> bool:
        """Whether a message with this ``prev`` follows what was applied."""
        if self.exact:
            return prev == self.last
        return prev is None or prev <= self.last


class Shard:
    def __init__(self, cfg: ShardConfig, ctx: zmq.Context | None = None) -> None:
        if not 0 <= cfg.shard < cfg.shards:
            raise ValueError(f"shard {cfg.shard} is not in 0..{cfg.shards - 1}")
        if not cfg.info_url and not cfg.snapshot_file:
            raise ValueError("one of --info-url or --snapshot-file is required")
        self.cfg = cfg
        self.ctx = ctx or zmq.Context.instance()
        pub, query = config.book_endpoints(cfg.shard)
        self.sub = self._socket(zmq.SUB, cfg.ingest_pub, bind=False)
        self.sub.setsockopt(zmq.RCVHWM, RCVHWM)
        self.sub.setsockopt(zmq.SUBSCRIBE, topics.HEADER)
        self.sub.setsockopt(zmq.SUBSCRIBE, topics.BOOK_PREFIX)
        self.req = self._new_req()
        xpub = self._socket(zmq.XPUB, cfg.pub or pub, bind=True, verbose=True)
        self.publisher = Publisher(xpub, cfg.shard)
        self.router = self._socket(zmq.ROUTER, cfg.query or query, bind=True)
        self.poller = zmq.Poller()
        for sock in (xpub, self.router):
            self.poller.register(sock, zmq.POLLIN)
        self.fetcher = Fetcher(cfg.info_url, self.owns) if cfg.info_url else None
        self.coins: dict[str, Coin] = {}
        self.mids: dict[str, str] = {}
        self.phase = INITIALISING
        self.height = 0  # last block finished
        self.time = 0  # its block time (ms)
        self.base = 0  # height of the last full snapshot (coins absent from it were empty)
        self.h_last = 0  # H| chain: last header height, ``h_exact`` as Coin.exact
        self.h_exact = False
        self.block: wire.BlockHeader | None = None  # the open block
        self.block_opened = 0.0
        self.pending: set[str] = set()  # owned coins whose slice of the open block is awaited
        self.replaying = False
        self.validation: Fetched | None = None
        self.next_validation = time.monotonic() + cfg.validate_every
        self.retry_at = 0.0
        self.resync_after: float | None = None  # when to fetch a snapshot for resyncing coins
        self._owned: dict[bytes, str | None] = {}
        self._dropped = 0
        self.stopped = False

    # ------------------------------------------------------------ sockets

    def _socket(self, kind: int, endpoint: str, bind: bool, verbose: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if verbose:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            sock.setsockopt(zmq.SNDHWM, 200_000)
        (sock.bind if bind else sock.connect)(endpoint)
        return sock

    def _new_req(self) -> zmq.Socket:
        return self._socket(zmq.REQ, self.cfg.ingest_replay, bind=False)

    # ------------------------------------------------------------ ownership and state

    def owns(self, coin: str) -> bool:
        return topics.shard_of(coin, self.cfg.shards) == self.cfg.shard

    def owned(self, topic: bytes) -> str | None:
        """The coin of a ``B|<coin>|`` topic if this shard owns it (cached per topic)."""
        try:
            return self._owned[topic]
        except KeyError:
            coin = topics.coin_of(topic)
            owned = self._owned[topic] = coin if self.owns(coin) else None
            return owned

    @property
    def books(self) -> dict[str, Book]:
        return {coin: c.book for coin, c in self.coins.items()}

    def coin_state(self, coin: str) -> str | None:
        c = self.coins.get(coin)
        if c is not None:
            return c.state
        if self.phase == INITIALISING and self.owns(coin):
            return INITIALISING
        return None

    def coin_height(self, book: Book) -> int:
        return max(self.height, book.height)

    def coin_time(self, book: Book) -> int:
        """Block time (ms) of the book's state (a snapshot book has none: the last block's)."""
        return max(self.time, book.time)

    def states(self) -> dict[str, str]:
        return {coin: c.state for coin, c in self.coins.items()}

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        while not self.stopped:
            self.step()
        self.close()

    def step(self, timeout_ms: int = 50) -> None:
        """One iteration: initialise if needed, then serve every socket that is ready."""
        now = time.monotonic()
        if self.phase == INITIALISING and now >= self.retry_at:
            self.begin_init()
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is self.sub:
                self.read_ingest()
            elif sock is self.router:
                self.serve_query()
            else:
                self.on_subscription(sock.recv())
        if self.block is not None and now - self.block_opened > BLOCK_WAIT and not self.sub.poll(0):
            self.close_block()  # no next header yet (quiet chain): the awaited slices were lost
        if self.fetcher is not None:
            fetched = self.fetcher.result()
            if fetched is not None:
                self.on_fetched(fetched)
            if self.resync_after is not None and now >= self.resync_after and self.fetcher.start("resync"):
                self.resync_after = None
            if self.phase == LIVE and self.cfg.validate_every > 0 and now >= self.next_validation:
                if self.fetcher.start("validate"):
                    self.next_validation = now + self.cfg.validate_every

    def read_ingest(self) -> None:
        for _ in range(BATCH):
            try:
                topic, payload = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not two frames
                BAD_INPUT.labels("book", "bad_frame").inc()
                continue
            if self.cfg.test_drop_every and self._test_drop(topic):
                continue
            self.on_message(topic, payload)

    def _test_drop(self, topic: bytes) -> bool:
        if topic != topics.HEADER and (not topic.startswith(topics.BOOK_PREFIX) or self.owned(topic) is None):
            return False
        self._dropped += 1
        return self._dropped % self.cfg.test_drop_every == 0

    # ------------------------------------------------------------ initialisation

    def begin_init(self) -> None:
        """Load the snapshot (file) or start fetching it (info server)."""
        if self.fetcher is not None:
            if self.fetcher.busy is None:
                self.fetcher.start("init")
            self.retry_at = time.monotonic() + 3600  # on_fetched decides what comes next
            return
        try:
            height, books = snapshot.load_file(self.cfg.snapshot_file or "", self.owns)
        except (OSError, snapshot.SnapshotError) as exc:
            log.error("cannot read snapshot file %s: %s", self.cfg.snapshot_file, exc)
            metrics.SNAPSHOTS.labels("init", "error").inc()
            self.retry_at = time.monotonic() + self.cfg.retry_every
            return
        metrics.SNAPSHOTS.labels("init", "ok").inc()
        self.finish_init(height, books)

    def finish_init(self, height: int, books: dict[str, Book]) -> None:
        """Install the snapshot's books, replay from its height + 1, go live."""
        self.coins = {coin: Coin(book) for coin, book in books.items()}
        self.height = self.base = self.h_last = height
        self.h_exact = False
        self.block, self.pending = None, set()
        self.mids = {}
        if not self.replay(height + 1, [topics.HEADER, topics.BOOK_PREFIX]):
            metrics.INIT_RESTARTS.inc()
            log.warning("replay from %d failed; starting initialisation over", height + 1)
            self.coins = {}
            self.retry_at = time.monotonic() + self.cfg.retry_every
            return
        self.phase = LIVE
        self.poller.register(self.sub, zmq.POLLIN)
        for coin, c in self.coins.items():
            self.update_mid(c.book)
            self.publisher.reset(coin, self.coin_height(c.book), "init", LIVE)
        for topic in sorted(self.publisher.subs.exact):  # subscribed while initialising
            self.publisher.initial(topic, self.books, self.height, self.time)
        log.info("live: %d coins, %d orders, snapshot %d, at block %d", len(self.coins), sum(len(c.book) for c in self.coins.values()), height, self.height)

    # ------------------------------------------------------------ ingest messages

    def on_message(self, topic: bytes, payload: bytes) -> None:
        try:
            if topic == topics.HEADER:
                self.on_header(wire.decode(payload, wire.BlockHeader))
            elif topic.startswith(topics.BOOK_PREFIX):
                coin = self.owned(topic)
                if coin is not None:
                    self.on_slice(coin, wire.decode(payload, wire.BookSlice))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            BAD_INPUT.labels("book", "bad_payload").inc()
            log.error("undecodable %r message: %s", topic[:40], exc)
        except Exception:  # a bug must not stop the shard; the coin is rebuilt
            BAD_INPUT.labels("book", "error").inc()
            log.exception("handling %r failed", topic[:40])
            coin = self.owned(topic) if topic.startswith(topics.BOOK_PREFIX) else None
            if coin is not None and coin in self.coins:
                self.resync([coin], "error")

    def on_header(self, h: wire.BlockHeader) -> None:
        if h.height <= self.height:
            return  # already finished (replayed)
        if self.block is not None:
            self.close_block()  # a later header: the open block's slices came or were lost
        if not self._header_fits(h):
            log.warning("header chain broken at %d (prev %s, last %d)", h.height, h.prev, self.h_last)
            if self.header_gap() and h.height <= self.height:
                return  # the replay held this header (and its slices) too
        self.h_last, self.h_exact = h.height, True
        self.block, self.block_opened = h, time.monotonic()
        self.pending = {c for c in h.book_coins if self.owns(c) and self._awaits(c, h.height)}
        if not self.pending:
            self.finish_block()

    def header_gap(self) -> bool:
        """Headers were lost: replay every block after the last finished one (else resync all)."""
        metrics.GAPS.labels("header").inc()
        if not self.replaying:
            # the replay re-sends the open block (its header and slices) and every later one
            self.block, self.pending = None, set()
            self.h_last, self.h_exact = self.height, False
            if self.replay(self.height + 1, [topics.HEADER, topics.BOOK_PREFIX]):
                return True
        self.resync(list(self.coins), "gap")
        return False

    def _awaits(self, coin: str, height: int) -> bool:
        c = self.coins.get(coin)
        return c is None or (c.state == LIVE and c.book.height < height)

    def _header_fits(self, h: wire.BlockHeader) -> bool:
        if self.h_exact:
            return h.prev == self.h_last
        if h.prev is None:  # ingest (re)started: fine if no block is missing
            return h.height == self.height + 1
        return h.prev <= self.h_last

    def close_block(self) -> None:
        """The next header came: slices still awaited were lost; recover them, finish the block."""
        lost = sorted(c for c in self.pending if c in self.coins and self.coins[c].state == LIVE)
        if lost:
            metrics.GAPS.labels("slice").inc(len(lost))
            log.warning("slices of block %d lost: %s", self.block.height if self.block else -1, lost)
            self.recover(lost)
        self.pending.clear()
        self.finish_block()

    def on_slice(self, coin: str, s: wire.BookSlice) -> None:
        if s.height > self.height and (self.block is None or self.block.height != s.height) and not self.replaying:
            log.warning("%s: slice of block %d before its header: header lost", coin, s.height)
            if self.header_gap():
                return  # the replay held this slice
        c = self.coins.get(coin)
        if c is None:  # a coin absent from the snapshot had no orders then
            c = self.coins[coin] = Coin(Book(coin, self.base))
        if c.state == LIVE and s.height > c.book.height:  # else resyncing (covered later) or applied
            if c.fits(s.prev):
                self.apply(c, s)
            else:
                metrics.GAPS.labels("slice").inc()
                log.warning("%s: chain broken at %d (prev %s, last %d)", coin, s.height, s.prev, c.last)
                self.recover([coin])  # the replay holds this slice too; or the coin resyncs
        self._slice_done(coin, s.height)

    def apply(self, c: Coin, s: wire.BookSlice) -> None:
        """Apply one slice to a live coin and publish what changed."""
        try:
            c.book.apply(s.height, s.time, s.diffs, s.statuses)
        except OutOfSync as exc:
            metrics.OUT_OF_SYNC.labels(exc.reason).inc()
            log.error("%s at block %d", exc, s.height)
            self.resync([c.book.coin], exc.reason)
            return
        c.last, c.exact = s.height, True
        metrics.DIFFS.inc(len(s.diffs))
        self.update_mid(c.book)
        self.publisher.coin_block(c.book, s.height, s.time, s.statuses, s.diffs)

    def _slice_done(self, coin: str, height: int) -> None:
        """The coin's book reached ``height`` (or resyncs): finish the open block once nothing is awaited."""
        block = self.block
        if block is None:
            return
        c = self.coins.get(coin)
        if height >= block.height or (c is not None and c.state != LIVE):
            self.pending.discard(coin)
        if not self.pending:
            self.finish_block()

    def finish_block(self) -> None:
        h = self.block
        if h is None:
            return
        self.block = None
        self.height = max(self.height, h.height)
        self.time = max(self.time, h.time)
        self.publisher.shard_block(h.height, h.time, dict(self.mids), self.states())
        metrics.BLOCKS.inc()
        metrics.HEIGHT.set(self.height)
        self._gauges()
        if self.validation is not None and self.validation.height <= self.height:
            self.validate(self.validation)

    def _gauges(self) -> None:
        counts = dict.fromkeys((INITIALISING, LIVE, RESYNCING), 0)
        for c in self.coins.values():
            counts[c.state] += 1
        for state, n in counts.items():
            metrics.COINS.labels(state).set(n)
        metrics.ORDERS.set(sum(len(c.book) for c in self.coins.values()))

    def update_mid(self, book: Book) -> None:
        mid = book.mid()
        if mid is None:
            self.mids.pop(book.coin, None)
        else:
            self.mids[book.coin] = fixed.fmt(mid)

    # ------------------------------------------------------------ recovery

    def fetch_replay(self, from_height: int, prefixes: list[bytes]) -> list[bytes] | None:
        """Ingest's stored ``topic, payload`` frames from ``from_height`` (None: timeout or refused)."""
        self.req.send(wire.encode(wire.ReplayRequest(from_height, prefixes)))
        if not self.req.poll(int(self.cfg.replay_timeout * 1000)):
            metrics.REPLAYS.labels("timeout").inc()
            log.warning("replay from %d: no answer from %s", from_height, self.cfg.ingest_replay)
            self.req.close()
            self.req = self._new_req()
            return None
        frames = self.req.recv_multipart()
        reply = wire.decode(frames[0], wire.ReplayReply)
        if not reply.ok:
            metrics.REPLAYS.labels("refused").inc()
            log.warning("replay from %d refused: %s", from_height, reply.error)
            return None
        metrics.REPLAYS.labels("ok").inc()
        return frames[1:]

    def replay(self, from_height: int, prefixes: list[bytes]) -> bool:
        """Ask ingest for the stored messages from ``from_height`` and apply them."""
        frames = self.fetch_replay(from_height, prefixes)
        if frames is None:
            return False
        self.replaying = True
        try:
            for i in range(0, len(frames) - 1, 2):
                self.on_message(frames[i], frames[i + 1])
        finally:
            self.replaying = False
        return True

    def recover(self, coins: list[str]) -> None:
        """Lost slices of ``coins``: replay them from ingest, else resync from a snapshot."""
        coins = [c for c in coins if self.coins[c].state == LIVE]
        if not coins:
            return
        if not self.replaying:
            start = min(self.coins[c].book.height for c in coins) + 1
            if self.replay(start, [topics.book(c) for c in coins]):
                return
        self.resync(coins, "gap")

    def resync(self, coins: Iterable[str], reason: str) -> None:
        """Stop serving ``coins``; they are rebuilt from the next node snapshot."""
        for coin in coins:
            c = self.coins.get(coin)
            if c is None or c.state == RESYNCING:
                continue
            c.state = RESYNCING
            self.mids.pop(coin, None)
            self.pending.discard(coin)
            self.publisher.reset(coin, self.coin_height(c.book), reason, RESYNCING)
        if self.fetcher is None:
            log.error("coins %s need a fresh snapshot but no --info-url was given", list(coins))
            return
        if self.resync_after is None:
            self.resync_after = time.monotonic()  # step() starts the fetch

    def on_fetched(self, fetched: Fetched) -> None:
        if fetched.error is not None:
            metrics.SNAPSHOTS.labels(fetched.purpose, "error").inc()
            log.error("snapshot (%s) failed: %s", fetched.purpose, fetched.error)
            if self.phase == INITIALISING:
                self.retry_at = time.monotonic() + self.cfg.retry_every
            elif any(c.state == RESYNCING for c in self.coins.values()):
                self.resync_after = time.monotonic() + self.cfg.retry_every
            return
        metrics.SNAPSHOTS.labels(fetched.purpose, "ok").inc()
        log.info("snapshot (%s) at %d: %d coins in %.2fs", fetched.purpose, fetched.height, len(fetched.books), fetched.seconds)
        if self.phase == INITIALISING:
            self.finish_init(fetched.height, fetched.books)
            return
        if self.repair_resyncing(fetched):
            return  # its books went live: the next round validates
        if fetched.purpose == "validate":
            if fetched.height > self.height:
                self.validation = fetched  # compared once the shard reaches its height
            else:
                self.validate(fetched)

    def repair_resyncing(self, fetched: Fetched) -> bool:
        """Rebuild every resyncing coin from ``fetched``, publish RESET, replay after it."""
        coins = [coin for coin, c in self.coins.items() if c.state == RESYNCING]
        if not coins:
            return False
        for coin in coins:
            self.revive(self.install(coin, fetched, LIVE), "resync")
        self.resync_after = None
        if not self.replay(fetched.height + 1, [topics.book(c) for c in coins]):
            self.resync(coins, "replay_failed")
            self.resync_after = time.monotonic() + self.cfg.retry_every
        return True

    def install(self, coin: str, fetched: Fetched, state: str) -> Coin:
        """Replace ``coin``'s book with the snapshot's (empty when absent from it)."""
        book = fetched.books.get(coin) or Book(coin, fetched.height)
        c = self.coins[coin] = Coin(book, state)
        self.publisher.forget(coin)
        return c

    def revive(self, c: Coin, reason: str) -> None:
        """A rebuilt coin is live again: RESET, then its current BBO and subscribed L2."""
        book = c.book
        self.update_mid(book)
        self.publisher.reset(book.coin, book.height, reason, LIVE)
        self.publisher.refresh(book, self.coin_height(book), self.coin_time(book))

    # ------------------------------------------------------------ validation

    def validate(self, fetched: Fetched) -> None:
        """Compare every live coin at the shard's height (the snapshot rolled forward to it
        with ingest's stored slices when it is older); repair those that differ."""
        self.validation = None
        if fetched.height > self.height or (fetched.height < self.height and not self.roll_forward(fetched)):
            metrics.VALIDATIONS.labels("skipped_height").inc()
            return
        metrics.VALIDATIONS.labels("compared").inc()
        for coin in sorted(set(self.coins) | set(fetched.books)):
            c = self.coins.get(coin)
            if c is not None and (c.state != LIVE or c.book.height > fetched.height):
                continue
            reason = difference(c.book if c else None, fetched.books.get(coin))
            if reason is None:
                continue
            metrics.MISMATCHES.labels(reason).inc()
            log.error("%s differs from the node's snapshot at %d (%s): replaced", coin, fetched.height, reason)
            self.revive(self.install(coin, fetched, LIVE), f"validation_{reason}")

    def roll_forward(self, fetched: Fetched) -> bool:
        """Apply the slices of blocks after the snapshot, up to the shard's height, to its books."""
        frames = self.fetch_replay(fetched.height + 1, [topics.BOOK_PREFIX])
        if frames is None:
            return False
        for i in range(0, len(frames) - 1, 2):
            coin = self.owned(frames[i])
            if coin is None:
                continue
            s = wire.decode(frames[i + 1], wire.BookSlice)
            if s.height > self.height:
                continue
            book = fetched.books.get(coin) or fetched.books.setdefault(coin, Book(coin, fetched.height))
            try:
                book.apply(s.height, s.time, s.diffs, s.statuses)
            except OutOfSync as exc:
                log.error("snapshot at %d does not take the stored slices (%s): not compared", fetched.height, exc)
                return False
        fetched.height = self.height
        for book in fetched.books.values():
            book.height = self.height
        return True

    # ------------------------------------------------------------ XPUB and queries

    def on_subscription(self, event: bytes) -> None:
        topic = self.publisher.subs.handle(event)
        if topic is not None and self.phase == LIVE:
            live = {coin: c.book for coin, c in self.coins.items() if c.state == LIVE}
            self.publisher.initial(topic, live, self.height, self.time)

    def serve_query(self) -> None:
        frames = self.router.recv_multipart()
        envelope, body = frames[:-1], frames[-1]  # identity, any request-id frames, delimiter
        try:
            query = wire.decode(body if len(frames) > 1 else b"", wire.Query)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            BAD_INPUT.labels("book", "bad_query").inc()
            reply = queries.error(f"bad query: {exc}")
        else:
            if query.op in ("test_corrupt", "test_drop") and self.cfg.test_hooks:
                reply = self._test_corrupt(query)
            else:
                reply = self._answer(query)
        self.router.send_multipart(envelope + [wire.encode(reply)])

    def _answer(self, query: wire.Query) -> dict:
        try:
            return queries.answer(self, query)
        except Exception as exc:  # a bug must not stop the shard
            log.exception("query %r failed", query)
            return queries.error(f"internal error: {type(exc).__name__}")

    def _test_corrupt(self, query: wire.Query) -> dict:
        """Test hooks: ``test_drop`` silently removes order ``oid``; ``test_corrupt``
        silently grows order ``oid`` (default: the best bid's first) by 1."""
        c = self.coins.get(query.coin or "")
        if c is None:
            return queries.error("no such coin")
        best = c.book.bids.best()
        oid = query.oid if query.oid is not None else (best.orders[0].oid if best else None)
        order = c.book.orders.get(oid) if oid is not None else None
        if order is None:
            return queries.error("no such order")
        if query.op == "test_drop":
            c.book.remove(oid)
        else:
            c.book.update(oid, order.sz + fixed.ONE)
        return {"ok": True, "oid": oid}

    def close(self) -> None:
        for sock in (self.sub, self.req, self.publisher.sock, self.router):
            sock.close(linger=0)


def run(cfg: ShardConfig) -> None:
    logs.setup(f"book-{cfg.shard}", cfg.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    serve(cfg.metrics_port, cfg.metrics_host)
    shard = Shard(cfg)
    stop_on_signals(lambda: setattr(shard, "stopped", True))
    log.info("shard %d/%d: ingest %s (replay %s), publishing on %s, queries on %s",
             cfg.shard, cfg.shards, cfg.ingest_pub, cfg.ingest_replay, cfg.pub, cfg.query)
    shard.run()


def test_hooks_from_env() -> tuple[int, bool]:
    """(drop every N owned B| messages, enable test_corrupt) from the hidden test env vars."""
    return int(os.environ.get("HLBOOK_TEST_DROP_EVERY", "0") or 0), os.environ.get("HLBOOK_TEST_HOOKS") == "1"

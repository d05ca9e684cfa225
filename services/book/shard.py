"""The book shard process: one loop (zmq Poller) over ingest's stream, the XPUB
(publish + subscriptions), the query ROUTER and the pipes of forked children.

Lifecycle (docs/ARCHITECTURE.md):

1. Subscribe to ingest's ``H|`` and ``B|`` first. While initialising the SUB
   socket is not read: ZeroMQ queues what arrives (bounded by ``RCVHWM``;
   anything dropped beyond it shows as a gap later and is repaired).
2. Load the node snapshot (``--snapshot-file``, or ``--info-url`` fetched in a
   helper thread), keep the owned coins (``topics.shard_of(coin, N) == K``).
3. Replay ``H|``/``B|`` from snapshot height + 1 from ingest's ROUTER, then
   read the queued live messages, skipping what was applied: live, no gap.

The parts, each in its module: ``state`` (coins, heights), ``stream`` (blocks
from ingest), ``recovery`` (replay, resync), ``publisher`` (XPUB),
``queries`` and ``l4`` (ROUTER answers), ``jobs`` (forked children for work
that reads whole books), ``validation`` (against node snapshots, in a child),
``hooks`` (test-only). Nothing in this loop may take more than about a
millisecond once live, so anything that reads a whole book runs in a child.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq

from hlbook.common import config, logs, topics, wire
from hlbook.common.metrics import BAD_INPUT, serve
from hlbook.common.security import Curve
from hlbook.common.signals import stop_on_signals
from hlbook.common.wire import CoinState
from hlbook.services.book import checkpoint, hooks, metrics, snapshot
from hlbook.services.book.book import Book
from hlbook.services.book.jobs import Jobs
from hlbook.services.book.publisher import RELEASE_AFTER, Publisher, is_exact
from hlbook.services.book.queries import Queries
from hlbook.services.book.recovery import Recovery, Replayer
from hlbook.services.book.state import Coin, ShardState
from hlbook.services.book.stream import STREAM_PREFIXES, Stream
from hlbook.services.book.validation import Validation

log = logging.getLogger(__name__)

RCVHWM = 500_000  # messages queued from ingest (while initialising, or a slow loop)
BATCH = 2000  # messages read from ingest per loop iteration before serving other sockets
QUERY_BATCH = 64  # queries answered per loop iteration
HEARTBEAT_S = 1.0  # seconds between ShardStatus messages
SNDHWM = 50_000  # messages queued per gateway before the XPUB drops (gateways detect the loss and recover)
REPLIES_QUEUED = 8  # query replies (an l4 snapshot: ~19 MB) queued for a peer that does not read them
INIT_BACKOFF_MAX = 30.0  # seconds between snapshot attempts at most while initialising
INFO_STARTUP_S = 20.0  # seconds the node's info server may not answer at start before it is an error
MAX_PARKED = 10_000  # queries waiting for a block's order details (then refused: retry)
DETAIL_QUERIES = (wire.L4Query, wire.OpenOrdersQuery, wire.OrderQuery)  # what reads order details


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
    curve_dir: str | None = None  # ZeroMQ CURVE keys (common.security)
    lossless: bool = False  # replays: the XPUB never drops (XPUB_NODROP: sends wait for the slowest gateway)
    coins: frozenset[str] | None = None  # these coins alone (None: every coin the shard owns)
    checkpoint_dir: str | None = None  # where L4 checkpoints go (checkpoint.py); None: none written
    checkpoint_every: float = 600.0  # seconds between checkpoints (0: off)
    checkpoint_keep: float = 7 * 86400.0  # seconds a checkpoint is kept (the history's days)
    test_drop_every: int = 0  # test hooks (hooks.py): only the test entry point sets these
    test_hooks: bool = False


def watched_first(batch: list[tuple[bytes, bytes]], watched: Callable[[bytes], bool]) -> list[tuple[bytes, bytes]]:
    """The messages of ``batch`` in the order to apply them: within each block's stretch (from
    its header to the next), the header, then the slices of coins someone watches (their l2Book
    and bbo go out first), then the rest in the order they came. A coin's messages keep their
    order; no block's end moves before its slices (only slices move, never past a header)."""
    out: list[tuple[bytes, bytes]] = []
    rest: list[tuple[bytes, bytes]] = []
    for message in batch:
        topic = message[0]
        if topic == topics.HEADER:
            out += rest
            rest = []
            out.append(message)
        elif topic.startswith(topics.BOOK_PREFIX) and watched(topic):
            out.append(message)
        else:
            rest.append(message)
    return out + rest


class Shard:
    def __init__(self, cfg: ShardConfig, ctx: zmq.Context | None = None) -> None:
        if not cfg.info_url and not cfg.snapshot_file:
            raise ValueError("one of --info-url or --snapshot-file is required")
        self.cfg = cfg
        self.state = state = ShardState(cfg.shard, cfg.shards, cfg.coins)
        self.ctx = ctx or zmq.Context.instance()
        self.curve = Curve.from_dir(cfg.curve_dir)
        pub, query = config.book_endpoints(cfg.shard)
        self.sub = self._socket(zmq.SUB, cfg.ingest_pub, bind=False)
        self.sub.setsockopt(zmq.RCVHWM, RCVHWM)
        for prefix in STREAM_PREFIXES:
            self.sub.setsockopt(zmq.SUBSCRIBE, prefix)
        xpub = self._socket(zmq.XPUB, cfg.pub or pub, bind=True, verbose=True)
        if cfg.lossless:
            xpub.setsockopt(zmq.XPUB_NODROP, 1)
        self.publisher = Publisher(xpub, cfg.shard)
        self.router = self._socket(zmq.ROUTER, cfg.query or query, bind=True)
        wire.router_replies(self.router, REPLIES_QUEUED)
        self.poller = zmq.Poller()
        for sock in (xpub, self.router):
            self.poller.register(sock, zmq.POLLIN)
        self.job_fds: set[int] = set()
        self.jobs = Jobs(ready=lambda: not state.awaiting_details())  # a child sees the books as forked: whole details
        self.fetcher = snapshot.Fetcher(cfg.info_url, state.owns, state.name) if cfg.info_url else None
        self.recovery = Recovery(state, self.publisher, Replayer(self.ctx, cfg.ingest_replay, cfg.replay_timeout, self.curve),
                                 self.fetcher, cfg.retry_every)
        self.stream = Stream(state, self.publisher, self.recovery)
        self.queries = Queries(state, self.jobs, self.send)
        self.parked: list[tuple[list[bytes], wire.ShardQuery]] = []  # queries reading order details, until the block's come
        self.stream.on_finished.append(lambda height: self.serve_parked())
        # the test ops decode only with the test hooks on: otherwise they are unknown ops like any other
        self.query_type: object = wire.ShardQuery | hooks.HookQuery if cfg.test_hooks else wire.ShardQuery
        self.query_ops = wire.SHARD_OPS + hooks.OPS if cfg.test_hooks else wire.SHARD_OPS
        self.validation = None
        if cfg.info_url and cfg.validate_every > 0:
            self.validation = Validation(state, self.jobs, cfg.info_url, cfg.ingest_replay, cfg.validate_every,
                                         cfg.replay_timeout, self.recovery.resync, cfg.curve_dir)
        self.checkpoints = None
        if cfg.checkpoint_dir and cfg.checkpoint_every > 0:
            self.checkpoints = checkpoint.Checkpointer(state, self.jobs, cfg.checkpoint_dir, cfg.checkpoint_every,
                                                       cfg.checkpoint_keep)
        self.dropper = hooks.Dropper(state, cfg.test_drop_every)
        self.started = time.monotonic()
        self.retry_at = 0.0
        self.init_failures = 0  # snapshot failures in a row while initialising (backoff)
        self.fresh_after = 0.0  # epoch s: a snapshot to start from must be written after this
        self.heartbeat_at = 0.0
        self.stopped = False

    def _socket(self, kind: int, endpoint: str, bind: bool, verbose: bool = False) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if verbose:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)
            sock.setsockopt(zmq.SNDHWM, SNDHWM)
        if self.curve is not None:
            self.curve.serve(sock, self.ctx) if bind else self.curve.connect(sock)
        (sock.bind if bind else sock.connect)(endpoint)
        return sock

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        while not self.stopped:
            self.step()
        self.close()

    def step(self, timeout_ms: int = 50) -> None:
        """One iteration: initialise if needed, then serve every socket and pipe that is ready."""
        now = time.monotonic()
        state = self.state
        if state.phase == CoinState.INITIALISING and now >= self.retry_at:
            self.begin_init()
        self._watch_jobs()
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is self.sub:
                self.read_ingest()
            elif sock is self.router:
                self.serve_queries()
            elif sock is self.publisher.sock:
                self.on_subscriptions()
            else:
                self.jobs.read(sock)
        now = time.monotonic()
        self.stream.tick(now, lambda: bool(self.sub.poll(0)))
        if self.fetcher is not None:
            fetched = self.fetcher.result()
            if fetched is not None:
                self.on_fetched(fetched)
        self.recovery.tick(now)
        if self.validation is not None:
            self.validation.tick(now)
        if self.checkpoints is not None:
            self.checkpoints.tick(now)
        self.jobs.start_queued()
        if now >= self.heartbeat_at:
            self.heartbeat_at = now + HEARTBEAT_S
            state = self.state
            state.gauges()  # once a second, not every block: a loop over every coin
            self.publisher.heartbeat(wire.ShardStatus(state.shard, state.phase, state.height, state.time, state.states()))

    def _watch_jobs(self) -> None:
        """Poll exactly the pipes of the running children."""
        fds = set(self.jobs.fds())
        for fd in self.job_fds - fds:
            self.poller.unregister(fd)
        for fd in fds - self.job_fds:
            self.poller.register(fd, zmq.POLLIN)
        self.job_fds = fds

    def read_ingest(self) -> None:
        """What ingest sent: each block's slices of coins someone watches first (see ``watched_first``);
        what that publishes goes out in bursts, each held at most ``RELEASE_AFTER``."""
        batch: list[tuple[bytes, bytes]] = []
        for _ in range(BATCH):
            try:
                topic, payload = wire.recv(self.sub, zmq.NOBLOCK)
            except zmq.Again:
                break
            except ValueError:  # not two frames
                BAD_INPUT.labels("book", "bad_frame").inc()
                continue
            if not self.dropper.drop(topic):
                batch.append((topic, payload))
        publisher = self.publisher
        publisher.hold()
        try:
            for topic, payload in watched_first(batch, publisher.subs.watches):
                self.stream.on_message(topic, payload)
                publisher.release_due(RELEASE_AFTER)
        finally:
            publisher.release()

    # ------------------------------------------------------------ initialisation

    def begin_init(self) -> None:
        """Load the snapshot (file) or start fetching it (info server)."""
        if self.fetcher is not None:
            if not self.fetcher.busy:
                self.fetcher.start("init", self.fresh_after)
            self.retry_at = time.monotonic() + 3600  # on_fetched decides what comes next
            return
        try:
            height, time_ms, books = checkpoint.load_file(self.cfg.snapshot_file or "", self.state.owns)
        except (OSError, snapshot.SnapshotError) as exc:
            metrics.SNAPSHOTS.labels("init", "error").inc()
            self.init_failed(f"cannot read snapshot file {self.cfg.snapshot_file!r}: {exc}")
            return
        metrics.SNAPSHOTS.labels("init", "ok").inc()
        self.finish_init(height, books, time_ms)

    def init_failed(self, why: str, starting: bool = False) -> None:
        """Try the snapshot again later: 1 s, 2 s, 4 s … up to INIT_BACKOFF_MAX s. ``starting``: the
        node's info server does not answer yet, in the shard's first ``INFO_STARTUP_S`` (a node, or
        the simulator beside it, starting too): said once, as information, not as an error."""
        delay = min(self.cfg.retry_every * 2 ** self.init_failures, INIT_BACKOFF_MAX)
        self.init_failures += 1
        if starting and time.monotonic() - self.started < INFO_STARTUP_S:
            if self.init_failures == 1:
                log.info("waiting for the node's info server at %s to answer", self.cfg.info_url)
        else:
            log.error("%s; trying again in %.0f s", why, delay)
        self.retry_at = time.monotonic() + delay

    def finish_init(self, height: int, books: dict[str, Book], time_ms: int = 0) -> None:
        """Install the snapshot's (or checkpoint's) books, replay from its height + 1, go live."""
        state = self.state
        state.coins = {coin: Coin(book) for coin, book in books.items()}
        state.height = state.base = height
        state.time = time_ms
        state.mids = {}
        for c in state.coins.values():  # before the replay: each block it finishes sends S| with every coin's mid
            state.update_mid(c.book)  # (gateways answer allMids from the last S|; a coin the replay did not touch was missing)
        self.stream.start_at(height)
        if not self.recovery.replay(height + 1, STREAM_PREFIXES):
            metrics.INIT_RESTARTS.inc()
            log.warning("replay from %d failed; starting initialisation over with a newer snapshot", height + 1)
            self.fresh_after = time.time()  # not the one another shard fetched before ingest lost these blocks
            state.coins, state.mids = {}, {}
            self.retry_at = time.monotonic() + self.cfg.retry_every
            return
        state.phase = CoinState.LIVE
        self.init_failures = 0
        self.poller.register(self.sub, zmq.POLLIN)
        for coin, c in state.coins.items():
            self.publisher.reset(coin, state.coin_height(c.book), "init", CoinState.LIVE)
        for topic in sorted(self.publisher.subs.exact):  # subscribed while initialising
            self.publisher.initial(topic, state.live_books(), state.height, state.time)
        state.gauges()
        log.info("live: %d coins, %d orders, snapshot %d, at block %d", len(state.coins),
                 sum(len(c.book) for c in state.coins.values()), height, state.height)

    def on_fetched(self, fetched: snapshot.Fetched) -> None:
        initialising = self.state.phase == CoinState.INITIALISING
        if fetched.error is not None:
            metrics.SNAPSHOTS.labels(fetched.purpose, "error").inc()
            if initialising:
                self.init_failed(f"snapshot from {self.cfg.info_url} failed: {fetched.error} "
                                 "(is the node running with --serve-info, and is --info-url its address?)", fetched.unreachable)
            else:
                log.error("snapshot (%s) failed: %s", fetched.purpose, fetched.error)
                self.recovery.on_fetched(fetched)
            return
        metrics.SNAPSHOTS.labels(fetched.purpose, "shared" if fetched.shared else "ok").inc()
        log.info("snapshot (%s) at %d: %d coins in %.2fs%s", fetched.purpose, fetched.height, len(fetched.books),
                 fetched.seconds, " (fetched by another shard)" if fetched.shared else "")
        if initialising:
            self.finish_init(fetched.height, fetched.books)
        else:
            self.recovery.on_fetched(fetched)

    # ------------------------------------------------------------ XPUB and queries

    def on_subscriptions(self) -> None:
        """Subscription events: current L2/BBO values and l4 sync markers for new subscribers."""
        state = self.state
        while True:
            try:
                event = self.publisher.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            topic = self.publisher.subs.handle(event)
            if topic is None:
                continue
            if topic.startswith(topics.L4_PREFIX):
                self._l4_sync(topic)
            elif state.phase == CoinState.LIVE:
                self.publisher.initial(topic, state.live_books(), state.height, state.time)

    def _l4_sync(self, topic: bytes) -> None:
        if not is_exact(topic):
            return
        coin = topics.coin_of(topic)
        if not self.state.owns(coin):
            return
        c = self.state.coins.get(coin)
        height = self.state.l4_height(c) if c is not None else self.state.height
        self.publisher.l4_sync(coin, height)

    def serve_queries(self) -> None:
        for _ in range(QUERY_BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope, body = frames[:-1], frames[-1]  # identity, any request-id frames, delimiter
            try:
                query = wire.decode(body if len(frames) > 1 else b"", self.query_type)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                op = wire.op_of(body) if len(frames) > 1 else None
                if op is not None and op not in self.query_ops:
                    self.queries.unknown(envelope, op)
                    continue
                BAD_INPUT.labels("book", "bad_query").inc()
                self.queries.reply(envelope, wire.error_reply(f"bad query: {exc}"))
                continue
            if isinstance(query, hooks.Hook) and self.cfg.test_hooks:
                self.queries.reply(envelope, hooks.corrupt(self.state, query))
                continue
            self.serve(envelope, query)

    def serve(self, envelope: list[bytes], query: wire.ShardQuery) -> None:
        """Answer one query; one that reads order details waits while a block's have not come
        (a few milliseconds after its diffs: ``stream``)."""
        if isinstance(query, DETAIL_QUERIES) and self.state.awaiting_details():
            if len(self.parked) < MAX_PARKED:
                self.parked.append((envelope, query))
                return
            self.queries.reply(envelope, wire.error_reply("shard busy (queries waiting for order details); retry"))
            return
        try:
            self.queries.answer(envelope, query)
        except Exception as exc:  # a bug must not stop the shard
            log.exception("query %r failed", query)
            self.queries.reply(envelope, wire.error_reply(f"internal error: {type(exc).__name__}"))

    def serve_parked(self) -> None:
        """The details of the blocks applied have come: answer the queries that waited for them."""
        if not self.parked or self.state.awaiting_details():
            return
        parked, self.parked = self.parked, []
        for envelope, query in parked:
            self.serve(envelope, query)

    def send(self, envelope: list[bytes], frames: list[bytes]) -> None:
        """Send reply ``frames`` to the peer of ``envelope`` (big frames without a copy)."""
        wire.reply(self.router, envelope + frames, "book", copy=False)

    def close(self) -> None:
        self.jobs.close()
        if self.fetcher is not None:
            self.fetcher.close()
        self.recovery.replayer.close()
        for sock in (self.sub, self.publisher.sock, self.router):
            sock.close(linger=0)
        if self.curve is not None:
            self.curve.close()


def run(cfg: ShardConfig) -> None:
    logs.setup(f"book-{cfg.shard}", cfg.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    serve(cfg.metrics_port, cfg.metrics_host)
    shard = Shard(cfg)
    stop_on_signals(lambda: setattr(shard, "stopped", True))
    log.info("shard %d/%d: ingest %s (replay %s), publishing on %s, queries on %s",
             cfg.shard, cfg.shards, cfg.ingest_pub, cfg.ingest_replay, cfg.pub, cfg.query)
    shard.run()

"""The history process: one single-threaded loop over ingest's ``HIST|`` blocks
(live), queries (ROUTER), candle subscriptions (XPUB) and, when nothing else
waits, slices of the backfill. Writes are committed every ``--commit-every``
seconds (5); queries read the same connection, so they see every block applied,
and a crash costs what was not committed, which the backfill reads again.

It runs at a lower CPU priority (``--niceness``): the books and gateways come
first, history is a few hundred milliseconds behind at worst.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from hlbook.common import config, logs, topics, wire
from hlbook.common.candles import INTERVALS
from hlbook.common.metrics import BAD_INPUT, serve
from hlbook.common.security import Curve
from hlbook.common.signals import stop_on_signals
from hlbook.services.history import metrics
from hlbook.services.history.backfill import Backfill
from hlbook.services.history.store import Store

log = logging.getLogger(__name__)

COMMIT_EVERY = 5.0  # default seconds between commits (queries read the open transaction; each commit writes the
# pages changed since the last: a whole-market block costs ~10 ms of commit at 0.2 s, ~2.5 ms at 1 s, ~0.5 ms at 5 s)
BACKFILL_SLICE = 0.02  # seconds of backfill between looks at the sockets
LIVE_BATCH = 100  # live blocks applied per turn
UPKEEP_EVERY = 60.0  # seconds between retention runs and gauge updates
IDLE_WAIT_MS = 100
REPLIES_QUEUED = 64  # replies queued for one gateway; past it a reply is dropped and counted (wire.reply)
WAIT_FOR_HEIGHT = 1.0  # seconds a query with min_height waits for that block at most


@dataclass
class HistoryConfig:
    data_dir: str
    mode: str = "by-block"
    db: str = ""  # the SQLite file; "": history-<data dir, mode>.sqlite in state_dir
    state_dir: str = config.STATE_DIR
    hours: float | None = None  # backfill window (None: every file within the retention)
    days: float = 7.0  # retention
    ingest_pub: str = config.INGEST_PUB
    pub: str = config.HISTORY_PUB
    query: str = config.HISTORY_QUERY
    niceness: int = 10
    commit_every: float = COMMIT_EVERY  # seconds; a crash loses at most this much, read again from the node's files
    curve_dir: str | None = None
    metrics_port: int = 0
    metrics_host: str = config.DEFAULT_HOST
    log_level: str = "INFO"
    # a replay (hlbook replay): no block after ``until`` (height, block time in ms) is backfilled, and
    # "now" (retention, open-ended queries) is the newest block's time: answers are as of the replay clock
    until: tuple[int, int] | None = None


def db_path(cfg: HistoryConfig) -> Path:
    return Path(cfg.db) if cfg.db else config.state_file(cfg.state_dir, "history", cfg.data_dir, cfg.mode, ".sqlite")


class History:
    def __init__(self, cfg: HistoryConfig, ctx: zmq.Context | None = None) -> None:
        if cfg.mode not in ("by-block", "streaming"):
            raise ValueError(f"mode must be by-block or streaming, not {cfg.mode!r}")
        self.cfg = cfg
        self.store = Store(db_path(cfg), cfg.days)
        self.backfill = Backfill(cfg.data_dir, cfg.mode, self.store, cfg.hours, cfg.until)
        self.clock_ms = cfg.until[1] if cfg.until else 0  # a replay's: its newest block's time
        ctx = ctx or zmq.Context.instance()
        self.curve = Curve.from_dir(cfg.curve_dir)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.RCVHWM, 20_000)
        self.sub.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.connect(self.sub)
        self.sub.connect(cfg.ingest_pub)
        self.sub.setsockopt(zmq.SUBSCRIBE, topics.HISTORY)
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscribe: each new subscriber gets the candle at once
        self.router = ctx.socket(zmq.ROUTER)
        wire.router_replies(self.router, REPLIES_QUEUED)
        for sock, endpoint in ((self.pub, cfg.pub), (self.router, cfg.query)):
            sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                self.curve.serve(sock, ctx)
            sock.bind(endpoint)
        self.poller = zmq.Poller()
        for sock in (self.sub, self.pub, self.router):
            self.poller.register(sock, zmq.POLLIN)
        self.subscribed: set[bytes] = set()  # candle topics someone subscribes to
        self.parked: list[tuple[float, list[bytes], wire.HistoryQuery]] = []  # (deadline, envelope, query) awaiting min_height
        self.last_commit = time.monotonic()
        self.last_upkeep = 0.0
        self.store_failures = 0
        self.stopped = False

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        while not self.stopped:
            self.step()
        self.close()

    def step(self) -> None:
        wait = 0 if self.backfill.busy else IDLE_WAIT_MS
        ready = dict(self.poller.poll(wait))
        if self.sub in ready:
            self.read_live()
        if self.router in ready:
            self.serve_queries()
        if self.pub in ready:
            self.read_subscriptions()
        if self.parked:
            self.serve_parked()
        if self.backfill.busy and not self.sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self.run_backfill()
        now = time.monotonic()
        if now - self.last_commit >= self.cfg.commit_every:
            self.commit()
        if now - self.last_upkeep >= UPKEEP_EVERY:
            self.upkeep()

    def commit(self) -> None:
        """Commit; a store that cannot be written (a full disk) loses what the transaction held,
        which the backfill reads again from the node's files once it can write: the service
        goes on, answering queries from what is committed."""
        self.last_commit = time.monotonic()
        try:
            self.store.commit()
        except sqlite3.Error as exc:
            self.store_failed(exc)

    def store_failed(self, exc: sqlite3.Error) -> None:
        """The store cannot be written (a full disk): the open transaction is dropped, its blocks
        are left to the backfill (the node's files), which runs again once writes succeed."""
        metrics.STORE_ERRORS.inc()
        self.store_failures += 1
        if self.store_failures <= 3 or self.store_failures % 100 == 0:
            log.error("cannot write the history store %s (%s) [%d so far]: what was not committed is read again from "
                      "the node's files", self.store.path, exc, self.store_failures)
        self.store.rollback()
        self.backfill.request()

    def run_backfill(self) -> None:
        try:
            self.backfill.step(BACKFILL_SLICE)
        except Exception:  # a bug or an unreadable file must not stop live history
            BAD_INPUT.labels("history", "backfill_error").inc()
            log.exception("backfill failed; what it stored since the last commit is dropped, it runs again later")
            self.store.rollback()
            self.backfill.work = None

    # ------------------------------------------------------------ live blocks

    def read_live(self) -> None:
        for _ in range(LIVE_BATCH):
            try:
                frames = wire.recv(self.sub, zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                block = wire.decode(frames[-1], wire.HistoryBlock)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                BAD_INPUT.labels("history", "bad_message").inc()
                log.error("undecodable HIST| message: %s", exc)
                continue
            self.on_block(block)

    def on_block(self, block: wire.HistoryBlock) -> None:
        held = self.store.held
        if block.incomplete:  # a stream's line never came: the files may have it later
            log.warning("block %d incomplete (%s): left to the backfill", block.height, block.incomplete)
            self.backfill.request()
            return
        if block.height in held:
            return
        if block.height - 1 not in held:
            # a restart, a lost message, or the first live block: the files hold what is missing (a pass
            # made before the node's files were all there found nothing, and none was asked for again)
            self.backfill.request()
        try:
            changed = self.store.add_block(block.height, block.time, block.statuses, block.fills)
        except sqlite3.Error as exc:
            self.store_failed(exc)
            return
        except Exception:
            BAD_INPUT.labels("history", "error").inc()
            log.exception("block %d could not be stored; left to the backfill", block.height)
            self.store.rollback()
            self.backfill.request()
            return
        metrics.BLOCKS.labels("live").inc()
        metrics.LAG.set(time.time() - block.time / 1000)
        self.clock_ms = max(self.clock_ms, block.time)
        for coin, interval in changed:
            topic = topics.candle(coin, interval)
            if topic in self.subscribed:
                self.publish_candle(topic, coin, interval)

    # ------------------------------------------------------------ candles (XPUB)

    def read_subscriptions(self) -> None:
        while True:
            try:
                event = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if not event or not event[1:].startswith(topics.CANDLE_PREFIX):
                continue
            topic = event[1:]
            if event[0] == 1:  # every subscribe (XPUB_VERBOSE); an unsubscribe comes when the last one leaves
                self.subscribed.add(topic)
                parts = topics.split(topic)
                if len(parts) == 3 and parts[2] in INTERVALS:
                    self.publish_candle(topic, parts[1], parts[2])
            else:
                self.subscribed.discard(topic)

    def publish_candle(self, topic: bytes, coin: str, interval: str) -> None:
        candle = self.store.newest_candle(coin, interval)
        if candle is not None:
            wire.send(self.pub, topic, wire.encode(wire.CandleUpdate(**candle)))

    # ------------------------------------------------------------ queries (ROUTER)

    def serve_queries(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            envelope, body = frames[:-1], frames[-1]
            try:
                query = wire.decode(body, wire.HistoryQuery)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                op = wire.op_of(body)
                if op is not None and op not in wire.HISTORY_OPS:
                    BAD_INPUT.labels("history", "bad_query").inc()
                    metrics.QUERIES.labels("unknown", "error").inc()
                    wire.reply(self.router, envelope + [wire.encode(wire.HistoryReply(False, self.store.held.last, f"bad query: unknown op {op!r}"))], "history")
                    continue
                BAD_INPUT.labels("history", "bad_query").inc()
                metrics.QUERIES.labels("bad", "error").inc()
                wire.reply(self.router, envelope + [wire.encode(wire.HistoryReply(False, self.store.held.last, f"bad query: {exc}"))], "history")
                continue
            if query.min_height > (self.store.held.last or 0):
                self.parked.append((time.monotonic() + WAIT_FOR_HEIGHT, envelope, query))
                continue
            self.reply(envelope, query)

    def serve_parked(self) -> None:
        """Answer the queries whose block has come (or that waited long enough)."""
        now, height, waiting = time.monotonic(), self.store.held.last or 0, []
        for deadline, envelope, query in self.parked:
            if query.min_height <= height or now >= deadline:
                self.reply(envelope, query)
            else:
                waiting.append((deadline, envelope, query))
        self.parked = waiting

    def reply(self, envelope: list[bytes], query: wire.HistoryQuery) -> None:
        started, op = time.perf_counter(), wire.op_name(query)  # one of wire.HISTORY_OPS: metric labels stay few
        try:
            reply = [wire.encode(wire.HistoryReply(True, self.store.held.last)), self.answer(query)]
            metrics.QUERIES.labels(op, "ok").inc()
            metrics.QUERY_SECONDS.labels(op).observe(time.perf_counter() - started)
        except ValueError as exc:
            BAD_INPUT.labels("history", "bad_query").inc()
            metrics.QUERIES.labels(op, "error").inc()
            reply = [wire.encode(wire.HistoryReply(False, self.store.held.last, f"bad query: {exc}"))]
        except Exception as exc:  # a bug must not stop the service
            log.exception("query %r failed", query)
            metrics.QUERIES.labels(op, "error").inc()
            reply = [wire.encode(wire.HistoryReply(False, self.store.held.last, f"internal error: {type(exc).__name__}"))]
        wire.reply(self.router, envelope + reply, "history")

    def answer(self, q: wire.HistoryQuery) -> bytes:
        """The answer's JSON; ValueError for a request missing what it needs."""
        s = self.store
        match q:
            case wire.StatusQuery():
                return msgspec.json.encode({"height": s.held.last, "spans": s.held.rows()[-100:], "backfilled": self.backfill.stored,
                                            "backfilling": self.backfill.busy})
            case wire.RecentTradesQuery():
                return s.recent_trades(_needed(q.coin, "coin"))
            case wire.CandlesQuery():
                if q.interval not in INTERVALS:
                    raise ValueError(f"interval must be one of {list(INTERVALS)}")
                end = q.end if q.end is not None else self.now_ms()
                return s.candles(_needed(q.coin, "coin"), q.interval, q.start, end)
            case wire.UserFillsQuery():
                return s.user_fills(_needed(q.user, "user").lower(), q.aggregate)
            case wire.UserFillsByTimeQuery():
                end = q.end if q.end is not None else self.now_ms()
                return s.user_fills_by_time(_needed(q.user, "user").lower(), q.start, end, q.aggregate, q.reversed)
            case wire.TwapSliceFillsQuery():
                end = q.end if q.end is not None else self.now_ms()
                return s.twap_slice_fills(_needed(q.user, "user").lower(), q.start, end)
            case wire.HistoricalOrdersQuery():
                return s.historical_orders(_needed(q.user, "user").lower())
            case wire.OrderStatusQuery():
                return s.order_status(_needed(q.user, "user").lower(), oid=q.oid, cloid=q.cloid.lower() if q.cloid else None)
        raise ValueError(f"unknown op {wire.op_name(q)!r}")

    def now_ms(self) -> int:
        """The wall clock, or a replay's clock (its newest block's time)."""
        return self.clock_ms if self.cfg.until else int(time.time() * 1000)

    # ------------------------------------------------------------ upkeep

    def upkeep(self) -> None:
        self.last_upkeep = time.monotonic()
        try:
            removed = self.store.prune(self.now_ms())
        except Exception:
            log.exception("retention failed")
            self.store.rollback()
            removed = 0
        if removed:
            log.info("retention removed %d rows", removed)
        self.last_commit = time.monotonic()
        metrics.DB_BYTES.set(self.store.size())
        spans = self.store.held.spans
        metrics.HOLES.set(sum(b - a - 1 for (_, a), (b, _) in zip(spans, spans[1:])))

    def close(self) -> None:
        self.store.close()
        for sock in (self.sub, self.pub, self.router):
            sock.close(0)
        if self.curve is not None:
            self.curve.close()


def _needed(value: str | None, name: str) -> str:
    if not value:
        raise ValueError(f"{name} is required")
    return value


def run(cfg: HistoryConfig) -> None:
    logs.setup("history", cfg.log_level)
    if cfg.niceness:
        os.nice(cfg.niceness)
    serve(cfg.metrics_port, cfg.metrics_host)
    try:
        history = History(cfg)
    except config.StateInUse as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    stop_on_signals(lambda: setattr(history, "stopped", True))
    log.info("store %s, backfill of %s (%s), live from %s, queries on %s, candles on %s", history.store.path, cfg.data_dir,
             cfg.mode, cfg.ingest_pub, cfg.query, cfg.pub)
    history.run()

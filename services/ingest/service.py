"""The ingest process: tail -> decode -> join -> publish, plus replay and the
downstream subscription set (XPUB), in one single-threaded poll loop.

Each block goes out in two phases (``joiner``): its books (``H|``, ``B|``, ``T|``)
as soon as its diffs and fills are read, then its details (``D|``, ``E|``,
``U|``, ``HIST|``) once its status line is read and decoded: l2Book, bbo and
trades never wait for the ~4 MB of statuses a whole-market block carries.
In streaming mode its trades (``T|``) are a phase of their own between the two:
its books go out once the diff stream moved past it, whatever the fills do."""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from hlbook.common import config, logs, nodefiles, wire
from hlbook.common.metrics import BAD_INPUT, serve
from hlbook.common.nodefiles import line_height
from hlbook.common.nodelines import Reason
from hlbook.common.security import Curve
from hlbook.common.models import STREAMS, block_time_ms
from hlbook.common.signals import stop_on_signals
from hlbook.services.ingest import metrics
from hlbook.services.ingest.joiner import STATUSES, Block, Joiner, Phase
from hlbook.services.ingest.messages import MessageBuilder, Subscriptions
from hlbook.services.ingest.pace import Pace
from hlbook.services.ingest.position import Position, PositionFile
from hlbook.services.ingest.replay import ReplayStore, serve_waiting
from hlbook.services.ingest.tailer import Tailer
from hlbook.services.ingest.watch import Watcher

log = logging.getLogger(__name__)

MAX_AHEAD = 200  # blocks a stream may read ahead of the slowest one still reading
WATCHED_POLL = 0.05  # seconds between reads when inotify reports nothing (joiner timeouts, missed events)
WARM_BLOCKS = 150  # blocks before a restart rebuilt into the replay store (10 s of mainnet; ~2 s of work on the whole market)
WARM_CHUNK = 20  # blocks joined at a time while rebuilding them
WAITING_NOTICE_S = 5.0  # seconds without any node file after which ingest says where it looked
RESUBSCRIBE_S = 30.0  # after a restart, users followed before stay followed this long unless subscribed again
SNDHWM = 20_000  # messages queued per subscriber before PUB drops (consumers detect drops and replay): ~1,000 blocks
REPLIES_QUEUED = 8  # replay replies (up to megabytes each) queued for a peer that does not read them


@dataclass
class IngestConfig:
    data_dir: str
    mode: str = "by-block"
    from_height: int | None = None
    pub: str = "tcp://127.0.0.1:5550"
    replay: str = "tcp://127.0.0.1:5551"
    replay_blocks: int = 1000
    block_timeout: float = 0.5
    poll_interval: float = 0.002  # without inotify
    watch: bool = True  # wake on inotify events
    state_dir: str | None = None  # where the position is kept (None: start live at the end every time)
    curve_dir: str | None = None  # ZeroMQ CURVE keys (common.security); None: no authentication
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
    # a replay (hlbook replay): publish nothing while ``hold_file`` does not exist, nothing after
    # ``until_height`` or ``until_time`` (block time, ms); pace blocks at ``speed`` x real time
    # (0: as fast as the slowest subscriber reads: XPUB_NODROP, sends block)
    hold_file: str | None = None
    until_height: int | None = None
    until_time: int | None = None
    speed: float | None = None
    pace_from_height: int = 0  # blocks before this height and this time (ms) go out unpaced (the checkpoint's lead)
    pace_from_time: int = 0


class Ingest:
    def __init__(self, cfg: IngestConfig, ctx: zmq.Context | None = None) -> None:
        if cfg.mode not in ("by-block", "streaming"):
            raise ValueError(f"mode must be by-block or streaming, not {cfg.mode!r}")
        self.cfg = cfg
        self.tailers = {s: Tailer(cfg.data_dir, s, cfg.mode) for s in STREAMS}
        self.position, self._lock = None, None
        if cfg.state_dir:
            path = config.state_file(cfg.state_dir, "ingest", cfg.data_dir, cfg.mode, ".json")
            self._lock = config.hold(path)
            self.position = PositionFile(path)
        saved = self.position.load() if self.position is not None and cfg.from_height is None else None
        self.subs = Subscriptions(saved.users if saved else (), keep_for=RESUBSCRIBE_S)
        self.streaming = cfg.mode == "streaming"
        self.builder = MessageBuilder(self.subs, self.streaming)
        if saved is not None:
            self.builder.prev.restore({topic.encode("latin-1"): height for topic, height in saved.prev.items()})
        self.store = ReplayStore(cfg.replay_blocks, 3 if self.streaming else 2)
        self.skip_below = self._start_position(saved)
        self.books_done = saved.books_height if saved is not None else None  # books published before a restart
        self.trades_done = saved.trades_height if saved is not None and saved.trades_height is not None else self.books_done
        if saved is not None:
            self._warm_store(saved.height, max(saved.height, saved.books_height or 0), max(saved.height, self.trades_done or 0))
        self.joiner = Joiner(cfg.mode, cfg.block_timeout, self.skip_below)
        for stream, tailer in self.tailers.items():  # a line the tailer drops (oversize, unterminated) is a gap too
            tailer.lost = functools.partial(self.joiner.lose, stream)
        ctx = ctx or zmq.Context.instance()
        self.curve = Curve.from_dir(cfg.curve_dir)
        self.pub = ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.SNDHWM, SNDHWM)
        self.pub.setsockopt(zmq.LINGER, 0)
        if cfg.speed == 0:
            self.pub.setsockopt(zmq.XPUB_NODROP, 1)
        self.pace = Pace(cfg.speed) if cfg.speed is not None else None
        self.end: int | None = cfg.until_height  # last block to publish
        if self.end is not None:
            metrics.REPLAY_END.set(self.end)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        wire.router_replies(self.router, REPLIES_QUEUED)
        for sock, endpoint in ((self.pub, cfg.pub), (self.router, cfg.replay)):
            if self.curve is not None:
                self.curve.serve(sock, ctx)
            sock.bind(endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.pub, zmq.POLLIN)
        self.poller.register(self.router, zmq.POLLIN)
        self.watcher = Watcher.open() if cfg.watch else None
        self._watching: dict[str, Path | None] = {}  # stream -> the file whose folder is watched
        if self.watcher is not None:
            self.poller.register(self.watcher.fd, zmq.POLLIN)
        self.started = time.monotonic()
        self.waiting_said = False  # "no node files" said once
        self.published: int | None = None  # last block published whole (its details phase too)
        self.books_published: int | None = None  # last block whose books phase was published
        self.trades_published: int | None = None  # streaming: last block whose trades phase was published
        self.stopped = False

    def _start_position(self, saved: Position | None) -> int | None:
        """Position every tailer; return the first height to publish: ``--from-height``,
        else the one after the last published (``--state-dir``), else live at the end."""
        height = self.cfg.from_height
        if height is None and saved is not None:
            height = saved.height + 1
            log.info("resuming after block %d (%s)", saved.height, self.position.path if self.position else "")
        if height is not None:
            for tailer in self.tailers.values():
                if not tailer.start_from(height):
                    metrics.BLOCK_ANOMALIES.labels("not_on_disk").inc()
                    log.error("%s: no file holds block %d any more (pruned?); starting at its oldest file",
                              tailer.stream, height)
            return height
        lasts = [h for h in (t.start_at_end() for t in self.tailers.values()) if h is not None]
        start = max(lasts) + 1 if lasts else None
        log.info("starting live at block %s", start if start is not None else "(no files yet)")
        return start

    def _warm_store(self, details: int, last: int, trades: int | None = None) -> None:
        """Rebuild the replay store's blocks up to ``last`` (the last whose books were published
        before the restart; their trades up to ``trades``, their details up to ``details``: later
        ones are published again) from the node files, with their own ``prev`` chain: a consumer
        that lost messages the previous ingest had queued when it died, or that the restart's
        catch-up sent before its subscription arrived, finds them here."""
        started = time.monotonic()
        trades = last if trades is None else trades
        first = max(0, last + 1 - min(self.cfg.replay_blocks, WARM_BLOCKS))
        builder = MessageBuilder(self.subs, self.streaming)
        for low in range(first, last + 1, WARM_CHUNK):
            high = min(low + WARM_CHUNK - 1, last)
            joiner = Joiner(self.cfg.mode, float("inf"), low)
            for stream in STREAMS:
                for line in nodefiles.lines_between(self.cfg.data_dir, stream, self.cfg.mode, low, high, joiner.drops.of(stream)):
                    joiner.feed(stream, line)
            for phase, block in joiner.ready(flush=True):
                try:
                    if phase is Phase.BOOKS:
                        self.store.add(block.height, builder.books(block))
                    elif phase is Phase.TRADES:
                        if block.height <= trades and (messages := builder.trades(block)):
                            self.store.add(block.height, messages)
                    elif block.height <= details:
                        block.decode_statuses(self.subs.wants, joiner.drops)
                        block.dropped = joiner.take_dropped()
                        stored, per_user = builder.details(block)
                        self.store.add(block.height, stored + per_user)
                except Exception:  # as in publish: that block cannot be replayed, the rest can
                    BAD_INPUT.labels("ingest", "error").inc()
                    log.exception("block %d could not be rebuilt for replay", block.height)
        log.info("replay store: %d blocks before the restart rebuilt from the node files (%s..%s) in %.2f s",
                 len(self.store.blocks), self.store.oldest, self.store.head, time.monotonic() - started)

    # -------------------------------------------------------------- loop

    def run(self) -> None:
        while not self.stopped:
            self.step()
        self.close()

    def step(self) -> int:
        """One iteration: read, publish closed blocks, wait for a write or a request
        (inotify: at most ``WATCHED_POLL`` s; else ``poll_interval``). Returns lines read."""
        if self.cfg.hold_file and not os.path.exists(self.cfg.hold_file):
            self._serve(50)
            return 0
        self._watch()
        lines = self._read_streams()
        for phase, block in self.joiner.ready():
            if phase is Phase.BOOKS:
                self.publish_books(block)
            elif phase is Phase.TRADES:
                self.publish_trades(block)
            else:
                self.publish_details(block)
        self.save_position()
        self.subs.expire()
        if not self.waiting_said and self.published is None and time.monotonic() - self.started > WAITING_NOTICE_S:
            self._say_what_is_awaited()
        wait = self.cfg.poll_interval if self.watcher is None else WATCHED_POLL
        self._serve(0 if lines else int(wait * 1000) or 1)
        return lines

    def _serve(self, timeout_ms: int) -> None:
        """Wait up to ``timeout_ms`` for subscriptions, replay requests, file events; handle them."""
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is self.pub:
                self.subs.handle(self.pub.recv())
            elif sock is self.router:
                serve_waiting(self.router, self.store)
            elif self.watcher is not None:
                self.watcher.drain()

    def _replaying(self, block: Block) -> bool:
        """A replay: False for a block past its end; else True once the block's time has come (pace)."""
        if self.end is None and self.cfg.until_time is not None and block_time_ms(block.block_time) > self.cfg.until_time:
            self.end = block.height - 1
            metrics.REPLAY_END.set(self.end)
            log.info("replay: the end (--to) is block %d", self.end)
        if self.end is not None and block.height > self.end:
            return False
        if self.pace is not None and block.height >= self.cfg.pace_from_height \
                and block_time_ms(block.block_time) >= self.cfg.pace_from_time:
            delay = self.pace.delay(block_time_ms(block.block_time))
            deadline = time.monotonic() + delay
            while delay > 0:
                self._serve(max(1, int(delay * 1000)))
                delay = deadline - time.monotonic()
        return True

    def _say_what_is_awaited(self) -> None:
        """Once: no block yet after a few seconds; when no stream has a file, where they were looked for."""
        self.waiting_said = True
        if any(t.path is not None for t in self.tailers.values()):
            return  # files exist: the node is slow or silent, not misplaced
        metrics.WAITING.set(1)
        looked = ", ".join(str(nodefiles.stream_dir(self.cfg.data_dir, s, self.cfg.mode)) for s in STREAMS)
        log.error("no node files after %.0f s: waiting for them in %s (is --data-dir the node's home, holding hl/data/, "
                  "and is the node writing %s files%s?)", WAITING_NOTICE_S, looked, self.cfg.mode,
                  " (--batch-by-block)" if self.cfg.mode == "by-block" else " (--stream-with-block-info)")

    def _watch(self) -> None:
        """Watch every stream's folder and the day folder of the file it reads (again after a change)."""
        watcher = self.watcher
        if watcher is None:
            return
        for tailer in self.tailers.values():
            if self._watching.get(tailer.stream) == tailer.path and watcher.watched:
                continue
            watcher.watch(nodefiles.stream_dir(self.cfg.data_dir, tailer.stream, self.cfg.mode))
            if tailer.path is not None:
                watcher.watch(tailer.path.parent)
            self._watching[tailer.stream] = tailer.path

    def _read_streams(self) -> int:
        reading = [s for s, t in self.tailers.items() if not t.at_eof]
        floor = min((self.joiner.reached[s] for s in reading), default=None)
        count = 0
        for stream, tailer in self.tailers.items():
            if floor is not None and self.joiner.reached[stream] > floor + MAX_AHEAD:
                continue
            for line in tailer.poll():
                count += 1
                self._feed(stream, line)
        return count

    def _feed(self, stream: str, line: bytes) -> None:
        metrics.LINES.labels(stream).inc()
        if self.skip_below is not None:
            height = line_height(line)
            if height is not None and height < self.skip_below:
                return
        self.joiner.feed(stream, line)

    def _bad_line(self, stream: str, line: bytes, exc: Exception) -> None:
        """A status line that did not decode when its block's details closed."""
        self.joiner.drops(stream, Reason.MALFORMED, line_height(line), f"{exc}: {line[:200]!r}")

    def publish_books(self, block: Block) -> None:
        """The books phase: header, book slices, trades (not again for a block whose books a
        previous ingest published before it stopped: consumers hold them)."""
        if self.books_done is not None and block.height <= self.books_done:
            return
        if not self._replaying(block):
            return
        try:
            messages = self.builder.books(block)
        except Exception:  # a bug or input the models let through: the block is lost, ingest is not
            BAD_INPUT.labels("ingest", "error").inc()
            log.exception("block %d could not be published; consumers will see its height missing", block.height)
            return
        self._send(messages)
        self._books_delay(block)
        self.store.add(block.height, messages)
        metrics.MESSAGES.labels("stored").inc(len(messages))
        if self.books_published is None:
            metrics.WAITING.set(0)
        self.books_published = block.height

    @staticmethod
    def _books_delay(block: Block) -> None:
        """From the node's write of the block (its ``local_time``) to its books going out."""
        try:
            metrics.BOOKS_DELAY.set(time.time() - block_time_ms(block.local_time) / 1000)
        except ValueError:  # no local_time (a streaming block with no row), or one not a node timestamp
            pass

    def publish_trades(self, block: Block) -> None:
        """Streaming mode's trades phase (not again for a block whose trades a previous ingest published)."""
        if self.end is not None and block.height > self.end:
            return
        if self.trades_done is not None and block.height <= self.trades_done:
            # sent by the ingest before this one: not again, but its E| still names them
            self.builder.note_trade_coins(block)
            return
        try:
            messages = self.builder.trades(block)
        except Exception:
            BAD_INPUT.labels("ingest", "error").inc()
            log.exception("block %d: trades could not be published; consumers will see them missing", block.height)
            return
        self._send(messages)
        if messages:
            self.store.add(block.height, messages)
            metrics.MESSAGES.labels("stored").inc(len(messages))
        self.trades_published = block.height

    def publish_details(self, block: Block) -> None:
        """The details phase: the block's statuses decoded, book details, the block's end, per-user events, history."""
        if self.end is not None and block.height > self.end:
            return
        for line, exc in block.decode_statuses(self.subs.wants, self.joiner.drops):
            self._bad_line(STATUSES, line, exc)
            if self.cfg.mode == "by-block":  # the block's one status line: its new orders have no details
                block.statuses_missing = True
        block.dropped = self.joiner.take_dropped()
        try:
            stored, per_user = self.builder.details(block)
        except Exception:
            BAD_INPUT.labels("ingest", "error").inc()
            log.exception("block %d: details could not be published; consumers will see its height missing", block.height)
            return
        self._send(stored)
        self._send(per_user)
        self.store.add(block.height, stored + per_user)
        self._publish_history(block)
        metrics.BLOCKS.inc()
        metrics.MESSAGES.labels("stored").inc(len(stored))
        metrics.MESSAGES.labels("user").inc(len(per_user))
        metrics.HEAD.set(block.height)
        block_s = block_time_ms(block.block_time) / 1000
        metrics.HEAD_TIME.set(block_s)
        metrics.LAG.set(time.time() - block_s)
        self.published = block.height

    def _send(self, messages: list[tuple[bytes, bytes]]) -> None:
        for topic, payload in messages:
            wire.send(self.pub, topic, payload)

    def _publish_history(self, block: Block) -> None:
        """``HIST|`` after the live messages; not kept for replay (the history service reads
        a block it lost from the node's files)."""
        try:
            history = self.builder.history(block)
        except Exception:
            BAD_INPUT.labels("ingest", "error").inc()
            log.exception("block %d: no history message; the history service will read it from the files", block.height)
            return
        if history is not None:
            wire.send(self.pub, *history)
            metrics.MESSAGES.labels("history").inc()

    def save_position(self, force: bool = False) -> None:
        """Write where publishing stands (after a block, at most every ``position.SAVE_EVERY`` s)."""
        if self.position is None or self.published is None or not (force or self.position.due()):
            return
        prev = {topic.decode("latin-1"): height for topic, height in self.builder.prev.items()}
        books = max(self.books_published or 0, self.books_done or 0, self.published)
        trades = max(self.trades_published or 0, self.trades_done or 0, self.published) if self.streaming else books
        self.position.save(Position(self.published, prev, sorted(self.subs.users), books, trades))

    def close(self) -> None:
        self.save_position(force=True)
        if self.position is not None:
            self.position.close()
        if self._lock is not None:
            self._lock.close()
        for tailer in self.tailers.values():
            tailer.close()
        if self.watcher is not None:
            self.watcher.close()
        self.pub.close()
        self.router.close()
        if self.curve is not None:
            self.curve.close()


def run(cfg: IngestConfig) -> None:
    logs.setup("ingest", cfg.log_level)
    if not Path(cfg.data_dir).is_dir():
        log.error("--data-dir %s: no such directory (give the directory that holds the node's hl/data/, e.g. ~)", cfg.data_dir)
        raise SystemExit(2)
    serve(cfg.metrics_port, cfg.metrics_host)
    try:
        ingest = Ingest(cfg)
    except config.StateInUse as exc:
        log.error("%s", exc)
        raise SystemExit(2) from None
    stop_on_signals(lambda: setattr(ingest, "stopped", True))
    log.info("publishing on %s, replay on %s, mode %s", cfg.pub, cfg.replay, cfg.mode)
    ingest.run()

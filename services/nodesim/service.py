"""The simulator process: block loop (generate, write, pace) plus the info server.

A live run (no ``start_time``) takes each block's time from the clock when it
makes the block, less ``BLOCK_AGE_NS`` (consensus time is before the node
writes), and the writer stamps each line's ``local_time`` with the clock as it
writes it: ``local_time`` trails ``block_time`` by ~400 ms as on a node, and
block times follow the clock even when the loop falls behind (which
``Pacer`` logs). With ``start_time`` block times are a fixed schedule from it
(reproducible blocks: a seed and a start time fix every event).
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hlbook.common import logs
from hlbook.common.signals import stop_on_signals
from hlbook.services.nodesim.engine import DEFAULT_START_HEIGHT, Simulator
from hlbook.services.nodesim.info_server import InfoServer
from hlbook.services.nodesim.writer import NodeWriter, last_height, parse_modes

log = logging.getLogger(__name__)

BLOCK_AGE_NS = 310_000_000  # a live block's time: the clock when it is made, less this and up to AGE_JITTER_NS
AGE_JITTER_NS = 20_000_000
LATE_S = 0.25  # a block started this late (or 3 intervals) is behind schedule: logged
RESYNC_S = 1.0  # this late: the schedule restarts from now (no burst to catch up)
WARN_EVERY_S = 10.0
FREEZE_EVERY = 100  # blocks: the books' objects leave the collector's generations (gc.freeze), so it never
# walks the ~600,000 resting orders of --profile full (a full collection stalled the loop ~0.4 s)


@dataclass
class SimConfig:
    data_dir: str
    info_host: str = "127.0.0.1"
    info_port: int | None = 3001  # None: no info server; 0: any free port
    blocks_per_sec: float = 15.0
    coins: int = 50
    mode: str = "by-block"  # by-block, streaming or both
    seed: int = 0
    blocks: int | None = None  # stop after this many blocks; None: forever
    start_height: int | None = None  # None: after the last block already in data_dir, else 1_000_000
    start_time: datetime | None = None  # block time of start_height, then a fixed schedule; None: from the clock
    volume: float = 1.0
    partial_write_p: float = 0.01
    profile: str = "default"  # engine.PROFILES: "full" is every market of mainnet (coins ignored)
    depth: int | None = None  # resting orders of the most active coin at start (default: the profile's)
    log_level: str = "INFO"


class NodeSim:
    """Simulator + writer + info server. ``run()`` blocks; ``start()``/``stop()`` run it in a thread (tests)."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.start_height = resolve_start_height(cfg)
        self.sim = Simulator(seed=cfg.seed, coins=cfg.coins, start_height=self.start_height,
                             start_time=cfg.start_time, blocks_per_sec=cfg.blocks_per_sec, volume=cfg.volume,
                             profile=cfg.profile, depth=cfg.depth)
        Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
        spread = min(0.035, 0.5 / cfg.blocks_per_sec)
        self.writer = NodeWriter(cfg.data_dir, parse_modes(cfg.mode), cfg.partial_write_p, cfg.seed,
                                 pause=time.sleep, stream_spread=spread, clock=time.time_ns)
        self._age = random.Random(f"age-{cfg.seed}")
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.server: InfoServer | None = None
        if cfg.info_port is not None:
            self.server = InfoServer(cfg.info_host, cfg.info_port, self.sim.capture, self.lock, self.sim)
        self._thread: threading.Thread | None = None

    @property
    def info_url(self) -> str | None:
        return f"http://{self.cfg.info_host}:{self.server.port}/info" if self.server else None

    @property
    def height(self) -> int:
        """Last block fully written (start_height - 1 before the first)."""
        with self.lock:
            return self.sim.height

    def run(self) -> None:
        """Serve info and produce blocks until ``blocks`` are written or ``stop()``."""
        if self.server:
            self.server.start()
            log.info("info server on %s", self.info_url)
        log.info("writing %s blocks from height %d at %.1f blocks/s (%d coins, %d resting orders, mode %s) into %s; "
                 "block times %s", self.cfg.blocks if self.cfg.blocks is not None else "unlimited", self.start_height,
                 self.cfg.blocks_per_sec, len(self.sim.coins), self.sim.resting_count(), self.cfg.mode,
                 self.cfg.data_dir, "from the clock" if self.cfg.start_time is None else
                 f"on a schedule from {self.cfg.start_time.isoformat()}")
        try:
            self._loop()
        finally:
            self.writer.close()
            if self.server:
                self.server.stop()

    def _loop(self) -> None:
        pacer = Pacer(self.cfg.blocks_per_sec)
        written = 0
        while not self.stop_event.is_set() and (self.cfg.blocks is None or written < self.cfg.blocks):
            if written % FREEZE_EVERY == 0:
                gc.freeze()
            with self.lock:
                self.writer.write_block(self.sim.step(self._block_time()))
            written += 1
            if written % 1000 == 0:
                log.info("height %d, %d resting orders, %s", self.sim.height, self.sim.resting_count(), pacer.summary(1000))
            pacer.wait(self.stop_event, self.sim.height)

    def _block_time(self) -> int | None:
        """A live block's time (the clock less the node's latency); None: the schedule from ``start_time``."""
        if self.cfg.start_time is not None:
            return None
        return time.time_ns() - BLOCK_AGE_NS - int(self._age.random() * AGE_JITTER_NS)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="nodesim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


class Pacer:
    """Keeps a block loop at ``rate`` blocks a second and says in the log when it falls behind:
    a block started ``LATE_S`` (or three intervals) late is logged (at most every ``WARN_EVERY_S``),
    and from ``RESYNC_S`` late the schedule restarts from now instead of bursting to catch up."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / rate
        self.clock = clock
        self.deadline = clock()
        self.late_after = max(LATE_S, 3 * self.interval)
        self.behind = 0  # blocks that started late since the last warning
        self.worst = 0.0
        self._warned = -WARN_EVERY_S
        self._mark = (self.deadline, time.process_time())  # (wall, cpu) at the last summary

    def wait(self, stop: threading.Event, height: int) -> None:
        """Sleep until the next block is due (or ``stop``)."""
        self.deadline += self.interval
        now = self.clock()
        delay = self.deadline - now
        if delay > 0:
            stop.wait(delay)
            return
        if -delay >= self.late_after:
            self.behind += 1
            self.worst = max(self.worst, -delay)
            if now - self._warned >= WARN_EVERY_S:
                self._warned = now
                log.warning("behind schedule at height %d: the next block starts %.2f s late (%d blocks late by "
                            "%.2f s or more since the last warning, worst %.2f s); target %.1f blocks/s", height, -delay,
                            self.behind, self.late_after, self.worst, 1 / self.interval)
                self.behind, self.worst = 0, 0.0
        if -delay >= RESYNC_S:
            self.deadline = now

    def summary(self, blocks: int) -> str:
        """Blocks a second and CPU a block (the process's) over the last ``blocks``, since the last summary."""
        wall, cpu = self.clock(), time.process_time()
        (wall0, cpu0), self._mark = self._mark, (wall, cpu)
        return (f"{blocks / max(wall - wall0, 1e-9):.1f} blocks/s and {(cpu - cpu0) / blocks * 1000:.1f} ms CPU a block "
                f"over the last {blocks}")


def resolve_start_height(cfg: SimConfig) -> int:
    """``cfg.start_height``, or the block after the last one found in ``data_dir`` (a restart
    continues the chain instead of writing heights backwards), or the default."""
    if cfg.start_height is not None:
        return cfg.start_height
    last = last_height(cfg.data_dir)
    if last is not None:
        log.info("found blocks up to %d in %s: continuing at %d with a fresh state", last, cfg.data_dir, last + 1)
        return last + 1
    return DEFAULT_START_HEIGHT


def run(cfg: SimConfig) -> None:
    """Run the simulator until SIGTERM/SIGINT (or ``cfg.blocks``)."""
    logs.setup("sim", cfg.log_level)
    try:
        node = NodeSim(cfg)
    except OSError as exc:  # info port taken, data dir not writable
        log.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    stop_on_signals(node.stop_event.set)
    node.run()
    log.info("stopped at height %d", node.sim.height)

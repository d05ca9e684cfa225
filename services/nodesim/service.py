"""The simulator process: block loop (generate, write, pace) plus the info server."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hlbook.common import logs
from hlbook.common.signals import stop_on_signals
from hlbook.services.nodesim.engine import DEFAULT_START_HEIGHT, Simulator
from hlbook.services.nodesim.info_server import InfoServer
from hlbook.services.nodesim.writer import NodeWriter, last_height, parse_modes

log = logging.getLogger(__name__)


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
    start_time: datetime | None = None  # block time of start_height; default: now
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
                                 pause=time.sleep, stream_spread=spread)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.server: InfoServer | None = None
        if cfg.info_port is not None:
            self.server = InfoServer(cfg.info_host, cfg.info_port, self.sim.snapshot, self.lock)
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
        log.info("writing %s blocks from height %d at %.1f blocks/s (%d coins, mode %s) into %s",
                 self.cfg.blocks if self.cfg.blocks is not None else "unlimited", self.start_height,
                 self.cfg.blocks_per_sec, len(self.sim.coins), self.cfg.mode, self.cfg.data_dir)
        try:
            self._loop()
        finally:
            self.writer.close()
            if self.server:
                self.server.stop()

    def _loop(self) -> None:
        interval = 1.0 / self.cfg.blocks_per_sec
        deadline = time.monotonic()
        written = 0
        while not self.stop_event.is_set() and (self.cfg.blocks is None or written < self.cfg.blocks):
            with self.lock:
                self.writer.write_block(self.sim.step())
            written += 1
            if written % 1000 == 0:
                log.info("height %d, %d resting orders", self.sim.height, self.sim.resting_count())
            deadline += interval
            delay = deadline - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            elif delay < -1.0:  # far behind: do not burst to catch up
                deadline = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="nodesim", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


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

"""A replay: ingest over the node's files from the checkpoints' height, one shard per checkpoint,
a gateway; supervised as `hlbook up` supervises its children, on ZeroMQ ``ipc://`` sockets in
a private temporary folder (removed at exit): nothing of a live instance is touched.

Ingest publishes nothing until a hold file exists: the shards load their checkpoints, the
gateway becomes ready and (``--wait-clients``) the clients subscribe first; then the blocks go
out with their own times, paced (``--speed``) or as fast as the slowest reader takes them.
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hlbook.common import logs
from hlbook.common.config import ipc_endpoint
from hlbook.services.replay.plan import Point, Start
from hlbook.services.supervisor.pipeline import _metrics, _ready, owned_tmpdir, sweep_dead_owners
from hlbook.services.supervisor.supervisor import ChildSpec, Output, Supervisor

log = logging.getLogger(__name__)

GRACE_S = 0.5  # after the clients subscribed: their subscriptions reach the shards before the first block


@dataclass
class Replay:
    data_dir: str
    mode: str
    start: Start
    to: Point
    speed: float  # 0: as fast as read
    coins: list[str]
    host: str
    port: int
    wait_clients: int  # subscriptions to wait for before the first block
    log_level: str
    pace_from: Point | None = None  # blocks before it go out unpaced (from the checkpoint to --from)
    history_hours: float = 1.0  # node files before the start the history service backfills (0: no history service)
    metrics_port: int = 0  # the replay's ingest metrics (blocks, the replay clock); 0: a free port

    def specs(self, sockets: str, hold: str, metrics_port: int) -> list[ChildSpec]:
        common = ["--log-level", self.log_level]
        pub, replay = ipc_endpoint(sockets, "ingest-pub"), ipc_endpoint(sockets, "ingest-replay")
        until = ["--until-height", str(self.to.height)] if self.to.height is not None else ["--until-time", str(self.to.time_ms)]
        pace = []
        if self.pace_from is not None:
            pace = (["--pace-from-height", str(self.pace_from.height)] if self.pace_from.height is not None
                    else ["--pace-from-time", str(self.pace_from.time_ms)])
        specs = [ChildSpec("ingest", ["ingest", "--data-dir", self.data_dir, "--mode", self.mode, "--state-dir", "",
                                      "--from-height", str(self.start.height + 1), *until, "--speed", str(self.speed), *pace,
                                      "--hold-file", hold, "--pub", pub, "--replay", replay,
                                      # the files are whole: a block waits for every stream (a time-out would close
                                      # blocks without the lines a stream had not read yet while sends waited)
                                      "--block-timeout", "1e9",
                                      "--metrics-port", str(metrics_port), *common])]
        books: list[str] = []
        coins = [arg for coin in self.coins for arg in ("--coins", coin)]
        lossless = ["--lossless"] if self.speed == 0 else []  # as fast as read: nothing dropped anywhere
        for k, path in enumerate(self.start.files):
            book_pub, query = ipc_endpoint(sockets, f"book-{k}-pub"), ipc_endpoint(sockets, f"book-{k}-query")
            books += ["--book-pub", book_pub, "--book-query", query]
            specs.append(ChildSpec(f"book-{k}", ["book", "--shard", str(k), "--shards", str(self.start.shards),
                                                 "--snapshot-file", str(path), "--checkpoint-every", "0", *coins, *lossless,
                                                 "--ingest-pub", pub, "--ingest-replay", replay,
                                                 "--pub", book_pub, "--query", query, *common]))
        history: list[str] = []
        if self.history_hours > 0:  # answers as of the replay clock: the files before the start, then the replay's blocks
            history = ["--history-pub", ipc_endpoint(sockets, "history-pub"), "--history-query", ipc_endpoint(sockets, "history-query")]
            specs.append(ChildSpec("history", ["history", "--data-dir", self.data_dir, "--mode", self.mode,
                                               "--db", str(Path(sockets, "history.sqlite")), "--history-hours", str(self.history_hours),
                                               "--until-height", str(self.start.height), "--until-time", str(min(self.start.times)),
                                               "--ingest-pub", pub, "--pub", history[1], "--query", history[3], *common],
                                   optional=True))
        specs.append(ChildSpec("gateway", ["gateway", "--host", self.host, "--port", str(self.port),
                                           "--shards", str(self.start.shards), "--ingest-pub", pub, "--ingest-replay", replay, *history,
                                           "--stale-after", "1e9", *lossless, *books, *common]))
        return specs


class Progress:
    """The terminal line: blocks published, the replay clock, blocks/s; releases the hold when due."""

    def __init__(self, replay: Replay, hold: Path, metrics_port: int) -> None:
        self.replay, self.hold, self.metrics_port = replay, hold, metrics_port
        self.base = f"http://{replay.host}:{replay.port}"
        self.released_at: float | None = None
        self.done_said = False

    def tick(self) -> None:
        if self.released_at is None:
            self.release_when_ready()
            return
        ingest = _metrics(f"http://127.0.0.1:{self.metrics_port}/metrics")
        head = ingest.get("hlbook_ingest_head_height", 0.0)
        if not head:
            return
        blocks = head - self.replay.start.height
        now = time.monotonic()
        seconds = max(now - self.released_at, 1e-9)
        replay_clock = ingest.get("hlbook_ingest_head_time_seconds", 0.0)
        if not replay_clock:  # the height is set a moment before the time
            return
        ratio = (replay_clock - min(self.replay.start.times) / 1000) / seconds  # block time gone by since the start
        clock = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(replay_clock))
        line = (f"replay: block {head:.0f} | clock {clock} UTC | {blocks:.0f} blocks, {blocks / seconds:.1f} blocks/s"
                f" | {ratio:.2f}x real time")
        end = ingest.get("hlbook_ingest_replay_end_height")
        if end and head >= end and not self.done_said:
            self.done_said = True
            print(f"\n{line} | reached --to; serving until stopped (Ctrl-C)", file=sys.stderr, flush=True)
        elif not self.done_said:
            print(f"\r{line}   " if sys.stderr.isatty() else line, end="" if sys.stderr.isatty() else "\n",
                  file=sys.stderr, flush=True)

    def release_when_ready(self) -> None:
        if not _ready(self.base):
            return
        gateway = _metrics(f"{self.base}/metrics")
        subscribed = sum(v for k, v in gateway.items() if k.startswith("hlbook_gateway_subscriptions{"))
        if subscribed < self.replay.wait_clients:
            return
        if self.replay.wait_clients:
            time.sleep(GRACE_S)
        self.hold.touch()
        self.released_at = time.monotonic()
        print(f"hlbook replay: started ({gateway.get('hlbook_gateway_connections', 0):.0f} clients): "
              f"WebSocket ws://{self.replay.host}:{self.replay.port}/ws", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(replay: Replay) -> None:
    output = sys.stderr = Output(sys.stderr)
    try:
        logs.setup("replay", replay.log_level)
        sweep_dead_owners()
        sockets = owned_tmpdir("hlbook-zmq-")
        scratch = owned_tmpdir("hlbook-tmp-")
        hold = Path(sockets, "go")
        metrics_port = replay.metrics_port or free_port()
        print(f"hlbook replay: blocks {replay.start.height + 1}.. from checkpoints {', '.join(p.name for p in replay.start.files)}"
              f" at {'as fast as read' if replay.speed == 0 else f'{replay.speed:g}x real time'}; metrics: "
              f"http://127.0.0.1:{metrics_port}/metrics (ingest: blocks, the replay clock) and the gateway's /metrics",
              file=sys.stderr, flush=True)
        progress = Progress(replay, hold, metrics_port)
        try:
            Supervisor(replay.specs(sockets, str(hold), metrics_port), env={"TMPDIR": scratch}).run(on_tick=progress.tick,
                                                                                                   tick_s=0.2)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(sockets, ignore_errors=True)
        log.info("stopped")
    finally:
        output.drain()
        sys.stderr = output.stream

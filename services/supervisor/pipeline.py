"""The children of `hlbook up` and its one-line status."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hlbook.common import config, logs
from hlbook.common.config import ipc_endpoint
from hlbook.common.private import pid_alive
from hlbook.services.supervisor.supervisor import ChildSpec, Output, Supervisor

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    simulate: bool
    data_dir: str | None
    info_url: str | None
    snapshot_file: str | None
    mode: str
    shards: int
    gateways: int
    host: str
    port: int
    info_port: int
    blocks_per_sec: float | None  # None: the simulator profile's
    coins: int
    seed: int
    metrics_base_port: int
    log_level: str
    sockets: str | None = None  # directory of the ipc:// endpoints; None: a temporary one
    state_dir: str = ""  # ingest's position; "" with the simulator's temporary data: kept in it
    curve_dir: str | None = None  # ZeroMQ CURVE keys for every socket
    profile: str = "default"  # the simulator's
    history: bool = True  # run the history service (gateways then answer history requests and candles)
    history_days: float = 7.0
    history_hours: float | None = None  # backfill window (None: every file within history_days)
    checkpoint_every: float = 10.0  # minutes between the shards' L4 checkpoints (0: off)

    def specs(self, data_dir: str, sockets: str) -> list[ChildSpec]:
        """The children; ZeroMQ runs over ``ipc://`` endpoints in the directory ``sockets``."""
        common = ["--log-level", self.log_level]
        curve = ["--curve-dir", self.curve_dir] if self.curve_dir else []
        specs = []
        info_url = self.info_url
        if self.simulate:
            specs.append(ChildSpec("sim", ["sim", "--data-dir", data_dir, "--info-port", str(self.info_port),
                                           *(["--blocks-per-sec", str(self.blocks_per_sec)] if self.blocks_per_sec else []),
                                           "--coins", str(self.coins), "--profile", self.profile,
                                           "--mode", self.mode, "--seed", str(self.seed), *common]))
            info_url = info_url or f"http://127.0.0.1:{self.info_port}/info"
        ingest = ["--ingest-pub", ipc_endpoint(sockets, "ingest-pub"), "--ingest-replay", ipc_endpoint(sockets, "ingest-replay")]
        state_dir = self.state_dir if self.data_dir else os.path.join(data_dir, "state")
        specs.append(ChildSpec("ingest", ["ingest", "--data-dir", data_dir, "--mode", self.mode, "--state-dir", state_dir,
                                          "--pub", ingest[1], "--replay", ingest[3],
                                          "--metrics-port", str(self.metrics_port(-1)), *curve, *common]))
        history: list[str] = []
        if self.history:
            history = ["--history-pub", ipc_endpoint(sockets, "history-pub"), "--history-query", ipc_endpoint(sockets, "history-query")]
            hours = ["--history-hours", str(self.history_hours)] if self.history_hours is not None else []
            specs.append(ChildSpec("history", ["history", "--data-dir", data_dir, "--mode", self.mode, "--state-dir", state_dir,
                                               "--history-days", str(self.history_days), *hours, "--ingest-pub", ingest[1],
                                               "--pub", history[1], "--query", history[3],
                                               "--metrics-port", str(self.metrics_base_port - 1 if self.metrics_base_port else 0),
                                               *curve, *common], optional=True))
        source = ["--info-url", info_url] if info_url else ["--snapshot-file", self.snapshot_file or ""]
        checkpoints = ["--checkpoint-every", str(self.checkpoint_every), "--history-days", str(self.history_days),
                       "--checkpoint-dir", str(config.state_file(state_dir, "checkpoints", data_dir, self.mode, ""))]
        books: list[str] = []
        for k in range(self.shards):
            pub, query = ipc_endpoint(sockets, f"book-{k}-pub"), ipc_endpoint(sockets, f"book-{k}-query")
            books += ["--book-pub", pub, "--book-query", query]
            specs.append(ChildSpec(f"book-{k}", ["book", "--shard", str(k), "--shards", str(self.shards), *source, *ingest,
                                                 *checkpoints, "--pub", pub, "--query", query,
                                                 "--metrics-port", str(self.metrics_port(k)), *curve, *common]))
        upstream = ["--info-upstream", info_url] if info_url else []  # what the gateways do not compute: the node's answers
        past = ["--checkpoint-dir", checkpoints[-1], "--data-dir", data_dir, "--mode", self.mode]  # point-in-time books
        for i in range(self.gateways):
            specs.append(ChildSpec(f"gateway-{i}", ["gateway", "--host", self.host, "--port", str(self.port + i),
                                                    "--shards", str(self.shards), *ingest, *books, *history, *upstream,
                                                    *past, *curve, *common]))
        return specs

    def metrics_port(self, shard: int) -> int:
        """Ingest: shard -1; book shard k: k (history: the base port - 1)."""
        return self.metrics_base_port + 1 + shard if self.metrics_base_port else 0


class Status:
    """One line: height, blocks/s, lag (block time to published; of which hlbook's own: from the
    node's write of the block to its books going out), gateway clients (from the services' metrics)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.last: tuple[float, float] | None = None

    def line(self) -> str:
        ingest = _metrics(f"http://127.0.0.1:{self.pipeline.metrics_port(-1)}/metrics")
        head = ingest.get("hlbook_ingest_head_height", 0.0)
        now = time.monotonic()
        rate = (head - self.last[1]) / (now - self.last[0]) if self.last and head else 0.0
        self.last = (now, head)
        clients = sum(
            _metrics(f"http://{self.pipeline.host}:{self.pipeline.port + i}/metrics").get("hlbook_gateway_connections", 0.0)
            for i in range(self.pipeline.gateways)
        )
        if ingest.get("hlbook_ingest_waiting_for_files"):
            return f"waiting for the node's files under {self.pipeline.data_dir}/hl/data/ (none yet: see ingest's error above)"
        lag, delay = ingest.get("hlbook_ingest_lag_seconds", 0.0), ingest.get("hlbook_ingest_books_delay_seconds", 0.0)
        return (f"height {head:.0f} | {rate:.1f} blocks/s | lag {lag * 1000:.0f} ms (hlbook's {delay * 1000:.0f})"
                f" | clients {clients:.0f}")


def _ready(base: str) -> bool:
    try:
        return urllib.request.urlopen(f"{base}/ready", timeout=0.5).status == 200
    except OSError:
        return False


def _metrics(url: str) -> dict[str, float]:
    """Samples of a Prometheus endpoint, keyed as written (``name`` or ``name{labels}``); empty
    when it does not answer."""
    try:
        text = urllib.request.urlopen(url, timeout=0.5).read().decode()
    except OSError:
        return {}
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


OWNED_PREFIXES = ("hlbook-sim-", "hlbook-zmq-", "hlbook-tmp-")  # the temporary folders `up` makes
OWNER_FILE = ".hlbook-owner"  # in each: the pid of the `up` that made it


def owned_tmpdir(prefix: str) -> str:
    """A new temporary folder, marked with our pid (a killed `up` cannot remove it: the next one does)."""
    path = tempfile.mkdtemp(prefix=prefix)
    Path(path, OWNER_FILE).write_text(str(os.getpid()))
    return path


def sweep_dead_owners() -> list[Path]:
    """Remove the temporary folders of ours whose `up` is gone (killed before it could)."""
    removed = []
    for path in Path(tempfile.gettempdir()).iterdir():
        if not path.name.startswith(OWNED_PREFIXES) or path.is_symlink() or not path.is_dir():
            continue
        try:
            if path.stat().st_uid != os.getuid() or pid_alive(int((path / OWNER_FILE).read_text())):
                continue
        except (OSError, ValueError):  # no owner file: not ours to judge
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d folder(s) left by an hlbook up that was killed: %s", len(removed), " ".join(map(str, removed)))
    return removed


def run(pipeline: Pipeline) -> None:
    output = sys.stderr = Output(sys.stderr)  # ours and the children's lines: a paused reader blocks none of them
    try:
        _run(pipeline)
    finally:
        output.drain()
        sys.stderr = output.stream


def _run(pipeline: Pipeline) -> None:
    logs.setup("up", pipeline.log_level)
    sweep_dead_owners()
    data_dir = pipeline.data_dir or owned_tmpdir("hlbook-sim-")
    sockets = pipeline.sockets or owned_tmpdir("hlbook-zmq-")
    os.makedirs(sockets, exist_ok=True)
    if pipeline.simulate:  # the simulator makes its folders once it runs; ingest, started beside it, refuses a missing one
        os.makedirs(data_dir, exist_ok=True)
    scratch = owned_tmpdir("hlbook-tmp-")  # the children's temporary files (shared snapshots, locks): ours alone, removed at the end
    supervisor = Supervisor(pipeline.specs(data_dir, sockets), env={"TMPDIR": scratch})
    status = Status(pipeline)
    base = f"http://{pipeline.host}:{pipeline.port}"
    urls = [f"ws://{pipeline.host}:{pipeline.port + i}/ws" for i in range(pipeline.gateways)]
    print(f"hlbook up: starting (node data {data_dir}); a 'ready' line follows when every gateway serves", file=sys.stderr, flush=True)
    ticks = 0
    ready = False

    def tick() -> None:
        nonlocal ticks, ready
        ticks += 1
        if not ready and all(_ready(f"http://{pipeline.host}:{pipeline.port + i}") for i in range(pipeline.gateways)):
            ready = True
            print(f"\nhlbook up: ready: WebSocket {', '.join(urls)}; POST {base}/info; web view {base}/; "
                  f"health {base}/ready", file=sys.stderr, flush=True)
        line = status.line()
        if sys.stderr.isatty():
            print(f"\r{line}   ", end="", file=sys.stderr, flush=True)
        elif ticks % 10 == 0:
            print(line, file=sys.stderr, flush=True)

    try:
        supervisor.run(on_tick=tick)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not pipeline.sockets:
            shutil.rmtree(sockets, ignore_errors=True)
        if not pipeline.data_dir:  # the simulator's files in a directory of our own making
            shutil.rmtree(data_dir, ignore_errors=True)
    log.info("stopped")

"""``hlbook ingest``."""

from __future__ import annotations

from typing import Annotated

import typer

from hlbook.common import config
from hlbook.common.config import env


def ingest(
    data_dir: Annotated[str, typer.Option(envvar=env("data-dir"), help="Node data directory (holds hl/data/)")],
    mode: Annotated[str, typer.Option(envvar=env("mode"), help="by-block or streaming")] = "by-block",
    from_height: Annotated[int | None, typer.Option(envvar=env("from-height"), help="Start at this block (found in the hourly files); default: after the last block published (--state-dir), else live at the end")] = None,
    state_dir: Annotated[str, typer.Option(envvar=env("state-dir"), help="Where ingest keeps its position, so a restart publishes every block written meanwhile ('' : start live at the end every time)")] = config.STATE_DIR,
    pub: Annotated[str, typer.Option(envvar=env("ingest-pub"), help="XPUB endpoint for blocks, trades, user events")] = config.INGEST_PUB,
    replay: Annotated[str, typer.Option(envvar=env("ingest-replay"), help="ROUTER endpoint serving replay")] = config.INGEST_REPLAY,
    replay_blocks: Annotated[int, typer.Option(envvar=env("replay-blocks"), help="Blocks kept for replay")] = config.REPLAY_BLOCKS,
    block_timeout: Annotated[float, typer.Option(envvar=env("block-timeout"), help="Streaming mode: seconds after which a block closes although a stream has not moved past it")] = 0.5,
    poll_interval: Annotated[float, typer.Option(envvar=env("poll-interval"), help="Seconds between file polls when idle, without --watch")] = 0.002,
    watch: Annotated[bool, typer.Option(envvar=env("watch"), show_default=False, help="Wake on writes to the node files (inotify; Linux; on by default); --no-watch polls every --poll-interval")] = True,
    curve_dir: Annotated[str | None, typer.Option(envvar=env("curve-dir"), help="ZeroMQ CURVE keys (hlbook keys DIR): authenticate and encrypt every socket")] = None,
    metrics_port: Annotated[int, typer.Option(envvar=env("ingest-metrics-port"), help="Prometheus port (0: off)")] = 0,
    metrics_host: Annotated[str, typer.Option(envvar=env("metrics-host"), help="Address for /metrics (0.0.0.0 to let Prometheus on other hosts scrape it)")] = config.DEFAULT_HOST,
    until_height: Annotated[int | None, typer.Option(hidden=True, help="Replay: the last block to publish")] = None,
    until_time: Annotated[int | None, typer.Option(hidden=True, help="Replay: publish no block whose time (ms) is later")] = None,
    speed: Annotated[float | None, typer.Option(hidden=True, help="Replay: block times x this in real time (0: as fast as subscribers read, nothing dropped)")] = None,
    pace_from_height: Annotated[int, typer.Option(hidden=True, help="Replay: blocks below this height go out unpaced")] = 0,
    pace_from_time: Annotated[int, typer.Option(hidden=True, help="Replay: blocks before this time (ms) go out unpaced")] = 0,
    hold_file: Annotated[str | None, typer.Option(hidden=True, help="Replay: publish nothing until this file exists")] = None,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """Tail the node's files, join the streams by block, publish over ZeroMQ."""
    from hlbook.services.ingest.service import IngestConfig, run

    run(
        IngestConfig(
            data_dir=data_dir,
            mode=mode,
            from_height=from_height,
            state_dir=state_dir or None,
            pub=pub,
            replay=replay,
            replay_blocks=replay_blocks,
            block_timeout=block_timeout,
            poll_interval=poll_interval,
            watch=watch,
            curve_dir=curve_dir,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            log_level=log_level,
            until_height=until_height,
            until_time=until_time,
            speed=speed,
            hold_file=hold_file,
            pace_from_height=pace_from_height,
            pace_from_time=pace_from_time,
        )
    )

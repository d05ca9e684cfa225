"""``hlbook history``."""

from __future__ import annotations

from typing import Annotated

import typer

from hlbook.common import config
from hlbook.common.config import env


def history(
    data_dir: Annotated[str, typer.Option(envvar=env("data-dir"), help="Node data directory (holds hl/data/): the backfill reads its hourly files")],
    mode: Annotated[str, typer.Option(envvar=env("mode"), help="by-block or streaming")] = "by-block",
    db: Annotated[str, typer.Option(envvar=env("history-db"), help="The SQLite file (default: history-<node key>.sqlite in --state-dir)")] = "",
    state_dir: Annotated[str, typer.Option(envvar=env("state-dir"), help="Where the store lives unless --db says")] = config.STATE_DIR,
    history_hours: Annotated[float | None, typer.Option(envvar=env("history-hours"), help="Backfill the node files of the last N hours (default: every file within --history-days)")] = None,
    history_days: Annotated[float, typer.Option(envvar=env("history-days"), help="Keep fills, trades and orders this many days (candles: the 5,000 newest of a series)")] = 7.0,
    ingest_pub: Annotated[str, typer.Option(envvar=env("ingest-pub"), help="Ingest's XPUB endpoint (live blocks)")] = config.INGEST_PUB,
    pub: Annotated[str, typer.Option(envvar=env("history-pub"), help="XPUB endpoint for candle updates")] = config.HISTORY_PUB,
    query: Annotated[str, typer.Option(envvar=env("history-query"), help="ROUTER endpoint for queries")] = config.HISTORY_QUERY,
    niceness: Annotated[int, typer.Option(envvar=env("niceness"), help="CPU priority below the live path (os.nice increment; 0: same)")] = 10,
    commit_every: Annotated[float, typer.Option(envvar=env("history-commit-every"), help="Seconds between commits: what a crash loses (read again from the node's files); shorter costs more CPU")] = 5.0,
    curve_dir: Annotated[str | None, typer.Option(envvar=env("curve-dir"), help="ZeroMQ CURVE keys (hlbook keys DIR): authenticate and encrypt every socket")] = None,
    metrics_port: Annotated[int, typer.Option(envvar=env("history-metrics-port"), help="Prometheus port (0: off)")] = 0,
    metrics_host: Annotated[str, typer.Option(envvar=env("metrics-host"), help="Address for /metrics")] = config.DEFAULT_HOST,
    until_height: Annotated[int | None, typer.Option(hidden=True, help="Replay: backfill no later block; now is the newest block's time")] = None,
    until_time: Annotated[int, typer.Option(hidden=True, help="Replay: the block time (ms) of --until-height")] = 0,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """Keep fills, trades, orders and candles of every user and coin, from the node's files and ingest's live blocks."""
    from hlbook.services.history.service import HistoryConfig, run

    run(HistoryConfig(data_dir=data_dir, mode=mode, db=db, state_dir=state_dir, hours=history_hours, days=history_days,
                      ingest_pub=ingest_pub, pub=pub, query=query, niceness=niceness, commit_every=commit_every, curve_dir=curve_dir,
                      metrics_port=metrics_port, metrics_host=metrics_host, log_level=log_level,
                      until=(until_height, until_time) if until_height is not None else None))

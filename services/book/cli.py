"""``hlbook book``."""

from __future__ import annotations

from typing import Annotated

import typer

from hlbook.common import config
from hlbook.common.config import env


def book(
    shard: Annotated[int, typer.Option(envvar=env("shard"), help="This shard's index K (owns the coins common.topics.shard_of places on K of N: the majors balanced by weight, the rest by crc32)")],
    shards: Annotated[int, typer.Option(envvar=env("shards"), help="Number of shards N")],
    info_url: Annotated[str | None, typer.Option(envvar=env("info-url"), help="Node info server (fileSnapshot) for init, resync and validation")] = None,
    snapshot_file: Annotated[str | None, typer.Option(envvar=env("snapshot-file"), help="Node fileSnapshot output to start from (no resync/validation without --info-url)")] = None,
    ingest_pub: Annotated[str, typer.Option(envvar=env("ingest-pub"), help="Ingest's XPUB endpoint")] = config.INGEST_PUB,
    ingest_replay: Annotated[str, typer.Option(envvar=env("ingest-replay"), help="Ingest's replay ROUTER endpoint")] = config.INGEST_REPLAY,
    pub: Annotated[str | None, typer.Option(envvar=env("book-pub"), help="XPUB endpoint to publish on (default tcp://127.0.0.1:5600+2K)")] = None,
    query: Annotated[str | None, typer.Option(envvar=env("book-query"), help="ROUTER endpoint for queries (default tcp://127.0.0.1:5601+2K)")] = None,
    validate_every: Annotated[float, typer.Option(envvar=env("validate-every"), help="Seconds between validations against a fresh node snapshot (0: off; needs --info-url)")] = 0.0,
    replay_timeout: Annotated[float, typer.Option(envvar=env("replay-timeout"), help="Seconds to wait for ingest's replay answer")] = 5.0,
    lossless: Annotated[bool, typer.Option("--lossless", show_default=False, help="Replays: never drop a message for a slow gateway (sends wait for it)")] = False,
    coins: Annotated[list[str] | None, typer.Option(help="Keep these coins alone (of those the shard owns)")] = None,
    checkpoint_every: Annotated[float, typer.Option(envvar=env("checkpoint-every"), help="Minutes between exact L4 checkpoints of the shard's books (0: off)")] = 10.0,
    checkpoint_dir: Annotated[str, typer.Option(envvar=env("checkpoint-dir"), help="Where checkpoints go (hlbook up: in --state-dir, per node data dir); --snapshot-file loads one")] = config.CHECKPOINT_DIR,
    history_days: Annotated[float, typer.Option(envvar=env("history-days"), help="Days checkpoints are kept (as the history)")] = 7.0,
    curve_dir: Annotated[str | None, typer.Option(envvar=env("curve-dir"), help="ZeroMQ CURVE keys (hlbook keys DIR): authenticate and encrypt every socket")] = None,
    metrics_port: Annotated[int, typer.Option(envvar=env("book-metrics-port"), help="Prometheus port (0: off)")] = 0,
    metrics_host: Annotated[str, typer.Option(envvar=env("metrics-host"), help="Address for /metrics (0.0.0.0 to let Prometheus on other hosts scrape it)")] = config.DEFAULT_HOST,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """Keep the L4 books of one shard's coins; publish L2/BBO/L4/mids; answer queries."""
    from hlbook.services.book import hooks
    from hlbook.services.book.shard import ShardConfig, run

    if not info_url and not snapshot_file:
        raise typer.BadParameter("one of --info-url or --snapshot-file is required")
    drop_every, test_hooks = hooks.ENABLED  # only `python -m hlbook.services.book.hooks` (tests) sets them
    pub_default, query_default = config.book_endpoints(shard)
    run(
        ShardConfig(
            shard=shard,
            shards=shards,
            info_url=info_url,
            snapshot_file=snapshot_file,
            ingest_pub=ingest_pub,
            ingest_replay=ingest_replay,
            pub=pub or pub_default,
            query=query or query_default,
            validate_every=validate_every,
            replay_timeout=replay_timeout,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            log_level=log_level,
            curve_dir=curve_dir,
            coins=frozenset(coins) if coins else None,
            lossless=lossless,
            checkpoint_dir=checkpoint_dir or None,
            checkpoint_every=checkpoint_every * 60,
            checkpoint_keep=history_days * 86400,
            test_drop_every=drop_every,
            test_hooks=test_hooks,
        )
    )

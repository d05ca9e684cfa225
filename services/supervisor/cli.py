"""``hlbook up``: the whole pipeline on one machine, supervised."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from hlbook.common import config
from hlbook.common.config import env


def up(
    simulate: Annotated[bool | None, typer.Option("--simulate/--no-simulate", envvar=env("simulate"), help="Run the node simulator (default when no --data-dir)")] = None,
    data_dir: Annotated[str | None, typer.Option(envvar=env("data-dir"), help="Node data directory (holds hl/data/)")] = None,
    info_url: Annotated[str | None, typer.Option(envvar=env("info-url"), help="Node info server, e.g. http://localhost:3001/info")] = None,
    snapshot_file: Annotated[str | None, typer.Option(envvar=env("snapshot-file"), help="Node fileSnapshot output to start the books from")] = None,
    mode: Annotated[str, typer.Option(envvar=env("mode"), help="by-block or streaming")] = "by-block",
    shards: Annotated[int, typer.Option(envvar=env("shards"), help="Book shards (0: one per core)")] = 0,
    gateways: Annotated[int, typer.Option(envvar=env("gateways"), help="Gateway processes, on --port, --port+1, …")] = 1,
    host: Annotated[str, typer.Option(envvar=env("host"), help="Gateway bind address")] = config.DEFAULT_HOST,
    port: Annotated[int, typer.Option(envvar=env("port"), help="First gateway port")] = 8000,
    info_port: Annotated[int, typer.Option(envvar=env("info-port"), help="Simulator info server port")] = 3001,
    blocks_per_sec: Annotated[float | None, typer.Option(envvar=env("blocks-per-sec"), help="Simulator block rate (default: the profile's)")] = None,
    coins: Annotated[int, typer.Option(envvar=env("coins"), help="Simulator coins (default profile)")] = 50,
    profile: Annotated[str, typer.Option(envvar=env("profile"), help="Simulator profile: default, or full (every market of mainnet; generating it takes more than a core)")] = "default",
    seed: Annotated[int, typer.Option(envvar=env("seed"), help="Simulator seed")] = 1,
    metrics_base_port: Annotated[int, typer.Option(envvar=env("metrics-base-port"), help="Prometheus ports: ingest on this one, shard k on +1+k, history on -1 (0: off)")] = 9100,
    sockets: Annotated[str | None, typer.Option(envvar=env("sockets"), help="Directory for the ZeroMQ ipc:// endpoints (default: a new temporary one)")] = None,
    curve_dir: Annotated[str | None, typer.Option(envvar=env("curve-dir"), help="ZeroMQ CURVE keys (hlbook keys DIR) for every socket (the default ipc:// endpoints are private to this host without them)")] = None,
    state_dir: Annotated[str, typer.Option(envvar=env("state-dir"), help="Where ingest keeps its position across restarts (with the simulator's temporary data: inside it)")] = config.STATE_DIR,
    history: Annotated[bool, typer.Option("--history/--no-history", envvar=env("history"), show_default=False, help="Run the history service (on by default; candles, userFills snapshots and history requests need it)")] = True,
    history_days: Annotated[float, typer.Option(envvar=env("history-days"), help="History kept (fills, trades, orders), in days")] = 7.0,
    history_hours: Annotated[float | None, typer.Option(envvar=env("history-hours"), help="Backfill history from the node files of the last N hours (default: all within --history-days)")] = None,
    checkpoint_every: Annotated[float, typer.Option(envvar=env("checkpoint-every"), help="Minutes between the shards' exact L4 checkpoints, kept --history-days in --state-dir (0: off; hlbook replay starts from them)")] = 10.0,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """Run sim (optional), ingest, N book shards and M gateways as supervised children."""
    from hlbook.services.supervisor import checks
    from hlbook.services.supervisor.pipeline import Pipeline, run
    from hlbook.services.supervisor.supervisor import ChildFailed

    if simulate is None:
        simulate = data_dir is None
    if not simulate and data_dir is None:
        _fail("--no-simulate needs --data-dir (the directory that holds the node's hl/data/)")
    pipeline = Pipeline(
        simulate=simulate,
        data_dir=data_dir,
        info_url=info_url,
        snapshot_file=snapshot_file,
        mode=mode,
        shards=shards or max(1, os.cpu_count() or 1),
        gateways=gateways,
        host=host,
        port=port,
        info_port=info_port,
        blocks_per_sec=blocks_per_sec,
        profile=profile,
        coins=coins,
        seed=seed,
        metrics_base_port=metrics_base_port,
        log_level=log_level,
        sockets=sockets,
        state_dir=state_dir,
        curve_dir=curve_dir,
        history=history,
        history_days=history_days,
        history_hours=history_hours,
        checkpoint_every=checkpoint_every,
    )
    found = checks.problems(pipeline)
    if found:
        _fail(*found)
    try:
        run(pipeline)
    except ChildFailed as exc:
        _fail(str(exc), code=1)


def _fail(*lines: str, code: int = 2) -> None:
    for line in lines:
        typer.echo(f"hlbook up: {line}", err=True)
    raise typer.Exit(code)

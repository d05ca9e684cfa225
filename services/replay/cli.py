"""``hlbook replay``."""

from __future__ import annotations

from typing import Annotated

import typer

from hlbook.common import config
from hlbook.common.config import env


def replay(
    from_: Annotated[str, typer.Option("--from", help="Where to start: a block height, or a UTC time (2026-05-05T17:39:13)")],
    to: Annotated[str, typer.Option(help="The last block: a height, or a UTC time (no block after it)")],
    data_dir: Annotated[str, typer.Option(envvar=env("data-dir"), help="Node data directory (holds hl/data/)")],
    speed: Annotated[float, typer.Option(help="Block times x this in real time (2: twice as fast)")] = 1.0,
    as_fast_as_read: Annotated[bool, typer.Option("--as-fast-as-read", show_default=False, help="No pacing: as fast as the slowest reader takes the blocks (ingest waits for it: nothing dropped)")] = False,
    coins: Annotated[list[str] | None, typer.Option(help="Replay these coins alone (repeat the option)")] = None,
    mode: Annotated[str, typer.Option(envvar=env("mode"), help="by-block or streaming")] = "by-block",
    state_dir: Annotated[str, typer.Option(envvar=env("state-dir"), help="The live instance's --state-dir (its checkpoints are read, nothing is written)")] = config.STATE_DIR,
    checkpoint_dir: Annotated[str | None, typer.Option(help="The checkpoints' folder (default: the one hlbook up uses in --state-dir for --data-dir and --mode)")] = None,
    host: Annotated[str, typer.Option(envvar=env("host"), help="Gateway bind address")] = config.DEFAULT_HOST,
    port: Annotated[int, typer.Option(help="The replay gateway's port")] = 8100,
    history_hours: Annotated[float, typer.Option(help="History service (userFills, candles, … as of the replay clock): the hours of node files before --from it reads first (0: none)")] = 1.0,
    wait_clients: Annotated[int, typer.Option(help="Start the blocks once the gateway has this many client subscriptions")] = 0,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port of the replay's ingest on 127.0.0.1: blocks, hlbook_ingest_head_time_seconds (the replay clock), hlbook_ingest_replay_end_height (0: a free port, printed)")] = 0,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """Serve a past span of the node's files through the gateway's API, from the L4 checkpoints."""
    from hlbook.services.replay.plan import ReplayError, check, choose, parse_point
    from hlbook.services.replay.service import Replay, run
    from hlbook.services.supervisor.supervisor import ChildFailed

    try:
        start_at, end = parse_point(from_), parse_point(to)
        folder = checkpoint_dir or str(config.state_file(state_dir, "checkpoints", data_dir, mode, ""))
        start = choose(folder, start_at)
        check(data_dir, mode, start, start_at, end)
    except ReplayError as exc:
        typer.echo(f"hlbook replay: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        run(Replay(data_dir=data_dir, mode=mode, start=start, to=end, speed=0.0 if as_fast_as_read else speed,
                   coins=coins or [], host=host, port=port, wait_clients=wait_clients, log_level=log_level, pace_from=start_at,
                   history_hours=history_hours, metrics_port=metrics_port))
    except ChildFailed as exc:
        typer.echo(f"hlbook replay: {exc}", err=True)
        raise typer.Exit(1) from None

"""``hlbook sim``."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated

import typer

from hlbook.common.config import env


def _start_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"not an ISO date-time: {text!r}", param_hint="--start-time") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def sim(
    data_dir: Annotated[str, typer.Option(envvar=env("data-dir"), help="Directory to write hl/data/ into")],
    info_port: Annotated[int, typer.Option(envvar=env("info-port"), help="Info server port (POST /info fileSnapshot); -1: off")] = 3001,
    info_host: Annotated[str, typer.Option(envvar=env("info-host"), help="Info server bind address")] = "127.0.0.1",
    blocks_per_sec: Annotated[float | None, typer.Option(envvar=env("blocks-per-sec"), help="Blocks per second (default: the profile's, 15 or 12)")] = None,
    coins: Annotated[int, typer.Option(envvar=env("coins"), help="Number of coins (perps and spot; the default profile)")] = 50,
    depth: Annotated[int | None, typer.Option(envvar=env("depth"), help="Resting orders of the most active coin at start, the others falling off with rank (default: the profile's; full: 50,000)")] = None,
    profile: Annotated[str, typer.Option(envvar=env("profile"), help="default (a few coins, light) or full (every market of mainnet: ~450 coins, ~620,000 resting orders, ~8,000 statuses a block)")] = "default",
    mode: Annotated[str, typer.Option(envvar=env("mode"), help="by-block, streaming or both")] = "by-block",
    seed: Annotated[int, typer.Option(envvar=env("seed"), help="RNG seed: same seed and start time, same blocks")] = 1,
    blocks: Annotated[int | None, typer.Option(envvar=env("blocks"), help="Stop after this many blocks (default: run forever)")] = None,
    start_height: Annotated[int | None, typer.Option(envvar=env("start-height"), help="Height of the first block (the initial state is start-height - 1); default: after the last block already in --data-dir, else 1000000")] = None,
    start_time: Annotated[str | None, typer.Option(envvar=env("start-time"), help="Block time of the first block, ISO 8601 (UTC if no offset), then a fixed schedule (reproducible blocks); default: each block's time from the clock when it is made")] = None,
    volume: Annotated[float, typer.Option(envvar=env("volume"), help="Scale of per-block activity (1.0: ~300 statuses, ~50 diffs, a few fills)")] = 1.0,
    partial_write_p: Annotated[float, typer.Option(envvar=env("partial-write-p"), help="Probability a line is written in two flushed parts")] = 0.01,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """Node simulator: write node-format files and serve fileSnapshot like a non-validating node."""
    from hlbook.services.nodesim.service import SimConfig, run
    from hlbook.services.nodesim.writer import parse_modes

    try:
        parse_modes(mode)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--mode") from None
    from hlbook.services.nodesim.engine import PROFILES

    if profile not in PROFILES:
        raise typer.BadParameter(f"one of {list(PROFILES)}", param_hint="--profile")
    blocks_per_sec = PROFILES[profile][1] if blocks_per_sec is None else blocks_per_sec
    if blocks_per_sec <= 0:
        raise typer.BadParameter("must be positive", param_hint="--blocks-per-sec")
    run(
        SimConfig(
            data_dir=data_dir,
            info_host=info_host,
            info_port=None if info_port < 0 else info_port,
            blocks_per_sec=blocks_per_sec,
            coins=coins,
            mode=mode,
            seed=seed,
            blocks=blocks,
            start_height=start_height,
            start_time=_start_time(start_time),
            volume=volume,
            partial_write_p=partial_write_p,
            profile=profile,
            depth=depth,
            log_level=log_level,
        )
    )

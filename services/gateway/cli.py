"""``hlbook gateway``."""

from __future__ import annotations

from typing import Annotated

import typer

from hlbook.common import config
from hlbook.common.config import env


def gateway(
    host: Annotated[str, typer.Option(envvar=env("host"), help="Address to serve on")] = config.DEFAULT_HOST,
    port: Annotated[int, typer.Option(envvar=env("port"), help="Port for /ws, /info, /health, /ready, /metrics")] = 8000,
    shards: Annotated[int, typer.Option(envvar=env("shards"), help="Number of book shards")] = 1,
    ingest_pub: Annotated[str, typer.Option(envvar=env("ingest-pub"), help="Ingest's XPUB endpoint (trades, per-user events)")] = config.INGEST_PUB,
    ingest_replay: Annotated[str, typer.Option(envvar=env("ingest-replay"), help="Ingest's replay ROUTER endpoint (recovers lost trades and per-user messages)")] = config.INGEST_REPLAY,
    book_pub: Annotated[list[str] | None, typer.Option(envvar=env("book-pub"), help="Shard XPUB endpoints in shard order (default tcp://127.0.0.1:5600+2K)")] = None,
    book_query: Annotated[list[str] | None, typer.Option(envvar=env("book-query"), help="Shard query endpoints in shard order (default tcp://127.0.0.1:5601+2K)")] = None,
    curve_dir: Annotated[str | None, typer.Option(envvar=env("curve-dir"), help="ZeroMQ CURVE keys (hlbook keys DIR): authenticate and encrypt every socket")] = None,
    token: Annotated[str | None, typer.Option(envvar=env("token"), help="Require this bearer token (Authorization header or ?token=)")] = None,
    max_connections_per_ip: Annotated[int, typer.Option(envvar=env("max-connections-per-ip"), help="TCP connections one address may hold (WebSocket and HTTP), counted from the accept; past it: 429")] = 100,
    header_timeout: Annotated[float, typer.Option(envvar=env("header-timeout"), help="Seconds a request's headers may take to arrive (slow senders are dropped)")] = 10.0,
    allowed_origins: Annotated[str, typer.Option(envvar=env("allowed-origins"), help="Comma-separated WebSocket Origin values accepted (browsers send one); empty: any")] = "",
    max_subscriptions: Annotated[int, typer.Option(envvar=env("max-subscriptions"), help="Per connection")] = 1000,
    max_messages_per_minute: Annotated[int, typer.Option(envvar=env("max-messages-per-minute"), help="Client messages per connection per minute")] = 2000,
    idle_timeout: Annotated[float, typer.Option(envvar=env("idle-timeout"), help="Close a connection silent for this many seconds")] = 60.0,
    max_frame_bytes: Annotated[int, typer.Option(envvar=env("max-frame-bytes"), help="Largest client frame accepted")] = 1 << 20,
    lossless: Annotated[bool, typer.Option("--lossless", show_default=False, help="Replays (hlbook replay --as-fast-as-read): nothing conflated, no client cut off; a client with --queue-size messages waiting holds back reading upstream")] = False,
    queue_size: Annotated[int, typer.Option(envvar=env("queue-size"), help="Trades/l4Book/reply messages queued per client before it is cut off (conflated feeds keep one each)")] = 4096,
    max_followed_users: Annotated[int, typer.Option(envvar=env("max-followed-users"), help="Users followed at once (per-user feeds)")] = 10_000,
    max_subscriptions_per_ip: Annotated[int, typer.Option(envvar=env("max-subscriptions-per-ip"), help="Subscriptions one address may hold across its connections")] = 5000,
    max_followed_users_per_ip: Annotated[int, typer.Option(envvar=env("max-followed-users-per-ip"), help="Users one address may follow across its connections")] = 1000,
    history_pub: Annotated[str | None, typer.Option(envvar=env("history-pub"), help="The history service's XPUB endpoint (candles); without it and --history-query: no candles or user history")] = None,
    history_query: Annotated[str | None, typer.Option(envvar=env("history-query"), help="The history service's query endpoint (fills, orders, trades, candles of the past)")] = None,
    stale_after: Annotated[float, typer.Option(envvar=env("stale-after"), help="/ready says stale (and ?fresh=1 answers 503) after this many seconds without a block, or this far behind the node's block time")] = 5.0,
    info_upstream: Annotated[str | None, typer.Option(envvar=env("info-upstream"), help="The node's info server (e.g. http://localhost:3001/info): info types hlbook does not compute are forwarded to it, and meta, spotMeta, perpDexs and the asset contexts come from it (the chain's asset ids); without it those are built from the books and the rest refused")] = None,
    info_upstream_timeout: Annotated[float, typer.Option(envvar=env("info-upstream-timeout"), help="Seconds a forwarded info request may take (then 504)")] = 5.0,
    info_upstream_concurrency: Annotated[int, typer.Option(envvar=env("info-upstream-concurrency"), help="Forwarded info requests in flight at once; past it: 503 at once, nothing queued")] = 64,
    info_upstream_max_bytes: Annotated[int, typer.Option(envvar=env("info-upstream-max-bytes"), help="Largest answer accepted from the info upstream (then 502)")] = 32 << 20,
    node_poll_interval: Annotated[float, typer.Option(envvar=env("node-poll-interval"), help="Seconds between two polls of the info upstream for one node-state subscription (clearinghouseState, spotState, ...)")] = 1.0,
    node_poll_max_keys: Annotated[int, typer.Option(envvar=env("node-poll-max-keys"), help="Distinct node-state subscriptions polled at once, gateway-wide")] = 1000,
    node_poll_max_per_connection: Annotated[int, typer.Option(envvar=env("node-poll-max-per-connection"), help="Node-state subscriptions one connection may hold")] = 20,
    node_poll_max_per_ip: Annotated[int, typer.Option(envvar=env("node-poll-max-per-ip"), help="Node-state subscriptions one address may hold across its connections")] = 100,
    per_message_deflate: Annotated[bool, typer.Option("--per-message-deflate", envvar=env("per-message-deflate"), show_default=False, help="Offer permessage-deflate compression (about 3x the CPU per frame: each client's stream is compressed separately)")] = False,
    checkpoint_dir: Annotated[str, typer.Option(envvar=env("checkpoint-dir"), help="The shards' L4 checkpoints (with --data-dir: l4Snapshot and l2Book with a time, rebuilt from them and the node's files)")] = config.CHECKPOINT_DIR,
    data_dir: Annotated[str | None, typer.Option(envvar=env("data-dir"), help="Node data directory (holds hl/data/), read for point-in-time books")] = None,
    mode: Annotated[str, typer.Option(envvar=env("mode"), help="The node files' layout: by-block or streaming")] = "by-block",
    past_workers: Annotated[int, typer.Option(envvar=env("past-workers"), help="Point-in-time books rebuilt at once (one process each); past it: 503 at once, nothing queued")] = 1,
    past_timeout: Annotated[float, typer.Option(envvar=env("past-timeout"), help="Seconds a point-in-time book may take to rebuild (then 504)")] = 30.0,
    past_max_span: Annotated[float, typer.Option(envvar=env("past-max-span"), help="Seconds of node files a point-in-time book may read past its checkpoint (further: refused)")] = 1800.0,
    log_level: Annotated[str, typer.Option(envvar=env("log-level"))] = "INFO",
) -> None:
    """Serve the public Hyperliquid WebSocket and /info protocol from the book shards."""
    from hlbook.services.gateway.service import run
    from hlbook.services.gateway.app import GatewayConfig

    cfg = GatewayConfig(
        shards=shards,
        ingest_pub=ingest_pub,
        ingest_replay=ingest_replay,
        book_pubs=list(book_pub or []),
        book_queries=list(book_query or []),
        token=token,
        curve_dir=curve_dir,
        max_connections_per_ip=max_connections_per_ip,
        header_timeout=header_timeout,
        allowed_origins=tuple(o.strip() for o in allowed_origins.split(",") if o.strip()),
        max_subscriptions=max_subscriptions,
        max_messages_per_minute=max_messages_per_minute,
        idle_timeout=idle_timeout,
        queue_size=queue_size,
        lossless=lossless,
        max_followed_users=max_followed_users,
        max_subscriptions_per_ip=max_subscriptions_per_ip,
        max_followed_users_per_ip=max_followed_users_per_ip,
        history_pub=history_pub,
        history_query=history_query,
        stale_after=stale_after,
        info_upstream=info_upstream or None,
        info_upstream_timeout=info_upstream_timeout,
        info_upstream_concurrency=info_upstream_concurrency,
        info_upstream_max_bytes=info_upstream_max_bytes,
        checkpoint_dir=checkpoint_dir or None,
        data_dir=data_dir or None,
        mode=mode,
        past_workers=past_workers,
        past_timeout=past_timeout,
        past_max_span=past_max_span,
        poll_interval=node_poll_interval,
        poll_max_keys=node_poll_max_keys,
        poll_max_per_connection=node_poll_max_per_connection,
        poll_max_per_ip=node_poll_max_per_ip,
    )
    if past_workers < 1 or past_timeout <= 0 or past_max_span <= 0:
        raise typer.BadParameter("--past-workers, --past-timeout and --past-max-span must be positive")
    if info_upstream_timeout <= 0 or info_upstream_concurrency < 1 or info_upstream_max_bytes < 1 or node_poll_interval <= 0 or node_poll_max_keys < 0 or node_poll_max_per_connection < 0 or node_poll_max_per_ip < 0:
        raise typer.BadParameter("--info-upstream-timeout, --info-upstream-concurrency, --info-upstream-max-bytes and --node-poll-interval must be positive, --node-poll-max-keys, --node-poll-max-per-connection and --node-poll-max-per-ip not negative")
    try:
        cfg.endpoints()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    run(cfg, host, port, max_frame_bytes, per_message_deflate, log_level)

"""Run one gateway process under uvicorn (uvloop when installed)."""

from __future__ import annotations

import importlib.util
import logging

import uvicorn

from hlbook.common import logs
from hlbook.services.gateway.app import GatewayConfig, create_app
from hlbook.services.gateway import guard
from hlbook.services.gateway.frames import FrameProtocol

log = logging.getLogger(__name__)


def run(cfg: GatewayConfig, host: str, port: int, max_frame_bytes: int, per_message_deflate: bool, log_level: str) -> None:
    logs.setup("gateway", log_level)
    log.info("gateway on %s:%d: %d shards, ingest %s", host, port, cfg.shards, cfg.ingest_pub)
    guard.limits = guard.Limits(cfg.max_connections_per_ip, cfg.header_timeout)
    uvicorn.run(
        create_app(cfg),
        host=host,
        port=port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http=guard.GuardedHttp,
        ws=FrameProtocol,
        ws_max_size=max_frame_bytes,
        ws_per_message_deflate=per_message_deflate,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )

"""Readiness that means something: a gateway started while the node is silent learns
the coins from the shards' heartbeats and takes clients; until then it answers 503 with
Retry-After (handshakes and /info alike); /ready tells a stalled node (200, stale) from a
shard that is gone (503)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import websockets
from websockets.exceptions import InvalidStatus

from conftest import metric
from pipeline import post_info
from scripted import COIN, scripted_gateway


def ready(port: int, query: str = "") -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready{query}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_silent_node_stalled_data_and_a_gone_shard(tmp_path: Path) -> None:
    with scripted_gateway(tmp_path, blocks=False) as (shard, port):
        # nothing from the shard yet: refused with 503 + Retry-After, not a 403 that reads like an auth failure
        async def refused() -> None:
            try:
                await websockets.connect(f"ws://127.0.0.1:{port}/ws")
            except InvalidStatus as exc:
                assert exc.response.status_code == 503 and exc.response.headers["Retry-After"] == "2"
            else:
                raise AssertionError("handshake accepted before the coins were known")

        asyncio.run(refused())
        status, _ = post_info(f"http://127.0.0.1:{port}", {"type": "meta"})
        assert status == 503  # not an empty universe (the SDK would fail on it)

        # the node is silent, the shard is up: its heartbeats make the gateway ready, stale
        shard.heartbeat(live=False)  # still initialising: not yet
        time.sleep(0.3)
        assert ready(port)[0] == 503
        for _ in range(3):
            shard.heartbeat()
            time.sleep(0.3)
        status, body = ready(port)
        assert status == 200 and body["ready"] and body["stale"] and body["block_age_s"] is None
        assert ready(port, "?fresh=1")[0] == 503

        async def served() -> None:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws") as ws:
                await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "l2Book", "coin": COIN}}))
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["channel"] == "subscriptionResponse"

        asyncio.run(served())
        assert post_info(f"http://127.0.0.1:{port}", {"type": "meta"})[0] == 200

        shard.block(time_ms=int(time.time() * 1000) - 60_000)  # blocks flow, but a minute behind the node
        time.sleep(0.2)
        status, body = ready(port, "?fresh=1")
        assert status == 503 and body["stale"] and body["block_age_s"] < 1 and 59 < body["lag_s"] < 62
        assert metric(port, "hlbook_gateway_lag_seconds") > 59
        shard.block(time_ms=int(time.time() * 1000) - 400)  # caught up (the node writes a block ~0.4 s after its time)
        time.sleep(0.2)
        status, body = ready(port, "?fresh=1")
        assert status == 200 and not body["stale"] and body["block_age_s"] < 1 and body["lag_s"] < 1

        time.sleep(5.5)  # no block and no heartbeat: the shard is gone
        status, body = ready(port)
        assert status == 503 and not body["ready"] and not body["shards"][0]["live"]

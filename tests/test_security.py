"""ZeroMQ CURVE: with --curve-dir the whole system runs authenticated and encrypted,
and a peer without an authorized key reads nothing and gets no replay."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import websockets
import zmq
import zmq.auth

from hlbook.common import topics, wire
from hlbook.common.security import Curve
from pipeline import running


def subscriber(ctx: zmq.Context, endpoint: str, keys: tuple[bytes, bytes] | None, server: bytes) -> zmq.Socket:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if keys is not None:
        sub.curve_publickey, sub.curve_secretkey = keys
        sub.curve_serverkey = server
    sub.connect(endpoint)
    sub.subscribe(topics.HEADER)
    return sub


def test_curve_everywhere(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    out = subprocess.run([sys.executable, "-m", "hlbook.cli", "keys", str(keys)], capture_output=True, text=True, check=True)
    assert "--curve-dir" in out.stdout
    assert oct((keys / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    curve = Curve(keys)
    zmq.auth.create_certificates(str(tmp_path), "stranger")  # a key pair nobody authorized
    stranger = zmq.auth.load_certificate(tmp_path / "stranger.key_secret")

    (tmp_path / "up").mkdir()
    with running(tmp_path / "up", shards=1, coins=5, extra=["--curve-dir", str(keys)]) as up:
        async def l2() -> None:  # the whole pipeline works through CURVE
            async with websockets.connect(up.ws) as ws:
                await ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "l2Book", "coin": "BTC"}}))
                while json.loads(await asyncio.wait_for(ws.recv(), 10))["channel"] != "l2Book":
                    pass

        asyncio.run(l2())
        ctx = zmq.Context()
        endpoint = f"ipc://{up.sockets}/ingest-pub"
        member = subscriber(ctx, endpoint, (curve.client_public, curve.client_secret), curve.server_public)
        outsiders = [subscriber(ctx, endpoint, None, curve.server_public),
                     subscriber(ctx, endpoint, stranger, curve.server_public)]
        assert member.poll(5000), "an authorized client gets the headers"
        time.sleep(1.0)
        assert not any(sub.poll(0) for sub in outsiders), "a peer without an authorized key read a message"

        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"ipc://{up.sockets}/ingest-replay")
        req.send(wire.encode(wire.ReplayRequest(0)))
        assert not req.poll(1500), "a replay was served to a peer without keys"
        ctx.destroy(linger=0)

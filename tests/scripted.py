"""A scripted book shard and a scripted ingest (their side of the wire, driven by the test)
and a real gateway on them: every ordering of upstream events can be reproduced deterministically;
and the base of scripted node info servers (``ScriptedInfo``)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import msgspec
import zmq

from conftest import free_port
from hlbook.common import topics, wire
from hlbook.common.models import BookDiff, DiffBody, NewDiff
from pipeline import stop_group, wait_ready

COIN = "BTC"
USER = "0x" + "ab" * 20


class JsonHandler(BaseHTTPRequestHandler):
    """A scripted info server's handler: ``_send`` an answer; nothing logged."""

    def _send(self, code: int, data: bytes, content_type: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class ScriptedInfo(ThreadingHTTPServer):
    """A node info server on a free port, answering with ``handler``; the requests it got in ``seen``."""

    daemon_threads = True

    def __init__(self, handler: type[JsonHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.seen: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/info"

    @contextlib.contextmanager
    def serving(self) -> Iterator[ScriptedInfo]:
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            self.server_close()


class ScriptedShard:
    """The shard side of the wire (XPUB + ROUTER on ipc); the test says what happens when."""

    def __init__(self, tmp: Path) -> None:
        self.ctx = zmq.Context()
        self.pub_ep, self.query_ep = f"ipc://{tmp}/shard-pub", f"ipc://{tmp}/shard-query"
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.bind(self.pub_ep)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(self.query_ep)
        self.prev = wire.PrevTracker()
        self.height = 100
        self.last_change: int | None = None

    def block(self, change: bool = False, time_ms: int | None = None) -> dict[str, Any] | None:
        """Finish the next block (its L4 update first when it changed the coin); the update's client JSON.
        ``time_ms``: its block time (default: height x 1000)."""
        self.height += 1
        updates = None
        if change:
            diff = BookDiff(USER, self.height, COIN, "B", "100.0", DiffBody(new=NewDiff("1.5")))
            message = wire.L4Updates(self.height, self.prev.next(topics.l4(COIN), self.height), self.height * 1000, COIN, [], [diff])
            self.xpub.send_multipart([topics.l4(COIN), wire.encode(message)])
            self.last_change = self.height
            updates = {"time": message.time, "height": self.height, "order_statuses": [], "book_diffs": [msgspec.to_builtins(diff)]}
        block = wire.ShardBlock(self.height, self.prev.next(topics.shard_block(0), self.height),
                                self.height * 1000 if time_ms is None else time_ms, 0, {COIN: "100.5"}, {COIN: "live"})
        self.xpub.send_multipart([topics.shard_block(0), wire.encode(block)])
        return updates

    def heartbeat(self, live: bool = True) -> None:
        """The shard's ``HB|0|`` (what it sends every second, blocks or not)."""
        phase = wire.CoinState.LIVE if live else wire.CoinState.INITIALISING
        status = wire.ShardStatus(0, phase, self.height, self.height * 1000, {COIN: "live"} if live else {})
        self.xpub.send_multipart([topics.heartbeat(0), wire.encode(status)])

    def lost_update(self) -> None:
        """An L4 update whose predecessor never reached the gateway (as when PUB drops at its HWM)."""
        self.height += 1
        self.prev.next(topics.l4(COIN), self.height)  # sent into the void
        self.height += 1
        message = wire.L4Updates(self.height, self.prev.next(topics.l4(COIN), self.height), self.height * 1000, COIN, [], [])
        self.xpub.send_multipart([topics.l4(COIN), wire.encode(message)])

    def sync(self) -> None:
        self.xpub.send_multipart([topics.l4(COIN), wire.encode(wire.L4Sync(self.height, self.prev.peek(topics.l4(COIN)), COIN))])

    def await_subscription(self, topic: bytes, timeout: float = 5.0) -> None:
        await_subscription(self.xpub, topic, timeout)

    def query(self, timeout: float = 5.0) -> tuple[list[bytes], wire.ShardQuery] | None:
        if not self.router.poll(int(timeout * 1000)):
            return None
        frames = self.router.recv_multipart()
        return frames[:-1], wire.decode(frames[-1], wire.ShardQuery)

    def answer_l4(self, envelope: list[bytes], height: int, levels: list[list[dict[str, Any]]]) -> None:
        body = json.dumps(levels, separators=(",", ":")).encode()
        header = wire.L4Snapshot(True, COIN, height, height * 1000, len(body))
        self.router.send_multipart([*envelope, wire.encode(header), body[:7], body[7:]])  # in two frames, as big ones come

    def close(self) -> None:
        self.ctx.destroy(linger=0)



def await_subscription(xpub: zmq.Socket, topic: bytes, timeout: float) -> None:
    """Read subscription events until ``topic``'s (the gateway's standing ones come first)."""
    deadline = time.monotonic() + timeout
    while True:
        assert xpub.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"{topic!r} never subscribed"
        if xpub.recv() == b"\x01" + topic:
            return


class ScriptedIngest:
    """Ingest's side of the wire: blocks' headers and trades on an XPUB, replays on a ROUTER."""

    def __init__(self, tmp: Path) -> None:
        self.ctx = zmq.Context()
        self.pub_ep, self.replay_ep = f"ipc://{tmp}/ingest-pub", f"ipc://{tmp}/ingest-replay"
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.bind(self.pub_ep)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(self.replay_ep)
        self.prev = wire.PrevTracker()

    def header(self, height: int, trade_coins: list[str]) -> None:
        header = wire.BlockHeader(height, self.prev.next(topics.HEADER, height), height * 1000, "", "", 0, len(trade_coins),
                                  [], trade_coins=trade_coins)
        self.xpub.send_multipart([topics.HEADER, wire.encode(header)])

    def end(self, height: int, trade_coins: list[str], dropped: list[wire.Dropped] | None = None) -> None:
        """The block's ``E|`` (streaming mode: it names the block's trades, sent before it; ``dropped``:
        node data ingest dropped)."""
        end = wire.BlockEnd(height, self.prev.next(topics.BLOCK_END, height), height * 1000, 0, [], trade_coins=trade_coins,
                            dropped=dropped or [])
        self.xpub.send_multipart([topics.BLOCK_END, wire.encode(end)])

    def trades(self, height: int, tid: int) -> tuple[bytes, bytes]:
        """The block's trades of COIN as sent (the caller sends them, or loses them)."""
        trade = wire.Trade(COIN, "B", "100.0", "0.5", "0x" + "0" * 64, height * 1000, tid, [USER, USER])
        message = wire.Trades(height, self.prev.next(topics.trades(COIN), height), height * 1000, COIN, [trade])
        return topics.trades(COIN), wire.encode(message)

    def await_subscription(self, topic: bytes, timeout: float = 10.0) -> None:
        await_subscription(self.xpub, topic, timeout)

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@contextlib.contextmanager
def scripted_gateway(tmp_path: Path, *flags: str, blocks: bool = True) -> Iterator[tuple[ScriptedShard, int]]:
    """A real gateway process on a scripted shard, ready (the shard has published blocks) or,
    with ``blocks=False``, only started (nothing published yet); (shard, port)."""
    shard = ScriptedShard(tmp_path)
    port = free_port()
    log = open(tmp_path / "gateway.log", "wb")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "hlbook.cli", "gateway", "--port", str(port), "--shards", "1",
         "--ingest-pub", f"ipc://{tmp_path}/no-ingest-pub", "--ingest-replay", f"ipc://{tmp_path}/no-ingest-replay",
         "--book-pub", shard.pub_ep, "--book-query", shard.query_ep, *flags],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        if blocks:
            for _ in range(300):  # blocks until the gateway has seen the shard
                shard.block()
                if _ready(port):
                    break
                time.sleep(0.05)
            wait_ready(f"http://127.0.0.1:{port}", gateway, 10)
        else:
            deadline = time.monotonic() + 30
            while _status(port, "/health") != 200:
                assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.05)
        yield shard, port
    finally:
        stop_group(gateway)
        shard.close()
        log.close()


def _ready(port: int) -> bool:
    return _status(port, "/ready") == 200


def _status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=0.5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0

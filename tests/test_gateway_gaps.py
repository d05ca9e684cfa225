"""A message lost on its way from ingest is known from the block that announced it, not
from its topic's next message: a real gateway on a scripted ingest (XPUB + replay ROUTER)
and a scripted shard; a real WebSocket client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import zmq

from hlbook.common import topics, wire
from scripted import COIN, USER, scripted_gateway
from test_gateway import connect, receive, send, sub


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

    def trades(self, height: int, tid: int) -> tuple[bytes, bytes]:
        """The block's trades of COIN as sent (the caller sends them, or loses them)."""
        trade = wire.Trade(COIN, "B", "100.0", "0.5", "0x" + "0" * 64, height * 1000, tid, [USER, USER])
        message = wire.Trades(height, self.prev.next(topics.trades(COIN), height), height * 1000, COIN, [trade])
        return topics.trades(COIN), wire.encode(message)

    def await_subscription(self, topic: bytes, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.xpub.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"{topic!r} never subscribed"
            if self.xpub.recv() == b"\x01" + topic:
                return

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def test_a_lost_trade_of_a_coin_that_never_trades_again_is_replayed(tmp_path: Path) -> None:
    ingest = ScriptedIngest(tmp_path)
    try:
        with scripted_gateway(tmp_path, "--ingest-pub", ingest.pub_ep, "--ingest-replay", ingest.replay_ep) as (shard, port):
            ingest.await_subscription(topics.HEADER)

            async def run() -> list[dict]:
                ws = await connect(f"ws://127.0.0.1:{port}/ws")
                await send(ws, sub("subscribe", {"type": "trades", "coin": COIN}))
                await receive(ws, "subscriptionResponse")
                ingest.header(201, [COIN])
                ingest.xpub.send_multipart(list(ingest.trades(201, 1)))  # arrives
                ingest.header(202, [COIN])
                lost = ingest.trades(202, 2)  # never arrives; the coin trades no more
                ingest.header(203, [])  # the next block: T|BTC| of 202 should have come by now
                assert ingest.router.poll(5000), "the gateway never asked for the lost trade"
                *envelope, body = ingest.router.recv_multipart()
                request = wire.decode(body, wire.ReplayRequest)
                assert request.from_height == 202 and request.prefixes == [topics.trades(COIN)]
                ingest.router.send_multipart([*envelope, wire.encode(wire.ReplayReply(True, 200, 203)), *lost])
                got = []
                while len(got) < 2:
                    got += (await receive(ws, "trades", timeout=5))["data"]
                await ws.close()
                return got

            got = asyncio.run(run())
            assert [t["tid"] for t in got] == [1, 2]  # the lost one, once, in order
    finally:
        ingest.close()

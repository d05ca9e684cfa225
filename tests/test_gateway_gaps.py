"""A message lost on its way from ingest is known from the block that announced it, not
from its topic's next message: a real gateway on a scripted ingest (XPUB + replay ROUTER)
and a scripted shard; a real WebSocket client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hlbook.common import topics, wire
from scripted import COIN, USER, ScriptedIngest, scripted_gateway
from test_gateway import connect, receive, send, sub


@pytest.mark.parametrize("mode", ["by-block", "streaming"])
def test_a_lost_trade_of_a_coin_that_never_trades_again_is_replayed(tmp_path: Path, mode: str) -> None:
    """Also when a block's trades come after the next block's header (streaming mode): named by
    its ``E|``, they are not taken for lost before that."""
    ingest = ScriptedIngest(tmp_path)
    try:
        with scripted_gateway(tmp_path, "--ingest-pub", ingest.pub_ep, "--ingest-replay", ingest.replay_ep) as (shard, port):
            ingest.await_subscription(topics.HEADER)

            async def run() -> list[dict]:
                ws = await connect(f"ws://127.0.0.1:{port}/ws")
                await send(ws, sub("subscribe", {"type": "trades", "coin": COIN}))
                await receive(ws, "subscriptionResponse")
                if mode == "by-block":
                    ingest.header(201, [COIN])
                    ingest.xpub.send_multipart(list(ingest.trades(201, 1)))  # arrives
                    ingest.header(202, [COIN])
                    lost = ingest.trades(202, 2)  # never arrives; the coin trades no more
                    ingest.header(203, [])  # the next block: T|BTC| of 202 should have come by now
                else:
                    ingest.header(201, [])
                    ingest.header(202, [])  # the next block's books before 201's trades
                    ingest.xpub.send_multipart(list(ingest.trades(201, 1)))  # arrives
                    ingest.end(201, [COIN])
                    ingest.header(203, [])
                    lost = ingest.trades(202, 2)  # never arrives; the coin trades no more
                    ingest.end(202, [COIN])
                    ingest.header(204, [])  # the next block: T|BTC| of 202 should have come by now
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


def test_dropped_node_data_and_an_unrecoverable_trade_are_told_to_the_feeds_they_concern(tmp_path: Path) -> None:
    """An ``E|`` naming dropped node data: each feed it concerns gets one ``error`` message (fills:
    trades by coin; statuses: orderUpdates by user; unknown coins or users: all of them), the
    others none. A trade a block announced that ingest's replay no longer holds: its
    subscribers are told it was lost, not left waiting."""
    ingest = ScriptedIngest(tmp_path)
    try:
        with scripted_gateway(tmp_path, "--ingest-pub", ingest.pub_ep, "--ingest-replay", ingest.replay_ep) as (shard, port):
            ingest.await_subscription(topics.HEADER)

            async def run() -> list[str]:
                ws = await connect(f"ws://127.0.0.1:{port}/ws")
                for subscription in ({"type": "trades", "coin": COIN}, {"type": "orderUpdates", "user": USER}):
                    await send(ws, sub("subscribe", subscription))
                    await receive(ws, "subscriptionResponse")
                said = []
                ingest.header(201, [])
                ingest.end(201, [], [wire.Dropped("fills", "event_time", 201, ["ETH"], [USER]),  # neither feed
                                     wire.Dropped("order_statuses", "malformed")])  # orderUpdates of every user
                said.append((await receive(ws, "error", timeout=5))["data"])
                ingest.header(202, [])
                ingest.end(202, [], [wire.Dropped("fills", "malformed", 202)])  # trades of every coin
                said.append((await receive(ws, "error", timeout=5))["data"])
                ingest.header(203, [COIN])
                ingest.trades(203, 1)  # never arrives
                ingest.header(204, [])
                assert ingest.router.poll(5000), "the gateway never asked for the lost trade"
                *envelope, body = ingest.router.recv_multipart()
                ingest.router.send_multipart([*envelope, wire.encode(wire.ReplayReply(True, 204, 204))])  # no longer held
                said.append((await receive(ws, "error", timeout=5))["data"])
                with pytest.raises(TimeoutError):
                    await receive(ws, "error", timeout=0.5)
                await ws.close()
                return said

            said = asyncio.run(run())
            assert said[0].startswith(f"orderUpdates {USER}: the node's order_statuses data of an unknown block was dropped (malformed)")
            assert said[1].startswith(f"trades {COIN}: the node's fills data of block 202 was dropped (malformed)")
            assert said[2].startswith(f"trades {COIN}: its message of block 203 was lost upstream"), said
    finally:
        ingest.close()

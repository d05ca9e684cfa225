"""``services/gateway/session.py``: what a session queues and sends (no sockets: its
``send`` is a list)."""

from __future__ import annotations

import asyncio

from hlbook.services.gateway.kinds import L2BookKey
from hlbook.services.gateway.session import Session


def session(sent: list[str], queue_size: int = 100) -> Session:
    async def send(text: str) -> None:
        sent.append(text)

    return Session("test", send, queue_size=queue_size, max_per_minute=2000)


def test_a_conflated_feed_keeps_its_latest_text_and_its_place() -> None:
    async def run() -> list[str]:
        sent: list[str] = []
        s = session(sent)
        writer = asyncio.create_task(s.writer())
        key = L2BookKey("BTC", None, None, 20)
        s.push("book 1", key)
        s.reply("ack")
        assert s.push("book 2", key) is True  # replaced, still ahead of the ack
        await asyncio.sleep(0.01)
        writer.cancel()
        return sent

    assert asyncio.run(run()) == ["book 2", "ack"]


def test_leaving_a_conflated_feed_drops_its_queued_text() -> None:
    """Unsubscribing while the feed's latest text waits: the rest is still sent (the key used
    to stay in the outbox without its text, and the next write failed and closed the client)."""
    async def run() -> tuple[list[str], str | None]:
        sent: list[str] = []
        s = session(sent)
        key = L2BookKey("BTC", None, None, 20)
        s.push("book", key)
        s.reply("ack of the unsubscribe")
        s.forget(key)
        writer = asyncio.create_task(s.writer())
        await asyncio.sleep(0.01)
        writer.cancel()
        return sent, s.closing

    assert asyncio.run(run()) == (["ack of the unsubscribe"], None)


def test_a_client_past_its_queue_is_cut_off_as_slow() -> None:
    async def run() -> tuple[str | None, int]:
        s = session([], queue_size=3)
        for i in range(5):
            s.reply(f"message {i}")
        return s.closing, len(s.outbox)

    assert asyncio.run(run()) == ("slow_client", 0)

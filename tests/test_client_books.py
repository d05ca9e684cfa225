"""Local books: L2BookView, L4Book state machine, gap repair over a real WebSocket."""

from __future__ import annotations

import asyncio
import random
from decimal import Decimal
from typing import Any

import pytest

from hlbook.client import BookDesync, HLClient, L2BookView, L4Book
from hlbook.client.books import canon
from hlbook.client.testing import FakeConnection, FakeServer
from test_client import FAST, run, until

USER = "0x" + "ab" * 20


class TruthBook:
    """A tiny reference book that produces node-style diffs and snapshots."""

    def __init__(self, coin: str, seed: int = 7, height: int = 100) -> None:
        self.coin = coin
        self.rng = random.Random(seed)
        self.height = height
        self.next_oid = 1
        self.orders: dict[int, dict[str, Any]] = {}  # insertion order = time priority
        for _ in range(30):
            self._new([])

    def _new(self, diffs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
        side = self.rng.choice("BA")
        px = Decimal(self.rng.randint(990, 1000) if side == "B" else self.rng.randint(1001, 1011)) / 10
        sz = Decimal(self.rng.randint(1, 5000)) / 1000
        oid = self.next_oid
        self.next_oid += 1
        order = {"coin": self.coin, "side": side, "limitPx": canon(px), "sz": canon(sz), "oid": oid, "timestamp": 1, "origSz": canon(sz), "cloid": None}
        self.orders[oid] = {"user": USER, **order}
        diffs.append({"user": USER, "oid": oid, "coin": self.coin, "side": side, "px": canon(px), "raw_book_diff": {"new": {"sz": canon(sz)}}})
        return order, {"time": 1, "user": USER, "hash": None, "builder": None, "status": "open", "order": order}

    def block(self) -> dict[str, Any]:
        """Advance one block; returns its Updates message data."""
        self.height += 1
        diffs: list[dict[str, Any]] = []
        statuses = []
        for _ in range(self.rng.randint(0, 4)):
            roll = self.rng.random()
            if roll < 0.4 or len(self.orders) < 5:
                statuses.append(self._new(diffs)[1])
            else:
                oid = self.rng.choice(list(self.orders))
                o = self.orders[oid]
                base = {"user": USER, "oid": oid, "coin": self.coin, "side": o["side"], "px": o["limitPx"]}
                if roll < 0.7:
                    new_sz = canon(Decimal(o["sz"]) / 2)
                    diffs.append({**base, "raw_book_diff": {"update": {"origSz": o["sz"], "newSz": new_sz}}})
                    o["sz"] = new_sz
                else:
                    diffs.append({**base, "raw_book_diff": "remove"})
                    del self.orders[oid]
        return {"Updates": {"time": self.height * 10, "height": self.height, "order_statuses": statuses, "book_diffs": diffs}}

    def snapshot(self) -> dict[str, Any]:
        def side(s: str) -> list[dict[str, Any]]:
            orders = [o for o in self.orders.values() if o["side"] == s]
            return sorted(orders, key=lambda o: -Decimal(o["limitPx"]) if s == "B" else Decimal(o["limitPx"]))  # stable: time priority

        return {"Snapshot": {"coin": self.coin, "time": self.height * 10, "height": self.height, "levels": [side("B"), side("A")]}}

    def fingerprint(self) -> tuple[list[tuple[int, str, str, str]], ...]:
        snap = self.snapshot()["Snapshot"]["levels"]
        return tuple([(o["oid"], o["user"], o["limitPx"], o["sz"]) for o in lv] for lv in snap)


def test_canonical_decimals() -> None:
    assert [canon(Decimal(x)) for x in ("81307", "81307.000", "0.00014", "1.50", "0", "1E+2")] == ["81307.0", "81307.0", "0.00014", "1.5", "0.0", "100.0"]


def test_l2_view_exact() -> None:
    view = L2BookView()
    view.apply({"channel": "l2Book", "data": {"coin": "BTC", "time": 5, "levels": [[{"px": "0.1", "sz": "1.10", "n": 2}], [{"px": "0.2", "sz": "3", "n": 1}]]}})
    assert view.mid == Decimal("0.15") and view.spread == Decimal("0.1")
    assert view.best_bid == (Decimal("0.1"), Decimal("1.1"), 2)
    table = view.render()
    assert "1.1" in table and "0.2" in table and "BTC" in table


def test_l4_applies_updates_and_matches_truth() -> None:
    truth = TruthBook("BTC")
    book = L4Book("BTC")
    book.apply(truth.snapshot())
    for _ in range(200):
        assert book.apply(truth.block())
    assert book.height == truth.height
    assert book.fingerprint() == truth.fingerprint()
    bids, asks = book.levels(3)
    assert bids[0][0] > bids[1][0] and asks[0][0] < asks[1][0]
    assert sum(n for _, _, n in book.levels()[0] + book.levels()[1]) == len(truth.orders)


def test_l4_detects_gap_unknown_oid_and_duplicate_new() -> None:
    truth = TruthBook("ETH")
    book = L4Book("ETH")
    assert not book.apply(truth.block())  # ignored before any snapshot
    book.apply(truth.snapshot())
    truth.block()  # lost
    with pytest.raises(BookDesync, match="height gap"):
        book.apply(truth.block())
    book.apply(truth.snapshot())
    bad = {"Updates": {"time": 1, "height": truth.height + 1, "order_statuses": [], "book_diffs": [{"user": USER, "oid": 999999, "coin": "ETH", "side": "B", "px": "1.0", "raw_book_diff": "remove"}]}}
    with pytest.raises(BookDesync, match="unknown oid"):
        book.apply(bad)
    book.apply(truth.snapshot())
    oid = next(iter(truth.orders))
    dup = {"Updates": {"time": 1, "height": truth.height + 1, "order_statuses": [], "book_diffs": [{"user": USER, "oid": oid, "coin": "ETH", "side": "B", "px": "1.0", "raw_book_diff": {"new": {"sz": "1.0"}}}]}}
    with pytest.raises(BookDesync, match="new for resting"):
        book.apply(dup)
    lax = L4Book("ETH", strict_heights=False)  # upstream order_book_server: only changed blocks
    lax.apply(truth.snapshot())
    assert lax.apply({"Updates": {"time": 1, "height": truth.height + 5, "order_statuses": [], "book_diffs": []}})
    assert not lax.apply({"Updates": {"time": 1, "height": truth.height + 5, "order_statuses": [], "book_diffs": []}})  # stale
    assert lax.height == truth.height + 5 and lax.fingerprint() == truth.fingerprint()


def test_l4_gap_over_websocket_is_repaired_by_a_fresh_snapshot() -> None:
    async def main() -> None:
        truth = TruthBook("BTC", seed=3)
        sub = {"type": "l4Book", "coin": "BTC"}
        snapshots = 0

        async def on_subscribe(conn: FakeConnection, s: dict[str, Any]) -> None:
            nonlocal snapshots
            if s["type"] == "l4Book":
                snapshots += 1
                await conn.send({"channel": "l4Book", "data": truth.snapshot()})

        server = await FakeServer(on_subscribe=on_subscribe).start()
        async with HLClient(server.url, **FAST) as client:
            book = L4Book("BTC")
            await book.subscribe(client)
            await until(lambda: book.synced, what="snapshot")
            for _ in range(20):
                await server.publish(sub, truth.block())
            await until(lambda: book.height == truth.height)
            assert book.fingerprint() == truth.fingerprint() and book.resyncs == 0
            truth.block()  # this block is lost on the way
            for _ in range(5):
                await server.publish(sub, truth.block())
                await asyncio.sleep(0.01)
            await until(lambda: book.resyncs == 1 and book.synced and snapshots == 2, what="repair")
            assert "height gap" in (book.last_desync or "")
            for _ in range(10):
                await server.publish(sub, truth.block())
            await until(lambda: book.height == truth.height, what="live again")
            assert book.fingerprint() == truth.fingerprint()
            assert client.get_subscription(book.sub_id)["state"] == "active"
        await server.stop()

    run(main())


def test_books_and_subscriptions_say_when_their_data_is_stale() -> None:
    """With the gateway stopped every sample read ``synced=True`` (the height frozen, the
    connection open), and after a kill too (the connection in backoff)."""
    async def main() -> None:
        truth = TruthBook("BTC", seed=5)
        sub = {"type": "l4Book", "coin": "BTC"}

        async def on_subscribe(conn: FakeConnection, s: dict[str, Any]) -> None:
            if s["type"] == "l4Book":
                await conn.send({"channel": "l4Book", "data": truth.snapshot()})

        server = await FakeServer(on_subscribe=on_subscribe).start()
        async with HLClient(server.url, **{**FAST, "pong_timeout": 30.0}) as client:
            book, view = L4Book("BTC", stale_after=0.3), L2BookView("BTC", stale_after=0.3)
            await book.subscribe(client)
            await view.subscribe(client)
            await until(lambda: book.synced, what="snapshot")
            await server.publish({"type": "l2Book", "coin": "BTC"}, l2_message())
            await until(lambda: view.synced, what="an l2Book")
            assert book.age is not None and book.age < 0.3
            server.silence_current()  # a stopped gateway: the socket open, nothing arrives
            await until(lambda: not book.synced and not view.synced, 2, "stale by age")
            assert client.connection_info()[0]["state"] == "open" and book.age >= 0.3
            assert client.subscription_metrics(book.sub_id)["last_message_age"] >= 0.3
            book.stale_after = view.stale_after = None  # by age never: only the connection counts now
            await server.stop(abort=True)
            await until(lambda: client.get_subscription(book.sub_id)["state"] == "pending", 2, "the drop noticed")
            assert not book.synced and not view.synced
            await server.start()
            await until(lambda: book.synced, 5, "a fresh snapshot after the reconnect")
        await server.stop()

    run(main())


def l2_message() -> dict[str, Any]:
    return {"coin": "BTC", "time": 1, "levels": [[{"px": "99.0", "sz": "1.0", "n": 1}], [{"px": "101.0", "sz": "1.0", "n": 1}]]}

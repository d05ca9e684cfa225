"""Connection strategies (shared, dedicated, user_grouped) and lookups, against FakeServer."""

from __future__ import annotations

from typing import Any

import pytest

from hlbook.client import HLClient, OrderTracker, TooManyConnections
from hlbook.client.testing import FakeServer
from test_client import FAST, run, until

ALICE = "0x" + "a1" * 20
BOB = "0x" + "b2" * 20
ALICE_CASED = "0x" + "A1" * 20  # the same user: addresses are case-insensitive


def test_each_strategy_places_subscriptions_as_it_says() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            trades = await client.subscribe({"type": "trades", "coin": "BTC"}, lambda m: None)
            mids = await client.subscribe({"type": "allMids"}, lambda m: None)
            book = await client.subscribe({"type": "l4Book", "coin": "BTC"}, lambda m: None, strategy="dedicated")
            heavy = await client.subscribe({"type": "l2Book", "coin": "ETH"}, lambda m: None, strategy="dedicated")
            alice = [await client.subscribe({"type": kind, "user": ALICE_CASED}, lambda m: None, strategy="user_grouped")
                     for kind in ("orderUpdates", "userFills", "userEvents")]
            bob = await client.subscribe({"type": "orderUpdates", "user": BOB}, lambda m: None, strategy="user_grouped")
            ids = [trades, mids, book, heavy, *alice, bob]
            for sid in ids:
                await client.wait_active(sid, 5)
            conn = {sid: client.get_subscription(sid)["connection"] for sid in ids}
            assert conn[trades] == conn[mids]
            assert len({conn[trades], conn[book], conn[heavy], conn[alice[0]], conn[bob]}) == 5
            assert conn[alice[0]] == conn[alice[1]] == conn[alice[2]]
            by_id = {c["id"]: c for c in client.connection_info()}
            assert (by_id[conn[alice[0]]]["strategy"], by_id[conn[alice[0]]]["user"]) == ("user_grouped", ALICE)
            assert by_id[conn[book]]["strategy"] == "dedicated" and by_id[conn[book]]["subscriptions"] == 1
            assert len(server.connections) == 5
            # nothing else joins a dedicated connection; emptied, it closes
            more = await client.subscribe({"type": "trades", "coin": "SOL"}, lambda m: None)
            assert client.get_subscription(more)["connection"] == conn[trades]
            await client.unsubscribe(book)
            assert conn[book] not in {c["id"] for c in client.connection_info()}
            await until(lambda: len(server.connections) == 4, what="the dedicated connection closed")
        await server.stop()

    run(main())


def test_user_grouped_feeds_arrive_in_their_order_on_one_connection() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        seen: list[tuple[str, int]] = []

        def record(message: dict[str, Any]) -> None:
            data = message["data"]
            seen.append((message["channel"], data[0]["order"]["oid"] if message["channel"] == "orderUpdates" else data["fills"][0]["oid"]))

        async with HLClient(server.url, **FAST) as client:
            ids = [await client.subscribe({"type": kind, "user": ALICE}, record, strategy="user_grouped") for kind in ("orderUpdates", "userFills")]
            for sid in ids:
                await client.wait_active(sid, 5)
            (conn,) = server.connections
            expected = []
            for oid in range(20):
                channel = "orderUpdates" if oid % 3 else "userFills"
                data = [{"order": {"oid": oid}, "status": "open", "statusTimestamp": 1}] if channel == "orderUpdates" else {"user": ALICE, "fills": [{"oid": oid}]}
                await conn.send({"channel": channel, "data": data})
                expected.append((channel, oid))
            await until(lambda: len(seen) == 20)
            assert seen == expected
        await server.stop()

    run(main())


def test_lookups_by_type_and_user_and_strategy_checks() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            a = await client.subscribe({"type": "userFills", "user": ALICE}, lambda m: None, strategy="user_grouped")
            b = await client.subscribe({"type": "orderUpdates", "user": ALICE}, lambda m: None, strategy="user_grouped")
            c = await client.subscribe({"type": "userFills", "user": BOB}, lambda m: None)
            d = await client.subscribe({"type": "trades", "coin": "BTC"}, lambda m: None)
            ids = lambda subs: sorted(s["id"] for s in subs)  # noqa: E731
            assert ids(client.list_subscriptions(user=ALICE_CASED)) == [a, b]
            assert ids(client.list_subscriptions(type="userFills")) == [a, c]
            assert ids(client.list_subscriptions(type="userFills", user=BOB)) == [c]
            assert ids(client.list_subscriptions()) == [a, b, c, d]
            assert client.get_subscription(a)["strategy"] == "user_grouped" and client.get_subscription(c)["strategy"] == "shared"
            # an identical subscription of another strategy lives where that strategy says
            e = await client.subscribe({"type": "trades", "coin": "BTC"}, lambda m: None, strategy="dedicated")
            assert client.get_subscription(e)["connection"] != client.get_subscription(d)["connection"]
            with pytest.raises(ValueError, match="needs a subscription with a user"):
                await client.subscribe({"type": "trades", "coin": "ETH"}, strategy="user_grouped")
            with pytest.raises(ValueError, match="strategy must be one of"):
                await client.subscribe({"type": "trades", "coin": "ETH"}, strategy="own")  # type: ignore[arg-type]
        await server.stop()

    run(main())


def test_an_identical_subscription_of_another_strategy_is_not_reused() -> None:
    """A tracker's userFills (user_grouped) reused an existing shared one: the user's two
    feeds ended up on two connections and their relative order no longer held."""
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            shared = await client.subscribe({"type": "userFills", "user": ALICE}, lambda m: None)
            grouped = [await client.subscribe({"type": kind, "user": ALICE}, lambda m: None, strategy="user_grouped")
                       for kind in ("orderUpdates", "userFills")]
            again = await client.subscribe({"type": "userFills", "user": ALICE}, lambda m: None)
            for sid in (shared, *grouped, again):
                await client.wait_active(sid, 5)
            conn = {sid: client.get_subscription(sid)["connection"] for sid in (shared, *grouped, again)}
            assert conn[grouped[0]] == conn[grouped[1]] != conn[shared] == conn[again]
            assert client.get_subscription(again)["shared_with"] == [shared]  # same strategy: shared
        await server.stop()

    run(main())


def test_info_goes_over_the_shared_connection_or_the_users_own() -> None:
    """``info()`` used any open connection: a dedicated l4Book's, or another user's group.
    Now the shared connection (opened if none) takes it, or with ``user`` that user's
    connection (an order tracker's loads: no extra connection)."""
    async def main() -> None:
        server = await FakeServer(on_info=lambda payload: []).start()
        async with HLClient(server.url, **FAST) as client:
            book = await client.subscribe({"type": "l4Book", "coin": "BTC"}, lambda m: None, strategy="dedicated")
            await client.wait_active(book, 5)
            bob = await client.subscribe({"type": "orderUpdates", "user": BOB}, lambda m: None, strategy="user_grouped")
            await client.wait_active(bob, 5)
            for _ in range(3):
                await client.info({"type": "openOrders", "user": ALICE})
            assert [c["strategy"] for c in client.connection_info()] == ["dedicated", "user_grouped", "shared"]
            assert [c.posts for c in server.connections] == [0, 0, 3]
            await client.info({"type": "openOrders", "user": BOB}, user=BOB.upper().replace("0X", "0x"))
            tracker = OrderTracker()
            await tracker.subscribe(client, ALICE)
            await tracker.wait_ready(5)
            assert tracker.load_error is None
            assert [c["strategy"] for c in client.connection_info()] == ["dedicated", "user_grouped", "shared", "user_grouped"]
            assert [c.posts for c in server.connections] == [0, 1, 3, 1]
            await client.info({"type": "meta"}, user="0x" + "c3" * 20)  # no connection of that user: the shared one
            assert [c.posts for c in server.connections] == [0, 1, 4, 1]
            await tracker.close()
        await server.stop()

    run(main())


def test_past_max_connections_users_share_connections_and_more_is_refused() -> None:
    """Following more users than ``max_connections`` allows: each new user's feeds join the
    user_grouped connection with the fewest users (one user's feeds still on one connection);
    a dedicated feed, a shared one with no room left, or an orderUpdates past the cap (its
    messages carry no user: one a connection) is refused at the call."""
    async def main() -> None:
        server = await FakeServer().start()
        users = [f"0x{n:040x}" for n in range(1, 6)]
        async with HLClient(server.url, **{**FAST, "max_connections": 3}) as client:
            trades = await client.subscribe({"type": "trades", "coin": "BTC"}, lambda m: None)
            ids = {u: [await client.subscribe({"type": kind, "user": u}, lambda m: None, strategy="user_grouped")
                       for kind in ("userFills", "userTwapSliceFills")] for u in users}
            for sid in [trades, *(s for pair in ids.values() for s in pair)]:
                await client.wait_active(sid, 5)
            assert len(server.connections) == 3
            conn = {u: {client.get_subscription(s)["connection"] for s in pair} for u, pair in ids.items()}
            assert all(len(c) == 1 for c in conn.values())  # a user's feeds on one connection
            grouped = [c for c in client.connection_info() if c["strategy"] == "user_grouped"]
            assert sorted(len(c["users"]) for c in grouped) == [2, 3] and {u for c in grouped for u in c["users"]} == set(users)
            with pytest.raises(TooManyConnections, match="max_connections 3"):
                await client.subscribe({"type": "l4Book", "coin": "BTC"}, strategy="dedicated")
            await client.subscribe({"type": "l2Book", "coin": "BTC"}, lambda m: None)  # room on the shared one
            with pytest.raises(TooManyConnections):  # another aggregation of BTC needs a shared connection of its own
                await client.subscribe({"type": "l2Book", "coin": "BTC", "nSigFigs": 5})
            await client.subscribe({"type": "orderUpdates", "user": users[0]}, lambda m: None, strategy="user_grouped")
            (neighbour, *_) = [u for u in users[1:] if conn[u] == conn[users[0]]]
            with pytest.raises(TooManyConnections):  # not elsewhere: its feeds stay on one connection
                await client.subscribe({"type": "orderUpdates", "user": neighbour}, strategy="user_grouped")
            assert client.get_subscription(ids[users[0]][0])["connection"] == client.list_subscriptions(type="orderUpdates")[0]["connection"]
            assert len(client.list_subscriptions()) == 13 and len(server.connections) == 3
            assert client.stats == {"users_past_cap": 3, "refused_past_cap": 3}
        await server.stop()

    run(main())

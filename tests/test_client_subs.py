"""Typed subscription builders (``hlbook.client.subs``): one for every feed the gateway
serves, refusing before sending what the gateway would refuse, and agreeing with the
gateway's own parser both ways."""

from __future__ import annotations

from typing import Any

import pytest

from hlbook.client import HLClient, subs
from hlbook.client.testing import FakeServer
from hlbook.services.gateway import kinds
from hlbook.services.gateway.protocol import RequestError
from test_client import FAST, run

ALICE = "0x" + "Ab" * 20


def gateway(sub: dict[str, Any]) -> dict[str, Any]:
    """What the gateway makes of ``sub`` (every coin exists)."""
    return kinds.normalise(sub, lambda coin: True)


GOOD = [
    subs.l2_book("BTC"), subs.l2_book("BTC", n_sig_figs=5, mantissa=2), subs.l2_book("@107", n_sig_figs=2, mantissa=1, n_levels=100),
    subs.l2_book("ETH", fast=True), subs.trades("PURR/USDC"), subs.bbo("ETH"), subs.l4_book("BTC"), subs.active_asset_ctx("SOL"),
    subs.candle("BTC", "1M"), subs.candle("BTC", "15m"), subs.all_mids(), subs.all_mids(dex="xyz"), subs.order_updates(ALICE),
    subs.user_events(ALICE), subs.user_twap_slice_fills(ALICE), subs.user_fills(ALICE), subs.user_fills(ALICE, aggregate_by_time=True),
    subs.open_orders(ALICE), subs.open_orders(ALICE, dex="xyz"), subs.clearinghouse_state(ALICE),
    subs.clearinghouse_state(ALICE, dex="xyz"), subs.spot_state(ALICE), subs.active_asset_data(ALICE, "BTC"),
    subs.web_data2(ALICE), subs.asset_ctxs(), subs.asset_ctxs(dex="xyz"), subs.user_historical_orders(ALICE),
    subs.all_dexs_clearinghouse_state(ALICE), subs.all_dexs_asset_ctxs(),
]


def test_node_state_messages_reach_their_subscription() -> None:
    """Two users' (or dexes') polled states on one connection are told apart by their data."""
    from hlbook.client.registry import message_route_key, route_key

    for sub, data in [(subs.clearinghouse_state(ALICE, dex="xyz"), {"dex": "xyz", "user": ALICE, "clearinghouseState": {}}),
                      (subs.spot_state(ALICE), {"user": ALICE, "spotState": {"balances": []}}),
                      (subs.asset_ctxs(), {"dex": "", "ctxs": []}),
                      (subs.user_historical_orders(ALICE), {"user": ALICE, "orderHistory": [], "isSnapshot": True})]:
        assert route_key(sub) == message_route_key(sub["type"], data), sub
    assert route_key(subs.clearinghouse_state(ALICE)) != route_key(subs.clearinghouse_state(ALICE, dex="xyz"))


def test_a_builder_for_every_feed_the_gateway_serves() -> None:
    assert set(subs.SPECS) == set(kinds.KINDS)
    assert {sub["type"] for sub in GOOD} == set(kinds.KINDS)
    for sub in GOOD:
        gateway(sub)  # the gateway takes each
    assert subs.l2_book("BTC", n_sig_figs=5, mantissa=2) == {"type": "l2Book", "coin": "BTC", "nSigFigs": 5, "mantissa": 2}
    assert subs.user_fills(ALICE) == {"type": "userFills", "user": ALICE.lower()}
    assert subs.check({"type": "candle", "coin": "BTC", "interval": "1h", "extra": None}) == subs.candle("BTC", "1h")


BAD: list[tuple[Any, str]] = [
    (lambda: subs.user_fills("0x123"), "address"),
    (lambda: subs.order_updates("ab" * 20), "address"),
    (lambda: subs.open_orders(ALICE + "0"), "address"),
    (lambda: subs.l2_book("BTC", n_sig_figs=1), "nSigFigs"),
    (lambda: subs.l2_book("BTC", n_sig_figs=6), "nSigFigs"),
    (lambda: subs.l2_book("BTC", n_sig_figs=True), "nSigFigs"),  # type: ignore[arg-type]
    (lambda: subs.l2_book("BTC", n_sig_figs="5"), "nSigFigs"),  # type: ignore[arg-type]
    (lambda: subs.l2_book("BTC", n_sig_figs=4, mantissa=2), "only allowed with nSigFigs 5"),
    (lambda: subs.l2_book("BTC", mantissa=1), "requires nSigFigs"),
    (lambda: subs.l2_book("BTC", n_sig_figs=5, mantissa=3), "mantissa"),
    (lambda: subs.l2_book("BTC", n_levels=0), "nLevels"),
    (lambda: subs.l2_book("BTC", n_levels=101), "nLevels"),
    (lambda: subs.l2_book("BTC", fast=1), "fast"),  # type: ignore[arg-type]
    (lambda: subs.l2_book(""), "coin"),
    (lambda: subs.trades(None), "needs"),  # type: ignore[arg-type]
    (lambda: subs.bbo(5), "coin"),  # type: ignore[arg-type]
    (lambda: subs.candle("BTC", "2m"), "interval"),
    (lambda: subs.candle("BTC", "1H"), "interval"),
    (lambda: subs.user_fills(ALICE, aggregate_by_time=1), "True or False"),  # type: ignore[arg-type]
    (lambda: subs.all_mids(dex=5), "string"),  # type: ignore[arg-type]
    (lambda: subs.check({"type": "l2Book", "coin": "BTC", "nSigFig": 5}), "not \\['nSigFig'\\]"),
    (lambda: subs.check({"type": "trades", "coin": "BTC", "user": ALICE}), "not \\['user'\\]"),
    (lambda: subs.check({"type": "candle", "coin": "BTC"}), "needs \\['interval'\\]"),
    (lambda: subs.check({"type": "l3Book", "coin": "BTC"}), "unknown subscription type"),
    (lambda: subs.check({"coin": "BTC"}), "unknown subscription type"),
]


@pytest.mark.parametrize("make, says", BAD)
def test_a_bad_parameter_is_refused_before_sending(make: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        make()


def test_what_the_builders_refuse_the_gateway_refuses_too() -> None:
    refused = [{"type": "userFills", "user": "0x123"}, {"type": "l2Book", "coin": "BTC", "nSigFigs": 6},
               {"type": "l2Book", "coin": "BTC", "nSigFigs": 4, "mantissa": 2}, {"type": "l2Book", "coin": "BTC", "mantissa": 1},
               {"type": "l2Book", "coin": "BTC", "nLevels": 101}, {"type": "candle", "coin": "BTC", "interval": "2m"},
               {"type": "userFills", "user": ALICE, "aggregateByTime": 1}, {"type": "l3Book", "coin": "BTC"}]
    for sub in refused:
        with pytest.raises(ValueError):
            subs.check(sub)
        with pytest.raises(RequestError, match="Invalid subscription"):
            gateway(sub)


def test_a_built_subscription_and_its_dict_form_share_one_server_subscription() -> None:
    async def main() -> None:
        server = await FakeServer().start()
        async with HLClient(server.url, **FAST) as client:
            built = await client.subscribe(subs.l2_book("BTC", n_sig_figs=5, mantissa=2), lambda m: None)
            plain = await client.subscribe({"type": "l2Book", "coin": "BTC", "nSigFigs": 5, "mantissa": 2}, lambda m: None)
            await client.wait_active(built, 5)
            assert client.get_subscription(plain)["shared_with"] == [built] and server.subscribe_requests == 1
        await server.stop()

    run(main())

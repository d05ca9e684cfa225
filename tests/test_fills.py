"""``aggregateByTime`` of common/fills.py on hand-made fills, expected values with
``Decimal``. Hyperliquid's rule (info endpoint docs, ``userFills``): "partial fills
are combined when a crossing order gets filled by multiple different resting
orders. Resting orders filled by multiple crossing orders will not be aggregated."
The end-to-end check against the node files is in test_gateway_users.py."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

from hlbook.common.fills import aggregate_by_time, trade_of, trades_of
from hlbook.common.models import Fill


def fill(oid: int, time: int, px: str, sz: str, crossed: bool, tid: int, fee: str = "0.1", pnl: str = "0.0",
         start: str = "1.5", side: str = "B") -> Fill:
    return Fill(coin="BTC", px=px, sz=sz, side=side, time=time, startPosition=start, dir="Open Long", closedPnl=pnl,
                hash="0x" + "ab" * 32, oid=oid, crossed=crossed, fee=fee, tid=tid, feeToken="USDC")


def test_a_crossing_orders_partial_fills_at_one_time_are_merged() -> None:
    parts = [fill(7, 1000, "100.5", "0.3", True, 1, "0.01", "1.25"), fill(7, 1000, "100.7", "0.2", True, 2, "0.02", "-0.5"),
             fill(7, 1000, "101.0", "0.00001", True, 3, "0.0000001", "0.0")]
    [merged] = aggregate_by_time(parts)
    size = sum(Decimal(p.sz) for p in parts)
    px = sum(Decimal(p.px) * Decimal(p.sz) for p in parts) / size
    assert Decimal(merged.sz) == size
    assert abs(Decimal(merged.px) - px) < Decimal("1e-9")  # size-weighted (hlbook keeps 10 decimals)
    assert Decimal(merged.fee) == sum(Decimal(p.fee) for p in parts)
    assert Decimal(merged.closedPnl) == Decimal("0.75")
    assert (merged.tid, merged.hash, merged.startPosition, merged.oid, merged.time) == (1, parts[0].hash, "1.5", 7, 1000)


def test_resting_orders_and_other_times_are_not_merged() -> None:
    maker = [fill(8, 1000, "100.0", "0.1", False, 4), fill(8, 1000, "100.0", "0.2", False, 5)]
    later = [fill(7, 1000, "100.0", "0.1", True, 6), fill(7, 1001, "100.0", "0.1", True, 7)]
    assert aggregate_by_time(maker) == maker
    assert aggregate_by_time(later) == later
    assert aggregate_by_time([]) == []


def test_the_merged_fill_starts_at_the_orders_first_fill_whatever_their_order() -> None:
    """The history service reads fills by tid, not in block order: the merged fill still takes
    its startPosition (and tid, hash, dir) from the order's first fill."""
    buys = [fill(7, 1000, "100.0", "0.2", True, 9, start="0.1"), fill(7, 1000, "100.0", "0.1", True, 3, start="-0.1")]
    sells = [fill(8, 1000, "100.0", "0.2", True, 2, start="0.3", side="A"), fill(8, 1000, "100.0", "0.1", True, 5, start="0.5", side="A")]
    [buy] = aggregate_by_time(buys)
    [sell] = aggregate_by_time(sells)
    assert (buy.startPosition, buy.tid, buy.sz) == ("-0.1", 3, "0.3")
    assert (sell.startPosition, sell.tid, sell.sz) == ("0.5", 5, "0.3")
    assert aggregate_by_time(buys[::-1]) == [buy] and aggregate_by_time(sells[::-1]) == [sell]


def _of(tid: int, side: str, crossed: bool) -> Fill:
    return fill(oid=tid, time=1, px="1", sz="1", crossed=crossed, tid=tid, side=side)


def _reference_trades(fills: list[tuple[str, Fill]]) -> tuple[list[tuple[int, Any]], int]:
    """The rule as first written: fills grouped by tid, ``trade_of`` of each group."""
    groups: dict[int, list[tuple[int, tuple[str, Fill]]]] = {}
    for place, user_fill in enumerate(fills):
        groups.setdefault(user_fill[1].tid, []).append((place, user_fill))
    trades, unpaired = [], 0
    for group in groups.values():
        trade = trade_of(f for _, f in group)
        if trade is None:
            unpaired += 1
        else:
            trades.append((next(p for p, (_, f) in group if f.crossed), trade))
    return trades, unpaired


def test_trades_of_keeps_the_pair_rule_on_every_shape_of_group() -> None:
    """The two-fill fast path makes the trades, taker places and unpaired count the general rule
    makes: pairs in either order, a taker on either side, two takers, no taker, one side twice,
    single fills and groups of three, interleaved."""
    rng = random.Random(7)
    for _ in range(300):
        fills = []
        for tid in range(rng.randint(1, 12)):
            for _ in range(rng.choice((1, 2, 2, 2, 3))):
                fills.append((f"0x{rng.randrange(99):02x}", _of(tid, rng.choice("AB"), rng.random() < 0.5)))
        rng.shuffle(fills)
        assert trades_of(fills) == _reference_trades(fills)


def test_trades_of_a_block_of_tens_of_thousands_of_trades_keeps_their_order() -> None:
    """A 48 MB fills line's worth (issue 23, finding 7): every trade, in order, with its buyer and seller."""
    fills = [(f"u{i}", _of(i // 2, "BA"[i % 2], i % 2 == 0)) for i in range(134_780)]
    trades, unpaired = trades_of(fills)
    assert unpaired == 0 and [t.tid for _, t in trades] == list(range(67_390))
    assert all(place == 2 * t.tid and t.users == [f"u{place}", f"u{place + 1}"] for place, t in trades)

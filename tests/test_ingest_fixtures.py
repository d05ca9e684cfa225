"""Ingest parsing and joining over the real mainnet node files."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from hlbook.common import fixed, nodefiles, wire
from hlbook.common.chain import Chains, Step
from hlbook.common.models import ASSISTANCE_FUND_USER, DECODERS, HIP2_USER, STREAMS, diff_kind
from hlbook.services.ingest.messages import MessageBuilder, Subscriptions
from hlbook.services.ingest.offline import read_blocks


@pytest.fixture(params=["btc_data", "btc_nosnapshot_data"])
def data_dir(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(request.param)


def test_every_line_parses_in_both_modes(data_dir: Path) -> None:
    counted = 0
    for mode in nodefiles.MODES:
        for stream in STREAMS:
            for path in nodefiles.hour_files(data_dir, stream, mode):
                for raw in path.read_bytes().splitlines():
                    line = DECODERS[stream].decode(raw)
                    assert len(line.events) == len(orjson.loads(raw)["events"])
                    for event in line.events:
                        if stream == "raw_book_diffs":
                            assert diff_kind(event) in ("new", "update", "remove")
                            fixed.parse(event.px)
                        elif stream == "order_statuses":
                            fixed.parse(event.order.limitPx), fixed.parse(event.order.sz)
                        else:
                            fixed.parse(event[1].px), fixed.parse(event[1].sz)
                    counted += 1
    assert counted > 100


def test_by_block_and_streaming_join_to_identical_blocks(btc_data: Path) -> None:
    by_block = list(read_blocks(btc_data, "by-block"))
    streaming = list(read_blocks(btc_data, "streaming"))
    assert [b.height for b in by_block] == list(range(985148182, 985148207))
    assert [b.height for b in streaming] == [b.height for b in by_block]
    for a, b in zip(by_block, streaming):
        assert (a.statuses, a.diffs, a.fills) == (b.statuses, b.diffs, b.fills), a.height
        if a.statuses or a.diffs or a.fills:  # an empty block writes no streaming row to take its time from
            assert a.block_time == b.block_time
    assert sum(len(b.statuses) for b in by_block) > 20_000


def test_nosnapshot_fixture_diffs_and_fills_join_identically(btc_nosnapshot_data: Path) -> None:
    """Its _streaming folder has no order statuses; diffs and fills must still match."""
    by_block = list(read_blocks(btc_nosnapshot_data, "by-block"))
    streaming = list(read_blocks(btc_nosnapshot_data, "streaming"))
    assert len(by_block) == 40
    assert [(b.height, b.diffs, b.fills) for b in by_block] == [(b.height, b.diffs, b.fills) for b in streaming]


def _snapshot_orders(data_dir: Path) -> tuple[int, dict[int, str]]:
    height, coins = orjson.loads((data_dir / "snapshot_985148181.json").read_bytes())
    orders: dict[int, str] = {}
    for coin, sides in coins:
        for side in sides:
            for _user, order in side:
                orders[order["oid"]] = order["sz"]
    return height, orders


def test_joined_diffs_apply_to_the_snapshot_without_unknown_oids(btc_data: Path) -> None:
    height, orders = _snapshot_orders(btc_data)
    assert len(orders) == 34_593 + 16_758
    applied = 0
    for block in read_blocks(btc_data, "by-block"):
        assert block.height > height
        for diff in block.diffs:
            kind = diff_kind(diff)
            if kind == "new":
                assert diff.oid not in orders
                orders[diff.oid] = diff.raw_book_diff.new.sz
            else:
                assert diff.oid in orders, f"unknown oid {diff.oid} in block {block.height}"
                if kind == "update":
                    assert orders[diff.oid] == diff.raw_book_diff.update.origSz
                    orders[diff.oid] = diff.raw_book_diff.update.newSz
                else:
                    del orders[diff.oid]
            applied += 1
    assert applied > 500


def test_book_details_carry_the_status_of_every_new_order(btc_nosnapshot_data: Path, btc_data: Path) -> None:
    """A block's books phase (H|, B| with its diffs), then its details phase (D| with the
    statuses of the oids its diffs touched, E| naming the coins that got details)."""
    news = 0
    for data_dir in (btc_data, btc_nosnapshot_data):
        builder = MessageBuilder(Subscriptions())
        for block in read_blocks(data_dir, "by-block"):
            books = dict(builder.books(block))
            details, per_user = builder.details(block)
            assert per_user == [] and details[-1][0] == b"E|"
            end = wire.decode(details[-1][1], wire.BlockEnd)
            assert end.height == block.height and end.n_statuses == len(block.statuses) and not end.incomplete
            slice_ = wire.decode(books[b"B|BTC|"], wire.BookSlice) if b"B|BTC|" in books else None
            by_oid: dict[int, list[str]] = {}
            for topic, payload in details[:-1]:
                detail = wire.decode(payload, wire.BookDetails)
                assert topic == b"D|BTC|" and detail.height == block.height and end.detail_coins == ["BTC"]
                for status in detail.statuses:
                    by_oid.setdefault(status.order.oid, []).append(status.status)
                    assert status.order.coin == "BTC"
            for diff in slice_.diffs if slice_ is not None else ():
                if diff_kind(diff) == "new" and diff.user not in (HIP2_USER, ASSISTANCE_FUND_USER):
                    kinds = by_oid[diff.oid]
                    assert "open" in kinds or "triggered" in kinds, (diff, kinds)
                    news += 1
            assert {s.order.oid for s in block.statuses if slice_ and s.order.oid in {d.oid for d in slice_.diffs}} == set(by_oid)
    assert news > 400


def test_trades_pair_fills_by_tid_with_the_taker_side(btc_data: Path) -> None:
    builder = MessageBuilder(Subscriptions())
    trades: list[wire.Trade] = []
    fills = 0
    for block in read_blocks(btc_data, "by-block"):
        fills += len(block.fills)
        for topic, payload in builder.books(block):
            if topic == b"T|BTC|":
                trades += wire.decode(payload, wire.Trades).trades
    assert fills == 2 * len(trades) > 0
    first = trades[0]
    assert first.side == "B" and first.px == "81308.0" and first.sz == "0.00033"
    assert first.users == ["0x1624a8af8b91cc781586b4d7a33b8e693dc11015", "0x5eaac7c475b1fad85701f02c4e9e796a53f94bd5"]
    assert first.hash == "0x" + "0" * 64  # a TWAP fill


def test_user_topics_only_for_wanted_users(btc_data: Path) -> None:
    user = "0x5eaac7c475b1fad85701f02c4e9e796a53f94bd5"
    builder = MessageBuilder(Subscriptions([user]))
    statuses = fills = 0
    expected_statuses = expected_fills = 0
    for block in read_blocks(btc_data, "by-block"):
        expected_statuses += sum(s.user == user for s in block.statuses)
        expected_fills += sum(u == user for u, _ in block.fills)
        builder.books(block)
        for topic, payload in builder.details(block)[1]:
            assert topic == f"U|{user}|".encode()
            events = wire.decode(payload, wire.UserEvents)
            statuses += len(events.statuses)
            fills += len(events.fills)
    assert (statuses, fills) == (expected_statuses, expected_fills)
    assert fills > 0


def test_header_chain_and_prev_per_topic(btc_data: Path) -> None:
    builder = MessageBuilder(Subscriptions())
    chains = Chains(dense_prefixes=(b"H|", b"E|"))
    headers = []
    for block in read_blocks(btc_data, "by-block"):
        for topic, payload in [*builder.books(block), *builder.details(block)[0]]:
            message = wire.decode(payload)
            assert chains[topic].check(message["height"], message["prev"]) is Step.NEXT
            if topic == b"H|":
                headers.append(wire.decode(payload, wire.BlockHeader))
    assert [h.prev for h in headers[1:]] == [h.height for h in headers[:-1]]
    assert headers[0].time == 1778002753024

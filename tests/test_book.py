"""L4 book and L2 aggregation: the real mainnet BTC fixture against an
independent plain-dict computation, and hand-computed aggregation cases."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest
import zmq

from hlbook.common import fixed, l2rules, topics
from hlbook.common.models import DECODERS, BookDiff, DiffBody, NewDiff, Order as NodeOrder, OrderStatus, UpdateDiff
from hlbook.services.book import l2, snapshot
from hlbook.services.book.book import DEEP, Book, Level, Order, OutOfSync
from hlbook.services.book.publisher import Publisher, Subscriptions
from hlbook.services.book.validation import difference

HOUR = "hourly/20260505/17"
HEIGHT = 985148181


def read_stream(data: Path, stream: str) -> dict[int, list]:
    path = data / "hl" / "data" / f"node_{stream}_by_block" / HOUR
    return {line.block_number: line.events for line in map(DECODERS[stream].decode, path.read_bytes().splitlines())}


@pytest.fixture(scope="module")
def fixture_blocks(btc_data: Path) -> tuple[bytes, list[tuple[int, list[BookDiff], list[OrderStatus]]]]:
    """(snapshot bytes, [(height, diffs, statuses of the same block)])."""
    statuses = read_stream(btc_data, "order_statuses")
    diffs = read_stream(btc_data, "raw_book_diffs")
    blocks = [(h, diffs[h], statuses[h]) for h in sorted(diffs)]
    return (btc_data / f"snapshot_{HEIGHT}.json").read_bytes(), blocks


# ------------------------------------------------------------ reference (plain dicts, Decimal, sort)


class RefBook:
    """Independent model: oid -> (side, px, sz) with Decimal, levels by sorting."""

    def __init__(self, data: bytes) -> None:
        height, coins = msgspec.json.decode(data)
        bids, asks = dict(coins)["BTC"]
        self.orders = {o["oid"]: (side, Decimal(o["limitPx"]), Decimal(o["sz"])) for side, entries in (("B", bids), ("A", asks)) for _, o in entries}

    def apply(self, diffs: list[BookDiff]) -> None:
        for d in diffs:
            body = d.raw_book_diff
            if body == "remove":
                del self.orders[d.oid]
            elif body.new is not None:
                assert d.oid not in self.orders
                self.orders[d.oid] = (d.side, Decimal(d.px), Decimal(body.new.sz))
            else:
                side, px, _ = self.orders[d.oid]
                self.orders[d.oid] = (side, px, Decimal(body.update.newSz))

    def levels(self, n: int) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, int]]]:
        out = []
        for side in ("B", "A"):
            agg: dict[Decimal, list] = {}
            for s, px, sz in self.orders.values():
                if s == side:
                    lv = agg.setdefault(px, [Decimal(0), 0])
                    lv[0] += sz
                    lv[1] += 1
            prices = sorted(agg, reverse=side == "B")[:n]
            out.append([(_canon(px), _canon(agg[px][0]), agg[px][1]) for px in prices])
        return out[0], out[1]


def _canon(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return text if "." in text else text + ".0"


# ------------------------------------------------------------ fixture replay


def test_snapshot_loads_every_order_in_time_priority(fixture_blocks) -> None:
    data, _ = fixture_blocks
    height, books = snapshot.load(data)
    book = books["BTC"]
    assert height == HEIGHT and book.height == HEIGHT
    assert (len(book.bids.levels), len(book.asks.levels)) == (14440, 6941)
    assert len(book) == 34593 + 16758
    _, coins = msgspec.json.decode(data)
    bids, asks = coins[0][1]
    got = book.l4_levels()
    assert got[0] == [dict(o, user=u) for u, o in bids]  # every field, node strings, node order
    assert got[1] == [dict(o, user=u) for u, o in asks]


@pytest.mark.parametrize("chunk", [7, 1000, snapshot.CHUNK])
def test_a_snapshot_read_a_coin_at_a_time_equals_one_decoded_whole(fixture_blocks, monkeypatch, chunk: int) -> None:
    """The by-coin reader (which never holds the whole file) gives the same books as one decode
    of the whole file, whatever the read size: coins cut where they meet, an empty coin, a coin
    without asks, the last coin; a file not cut that way (spaces) is decoded whole."""
    data, _ = fixture_blocks
    _, coins = msgspec.json.decode(data)
    bids, asks = coins[0][1]
    made = [["BTC", [bids[:400], asks[:300]]], ["EMPTY", [[], []]], ["@7", [bids[400:500], []]], ["LAST", [[], asks[300:350]]]]
    compact = msgspec.json.encode([HEIGHT, made])
    monkeypatch.setattr(snapshot, "CHUNK", chunk)
    for text in (compact, json.dumps([HEIGHT, made], indent=1).encode()):
        height, books = snapshot.load(text)
        whole_height, whole = snapshot._load_whole(text, lambda coin: True)
        assert height == whole_height == HEIGHT and list(books) == list(whole) == ["BTC", "EMPTY", "@7", "LAST"]
        for coin, book in books.items():
            assert book.l4_levels() == whole[coin].l4_levels() and len(book) == len(whole[coin])
    assert len(books["BTC"]) == 700 and len(books["LAST"]) == 50
    with pytest.raises(snapshot.SnapshotError):
        snapshot.load(compact.replace(b'"sz"', b'"zz"', 1))


def test_snapshot_skips_unwanted_coins(fixture_blocks) -> None:
    data, _ = fixture_blocks
    height, books = snapshot.load(data, want=lambda coin: coin != "BTC")
    assert height == HEIGHT and books == {}


def test_malformed_snapshot_raises() -> None:
    with pytest.raises(snapshot.SnapshotError):
        snapshot.load(b'[1, [["BTC", [[["0xab", {"coin": "BTC"}]], []]]]]')


def test_every_block_matches_reference(fixture_blocks) -> None:
    data, blocks = fixture_blocks
    _, books = snapshot.load(data)
    book, ref = books["BTC"], RefBook(data)
    for height, diffs, statuses in blocks:
        book.apply(height, 0, diffs, statuses)
        ref.apply(diffs)
        want = ref.levels(20)
        assert l2.levels(book, 20) == want, height
        assert l2.bbo(book) == (want[0][0], want[1][0]), height
        assert len(book) == len(ref.orders)
        if height == blocks[0][0]:
            assert l2.bbo(book) == (("81307.0", "0.20195", 4), ("81308.0", "6.08174", 49))
    full = ref.levels(10**6)
    assert l2.levels(book, 10**6) == full  # whole book, not only the top


def test_new_order_details_come_from_status_and_px_sz_from_diff(fixture_blocks) -> None:
    data, blocks = fixture_blocks
    _, books = snapshot.load(data)
    book = books["BTC"]
    height, diffs, statuses = blocks[0]
    book.apply(height, 0, diffs, statuses)
    news = [d for d in diffs if isinstance(d.raw_book_diff, DiffBody) and d.raw_book_diff.new and d.oid in book.orders]
    assert len(news) >= 3
    for new in news:
        status = next(s for s in statuses if s.order.oid == new.oid and s.status == "open")
        order = book.orders[new.oid].to_dict("BTC")
        assert order["user"] == new.user and order["limitPx"] == new.px and order["sz"] == new.raw_book_diff.new.sz
        for key in ("timestamp", "tif", "cloid", "orderType", "reduceOnly", "origSz", "triggerCondition", "isTrigger"):
            assert order[key] == msgspec.structs.asdict(status.order)[key], key


# ------------------------------------------------------------ rules on a small book


def diff(oid: int, side: str, px: str, body: DiffBody | str, user: str = "0xaa") -> BookDiff:
    return BookDiff(user, oid, "X", side, px, body)


def new(oid: int, side: str, px: str, sz: str, user: str = "0xaa") -> BookDiff:
    return diff(oid, side, px, DiffBody(new=NewDiff(sz)), user)


def status(oid: int, px: str, kind: str = "open", tif: str | None = "Gtc", trigger: str = "Triggered") -> OrderStatus:
    is_trigger, trigger_px = (True, px) if trigger != "Triggered" else (False, "0.0")
    order = NodeOrder("X", "B", px, "9.0", oid, 1234, trigger, is_trigger, trigger_px, [], False, True, "Stop Limit", "9.0", tif, "0x" + "0" * 31 + "7")
    return OrderStatus("t", "0xaa", None, None, kind, order)


def test_fired_trigger_order_rests_as_triggered() -> None:
    """Mainnet: the ``triggered`` status holds the order as placed (isTrigger, "Price below 77409",
    tif null); the node's snapshot shows resting fired orders as Triggered / 0.0 / Gtc."""
    book = Book("X")
    book.apply(1, 0, [new(1, "A", "11.5", "2.0")], [status(1, "11.0", "triggered", tif=None, trigger="Price below 11.0")])
    order = book.l4_levels()[1][0]
    assert (order["isTrigger"], order["triggerCondition"], order["triggerPx"], order["tif"]) == (False, "Triggered", "0.0", "Gtc")
    assert (order["limitPx"], order["orderType"], order["reduceOnly"], order["side"]) == ("11.5", "Stop Limit", True, "A")


def test_diff_px_is_authoritative_and_hip2_gets_defaults() -> None:
    book = Book("X")
    hip2 = "0xffffffffffffffffffffffffffffffffffffffff"
    book.apply(1, 777, [new(1, "B", "10.5", "2.0"), new(2, "B", "10.5", "1.25", user=hip2)], [status(1, "11.0", "triggered")])
    first, second = book.l4_levels()[0]
    assert first["limitPx"] == "10.5" and first["sz"] == "2.0" and first["orderType"] == "Stop Limit"
    assert first["cloid"] == "0x00000000000000000000000000000007" and first["origSz"] == "9.0" and first["timestamp"] == 1234
    assert second["user"] == hip2 and second["timestamp"] == 777 and second["origSz"] == "1.25" and second["cloid"] is None
    assert l2.levels(book) == ([("10.5", "3.25", 2)], [])


def test_time_priority_update_remove() -> None:
    book = Book("X")
    book.apply(1, 0, [new(1, "A", "5.0", "1.0"), new(2, "A", "5.0", "2.0"), new(3, "A", "5.0", "3.0"), new(4, "A", "4.0", "1.0")], [])
    book.apply(2, 0, [diff(2, "A", "5.0", DiffBody(update=UpdateDiff("2.0", "0.5"))), diff(1, "A", "5.0", "remove")], [])
    assert [o.oid for o in book.asks.levels[5 * 10**10].orders] == [2, 3]
    assert l2.levels(book) == ([], [("4.0", "1.0", 1), ("5.0", "3.5", 2)])
    book.apply(3, 0, [diff(4, "A", "4.0", "remove")], [])
    assert l2.bbo(book) == (None, ("5.0", "3.5", 2)) and book.mid() is None
    book.apply(4, 0, [new(5, "B", "4.5", "1.0")], [])
    assert book.mid() == 475 * 10**8  # (4.5 + 5.0) / 2 = 4.75


@pytest.mark.parametrize(
    ("diffs", "reason"),
    [
        ([diff(9, "B", "1.0", "remove")], "unknown_oid"),
        ([diff(9, "B", "1.0", DiffBody(update=UpdateDiff("1.0", "2.0")))], "unknown_oid"),
        ([new(1, "B", "1.0", "1.0")], "duplicate_oid"),
        ([diff(1, "B", "2.0", "remove")], "px_mismatch"),
        ([diff(1, "A", "1.0", "remove")], "px_mismatch"),
        ([diff(1, "B", "1.0", "cancel")], "bad_diff"),
    ],
)
def test_out_of_sync(diffs: list[BookDiff], reason: str) -> None:
    book = Book("X")
    book.apply(1, 0, [new(1, "B", "1.0", "1.0")], [])
    with pytest.raises(OutOfSync) as err:
        book.apply(2, 0, diffs, [])
    assert err.value.reason == reason and err.value.coin == "X"


# ------------------------------------------------------------ aggregation by hand


def agg_book(bids: list[tuple[str, str]], asks: list[tuple[str, str]]) -> Book:
    book = Book("X")
    diffs = [new(i, "B", px, sz) for i, (px, sz) in enumerate(bids)]
    diffs += [new(1000 + i, "A", px, sz) for i, (px, sz) in enumerate(asks)]
    book.apply(1, 0, diffs, [])
    return book


BTC_LIKE = agg_book(
    [("81307.0", "1.0"), ("81306.5", "2.0"), ("81299.0", "0.5"), ("81250.0", "1.0"), ("80999.0", "3.0")],
    [("81308.0", "1.0"), ("81309.0", "1.0"), ("81310.1", "0.25"), ("81400.0", "2.0"), ("99999.0", "1.0"), ("100001.0", "1.0")],
)


@pytest.mark.parametrize(
    ("nsf", "man", "bids", "asks"),
    [
        (5, None, [("81307.0", "1.0", 1), ("81306.0", "2.0", 1), ("81299.0", "0.5", 1), ("81250.0", "1.0", 1), ("80999.0", "3.0", 1)],
         [("81308.0", "1.0", 1), ("81309.0", "1.0", 1), ("81311.0", "0.25", 1), ("81400.0", "2.0", 1), ("99999.0", "1.0", 1), ("100010.0", "1.0", 1)]),
        (5, 2, [("81306.0", "3.0", 2), ("81298.0", "0.5", 1), ("81250.0", "1.0", 1), ("80998.0", "3.0", 1)],
         [("81308.0", "1.0", 1), ("81310.0", "1.0", 1), ("81312.0", "0.25", 1), ("81400.0", "2.0", 1), ("100000.0", "1.0", 1), ("100020.0", "1.0", 1)]),
        (5, 5, [("81305.0", "3.0", 2), ("81295.0", "0.5", 1), ("81250.0", "1.0", 1), ("80995.0", "3.0", 1)],
         [("81310.0", "2.0", 2), ("81315.0", "0.25", 1), ("81400.0", "2.0", 1), ("100000.0", "1.0", 1), ("100050.0", "1.0", 1)]),
        (4, None, [("81300.0", "3.0", 2), ("81290.0", "0.5", 1), ("81250.0", "1.0", 1), ("80990.0", "3.0", 1)],
         [("81310.0", "2.0", 2), ("81320.0", "0.25", 1), ("81400.0", "2.0", 1), ("100000.0", "1.0", 1), ("100100.0", "1.0", 1)]),
        (3, None, [("81300.0", "3.0", 2), ("81200.0", "1.5", 2), ("80900.0", "3.0", 1)],
         [("81400.0", "4.25", 4), ("100000.0", "1.0", 1), ("101000.0", "1.0", 1)]),
        (2, None, [("81000.0", "4.5", 4), ("80000.0", "3.0", 1)],
         [("82000.0", "4.25", 4), ("100000.0", "1.0", 1), ("110000.0", "1.0", 1)]),
    ],
)
def test_aggregation_above_one(nsf: int, man: int | None, bids: list, asks: list) -> None:
    assert l2.levels(BTC_LIKE, 20, nsf, man) == (bids, asks)


SMALL = agg_book(
    [("0.012345", "10.0"), ("0.012301", "5.0"), ("0.0099994", "1.0")],
    [("0.012346", "10.0"), ("0.0123471", "1.0"), ("0.012399", "2.0")],
)


@pytest.mark.parametrize(
    ("nsf", "man", "bids", "asks"),
    [
        # 0.012345: first significant digit at 10^-2 -> step 10^(-2+1-nsf)
        (2, None, [("0.012", "15.0", 2), ("0.0099", "1.0", 1)], [("0.013", "13.0", 3)]),
        (3, None, [("0.0123", "15.0", 2), ("0.00999", "1.0", 1)], [("0.0124", "13.0", 3)]),
        (4, None, [("0.01234", "10.0", 1), ("0.0123", "5.0", 1), ("0.009999", "1.0", 1)],
         [("0.01235", "11.0", 2), ("0.0124", "2.0", 1)]),
        (5, None, [("0.012345", "10.0", 1), ("0.012301", "5.0", 1), ("0.0099994", "1.0", 1)],
         [("0.012346", "10.0", 1), ("0.012348", "1.0", 1), ("0.012399", "2.0", 1)]),
        (5, 2, [("0.012344", "10.0", 1), ("0.0123", "5.0", 1), ("0.0099994", "1.0", 1)],
         [("0.012346", "10.0", 1), ("0.012348", "1.0", 1), ("0.0124", "2.0", 1)]),
        (5, 5, [("0.012345", "10.0", 1), ("0.0123", "5.0", 1), ("0.009999", "1.0", 1)],
         [("0.01235", "11.0", 2), ("0.0124", "2.0", 1)]),
    ],
)
def test_aggregation_below_one(nsf: int, man: int | None, bids: list, asks: list) -> None:
    assert l2.levels(SMALL, 20, nsf, man) == (bids, asks)


def test_aggregation_stops_at_n_and_matches_reference_on_fixture(fixture_blocks) -> None:
    data, _ = fixture_blocks
    book = snapshot.load(data)[1]["BTC"]
    ref = RefBook(data)
    for nsf, man in ((2, None), (3, None), (4, None), (5, None), (5, 2), (5, 5)):
        step = Decimal(man or 1) * Decimal(10) ** (5 - nsf)  # BTC prices here have 5 integer digits
        want = []
        for side, rnd in (("B", "ROUND_FLOOR"), ("A", "ROUND_CEILING")):
            agg: dict[Decimal, list] = {}
            for s, px, sz in ref.orders.values():
                if s == side and px >= 10000 and px < 100000:
                    b = (px / step).to_integral_value(rounding=rnd) * step
                    lv = agg.setdefault(b, [Decimal(0), 0])
                    lv[0] += sz
                    lv[1] += 1
            keys = sorted(agg, reverse=side == "B")[:10]
            want.append([(_canon(k), _canon(agg[k][0]), agg[k][1]) for k in keys])
        assert l2.levels(book, 10, nsf, man) == tuple(want), (nsf, man)


def test_validate_aggregation() -> None:
    for ok in ((None, None), (2, None), (5, 2), (5, 5), (5, 1), (3, 1)):
        l2rules.validate(*ok)
    for bad in ((1, None), (6, None), (4, 2), (None, 2), (5, 3)):
        with pytest.raises(ValueError):
            l2rules.validate(*bad)


# ------------------------------------------------------------ subscriptions and validation


def test_subscriptions_turn_on_aggregations() -> None:
    subs = Subscriptions()
    assert subs.handle(b"\x01L2|BTC|5|2|20|") == b"L2|BTC|5|2|20|"
    subs.handle(b"\x01L2|BTC|-|-|7|")
    subs.handle(b"\x01L2|BTC|4|2|20|")  # invalid aggregation: ignored
    subs.handle(b"\x01L2|BTC|-|-|101|")  # deeper than the API allows: ignored
    subs.handle(b"\x01BBO|ETH|")
    assert subs.l2_topics("BTC") == {b"L2|BTC|5|2|20|": ((5, 2), 20), b"L2|BTC|-|-|7|": ((None, None), 7)}
    assert subs.l2_topics("ETH") == {}
    assert subs.wanted(topics.bbo("ETH")) and not subs.wanted(topics.bbo("ET"))
    assert subs.handle(b"\x00L2|BTC|5|2|20|") is None
    assert subs.l2_topics("BTC") == {b"L2|BTC|-|-|7|": ((None, None), 7)}
    for k in range(1000):  # a gateway's SUB subscribes every publisher to its users' and trades' topics
        assert subs.handle(b"\x01U|0x%040x|" % k) is None
    subs.handle(b"\x01T|")
    assert not subs.prefixes and not subs.watches(topics.book("SOL")) and not subs.wanted(b"L4|SOL|")
    subs.handle(b"\x01L2|")  # a prefix: full precision at full depth for every coin
    assert subs.l2_topics("SOL") == {b"L2|SOL|-|-|100|": ((None, None), 100)} and subs.wanted(b"L2|SOL|3|-|20|")
    subs.handle(b"\x01")  # everything
    assert subs.wanted(b"L4|SOL|")


class SentFrames:
    """Stands for the shard's XPUB socket: what the publisher sent, in order."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bytes]] = []
        self.topic: bytes | None = None

    def send(self, data: bytes, flags: int = 0, copy: bool = True) -> None:
        if flags & zmq.SNDMORE:
            self.topic = data
        else:
            assert self.topic is not None
            self.frames.append((self.topic, data))
            self.topic = None

    def take(self) -> dict[bytes, dict]:
        out = {topic: msgspec.msgpack.decode(payload) for topic, payload in self.frames}
        self.frames.clear()
        return out


def test_a_depth_is_published_when_a_block_changed_its_levels_and_only_then() -> None:
    book, sent = Book("X"), SentFrames()
    publisher = Publisher(sent, 0)  # type: ignore[arg-type]
    shallow, deep = topics.l2("X", None, None, 3), topics.l2("X", None, None, 100)
    for topic in (shallow, deep, topics.l2("X", 3, None, 2)):
        publisher.subs.handle(b"\x01" + topic)

    def block(height: int, diffs: list[BookDiff]) -> dict[bytes, dict]:
        book.apply(height, height * 10, diffs, [])
        publisher.coin_books(book, height, height * 10, diffs)
        published = sent.take()
        for topic, (nsf, man, n) in ((shallow, (None, None, 3)), (deep, (None, None, 100)), (topics.l2("X", 3, None, 2), (3, None, 2))):
            if topic in published:  # what the shard rendered is what the book holds, as clients get it
                want = [[{"px": px, "sz": sz, "n": count} for px, sz, count in side] for side in l2.levels(book, n, nsf, man)]
                assert msgspec.json.decode(published[topic]["data"]) == {"coin": "X", "time": height * 10, "levels": want}
        return published

    coarse = topics.l2("X", 3, None, 2)
    first = block(1, [new(i, "B", f"{100 - i}.0", "1.0") for i in range(10)] + [new(20 + i, "A", f"{101 + i}.0", "1.0") for i in range(4)])
    assert {shallow, deep, coarse} <= first.keys()
    second = block(2, [new(30, "B", "95.0", "2.0")])  # beyond the 3 levels (and 2 buckets) shown
    assert deep in second and shallow not in second and coarse not in second
    assert deep in block(3, [diff(30, "B", "95.0", "remove")]).keys() - {shallow, coarse}
    assert shallow in block(4, [diff(2, "B", "98.0", DiffBody(update=UpdateDiff("1.0", "0.5")))])  # the third level
    assert {shallow, coarse} <= block(5, [diff(0, "B", "100.0", "remove")]).keys()  # the best level goes: all shift
    assert set(block(6, [new(40, "A", "150.0", "1.0")])) == {deep}  # the book's 100 levels are not full: every change shows


def test_watched_coins_slices_go_first_within_their_block() -> None:
    from hlbook.services.book.shard import watched_first

    batch = [(b"D|A|", b"1"), (b"E|", b"1"),  # the end of block 1
             (b"H|", b"2"), (b"B|A|", b"2"), (b"B|W|", b"2"), (b"D|W|", b"1"), (b"B|X|", b"2"),
             (b"H|", b"3"), (b"B|A|", b"3"), (b"B|W|", b"3")]
    order = [m for m in watched_first(batch, lambda topic: topic == b"B|W|")]
    assert order == [(b"D|A|", b"1"), (b"E|", b"1"),
                     (b"H|", b"2"), (b"B|W|", b"2"), (b"B|A|", b"2"), (b"D|W|", b"1"), (b"B|X|", b"2"),
                     (b"H|", b"3"), (b"B|W|", b"3"), (b"B|A|", b"3")]


def test_validation_difference_reasons() -> None:
    def book(*orders: tuple[int, str, str]) -> Book:
        b = Book("X")
        b.apply(1, 0, [new(oid, "B", px, sz) for oid, px, sz in orders], [])
        return b

    base = book((1, "1.0", "1.0"), (2, "1.0", "2.0"), (3, "0.5", "1.0"))
    assert difference(base, book((1, "1.0", "1.0"), (2, "1.0", "2.0"), (3, "0.5", "1.0"))) is None
    assert difference(base, book((1, "1.0", "1.0"), (2, "1.0", "2.0"))) == "orders"
    assert difference(base, book((1, "1.0", "1.0"), (2, "1.0", "2.0"), (3, "0.6", "1.0"))) == "price"
    assert difference(base, book((1, "1.0", "1.0"), (2, "1.0", "2.5"), (3, "0.5", "1.0"))) == "size"
    assert difference(base, book((2, "1.0", "2.0"), (1, "1.0", "1.0"), (3, "0.5", "1.0"))) == "priority"
    assert difference(None, Book("X")) is None and difference(base, None) == "orders"


AGGS = ((2, None), (3, None), (4, None), (5, None), (5, 2), (5, 5))


def test_incremental_views_match_a_scan_on_every_block(fixture_blocks) -> None:
    data, blocks = fixture_blocks
    book = snapshot.load(data)[1]["BTC"]
    l2.sync_views(book, set(AGGS))
    assert len(book.views) == 6 and len(book.bids.views) == 6
    for height, diffs, statuses in blocks:
        book.apply(height, 0, diffs, statuses)
        for nsf, man in AGGS:
            scan = (l2.side_levels(book.bids, 100, nsf, man), l2.side_levels(book.asks, 100, nsf, man))
            assert l2.levels(book, 100, nsf, man) == scan, (height, nsf, man)
    l2.sync_views(book, {(5, 1), (None, None)})  # (5, 1) is (5, None); full precision needs no view
    assert list(book.views) == [(5, 1)] and len(book.asks.views) == 1
    assert l2.levels(book, 30, 5, None) == (l2.side_levels(book.bids, 30, 5), l2.side_levels(book.asks, 30, 5))


def test_views_follow_small_book_changes() -> None:
    book = Book("X")
    l2.sync_views(book, {(2, None)})
    book.apply(1, 0, [new(1, "B", "0.012345", "1.0"), new(2, "B", "0.0121", "2.0"), new(3, "A", "0.0125", "1.0")], [])
    assert l2.levels(book, 5, 2) == ([("0.012", "3.0", 2)], [("0.013", "1.0", 1)])
    book.apply(2, 0, [diff(1, "B", "0.012345", DiffBody(update=UpdateDiff("1.0", "0.25"))), diff(3, "A", "0.0125", "remove")], [])
    assert l2.levels(book, 5, 2) == ([("0.012", "2.25", 2)], [])
    book.apply(3, 0, [diff(1, "B", "0.012345", "remove"), diff(2, "B", "0.0121", "remove")], [])
    assert l2.levels(book, 5, 2) == ([], []) and book.views[(2, 1)][0].buckets == {}


def test_malformed_diff_numbers_are_out_of_sync() -> None:
    book = Book("X")
    with pytest.raises(OutOfSync) as err:
        book.apply(1, 0, [new(1, "B", "1.0", "1e5")], [])
    assert err.value.reason == "bad_diff"
    with pytest.raises(OutOfSync):
        book.apply(1, 0, [new(2, "B", "abc", "1.0")], [])


def test_a_deep_level_keeps_time_priority_through_removals() -> None:
    """Past DEEP orders a level changes how it holds them (O(1) removal): the same orders,
    in the same time priority, the same size, whichever end or middle they leave from."""
    level = Level(px=1)
    orders = [Order(oid, "0xu", 1, oid + 1, oid, oid + 1, None, ()) for oid in range(3 * DEEP)]
    for order in orders:
        level.add(order)
    assert isinstance(level.orders, dict) and list(level.orders) == orders
    for gone in (orders[0], orders[-1], orders[DEEP], orders[5]):
        level.discard(gone)
        orders.remove(gone)
        assert list(level.orders) == orders and level.n == len(orders) and level.sz == sum(o.sz for o in orders)
    late = Order(999, "0xu", 1, 7, 999, 7, None, ())
    level.add(late)
    assert list(level.orders)[-1] is late and level.wire() == (fixed.fmt(1), fixed.fmt(level.sz), len(orders) + 1)

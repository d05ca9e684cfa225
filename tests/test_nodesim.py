"""Node simulator: engine consistency, node file format, fileSnapshot over real HTTP, the CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from hlbook.common import fixed
from hlbook.common.models import (
    ASSISTANCE_FUND_USER,
    DECODERS,
    HIP2_USER,
    STREAMS,
    ZERO_HASH,
    Order,
    diff_kind,
)
from hlbook.common.nodefiles import hour_files
from hlbook.services.nodesim.block import node_time
from hlbook.services.nodesim.engine import FULL, Block, Simulator
from hlbook.services.nodesim.info_server import render
from hlbook.services.nodesim.service import NodeSim, Pacer, SimConfig
from hlbook.services.nodesim.writer import NodeWriter

from conftest import free_port

SPECIAL = {HIP2_USER, ASSISTANCE_FUND_USER}
START = datetime(2026, 5, 5, 16, 59, 59, 500_000, tzinfo=timezone.utc)
ORDER_KEYS = list(Order.__struct_fields__)


# ------------------------------------------------------------------ helpers


def read_lines(data_dir: Path, stream: str, mode: str) -> list[Any]:
    """Decoded complete lines of a stream (a partial last line is left out, as a reader must)."""
    lines = []
    for path in hour_files(data_dir, stream, mode):
        data = path.read_bytes()
        for raw in data[: data.rfind(b"\n") + 1].splitlines():
            lines.append(DECODERS[stream].decode(raw))
    return lines


def raw_lines(data_dir: Path, stream: str, mode: str) -> list[dict[str, Any]]:
    """Complete lines as plain JSON (each also decoded with the project's typed decoder)."""
    lines = []
    for path in hour_files(data_dir, stream, mode):
        data = path.read_bytes()
        for raw in data[: data.rfind(b"\n") + 1].splitlines():
            DECODERS[stream].decode(raw)
            lines.append(json.loads(raw))
    return lines


def events_by_block(lines: list[dict[str, Any]]) -> list[tuple[int, Any]]:
    return [(line["block_number"], e) for line in lines for e in line["events"]]


class Applier:
    """A plain dict book fed with node diffs: coin -> oid -> [user, side, px, sz] in arrival order."""

    def __init__(self, snapshot: list[Any]) -> None:
        self.orders: dict[str, dict[int, list[Any]]] = {}
        for coin, sides in snapshot:
            book = self.orders[coin] = {}
            for side in sides:
                for user, order in side:
                    book[order["oid"]] = [user, order["side"], order["limitPx"], order["sz"]]

    def apply(self, diff: Any) -> None:
        book = self.orders.setdefault(diff.coin, {})
        kind = diff_kind(diff)
        if kind == "new":
            assert diff.oid not in book, f"new for live oid {diff.oid}"
            book[diff.oid] = [diff.user, diff.side, diff.px, diff.raw_book_diff.new.sz]
        elif kind == "update":
            assert book[diff.oid][3] == diff.raw_book_diff.update.origSz, f"update origSz mismatch for {diff.oid}"
            book[diff.oid][3] = diff.raw_book_diff.update.newSz
        else:
            del book[diff.oid]

    def levels(self) -> dict[str, list[list[tuple[str, int, str, str]]]]:
        """Per coin: [bids best first, asks best first], each level in time priority."""
        out = {}
        for coin, book in self.orders.items():
            sides = []
            for side, sign in (("B", -1), ("A", 1)):
                entries = [(oid, o) for oid, o in book.items() if o[1] == side]
                entries.sort(key=lambda e: sign * fixed.parse(e[1][2]))  # stable: time priority kept
                sides.append([(o[0], oid, o[2], o[3]) for oid, o in entries])
            out[coin] = sides
        return out


def snapshot_levels(snapshot: list[Any]) -> dict[str, list[list[tuple[str, int, str, str]]]]:
    return {
        coin: [[(user, o["oid"], o["limitPx"], o["sz"]) for user, o in side] for side in sides]
        for coin, sides in snapshot
    }


def sig_figs_ok(px: str) -> bool:
    """Hyperliquid price rule: integers always, otherwise at most 5 significant figures."""
    whole, _, frac = px.partition(".")
    if frac == "0":
        return True
    return len((whole + frac).lstrip("0")) <= 5


# -------------------------------------------------------------------- engine


class Checker:
    """Replays generated blocks and asserts the node's invariants, block by block."""

    def __init__(self, snapshot: list[Any]) -> None:
        self.live: dict[int, list[Any]] = {}  # oid -> [user, coin, side, px, sz, cloid]
        self.cloids: dict[str, int] = {}
        self.loose: dict[int, int] = {}  # removed orders of special users (no status: fill or cancel)
        self.levels: dict[tuple[str, str], Counter[int]] = defaultdict(Counter)
        for coin, sides in snapshot:
            for side in sides:
                for user, o in side:
                    self._add(o["oid"], user, coin, o["side"], o["limitPx"], o["sz"], o["cloid"])
        self.counts: Counter[str] = Counter()

    def _add(self, oid: int, user: str, coin: str, side: str, px: str, sz: str, cloid: str | None) -> None:
        self.live[oid] = [user, coin, side, px, sz, cloid]
        if cloid is not None:
            self.cloids[cloid] = oid
        self.levels[(coin, side)][fixed.parse(px)] += 1

    def _drop(self, oid: int) -> None:
        user, coin, side, px, _, cloid = self.live.pop(oid)
        self.cloids.pop(cloid, None)
        level = self.levels[(coin, side)]
        level[fixed.parse(px)] -= 1
        if not level[fixed.parse(px)]:
            del level[fixed.parse(px)]

    def block(self, b: Block) -> None:
        statuses: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for s in b.statuses:
            assert s["user"] not in SPECIAL, "HIP-2/assistance-fund orders must have no status"
            assert list(s["order"]) == ORDER_KEYS
            assert s["time"] == b.block_time
            statuses[s["order"]["oid"]].append(s)
            self.counts[s["status"]] += 1
            self.counts["rejected" if s["status"].endswith("Rejected") else "other"] += 1
            self.counts["builder"] += s["builder"] is not None
            assert (s["hash"] is not None) == (s["status"] == "open")
        touched = set()
        decreases: Counter[int] = Counter()
        canceled = {s["order"]["cloid"]: s["user"] for s in b.statuses if s["status"] == "canceled" and s["order"]["cloid"]}
        for d in b.diffs:
            touched.add(d["coin"])
            self.diff(d, statuses, decreases, canceled)
        self.fills(b, decreases)
        for coin in touched:
            bids, asks = self.levels[(coin, "B")], self.levels[(coin, "A")]
            if bids and asks:
                assert max(bids) < min(asks), f"{coin} crossed after block {b.height}"

    def diff(self, d: dict[str, Any], statuses: dict[int, list[dict[str, Any]]], decreases: Counter[int],
             canceled: dict[str, str]) -> None:
        oid, body = d["oid"], d["raw_book_diff"]
        assert fixed.canonical(d["px"]) == d["px"] and sig_figs_ok(d["px"])
        if isinstance(body, dict) and "new" in body:
            assert oid not in self.live
            sz = body["new"]["sz"]
            assert fixed.canonical(sz) == sz and fixed.parse(sz) > 0
            found = [s for s in statuses.get(oid, []) if s["status"] in ("open", "triggered")]
            if d["user"] in SPECIAL:
                assert oid not in statuses
                self.counts["special_new"] += 1
            else:
                assert found, f"new diff for oid {oid} without open/triggered status in its block"
                status = found[-1]
                assert status["user"] == d["user"] and status["order"]["side"] == d["side"]
                if status["status"] == "triggered":
                    self.counts["triggered_new"] += 1
                    self.counts["triggered_px_differs"] += status["order"]["limitPx"] != d["px"]
                self.modify_check(d, status, canceled)
            self._add(oid, d["user"], d["coin"], d["side"], d["px"], sz, None if d["user"] in SPECIAL else found[-1]["order"]["cloid"])
        elif isinstance(body, dict):
            assert oid in self.live, f"update for unknown oid {oid}"
            up = body["update"]
            assert self.live[oid][4] == up["origSz"] and fixed.parse(up["newSz"]) < fixed.parse(up["origSz"])
            assert fixed.parse(up["newSz"]) > 0
            decreases[oid] += fixed.parse(up["origSz"]) - fixed.parse(up["newSz"])
            self.live[oid][4] = up["newSz"]
            self.counts["update"] += 1
        else:
            assert body == "remove" and oid in self.live, f"remove for unknown oid {oid}"
            assert self.live[oid][3] == d["px"]
            done = {s["status"] for s in statuses.get(oid, [])}
            if d["user"] in SPECIAL:  # canceled or filled: no status tells
                self.loose[oid] = fixed.parse(self.live[oid][4])
            else:
                assert len(done & {"filled", "canceled"}) == 1, f"remove of {oid} without filled/canceled status"
                if "filled" in done:
                    decreases[oid] += fixed.parse(self.live[oid][4])
            self._drop(oid)

    def modify_check(self, d: dict[str, Any], status: dict[str, Any], canceled: dict[str, str]) -> None:
        """A new order reusing a live order's cloid is a modify: the old one was canceled in this block."""
        cloid = status["order"]["cloid"]
        if cloid is None:
            return
        assert cloid not in self.cloids, f"cloid {cloid} of live oid {self.cloids.get(cloid)} reused while it rests"
        if cloid in canceled:
            assert canceled[cloid] == d["user"]
            self.counts["modify"] += 1

    def fills(self, b: Block, decreases: Counter[int]) -> None:
        by_tid: dict[int, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for user, f in b.fills:
            by_tid[f["tid"]].append((user, f))
        maker_filled: Counter[int] = Counter()
        for tid, pair in by_tid.items():
            assert len(pair) == 2, f"tid {tid} has {len(pair)} fills"
            (u1, a), (u2, c) = pair
            assert sorted([a["crossed"], c["crossed"]]) == [False, True]
            assert {a["side"], c["side"]} == {"A", "B"}
            assert (a["coin"], a["px"], a["sz"], a["hash"], a["time"]) == (c["coin"], c["px"], c["sz"], c["hash"], c["time"])
            taker = a if a["crossed"] else c
            maker = c if a["crossed"] else a
            assert maker["twapId"] is None
            if a["hash"] == ZERO_HASH:
                assert taker["twapId"] is not None
                self.counts["twap_fill"] += 1
            else:
                assert taker["twapId"] is None
            maker_filled[maker["oid"]] += fixed.parse(maker["sz"])
            self.counts["trade"] += 1
        for oid, qty in maker_filled.items():
            took = decreases[oid]
            assert took == qty or took < qty <= took + self.loose.get(oid, 0), f"maker {oid} filled {qty}, diffs took {took}"
        self.loose.clear()


def test_engine_consistency_over_thousands_of_blocks() -> None:
    sim = Simulator(seed=7, coins=50, start_time=START)
    height, initial = sim.snapshot()
    assert height == sim.start_height - 1
    per_coin = [len(b) + len(a) for _, (b, a) in initial]
    assert min(per_coin) >= 20 and max(per_coin) <= 200
    names = [coin for coin, _ in initial]
    assert {"BTC", "ETH", "@107", "@1", "PURR/USDC", "kPEPE"} <= set(names)
    checker = Checker(initial)
    n = 1000  # every invariant and every count below is exercised many times over (seed 7: 93 triggered
    # new orders, 47 at another price, 1157 modifies, 884 TWAP fills, 19 empty blocks); 3000 took 3x the time
    totals = Counter()
    empty = 0
    for i in range(n):
        b = sim.step()
        assert b.height == height + 1 + i
        totals.update(statuses=len(b.statuses), diffs=len(b.diffs), fills=len(b.fills))
        empty += not (b.statuses or b.diffs or b.fills)
        checker.block(b)
    c = checker.counts
    assert c["rejected"] > c["other"], "rejections must be the majority of statuses"
    for status in ("open", "canceled", "filled", "triggered", "badAloPxRejected", "iocCancelRejected",
                   "perpMarginRejected", "minTradeNtlRejected"):
        assert c[status] > 0, status
    assert c["modify"] > 20 and c["update"] > 50 and c["twap_fill"] > 0 and c["special_new"] > 100
    assert c["builder"] > 0
    assert c["triggered_new"] > 0 and c["triggered_px_differs"] > 0
    assert 200 < totals["statuses"] / n < 450 and 25 < totals["diffs"] / n < 120 and 1 < totals["fills"] / n < 20
    assert 0 < empty < n * 0.1
    # the engine's own books agree with the replayed diffs
    assert snapshot_levels(sim.snapshot()[1]) == snapshot_levels(_rebuild(checker))


def _rebuild(checker: Checker) -> list[Any]:
    """Checker state in snapshot shape (order of a level: arrival)."""
    coins: dict[str, list[list[Any]]] = defaultdict(lambda: [[], []])
    for oid, (user, coin, side, px, sz, _) in checker.live.items():
        coins[coin][0 if side == "B" else 1].append((fixed.parse(px), user, oid, px, sz))
    out = []
    for coin, (bids, asks) in coins.items():
        bids.sort(key=lambda e: -e[0])
        asks.sort(key=lambda e: e[0])
        out.append([coin, [[[u, {"oid": o, "limitPx": p, "sz": s}] for _, u, o, p, s in side] for side in (bids, asks)]])
    return [c for c in out if c[1][0] or c[1][1]]


def test_deterministic_with_seed() -> None:
    a = Simulator(seed=42, coins=30, start_time=START)
    b = Simulator(seed=42, coins=30, start_time=START)
    other = Simulator(seed=43, coins=30, start_time=START)
    assert a.snapshot() == b.snapshot()
    blocks_a = [a.step() for _ in range(150)]
    assert blocks_a == [b.step() for _ in range(150)]
    assert a.snapshot() == b.snapshot()
    assert blocks_a != [other.step() for _ in range(150)]


def test_resting_orders_stay_near_the_start() -> None:
    """--profile full's flow is in equilibrium with its depth: over several turnovers of every book the
    resting orders stay within 10 % of the start (the old flow added ~450 and canceled ~190 a block).
    A smaller depth and half the volume keep it fast, and no rejections (they change no book); the
    equilibrium depends on none of them."""
    sim = Simulator(seed=5, profile="full", depth=1000, volume=0.5, start_time=START,
                    activity=dataclasses.replace(FULL, rejects=0.0))
    start = sim.resting_count()
    btc = sim.market_of["BTC"]
    btc_start = btc.resting()
    placed, counts = 0, []
    for i in range(1, 601):
        placed += sum(1 for d in sim.step().events()[1] if b'"raw_book_diff":{"new"' in d)
        if i % 100 == 0:
            counts.append(sim.resting_count())
    assert placed > 3 * start, "the books must turn over for the test to mean anything"
    assert all(abs(n / start - 1) < 0.10 for n in counts), (start, counts)
    assert abs(btc.resting() / btc_start - 1) < 0.25, (btc_start, btc.resting())


def test_rejections_and_orders_are_encoded_as_orjson_would() -> None:
    """The byte templates (rejections, orders, statuses, diffs) give orjson's bytes for the same values."""
    sim = Simulator(seed=6, profile="full", depth=500, volume=0.05, start_time=START)
    blocks = [sim.step() for _ in range(40)]
    kinds: Counter[str] = Counter()
    for b in blocks:
        for stream, events in zip(STREAMS, b.events()):
            for raw in events:
                event = orjson.loads(raw)
                assert orjson.dumps(event) == raw
                if stream == "order_statuses":
                    assert list(event) == ["time", "user", "hash", "builder", "status", "order"]
                    assert list(event["order"]) == ORDER_KEYS and event["time"] == b.block_time
                    kinds[event["status"]] += 1
                    order = event["order"]
                    assert order["origSz"] == order["sz"] or event["status"] in ("filled", "canceled")
                    for key in ("limitPx", "sz", "origSz", "triggerPx"):
                        assert fixed.canonical(order[key]) == order[key]
    assert kinds["badAloPxRejected"] > 1000 and kinds["open"] > 20
    for m in sim.markets:  # every resting order's template against its dict
        for o in m.entries("B") + m.entries("A"):
            assert o.order_json() == orjson.dumps(o.order()) and o.order_json(0) == orjson.dumps(o.order(sz=0))


def test_rejected_alo_orders_cross_the_book() -> None:
    """A badAloPxRejected order would have crossed: a buy at or above the best ask, a sell at or below
    the best bid, of the book when it was sent (rejections change no book, so checked right after)."""
    sim = Simulator(seed=8, profile="full", depth=500, volume=0.05, start_time=START)
    sim.step()
    from hlbook.services.nodesim.rejects import block_formats

    out = sim.senders.render(3000, block_formats(node_time(sim.last_ns or 0), 0), 0)
    checked = 0
    for raw in out:
        status = orjson.loads(raw)
        if status["status"] != "badAloPxRejected":
            continue
        order, m = status["order"], sim.market_of[status["order"]["coin"]]
        px = fixed.parse(order["limitPx"])
        if order["side"] == "B" and m.best_ask is not None:
            assert px >= m.best_ask and order["tif"] == "Alo"
        elif order["side"] == "A" and m.best_bid is not None:
            assert px <= m.best_bid and order["tif"] == "Alo"
        checked += 1
    assert checked > 1000


# --------------------------------------------------------------------- files


def _apply_files(initial: list[Any], data_dir: Path, upto: int | None = None) -> tuple[Applier, int]:
    """Apply the by-block diffs in the files (up to height ``upto``) to ``initial``."""
    applier = Applier(initial)
    last = None
    for line in read_lines(data_dir, "raw_book_diffs", "by-block"):
        if upto is not None and line.block_number > upto:
            break
        for d in line.events:
            applier.apply(d)
        last = line.block_number
    return applier, last


def _nonempty(levels: dict[str, Any]) -> dict[str, Any]:
    return {coin: sides for coin, sides in levels.items() if sides[0] or sides[1]}


def test_snapshot_equals_initial_plus_written_diffs(tmp_path: Path) -> None:
    sim = Simulator(seed=3, coins=20, start_time=START)
    _, initial = sim.snapshot()
    with NodeWriter(tmp_path, ("by-block", "streaming"), partial_p=0.3, seed=3) as writer:
        for _ in range(400):
            writer.write_block(sim.step())
    height, final = sim.snapshot()
    applier, last = _apply_files(initial, tmp_path)
    assert last == height
    assert _nonempty(applier.levels()) == _nonempty(snapshot_levels(final))
    # every order object has the node's keys in the node's order; new orders carry their status's details
    statuses = {(s.user, s.order.oid): s for line in read_lines(tmp_path, "order_statuses", "by-block")
                for s in line.events if s.status in ("open", "triggered")}
    checked = 0
    for _, sides in final:
        for side in sides:
            for user, order in side:
                assert list(order) == ORDER_KEYS
                status = statuses.get((user, order["oid"]))
                if status is not None:
                    assert (order["cloid"], order["timestamp"], order["orderType"], order["origSz"]) == (
                        status.order.cloid, status.order.timestamp, status.order.orderType, status.order.origSz)
                    checked += 1
    assert checked > 100


def test_captured_snapshot_encodes_as_the_dicts_do() -> None:
    """The info server captures orders and sizes under the lock and encodes them after: the bytes are
    render()'s of snapshot()'s dicts, with and without users and height, even once the books moved on."""
    sim = Simulator(seed=15, coins=30, start_time=START)
    for _ in range(200):
        sim.step()
    captured, (height, body) = sim.capture(), sim.snapshot()
    expected = {(u, h): render(height, body, u, h) for u in (True, False) for h in (True, False)}
    for _ in range(100):  # fills change resting sizes, cancels remove orders: the capture keeps its height's
        sim.step()
    for (users, with_height), data in expected.items():
        assert captured.encode(users, with_height) == data
    assert b'"0x' in expected[(True, True)] and expected[(True, True)].startswith(b"[%d," % height)


def test_streaming_and_by_block_files_hold_the_same_events(tmp_path: Path) -> None:
    sim = Simulator(seed=9, coins=15, start_time=START)
    with NodeWriter(tmp_path, ("by-block", "streaming"), partial_p=0.2, seed=9) as writer:
        blocks = [sim.step() for _ in range(150)]
        for b in blocks:
            writer.write_block(b)
    for stream in STREAMS:
        by_block = raw_lines(tmp_path, stream, "by-block")
        streaming = raw_lines(tmp_path, stream, "streaming")
        assert [line["block_number"] for line in by_block] == [b.height for b in blocks]
        assert all(len(line["events"]) == 1 for line in streaming)
        assert events_by_block(by_block) == events_by_block(streaming)
        empty = {line["block_number"] for line in by_block if not line["events"]}
        assert empty and not empty & {line["block_number"] for line in streaming}
        assert all(line["block_time"] < line["local_time"] for line in streaming)
        local = [line["local_time"] for line in streaming]
        assert local == sorted(local) and len(set(local)) == len(local)
        local = [line["local_time"] for line in by_block]
        assert local == sorted(local)


def test_lines_match_the_node_format(tmp_path: Path) -> None:
    sim = Simulator(seed=1, coins=10, start_time=START)
    with NodeWriter(tmp_path, ("by-block",), partial_p=0.0, seed=1) as writer:
        for _ in range(30):
            writer.write_block(sim.step())
    for stream in STREAMS:
        for path in hour_files(tmp_path, stream, "by-block"):
            for raw in path.read_bytes().splitlines():
                obj = json.loads(raw)
                assert json.dumps(obj, separators=(",", ":")).encode() == raw  # compact, as the node
                assert list(obj) == ["local_time", "block_time", "block_number", "events"]
                assert len(obj["block_time"]) == len("2026-05-05T17:39:13.024084407")
                assert obj["block_time"] < obj["local_time"]
    fills = [e[1] for line in raw_lines(tmp_path, "fills", "by-block") for e in line["events"]]
    assert fills
    for fill in fills:
        keys = ["coin", "px", "sz", "side", "time", "startPosition", "dir", "closedPnl", "hash",
                                   "oid", "crossed", "fee", "tid"]
        keys += ["cloid"] if "cloid" in fill else []
        assert list(fill) == keys + ["feeToken", "twapId"]


def test_local_time_is_the_clock_when_the_line_is_written(tmp_path: Path) -> None:
    """With a clock (a live run) each line's local_time is the clock's reading as it is written, in
    both modes, strictly rising; block_time comes before it."""
    readings: list[int] = []
    base = int(START.timestamp() * 1e9) + 400_000_000

    def clock() -> int:
        readings.append(base + 7_919_000 * len(readings))
        return readings[-1]

    sim = Simulator(seed=12, coins=6, start_time=START)
    with NodeWriter(tmp_path, ("by-block", "streaming"), partial_p=0.0, seed=12, clock=clock) as writer:
        for _ in range(20):
            writer.write_block(sim.step())
    stamps = set(node_time(ns) for ns in readings)
    for mode in ("by-block", "streaming"):
        lines = [line for stream in STREAMS for line in raw_lines(tmp_path, stream, mode)]
        assert lines
        for line in lines:
            assert line["block_time"] < line["local_time"]
            if mode == "by-block":  # a line is one write: its stamp is a reading
                assert line["local_time"] in stamps
            else:  # a piece of lines is one write: the reading, then a nanosecond per line
                assert any(0 <= _ns(line["local_time"]) - r < 10_000 for r in readings)
    assert len(readings) >= 20 * 3


def _ns(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(datetime.fromisoformat(whole).replace(tzinfo=timezone.utc).timestamp()) * 1_000_000_000 + int(frac)


def test_partial_lines_are_visible_between_the_two_writes(tmp_path: Path) -> None:
    seen: list[bytes] = []

    def pause(_: float) -> None:  # called after the first part was flushed
        seen.append(hour_files(tmp_path, "order_statuses", "by-block")[0].read_bytes())

    sim = Simulator(seed=2, coins=5, start_time=START)
    with NodeWriter(tmp_path, ("by-block",), partial_p=1.0, seed=2, pause=pause) as writer:
        sim.step()
        writer.write_block(sim.step())
    assert seen and not seen[0].endswith(b"\n")  # a reader saw a partial line
    assert [line["block_number"] for line in raw_lines(tmp_path, "order_statuses", "by-block")] == [sim.height]


def test_new_day_folder_at_midnight(tmp_path: Path) -> None:
    sim = Simulator(seed=4, coins=5, start_time=datetime(2026, 5, 5, 23, 59, 59, 800_000, tzinfo=timezone.utc))
    with NodeWriter(tmp_path, ("by-block",), partial_p=0.0) as writer:
        for _ in range(10):
            writer.write_block(sim.step())
    for stream in STREAMS:
        files = hour_files(tmp_path, stream, "by-block")
        assert [f"{f.parent.name}/{f.name}" for f in files] == ["20260505/23", "20260506/0"]
        assert [line["block_number"] for line in raw_lines(tmp_path, stream, "by-block")] == list(range(1_000_000, 1_000_010))


def test_cli_writes_both_modes_and_rotates_hourly(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "hlbook.cli", "sim", "--data-dir", str(tmp_path), "--blocks", "40",
           "--blocks-per-sec", "50", "--mode", "both", "--start-time", "2026-05-05T16:59:59.5", "--info-port", "-1",
           "--seed", "5", "--coins", "10", "--partial-write-p", "0.2", "--start-height", "500"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    expected = Simulator(seed=5, coins=10, start_height=500, start_time=START, blocks_per_sec=50)
    blocks = [expected.step() for _ in range(40)]
    for stream in STREAMS:
        for mode in ("by-block", "streaming"):
            files = hour_files(tmp_path, stream, mode)
            if mode == "by-block" or stream != "fills":
                assert [f"{f.parent.name}/{f.name}" for f in files] == ["20260505/16", "20260505/17"]
        by_block = raw_lines(tmp_path, stream, "by-block")
        assert [line["block_number"] for line in by_block] == list(range(500, 540))
        assert events_by_block(by_block) == events_by_block(raw_lines(tmp_path, stream, "streaming"))
        attr = {"order_statuses": "statuses", "raw_book_diffs": "diffs", "fills": "fills"}[stream]
        assert events_by_block(by_block) == [(b.height, e) for b in blocks for e in getattr(b, attr)]


def test_cli_rejects_bad_mode(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hlbook.cli", "sim", "--data-dir", str(tmp_path), "--mode", "nope",
                           "--blocks", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "mode" in proc.stderr


# ---------------------------------------------------------------- info server


@pytest.fixture
def live_sim(tmp_path: Path) -> Any:
    cfg = SimConfig(data_dir=str(tmp_path / "node"), info_port=0, blocks_per_sec=100, coins=12, seed=11,
                    start_time=START, mode="by-block", partial_write_p=0.1)
    node = NodeSim(cfg)
    node.start()
    yield node
    node.stop()


def _wait_height(node: NodeSim, height: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while node.height < height:
        assert time.monotonic() < deadline, "simulator did not advance"
        time.sleep(0.01)


def _request(out: Path) -> dict[str, Any]:
    return {"type": "fileSnapshot",
            "request": {"type": "l4Snapshots", "includeUsers": True, "includeTriggerOrders": False},
            "outPath": str(out), "includeHeightInOutput": True}


def test_info_server_snapshot_is_a_written_height(live_sim: NodeSim, tmp_path: Path) -> None:
    start = live_sim.start_height
    _wait_height(live_sim, start + 20)
    out = tmp_path / "snap.json"
    r = httpx.post(live_sim.info_url, json=_request(out), timeout=10)
    assert r.status_code == 200
    height, coins = json.loads(out.read_bytes())
    assert height >= start + 20
    data_dir = Path(live_sim.cfg.data_dir)
    for stream in STREAMS:  # the snapshot's block is complete in every stream
        assert height in {line.block_number for line in read_lines(data_dir, stream, "by-block")}
    # the same seed rebuilds the initial state; initial + file diffs up to the height == the snapshot
    _, initial = Simulator(seed=11, coins=12, start_height=start, start_time=START, blocks_per_sec=100).snapshot()
    applier, last = _apply_files(initial, data_dir, upto=height)
    assert last == height
    assert _nonempty(applier.levels()) == _nonempty(snapshot_levels(coins))
    assert [coin for coin, _ in coins][:4] == ["BTC", "ETH", "@107", "SOL"]


def test_info_server_rejects_bad_requests_and_keeps_serving(live_sim: NodeSim, tmp_path: Path) -> None:
    url = live_sim.info_url
    bad = [  # fileSnapshot requests it cannot serve: 400 with {"error"}
        json.dumps({**_request(tmp_path / "x.json"), "outPath": "relative.json"}).encode(),
        json.dumps({**_request(tmp_path / "x.json"), "request": {"type": "l2Snapshots"}}).encode(),
        json.dumps(_request(tmp_path / "missing-dir" / "x.json")).encode(),
        json.dumps(_request(Path("/etc/hlbook-planted.json"))).encode(),  # a folder others can use: no file written there
    ]
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    bad.append(json.dumps(_request(shared / "x.json")).encode())
    for body in bad:
        r = httpx.post(url, content=body, timeout=10)
        assert r.status_code == 400, body
        assert r.json()["error"]
    assert not (shared / "x.json").exists() and not Path("/etc/hlbook-planted.json").exists()
    # anything else is refused as the node refuses it (the node's other info types: tests/test_info_parity.py)
    assert httpx.post(url, content=b"{not json", timeout=10).status_code == 400
    assert httpx.post(url, content=b"[1,2]", timeout=10).status_code == 422
    assert httpx.post(url, json={"type": "meta"}, timeout=10).json()["universe"][0]["name"] == "BTC"
    assert httpx.get(url, timeout=10).status_code == 405
    h0 = live_sim.height
    out = tmp_path / "ok.json"
    assert httpx.post(url, json=_request(out), timeout=10).status_code == 200
    assert json.loads(out.read_bytes())[0] >= h0
    _wait_height(live_sim, h0 + 5)


def test_live_lines_are_stamped_when_written(tmp_path: Path) -> None:
    """A live run (no start time): a new line's local_time is close to the wall clock when the line
    appears in the file, never after it, and its block_time a few hundred ms before it."""
    node = NodeSim(SimConfig(data_dir=str(tmp_path / "node"), info_port=None, blocks_per_sec=25, coins=6, seed=13,
                             partial_write_p=0.0))
    started = time.time_ns()
    node.start()
    seen: list[tuple[int, dict[str, Any]]] = []
    try:
        size, deadline = 0, time.monotonic() + 20
        while len(seen) < 30 and time.monotonic() < deadline:
            files = hour_files(Path(node.cfg.data_dir), "order_statuses", "by-block")
            data = files[-1].read_bytes() if files else b""
            now = time.time_ns()
            for raw in data[size: data.rfind(b"\n") + 1].splitlines():
                seen.append((now, json.loads(raw)))
            size = max(size, data.rfind(b"\n") + 1)
            time.sleep(0.005)
    finally:
        node.stop()
    assert len(seen) >= 30
    for observed, line in seen:
        local, block = _ns(line["local_time"]), _ns(line["block_time"])
        assert started < local <= observed, "local_time is when the line was written"
        assert observed - local < 2_000_000_000  # seen within 5 ms when the machine is idle
        assert 200_000_000 < local - block < 2_000_000_000  # ~350 ms when idle


def test_block_times_follow_the_clock_when_the_loop_falls_behind(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Asked for more blocks a second than it can make, the simulator says so in its log, and its block
    times stay with the clock (on a fixed schedule of 100,000 blocks a second they would trail it by about the time run)."""
    caplog.set_level(logging.WARNING, logger="hlbook.services.nodesim.service")
    node = NodeSim(SimConfig(data_dir=str(tmp_path / "node"), info_port=None, blocks_per_sec=100_000, coins=50, seed=14,
                             partial_write_p=0.0))
    node.start()
    try:
        deadline = time.monotonic() + 20
        while not any("behind schedule" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "no 'behind schedule' in the log"
            time.sleep(0.05)
        time.sleep(3.0)  # on a fixed schedule the block times would now trail the clock by ~3 s
        with node.lock:
            last = node.sim.last_ns or 0
            height = node.sim.height
        now = time.time_ns()
    finally:
        node.stop()
    assert height - node.start_height > 100
    assert 0 < now - last < 1_500_000_000, "block times follow the clock"  # ~0.33 s when idle


def test_pacer_logs_falling_behind_and_restarts_the_schedule(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="hlbook.services.nodesim.service")
    now = [100.0]
    pacer = Pacer(10.0, clock=lambda: now[0])
    never = threading.Event()
    waited: list[float] = []
    never.wait = lambda timeout=None: waited.append(timeout) or False  # type: ignore[method-assign]
    now[0] += 0.05  # on time: sleeps the rest of the interval
    pacer.wait(never, 1)
    assert waited and abs(waited[0] - 0.05) < 1e-9 and not caplog.records
    now[0] += 0.5  # 0.4 s late
    pacer.wait(never, 2)
    assert "behind schedule at height 2" in caplog.records[-1].getMessage()
    now[0] += 2.0  # far behind: the schedule restarts from now
    pacer.wait(never, 3)
    assert pacer.deadline == now[0]
    now[0] += 0.01
    pacer.wait(never, 4)
    assert abs(waited[-1] - 0.09) < 1e-9


def test_cli_process_serves_snapshots_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "node"
    proc = subprocess.Popen([sys.executable, "-m", "hlbook.cli", "sim", "--data-dir", str(data_dir), "--info-port",
                             str(port), "--blocks-per-sec", "50", "--coins", "8", "--mode", "streaming"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out = tmp_path / "snap.json"
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/info", json=_request(out), timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "sim did not start serving"
                time.sleep(0.05)
        assert r.status_code == 200
        height, coins = json.loads(out.read_bytes())
        assert len(coins) == 8 and height >= 999_999
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped at height" in err
    assert hour_files(data_dir, "order_statuses", "streaming")


def test_cli_reads_flags_from_the_environment(tmp_path: Path) -> None:
    env = {**os.environ, "HLBOOK_DATA_DIR": str(tmp_path), "HLBOOK_BLOCKS": "5", "HLBOOK_INFO_PORT": "-1",
           "HLBOOK_BLOCKS_PER_SEC": "100", "HLBOOK_COINS": "3", "HLBOOK_START_HEIGHT": "77", "HLBOOK_MODE": "by-block"}
    proc = subprocess.run([sys.executable, "-m", "hlbook.cli", "sim"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = raw_lines(tmp_path, "raw_book_diffs", "by-block")
    assert [line["block_number"] for line in lines] == [77, 78, 79, 80, 81]
    assert {e["coin"] for line in lines for e in line["events"]} <= {"BTC", "ETH", "@107"}


def test_restart_continues_after_the_last_written_block(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "hlbook.cli", "sim", "--data-dir", str(tmp_path), "--blocks", "5", "--coins", "3",
           "--blocks-per-sec", "100", "--info-port", "-1", "--partial-write-p", "0", "--mode", "both"]
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    first = [e["oid"] for line in raw_lines(tmp_path, "raw_book_diffs", "by-block") for e in line["events"]]
    with open(hour_files(tmp_path, "order_statuses", "by-block")[-1], "ab") as fh:
        fh.write(b'{"local_time":"2026-05-05T1')  # the earlier run died mid-line
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "continuing at 1000005" in proc.stderr
    for stream in STREAMS:  # every line decodes: the partial line was cut before appending
        assert [line["block_number"] for line in raw_lines(tmp_path, stream, "by-block")] == list(range(1_000_000, 1_000_010))
    second = [e["oid"] for line in raw_lines(tmp_path, "raw_book_diffs", "by-block")[5:] for e in line["events"]
              if isinstance(e["raw_book_diff"], dict) and "new" in e["raw_book_diff"]]
    assert second and min(second) > max(first)

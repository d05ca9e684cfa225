"""Matching engine and order flow of the node simulator.

``Simulator.step()`` produces one block: order statuses, raw book diffs and
fills as dicts shaped exactly like the node's events, consistent with a
price-time-priority book per coin (every ``new`` diff has its ``open`` or
``triggered`` status in the same block except for the HIP-2 and
assistance-fund users; updates and removes touch live orders only; fills come
in pairs sharing ``tid``; books are never crossed after a block).
``Simulator.snapshot()`` is the true state in the node's ``fileSnapshot`` shape.
Everything is derived from one seeded RNG, so a seed and a start time fix the
content of every block.
"""

from __future__ import annotations

import dataclasses
import math
import random
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sortedcontainers import SortedDict

from hlbook.common import fixed
from hlbook.common.fixed import fmt
from hlbook.common.models import ASSISTANCE_FUND_USER, HIP2_USER, ZERO_HASH
from hlbook.services.nodesim.universe import Coin, full_universe, universe

Event = dict[str, Any]
REJECTIONS_PERP = (
    ("badAloPxRejected", 60.0),
    ("perpMarginRejected", 12.0),
    ("iocCancelRejected", 8.0),
    ("minTradeNtlRejected", 4.0),
    ("reduceOnlyRejected", 3.0),
    ("perpMaxPositionRejected", 0.5),
)
REJECTIONS_SPOT = (
    ("badAloPxRejected", 60.0),
    ("insufficientSpotBalanceRejected", 12.0),
    ("iocCancelRejected", 8.0),
    ("minTradeNtlRejected", 4.0),
)
TRIGGER_TYPES = ("Stop Market", "Stop Limit", "Take Profit Market", "Take Profit Limit")
SPECIAL_USERS = (HIP2_USER, ASSISTANCE_FUND_USER)
FIRST_OID = 400_000_000_000
DEFAULT_START_HEIGHT = 1_000_000
OIDS_PER_BLOCK = 10_000  # oid space per height: a run started later never reuses an earlier run's oids
BUILDERS = (
    "0x64c06812904d342367ad155d7a8f3b7c7fb27f5f",
    "0xb84168cf3be63c6b8dad05ff5d755e97432ff80b",
    "0x6349efdbcbc71d9523582843a20029f14f8eeb8b",
)  # builder codes seen on mainnet open statuses


@dataclass(frozen=True, slots=True)
class Activity:
    """Mean events per block (all coins together), before scaling by ``volume``."""

    rejects: float = 240.0
    places: float = 22.0
    cancel_rate: float = 0.004  # per resting order per block
    takers: float = 1.2
    modifies: float = 2.0
    trigger_places: float = 0.4
    trigger_fire_p: float = 0.03
    twaps: float = 0.3
    special_places: float = 1.0  # HIP-2 (spot) and assistance fund (perps): diffs, no statuses
    empty_block_p: float = 0.02
    initial_orders: tuple[int, int] = (20, 200)
    major_depth: int = 0  # > 0: the coin of rank r starts with ~major_depth / (r + 1) ** depth_decay orders
    depth_decay: float = 0.8


# The whole market, per block (see docs/BENCHMARKS.md, "Whole market"): ~8,000 statuses (~94 %
# rejections), ~700 diffs (HIP-2 orders, which have no statuses, a third of them), ~60 fills;
# ~620,000 resting orders, BTC's 50,000 like the real fixture's.
FULL = Activity(rejects=7600.0, places=200.0, cancel_rate=0.0003, takers=15.0, modifies=20.0, trigger_places=3.0,
                twaps=1.0, special_places=250.0, empty_block_p=0.0, initial_orders=(20, 40), major_depth=50_000)
PROFILES = {"default": (Activity(), 15.0), "full": (FULL, 12.0)}  # name -> (activity, blocks per second)


@dataclass(slots=True)
class Resting:
    """An order resting on a book (or a pending trigger order when ``is_trigger``)."""

    oid: int
    user: str
    coin: str
    side: str
    px: int
    sz: int
    orig_sz: int
    timestamp: int
    cloid: str | None
    tif: str | None
    order_type: str = "Limit"
    reduce_only: bool = False
    trigger_condition: str = "N/A"
    is_trigger: bool = False
    trigger_px: int = 0
    limit_px: int = 0  # status limitPx of a trigger order (the resting px may differ)

    def order(self, sz: int | None = None, px: int | None = None) -> Event:
        """The node's order object (status and snapshot shape)."""
        return {
            "coin": self.coin,
            "side": self.side,
            "limitPx": fmt(self.px if px is None else px),
            "sz": fmt(self.sz if sz is None else sz),
            "oid": self.oid,
            "timestamp": self.timestamp,
            "triggerCondition": self.trigger_condition,
            "isTrigger": self.is_trigger,
            "triggerPx": fmt(self.trigger_px),
            "children": [],
            "isPositionTpsl": False,
            "reduceOnly": self.reduce_only,
            "orderType": self.order_type,
            "origSz": fmt(self.orig_sz),
            "tif": self.tif,
            "cloid": self.cloid,
        }


class Book:
    """One coin's book: price -> {oid: Resting} in time priority; bids keyed by -px."""

    __slots__ = ("bids", "asks")

    def __init__(self) -> None:
        self.bids: SortedDict = SortedDict()
        self.asks: SortedDict = SortedDict()

    def side(self, side: str) -> SortedDict:
        return self.bids if side == "B" else self.asks

    def best(self, side: str) -> int | None:
        levels = self.side(side)
        if not levels:
            return None
        key = levels.keys()[0]
        return -key if side == "B" else key

    def add(self, order: Resting) -> None:
        key = -order.px if order.side == "B" else order.px
        levels = self.side(order.side)
        level = levels.get(key)
        if level is None:
            level = levels[key] = {}
        level[order.oid] = order

    def discard(self, order: Resting) -> None:
        key = -order.px if order.side == "B" else order.px
        levels = self.side(order.side)
        level = levels[key]
        del level[order.oid]
        if not level:
            del levels[key]

    def entries(self, side: str) -> list[Resting]:
        """Orders of a side, best price first, time priority within a level."""
        return [o for level in self.side(side).values() for o in level.values()]


@dataclass(slots=True)
class Block:
    """One generated block: node events as dicts, in node order."""

    height: int
    time_ns: int  # block_time, epoch nanoseconds
    statuses: list[Event] = field(default_factory=list)
    diffs: list[Event] = field(default_factory=list)
    fills: list[list[Any]] = field(default_factory=list)

    @property
    def block_time(self) -> str:
        return node_time(self.time_ns)


_second_cache: list[Any] = [None, ""]


def node_time(ns: int) -> str:
    """Node timestamp with nanoseconds (``2026-05-05T17:39:13.024084407``), UTC."""
    sec, frac = divmod(ns, 1_000_000_000)
    if _second_cache[0] != sec:
        _second_cache[:] = [sec, datetime.fromtimestamp(sec, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second_cache[1]}.{frac:09d}"


def _round_to(value: int, unit: int) -> int:
    """Round half away from zero to a multiple of ``unit``."""
    q, r = divmod(abs(value), unit)
    if 2 * r >= unit:
        q += 1
    return q * unit if value >= 0 else -q * unit


_MICRO = fixed.ONE // 1_000_000


class Simulator:
    """Generates blocks; holds the true book of every coin.

    Initial state (height ``start_height - 1``) is pre-populated with resting
    orders; ``step()`` produces ``start_height``, ``start_height + 1``, …
    """

    def __init__(
        self,
        seed: int = 0,
        coins: int = 50,
        start_height: int = DEFAULT_START_HEIGHT,
        start_time: datetime | None = None,
        blocks_per_sec: float = 15.0,
        volume: float = 1.0,
        activity: Activity | None = None,
        profile: str = "default",
        depth: int | None = None,
    ) -> None:
        if blocks_per_sec <= 0:
            raise ValueError("blocks_per_sec must be positive")
        if profile not in PROFILES:
            raise ValueError(f"profile must be one of {list(PROFILES)}, not {profile!r}")
        self.rng = random.Random(seed)
        self.coins = full_universe(seed) if profile == "full" else universe(coins, seed)
        self.coin_by_name = {c.name: c for c in self.coins}
        self.books = {c.name: Book() for c in self.coins}
        self.fair = {c.name: c.price for c in self.coins}
        self.activity = activity or PROFILES[profile][0]
        if depth is not None:  # resting orders of the most active coin at start (the others fall off with rank)
            self.activity = dataclasses.replace(self.activity, major_depth=depth)
        self.volume = volume
        self.height = start_height - 1
        start = start_time or datetime.now(timezone.utc)
        if start.tzinfo is None:
            start = start.replace(tzinfo=timezone.utc)
        self.start_ns = int(start.timestamp()) * 1_000_000_000 + start.microsecond * 1000
        self.interval_ns = int(1_000_000_000 / blocks_per_sec)
        self.start_height = start_height
        self.first_oid = FIRST_OID + max(0, start_height - DEFAULT_START_HEIGHT) * OIDS_PER_BLOCK
        self.next_oid = self.first_oid
        self.users = [f"0x{self.rng.getrandbits(160):040x}" for _ in range(2000)]
        self.live: list[Resting] = []  # every resting order (random picks)
        self.live_pos: dict[int, int] = {}
        self.triggers: list[Resting] = []  # pending trigger orders (off book)
        self.positions: dict[tuple[str, str], tuple[int, int]] = {}  # (user, coin) -> (size, entry px)
        self.next_twap = 1_700_000
        self._cum_weights = list(_cumulative(c.weight for c in self.coins))
        self.spread_ticks = {c.name: max(2.0, 0.003 * c.price / c.tick) for c in self.coins}
        self._populate()

    # ---------------------------------------------------------------- state

    def _time_ns(self, height: int) -> int:
        return self.start_ns + (height - self.start_height) * self.interval_ns

    def snapshot(self) -> tuple[int, list[Any]]:
        """(height, ``[[coin, [[[user, order], …bids], [[user, order], …asks]]], …]``) of the true state."""
        body = []
        for coin in self.coins:
            book = self.books[coin.name]
            body.append([coin.name, [[[o.user, o.order()] for o in book.entries(s)] for s in ("B", "A")]])
        return self.height, body

    def resting_count(self) -> int:
        return len(self.live)

    def _rest(self, order: Resting) -> None:
        self.books[order.coin].add(order)
        self.live_pos[order.oid] = len(self.live)
        self.live.append(order)

    def _unrest(self, order: Resting) -> None:
        self.books[order.coin].discard(order)
        pos = self.live_pos.pop(order.oid)
        last = self.live.pop()
        if last is not order:
            self.live[pos] = last
            self.live_pos[last.oid] = pos

    # ---------------------------------------------------------- generation

    def _coin(self) -> Coin:
        return self.coins[bisect_right(self._cum_weights, self.rng.random() * self._cum_weights[-1])]

    def _user(self, coin: Coin | None = None, special_p: float = 0.0) -> str:
        if coin is not None and special_p and self.rng.random() < special_p:
            return HIP2_USER if coin.is_spot else ASSISTANCE_FUND_USER
        return self.users[int(self.rng.random() ** 2 * len(self.users))]

    def _oid(self) -> int:
        self.next_oid += 1
        return self.next_oid

    def _hash(self) -> str:
        return f"0x{self.rng.getrandbits(256):064x}"

    def _cloid(self, p: float = 0.6) -> str | None:
        return f"0x{self.rng.getrandbits(128):032x}" if self.rng.random() < p else None

    def _size(self, coin: Coin) -> int:
        notional = min(math.exp(self.rng.gauss(5.5, 1.6)), 300_000.0)
        lots = max(1, int(notional * fixed.ONE / self.fair[coin.name] * fixed.ONE / coin.lot))
        return lots * coin.lot

    def _clamp(self, coin: Coin, px: int) -> int:
        return min(max(px, coin.min_px), coin.max_px)

    def _passive_px(self, coin: Coin, side: str) -> int:
        """A price that rests without crossing: near the same-side best or deeper around fair."""
        book = self.books[coin.name]
        rng = self.rng
        same, opp = book.best(side), book.best("A" if side == "B" else "B")
        sign = -1 if side == "B" else 1
        if same is not None and rng.random() < 0.35:
            px = same + sign * coin.tick * int(rng.expovariate(0.5))
        else:
            mean_ticks = max(2.0, 0.0015 * self.fair[coin.name] / coin.tick)
            px = self.fair[coin.name] + sign * coin.tick * (1 + int(rng.expovariate(1.0 / mean_ticks)))
        if opp is not None:
            px = min(px, opp - coin.tick) if side == "B" else max(px, opp + coin.tick)
        return self._clamp(coin, px - px % coin.tick)

    def _walk(self) -> None:
        """Fair prices: small mean-reverting random walk inside each coin's valid range."""
        rng = self.rng
        for coin in self.coins:
            if rng.random() < 0.3:
                fair = self.fair[coin.name]
                pull = (coin.price - fair) / coin.price
                step = coin.tick * max(1, int(fair * 0.0003 / coin.tick))
                up = rng.random() < 0.5 + pull * 5
                fair += step if up else -step
                lo, hi = coin.price * 9 // 10, min(coin.price * 11 // 10, coin.max_px)
                self.fair[coin.name] = min(max(fair - fair % coin.tick, lo, coin.min_px), hi)

    def _count(self, mean: float) -> int:
        """Poisson-distributed count (normal approximation above 30)."""
        mean *= self.volume
        if mean <= 0:
            return 0
        if mean > 30:
            return max(0, int(self.rng.gauss(mean, math.sqrt(mean)) + 0.5))
        limit, k, p = math.exp(-mean), 0, self.rng.random()
        while p > limit:
            k += 1
            p *= self.rng.random()
        return k

    def _populate(self) -> None:
        """Initial books (height start-1): resting orders with timestamps in the past hour."""
        a = self.activity
        lo, hi = a.initial_orders
        t0 = self._time_ns(self.start_height) // 1_000_000 - 3_600_000
        counts = [self.rng.randint(lo, hi) for _ in self.coins]
        if a.major_depth:
            counts = [max(n, int(a.major_depth / (rank + 1) ** a.depth_decay * self.rng.uniform(0.9, 1.1)))
                      for rank, n in enumerate(counts)]
        total = sum(counts)
        self.next_oid = self.first_oid - total - 1
        made = 0
        for coin, n in zip(self.coins, counts):
            for i in range(n):
                side = "B" if i % 2 == 0 else "A"
                user = self._user(coin, 0.05)
                px = self._passive_px(coin, side)
                sz = self._size(coin)
                orig = sz + coin.lot * self.rng.randint(1, 50) if self.rng.random() < 0.15 else sz
                made += 1
                ts = t0 + made * 3_600_000 // (total + 1)
                self._rest(Resting(self._oid(), user, coin.name, side, px, sz, orig, ts, self._maker_cloid(user),
                                   self._maker_tif(user), reduce_only=self.rng.random() < 0.1))
        self.next_oid = self.first_oid

    def _maker_cloid(self, user: str) -> str | None:
        return None if user in SPECIAL_USERS else self._cloid()

    def _maker_tif(self, user: str) -> str:
        return "Alo" if user in SPECIAL_USERS or self.rng.random() >= 0.4 else "Gtc"

    def step(self) -> Block:
        """Generate the next block, apply it to the books, and return it."""
        self.height += 1
        jitter = int(self.rng.random() * self.interval_ns * 0.3)
        block = Block(self.height, self._time_ns(self.height) + jitter)
        gen = _BlockGen(self, block)
        if self.rng.random() < self.activity.empty_block_p:
            return block
        self._walk()
        a = self.activity
        actions = (
            [gen.reject] * self._count(a.rejects)
            + [gen.place] * self._count(a.places)
            + [gen.special_place] * self._count(a.special_places)
            + [gen.cancel] * self._count(a.cancel_rate * len(self.live) / max(self.volume, 1e-9))
            + [gen.take] * self._count(a.takers)
            + [gen.modify] * self._count(a.modifies)
            + [gen.place_trigger] * self._count(a.trigger_places)
            + [gen.twap] * self._count(a.twaps)
        )
        self.rng.shuffle(actions)
        gen.fire_triggers()
        for action in actions:
            action()
        return block


def _cumulative(weights: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


class _BlockGen:
    """The actions that fill one block (each appends node events and updates the books)."""

    def __init__(self, sim: Simulator, block: Block) -> None:
        self.sim = sim
        self.block = block
        self.rng = sim.rng
        self.ms = block.time_ns // 1_000_000
        self.time = block.block_time

    # ------------------------------------------------------------ emitters

    def status(self, user: str, status: str, order: Event, hash_: str | None = None, builder: Any = None) -> None:
        if user in SPECIAL_USERS:
            return
        self.block.statuses.append(
            {"time": self.time, "user": user, "hash": hash_, "builder": builder, "status": status, "order": order}
        )

    def diff(self, o: Resting, body: Any, px: int | None = None) -> None:
        self.block.diffs.append(
            {"user": o.user, "oid": o.oid, "coin": o.coin, "side": o.side, "px": fmt(o.px if px is None else px),
             "raw_book_diff": body}
        )

    def new(self, o: Resting) -> None:
        self.sim._rest(o)
        self.diff(o, {"new": {"sz": fmt(o.sz)}})

    def remove(self, o: Resting) -> None:
        self.sim._unrest(o)
        self.diff(o, "remove")

    # ------------------------------------------------------------- actions

    def reject(self) -> None:
        """A rejected order: a status only, no book change (the hot path: built directly)."""
        sim, rng = self.sim, self.rng
        coin = sim._coin()
        names, cum = _REJECT_SPOT if coin.is_spot else _REJECT_PERP
        status = names[bisect_right(cum, rng.random() * cum[-1])]
        side = "B" if rng.random() < 0.5 else "A"
        sign = 1 if side == "B" else -1
        if status == "badAloPxRejected":  # an ALO that would cross
            opp = sim.books[coin.name].best("A" if side == "B" else "B")
            tif, px = "Alo", (sim.fair[coin.name] if opp is None else opp) + sign * coin.tick * int(rng.random() * 4)
        else:
            tif = "Ioc" if status == "iocCancelRejected" or rng.random() < 0.4 else "Alo"
            px = sim.fair[coin.name] - sign * coin.tick * (1 + int(rng.random() * sim.spread_ticks[coin.name]))
        sz = fmt(sim._size(coin))
        order = {
            "coin": coin.name, "side": side, "limitPx": fmt(sim._clamp(coin, px)), "sz": sz, "oid": sim._oid(),
            "timestamp": self.ms, "triggerCondition": "N/A", "isTrigger": False, "triggerPx": "0.0", "children": [],
            "isPositionTpsl": False, "reduceOnly": status == "reduceOnlyRejected" or rng.random() < 0.05,
            "orderType": "Limit", "origSz": sz, "tif": tif, "cloid": sim._cloid(0.8),
        }
        self.block.statuses.append(
            {"time": self.time, "user": sim._user(), "hash": None, "builder": None, "status": status, "order": order}
        )

    def place(self, user: str | None = None) -> None:
        """A resting Alo/Gtc order: ``open`` status and a ``new`` diff."""
        sim = self.sim
        coin = sim._coin()
        user = user or sim._user()
        side = "B" if self.rng.random() < 0.5 else "A"
        sz = sim._size(coin)
        o = Resting(sim._oid(), user, coin.name, side, sim._passive_px(coin, side), sz, sz, self.ms,
                    sim._maker_cloid(user), sim._maker_tif(user), reduce_only=self.rng.random() < 0.05)
        builder = {"b": BUILDERS[int(self.rng.random() * 3)], "f": 10} if self.rng.random() < 0.05 else None
        self.status(user, "open", o.order(), sim._hash(), builder)
        self.new(o)

    def special_place(self) -> None:
        """An order of the HIP-2 (spot) or assistance-fund (perp) address: a diff, never a status."""
        coin = self.sim._coin()
        self.place(HIP2_USER if coin.is_spot else ASSISTANCE_FUND_USER)

    def cancel(self) -> None:
        sim = self.sim
        if not sim.live:
            return
        o = sim.live[int(self.rng.random() * len(sim.live))]
        self.status(o.user, "canceled", o.order())
        self.remove(o)

    def modify(self) -> None:
        """Cancel a resting order with a cloid and reopen it (new oid, same cloid) at a new price."""
        sim = self.sim
        if not sim.live:
            return
        old = sim.live[int(self.rng.random() * len(sim.live))]
        if old.cloid is None or old.order_type != "Limit":
            return
        self.status(old.user, "canceled", old.order())
        self.remove(old)
        coin = self._coin_of(old.coin)
        sz = sim._size(coin)
        new = Resting(sim._oid(), old.user, old.coin, old.side, sim._passive_px(coin, old.side), sz, sz, self.ms,
                      old.cloid, old.tif, reduce_only=old.reduce_only)
        self.status(new.user, "open", new.order(), sim._hash())
        self.new(new)

    def _coin_of(self, name: str) -> Coin:
        return self.sim.coin_by_name[name]

    def take(self) -> None:
        """An aggressive order (IOC, or GTC resting its remainder) that sweeps the other side."""
        sim, rng = self.sim, self.rng
        coin = sim._coin()
        side = "B" if rng.random() < 0.5 else "A"
        book = sim.books[coin.name]
        opp = book.best("A" if side == "B" else "B")
        if opp is None:
            return
        px = sim._clamp(coin, opp + (coin.tick if side == "B" else -coin.tick) * int(rng.expovariate(0.4)))
        top = sum(o.sz for o in book.entries("A" if side == "B" else "B")[:2])
        sz = max(coin.lot, (int(top * rng.uniform(0.05, 1.2)) // coin.lot) * coin.lot)
        tif = "Ioc" if rng.random() < 0.8 else "Gtc"
        o = Resting(sim._oid(), sim._user(), coin.name, side, px, sz, sz, self.ms, sim._cloid(0.5), tif)
        hash_ = sim._hash()
        self.status(o.user, "open", o.order(), hash_)
        self.execute(o, coin, hash_, rest=tif == "Gtc")

    def execute(self, o: Resting, coin: Coin, hash_: str, rest: bool, twap_id: int | None = None,
                status: str | None = None) -> None:
        """Match ``o`` against the book, then finish it: filled, canceled remainder, or resting remainder."""
        remaining = self.match(o, hash_, twap_id)
        if twap_id is not None:
            return
        if remaining == 0:
            self.status(o.user, "filled", o.order(sz=0))
        elif rest:
            o.sz = remaining
            self.new(o)
        elif remaining == o.orig_sz:
            self.status(o.user, "iocCancelRejected", o.order())
        else:
            self.status(o.user, "canceled", o.order(sz=remaining))

    def match(self, taker: Resting, hash_: str, twap_id: int | None) -> int:
        """Fill ``taker`` against resting orders in price-time priority; returns the unfilled size."""
        sim = self.sim
        levels = sim.books[taker.coin].side("A" if taker.side == "B" else "B")
        remaining = taker.orig_sz
        while remaining and levels:
            key, level = levels.peekitem(0)
            px = key if taker.side == "B" else -key
            if (taker.side == "B" and px > taker.px) or (taker.side == "A" and px < taker.px):
                break
            for maker in list(level.values()):
                qty = min(remaining, maker.sz)
                self.trade(taker, maker, px, qty, hash_, twap_id)
                remaining -= qty
                if qty == maker.sz:
                    self.status(maker.user, "filled", maker.order(sz=0))
                    self.remove(maker)
                else:
                    self.diff(maker, {"update": {"origSz": fmt(maker.sz), "newSz": fmt(maker.sz - qty)}})
                    maker.sz -= qty
                if not remaining:
                    break
        return remaining

    def trade(self, taker: Resting, maker: Resting, px: int, qty: int, hash_: str, twap_id: int | None) -> None:
        tid = self.rng.getrandbits(50)
        pair = [self.fill(taker, px, qty, hash_, True, tid, twap_id), self.fill(maker, px, qty, hash_, False, tid, None)]
        if self.rng.random() < 0.5:
            pair.reverse()
        self.block.fills.extend(pair)

    def fill(self, o: Resting, px: int, qty: int, hash_: str, crossed: bool, tid: int, twap_id: int | None) -> list[Any]:
        sim = self.sim
        coin = self._coin_of(o.coin)
        start, entry = sim.positions.get((o.user, o.coin), (0, 0))
        signed = qty if o.side == "B" else -qty
        closing = min(qty, abs(start)) if start and (start > 0) != (signed > 0) else 0
        pnl = (px - entry) * closing // fixed.ONE if start > 0 else (entry - px) * closing // fixed.ONE
        end = start + signed
        if end == 0:
            entry = 0
        elif closing < qty and (start == 0 or (start > 0) == (signed > 0)):
            entry = (entry * abs(start) + px * qty) // abs(end)
        elif abs(signed) > abs(start) and closing:
            entry = px
        sim.positions[(o.user, o.coin)] = (end, entry)
        notional = px * qty // fixed.ONE
        fee = notional * 45 // 100_000 if crossed else -(notional * 3 // 100_000)
        event: Event = {
            "coin": o.coin, "px": fmt(px), "sz": fmt(qty), "side": o.side, "time": self.ms,
            "startPosition": fmt(start), "dir": _direction(coin, o.side, start, qty),
            "closedPnl": fmt(_round_to(pnl if closing else 0, _MICRO)), "hash": hash_, "oid": o.oid,
            "crossed": crossed, "fee": fmt(_round_to(fee, _MICRO)), "tid": tid,
        }
        if o.cloid is not None:
            event["cloid"] = o.cloid
        event["feeToken"] = "USDC" if not coin.is_spot or o.side == "A" else coin.base
        event["twapId"] = twap_id
        return [o.user, event]

    def twap(self) -> None:
        """A TWAP slice: fills only (zero hash, ``twapId`` on the taker), no status."""
        sim, rng = self.sim, self.rng
        coin = sim._coin()
        side = "B" if rng.random() < 0.5 else "A"
        opp = sim.books[coin.name].best("A" if side == "B" else "B")
        if opp is None:
            return
        px = sim._clamp(coin, opp + (coin.tick if side == "B" else -coin.tick) * 3)
        sz = sim._size(coin)
        sim.next_twap += rng.randint(1, 20)
        o = Resting(sim._oid(), sim._user(), coin.name, side, px, sz, sz, self.ms, None, "Ioc")
        self.execute(o, coin, ZERO_HASH, rest=False, twap_id=sim.next_twap)

    def place_trigger(self) -> None:
        """A trigger order waiting off book (``open``, ``isTrigger``); it fires in a later block."""
        sim, rng = self.sim, self.rng
        coin = sim._coin()
        side = "B" if rng.random() < 0.5 else "A"
        kind = rng.choice(TRIGGER_TYPES)
        fair = sim.fair[coin.name]
        trigger_px = sim._clamp(coin, fair + coin.tick * rng.randint(-200, 200))
        trigger_px -= trigger_px % coin.tick
        if kind.endswith("Market"):
            slip = fair // 10 if side == "B" else -(fair // 10)
            limit = sim._clamp(coin, trigger_px + slip)
        else:
            limit = sim._clamp(coin, trigger_px + coin.tick * rng.randint(-20, 20))
        limit -= limit % coin.tick
        above = (kind.startswith("Stop")) == (side == "B")
        sz = sim._size(coin)
        o = Resting(sim._oid(), sim._user(), coin.name, side, limit, sz, sz, self.ms, sim._cloid(0.3), None,
                    order_type=kind, reduce_only=rng.random() < 0.6 and not coin.is_spot, is_trigger=True, trigger_px=trigger_px,
                    trigger_condition=f"Price {'above' if above else 'below'} {_trigger_text(trigger_px)}",
                    limit_px=limit)
        self.status(o.user, "open", o.order(), sim._hash())
        sim.triggers.append(o)

    def fire_triggers(self) -> None:
        sim = self.sim
        if not sim.triggers:
            return
        keep = []
        for o in sim.triggers:
            if self.rng.random() < sim.activity.trigger_fire_p:
                self.fire(o)
            else:
                keep.append(o)
        sim.triggers = keep

    def fire(self, o: Resting) -> None:
        """``triggered`` status, then the order executes; a limit remainder rests (its px may differ)."""
        coin = self._coin_of(o.coin)
        self.status(o.user, "triggered", o.order())
        market = o.order_type.endswith("Market")
        self.execute_triggered(o, coin, market)

    def execute_triggered(self, o: Resting, coin: Coin, market: bool) -> None:
        remaining = self.match(o, self.sim._hash(), None)
        if remaining == 0:
            self.status(o.user, "filled", o.order(sz=0))
            return
        if market:
            self.status(o.user, "canceled", o.order(sz=remaining))
            return
        opp = self.sim.books[o.coin].best("A" if o.side == "B" else "B")
        px = o.px
        if self.rng.random() < 0.5:  # rests one tick more passive than its status limitPx
            px = px - coin.tick if o.side == "B" else px + coin.tick
        if opp is not None:
            px = min(px, opp - coin.tick) if o.side == "B" else max(px, opp + coin.tick)
        o.px, o.sz = self.sim._clamp(coin, px), remaining
        o.is_trigger, o.trigger_condition, o.trigger_px, o.tif = False, "Triggered", 0, "Gtc"
        self.new(o)


_REJECT_PERP = ([s for s, _ in REJECTIONS_PERP], list(_cumulative(w for _, w in REJECTIONS_PERP)))
_REJECT_SPOT = ([s for s, _ in REJECTIONS_SPOT], list(_cumulative(w for _, w in REJECTIONS_SPOT)))


def _direction(coin: Coin, side: str, start: int, qty: int) -> str:
    if coin.is_spot:
        return "Buy" if side == "B" else "Sell"
    if side == "B":
        if start >= 0:
            return "Open Long"
        return "Close Short" if qty <= -start else "Short > Long"
    if start <= 0:
        return "Open Short"
    return "Close Long" if qty <= start else "Long > Short"


def _trigger_text(px: int) -> str:
    text = fmt(px)
    return text[:-2] if text.endswith(".0") else text

"""Matching engine and order flow of the node simulator.

``Simulator.step()`` produces one block: order statuses, raw book diffs and
fills shaped exactly like the node's events (encoded as the node writes
them; ``Block.statuses`` etc. decode them), consistent with a
price-time-priority book per coin (every ``new`` diff has its ``open`` or
``triggered`` status in the same block except for the HIP-2 and
assistance-fund users; updates and removes touch live orders only; fills come
in pairs sharing ``tid``; books are never crossed after a block).
``Simulator.snapshot()`` is the true state in the node's ``fileSnapshot`` shape.
Everything is derived from one seeded RNG, so a seed and the block times fix
the content of every block.

The flow is in equilibrium with the initial depth: each coin's cancels rise
with its resting orders relative to the depth it started with (``churn``), and
the special users requote (a new order replaces one of theirs once they hold
their starting count), so the resting orders stay near the start for any run.
"""

from __future__ import annotations

import dataclasses
import math
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import orjson

from hlbook.common import fixed
from hlbook.common.fixed import fmt
from hlbook.common.models import ASSISTANCE_FUND_USER, HIP2_USER, ZERO_HASH
from hlbook.services.nodesim.block import Block, Event, node_time
from hlbook.services.nodesim.info_server import Captured
from hlbook.services.nodesim.market import SPECIAL_USERS, Market, Resting, quoted, text
from hlbook.services.nodesim.rejects import REJECTIONS_PERP, REJECTIONS_SPOT, Senders, block_formats
from hlbook.services.nodesim.universe import Coin, full_universe, universe

__all__ = ["Activity", "Block", "Event", "Resting", "Simulator", "node_time", "PROFILES", "FULL",
           "REJECTIONS_PERP", "REJECTIONS_SPOT", "SPECIAL_USERS"]

TRIGGER_TYPES = ("Stop Market", "Stop Limit", "Take Profit Market", "Take Profit Limit")
FIRST_OID = 400_000_000_000
DEFAULT_START_HEIGHT = 1_000_000
OIDS_PER_BLOCK = 10_000  # oid space per height: a run started later never reuses an earlier run's oids
MIN_GAP_NS = 1_000_000  # block times rise by at least a millisecond
BUILDERS = (
    "0x64c06812904d342367ad155d7a8f3b7c7fb27f5f",
    "0xb84168cf3be63c6b8dad05ff5d755e97432ff80b",
    "0x6349efdbcbc71d9523582843a20029f14f8eeb8b",
)  # builder codes seen on mainnet open statuses


@dataclass(frozen=True, slots=True)
class Activity:
    """Mean events per block (all coins together), before scaling by ``volume``."""

    rejects: float = 240.0
    places: float = 22.0  # resting orders placed; as many are canceled (or filled) at the starting depth
    churn: float = 4.0  # a coin's cancels: its share of ``places`` times (resting / starting depth) ** churn
    takers: float = 1.2
    modifies: float = 2.0
    trigger_places: float = 0.4
    trigger_fire_p: float = 0.03
    twaps: float = 0.3
    special_places: float = 1.0  # HIP-2 (spot) and assistance fund (perps) requotes: diffs, no statuses
    special_share: float = 0.05  # of the starting orders
    empty_block_p: float = 0.02
    initial_orders: tuple[int, int] = (20, 200)
    major_depth: int = 0  # > 0: the coin of rank r starts with ~major_depth / (r + 1) ** depth_decay orders
    depth_decay: float = 0.8


# The whole market, per block (see docs/BENCHMARKS.md, "Whole market"): ~8,000 statuses (~94 %
# rejections), ~700 diffs (HIP-2 requotes a third of them), ~70 fills; ~632,000 resting orders,
# BTC's 50,000 like the real fixture's, kept there by the flow.
FULL = Activity(rejects=7600.0, places=200.0, takers=15.0, modifies=20.0, trigger_places=3.0, twaps=1.0,
                special_places=115.0, empty_block_p=0.0, initial_orders=(20, 40), major_depth=50_000)
PROFILES = {"default": (Activity(), 15.0), "full": (FULL, 12.0)}  # name -> (activity, blocks per second)

_MICRO = fixed.ONE // 1_000_000
_STATUS = b'{"time":"%s","user":"%s","hash":%s,"builder":%s,"status":"%s","order":%s}'
_DIFF = b'{"user":"%s","oid":%d,"coin":"%s","side":"%s","px":"%s","raw_book_diff":%s}'


def _round_to(value: int, unit: int) -> int:
    """Round half away from zero to a multiple of ``unit``."""
    q, r = divmod(abs(value), unit)
    if 2 * r >= unit:
        q += 1
    return q * unit if value >= 0 else -q * unit


def _cumulative(weights: Iterable[float]) -> Iterator[float]:
    total = 0.0
    for w in weights:
        total += w
        yield total


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
        self.markets = [Market(c) for c in self.coins]
        self.market_of = {m.coin.name: m for m in self.markets}
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
        self.last_ns: int | None = None  # block time of the last block
        self.first_oid = FIRST_OID + max(0, start_height - DEFAULT_START_HEIGHT) * OIDS_PER_BLOCK
        self.next_oid = self.first_oid
        self.users = [f"0x{self.rng.getrandbits(160):040x}" for _ in range(2000)]
        self.users_b = [u.encode() for u in self.users]
        self.triggers: list[Resting] = []  # pending trigger orders (off book)
        self.positions: dict[tuple[str, str], tuple[int, int]] = {}  # (user, coin) -> (size, entry px)
        self.next_twap = 1_700_000
        self._weights = [c.weight for c in self.coins]
        self._cum_weights = list(_cumulative(self._weights))
        self._populate()
        self.senders = Senders(self.markets, self._cum_weights, self.users_b, self.rng)

    # ---------------------------------------------------------------- state

    def _time_ns(self, height: int) -> int:
        return self.start_ns + (height - self.start_height) * self.interval_ns

    def snapshot(self) -> tuple[int, list[Any]]:
        """(height, ``[[coin, [[[user, order], …bids], [[user, order], …asks]]], …]``) of the true state."""
        body = []
        for m in self.markets:
            body.append([m.coin.name, [[[o.user, o.order()] for o in m.entries(s)] for s in ("B", "A")]])
        return self.height, body

    def capture(self) -> Captured:
        """The true state's orders with their sizes now, for ``Captured.encode`` later (cheap: under a lock)."""
        return Captured(self.height, [(m.coin.name, Captured.side(m.bids), Captured.side(m.asks)) for m in self.markets])

    def resting_count(self) -> int:
        return sum(m.resting() for m in self.markets)

    def _rest(self, order: Resting) -> None:
        self.market_of[order.coin].add(order)

    def _unrest(self, order: Resting) -> None:
        self.market_of[order.coin].discard(order)

    # ---------------------------------------------------------- generation

    def _market(self) -> Market:
        """A coin picked by its activity weight."""
        return self.markets[bisect_right(self._cum_weights, self.rng.random() * self._cum_weights[-1])]

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

    def _size(self, m: Market) -> int:
        notional = min(math.exp(self.rng.gauss(5.5, 1.6)), 300_000.0)
        lots = max(1, int(notional * fixed.ONE / m.fair * fixed.ONE / m.coin.lot))
        return lots * m.coin.lot

    @staticmethod
    def _clamp(coin: Coin, px: int) -> int:
        return min(max(px, coin.min_px), coin.max_px)

    def _passive_px(self, m: Market, side: str) -> int:
        """A price that rests without crossing: near the same-side best or deeper around fair."""
        rng, coin = self.rng, m.coin
        same, opp = (m.best_bid, m.best_ask) if side == "B" else (m.best_ask, m.best_bid)
        sign = -1 if side == "B" else 1
        if same is not None and rng.random() < 0.35:
            px = same + sign * coin.tick * int(rng.expovariate(0.5))
        else:
            mean_ticks = max(2.0, 0.0015 * m.fair / coin.tick)
            px = m.fair + sign * coin.tick * (1 + int(rng.expovariate(1.0 / mean_ticks)))
        if opp is not None:
            px = min(px, opp - coin.tick) if side == "B" else max(px, opp + coin.tick)
        return self._clamp(coin, px - px % coin.tick)

    def _walk(self) -> None:
        """Fair prices: small mean-reverting random walk inside each coin's valid range."""
        r = self.rng.random
        for m in self.markets:
            if r() < 0.3:
                coin, fair = m.coin, m.fair
                pull = (coin.price - fair) / coin.price
                step = coin.tick * max(1, int(fair * 0.0003 / coin.tick))
                fair += step if r() < 0.5 + pull * 5 else -step
                lo, hi = coin.price * 9 // 10, min(coin.price * 11 // 10, coin.max_px)
                m.set_fair(min(max(fair - fair % coin.tick, lo, coin.min_px), hi))

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

    def _runs(self, n: int, slots: int) -> list[int]:
        """``n`` rejections and ``slots - 1`` actions in a uniformly random order: how many rejections
        come before the first action, between each two, and after the last (the actions' places
        among the ``n + slots - 1`` drawn at once: no shuffle of the ~8,000)."""
        runs, prev = [], -1
        for place in sorted(self.rng.sample(range(n + slots - 1), slots - 1)):
            runs.append(place - prev - 1)
            prev = place
        runs.append(n + slots - 2 - prev)
        return runs

    def _cancel_weights(self) -> tuple[list[float], float]:
        """Cumulative cancel weights per coin, and the mean cancels of a block (before ``volume``):
        a coin's share of ``places`` times (its resting orders / its starting ones) ** ``churn``."""
        churn, cum, total = self.activity.churn, [], 0.0
        for m, w in zip(self.markets, self._weights):
            if m.orders:
                total += w * (len(m.orders) / m.target) ** churn
            cum.append(total)
        return cum, total / self._cum_weights[-1] * self.activity.places

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
        for m, n in zip(self.markets, counts):
            coin = m.coin
            for i in range(n):
                side = "B" if i % 2 == 0 else "A"
                user = self._user(coin, a.special_share)
                px = self._passive_px(m, side)
                sz = self._size(m)
                orig = sz + coin.lot * self.rng.randint(1, 50) if self.rng.random() < 0.15 else sz
                made += 1
                ts = t0 + made * 3_600_000 // (total + 1)
                m.add(Resting(self._oid(), user, coin.name, side, px, sz, orig, ts, self._maker_cloid(user),
                              self._maker_tif(user), reduce_only=self.rng.random() < 0.1))
            m.target, m.special_target = max(1, len(m.orders)), len(m.specials)
        self.next_oid = self.first_oid

    def _maker_cloid(self, user: str) -> str | None:
        return None if user in SPECIAL_USERS else self._cloid()

    def _maker_tif(self, user: str) -> str:
        return "Alo" if user in SPECIAL_USERS or self.rng.random() >= 0.4 else "Gtc"

    def step(self, time_ns: int | None = None) -> Block:
        """Generate the next block, apply it to the books, and return it.

        ``time_ns``: its block time (a live run's, from the clock); default: the schedule from
        ``start_time`` at ``blocks_per_sec`` with some jitter. Block times rise by at least 1 ms."""
        self.height += 1
        jitter = int(self.rng.random() * self.interval_ns * 0.3)
        now = self._time_ns(self.height) + jitter if time_ns is None else time_ns
        if self.last_ns is not None and now < self.last_ns + MIN_GAP_NS:
            now = self.last_ns + MIN_GAP_NS
        self.last_ns = now
        gen = _BlockGen(self, now)
        if self.rng.random() >= self.activity.empty_block_p:
            self._fill(gen)
        return gen.block()

    def _fill(self, gen: _BlockGen) -> None:
        """The block's actions in random order, the rejections spread between them."""
        self._walk()
        a = self.activity
        gen.cancel_cum, cancels = self._cancel_weights()
        actions: list[Callable[[], None]] = (
            [gen.place] * self._count(a.places)
            + [gen.requote] * self._count(a.special_places)
            + [gen.cancel] * self._count(cancels)
            + [gen.take] * self._count(a.takers)
            + [gen.modify] * self._count(a.modifies)
            + [gen.place_trigger] * self._count(a.trigger_places)
            + [gen.twap] * self._count(a.twaps)
        )
        self.rng.shuffle(actions)
        self.senders.turn_over()
        runs = self._runs(self._count(a.rejects), len(actions) + 1)
        gen.fire_triggers()
        for action, run in zip(actions, runs):
            gen.rejects(run)
            action()
        gen.rejects(runs[-1])


class _BlockGen:
    """The actions that fill one block (each appends node events and updates the books)."""

    def __init__(self, sim: Simulator, time_ns: int) -> None:
        self.sim = sim
        self.rng = sim.rng
        self.height = sim.height
        self.time_ns = time_ns
        self.ms = time_ns // 1_000_000
        self.time = node_time(time_ns)
        self.statuses: list[bytes] = []
        self.diffs: list[bytes] = []
        self.fills: list[bytes] = []
        self.time_b = self.time.encode()
        self.formats = block_formats(self.time, self.ms)
        self.cancel_cum: list[float] = []

    def block(self) -> Block:
        return Block.encoded(self.height, self.time_ns, self.statuses, self.diffs, self.fills)

    # ------------------------------------------------------------ emitters

    def status(self, o: Resting, status: str, sz: int | None = None, hash_: str | None = None,
               builder: Any = None) -> None:
        """``o``'s status (with size ``sz`` if given); none for the special users."""
        if o.user in SPECIAL_USERS:
            return
        self.statuses.append(_STATUS % (self.time_b, o.user.encode(), quoted(hash_),
                                        b"null" if builder is None else orjson.dumps(builder), status.encode(),
                                        o.order_json(sz)))

    def diff(self, o: Resting, body: bytes) -> None:
        self.diffs.append(_DIFF % (o.user.encode(), o.oid, o.coin.encode(), o.side.encode(), text(o.px), body))

    def new(self, o: Resting) -> None:
        self.sim._rest(o)
        self.diff(o, b'{"new":{"sz":"%s"}}' % text(o.sz))

    def remove(self, o: Resting) -> None:
        self.sim._unrest(o)
        self.diff(o, b'"remove"')

    # ------------------------------------------------------------- actions

    def rejects(self, k: int) -> None:
        """``k`` rejected orders: statuses only, no book change (rejects.Senders: the hot path)."""
        if k:
            self.statuses += self.sim.senders.render(k, self.formats, self.sim.next_oid)
            self.sim.next_oid += k

    def place(self, user: str | None = None, m: Market | None = None) -> None:
        """A resting Alo/Gtc order: ``open`` status and a ``new`` diff."""
        sim = self.sim
        m = m or sim._market()
        user = user or sim._user()
        side = "B" if self.rng.random() < 0.5 else "A"
        sz = sim._size(m)
        o = Resting(sim._oid(), user, m.coin.name, side, sim._passive_px(m, side), sz, sz, self.ms,
                    sim._maker_cloid(user), sim._maker_tif(user), reduce_only=self.rng.random() < 0.05)
        builder = {"b": BUILDERS[int(self.rng.random() * 3)], "f": 10} if self.rng.random() < 0.05 else None
        self.status(o, "open", hash_=sim._hash(), builder=builder)
        self.new(o)

    def requote(self) -> None:
        """The HIP-2 (spot) or assistance-fund (perp) address moves an order: once it holds as many
        as at start, one of its orders goes (a remove diff) and a new one rests (diffs, never statuses)."""
        m = self.sim._market()
        if m.specials and len(m.specials) >= max(1, m.special_target):
            self.remove(m.specials[int(self.rng.random() * len(m.specials))])
        self.place(HIP2_USER if m.coin.is_spot else ASSISTANCE_FUND_USER, m)

    def cancel(self) -> None:
        """A resting order canceled by its user, on a coin picked by its cancel weight (``_cancel_weights``)."""
        cum = self.cancel_cum
        m = self.sim.markets[bisect_right(cum, self.rng.random() * cum[-1])]
        if not m.orders:
            return
        o = m.orders[int(self.rng.random() * len(m.orders))]
        self.status(o, "canceled")
        self.remove(o)

    def modify(self) -> None:
        """Cancel a resting order with a cloid and reopen it (new oid, same cloid) at a new price."""
        sim = self.sim
        m = sim._market()
        if not m.orders:
            return
        old = m.orders[int(self.rng.random() * len(m.orders))]
        if old.cloid is None or old.order_type != "Limit":
            return
        self.status(old, "canceled")
        self.remove(old)
        sz = sim._size(m)
        new = Resting(sim._oid(), old.user, old.coin, old.side, sim._passive_px(m, old.side), sz, sz, self.ms,
                      old.cloid, old.tif, reduce_only=old.reduce_only)
        self.status(new, "open", hash_=sim._hash())
        self.new(new)

    def take(self) -> None:
        """An aggressive order (IOC, or GTC resting its remainder) that sweeps the other side."""
        sim, rng = self.sim, self.rng
        m = sim._market()
        coin = m.coin
        side = "B" if rng.random() < 0.5 else "A"
        other = "A" if side == "B" else "B"
        opp = m.best(other)
        if opp is None:
            return
        px = sim._clamp(coin, opp + (coin.tick if side == "B" else -coin.tick) * int(rng.expovariate(0.4)))
        sz = max(coin.lot, (int(m.top_size(other, 2) * rng.uniform(0.05, 1.2)) // coin.lot) * coin.lot)
        tif = "Ioc" if rng.random() < 0.8 else "Gtc"
        o = Resting(sim._oid(), sim._user(), coin.name, side, px, sz, sz, self.ms, sim._cloid(0.5), tif)
        hash_ = sim._hash()
        self.status(o, "open", hash_=hash_)
        self.execute(o, m, hash_, rest=tif == "Gtc")

    def execute(self, o: Resting, m: Market, hash_: str, rest: bool, twap_id: int | None = None) -> None:
        """Match ``o`` against the book, then finish it: filled, canceled remainder, or resting remainder."""
        remaining = self.match(o, m, hash_, twap_id)
        if twap_id is not None:
            return
        if remaining == 0:
            self.status(o, "filled", 0)
        elif rest:
            o.sz = remaining
            self.new(o)
        elif remaining == o.orig_sz:
            self.status(o, "iocCancelRejected")
        else:
            self.status(o, "canceled", remaining)

    def match(self, taker: Resting, m: Market, hash_: str, twap_id: int | None) -> int:
        """Fill ``taker`` against resting orders in price-time priority; returns the unfilled size."""
        buy = taker.side == "B"
        levels = m.asks if buy else m.bids
        remaining = taker.orig_sz
        while remaining and levels:  # the best level's first order each time (a level is not copied)
            key, level = levels.peekitem(0)
            px = key if buy else -key
            if (buy and px > taker.px) or (not buy and px < taker.px):
                break
            maker = next(iter(level.values()))
            qty = min(remaining, maker.sz)
            self.trade(taker, maker, m.coin, px, qty, hash_, twap_id)
            remaining -= qty
            if qty == maker.sz:
                self.status(maker, "filled", 0)
                self.remove(maker)
            else:
                self.diff(maker, b'{"update":{"origSz":"%s","newSz":"%s"}}' % (text(maker.sz), text(maker.sz - qty)))
                maker.sz -= qty
        return remaining

    def trade(self, taker: Resting, maker: Resting, coin: Coin, px: int, qty: int, hash_: str,
              twap_id: int | None) -> None:
        tid = self.rng.getrandbits(50)
        pair = [self.fill(taker, coin, px, qty, hash_, True, tid, twap_id),
                self.fill(maker, coin, px, qty, hash_, False, tid, None)]
        if self.rng.random() < 0.5:
            pair.reverse()
        self.fills += pair

    def fill(self, o: Resting, coin: Coin, px: int, qty: int, hash_: str, crossed: bool, tid: int,
             twap_id: int | None) -> bytes:
        sim = self.sim
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
        return orjson.dumps([o.user, event])

    def twap(self) -> None:
        """A TWAP slice: fills only (zero hash, ``twapId`` on the taker), no status."""
        sim, rng = self.sim, self.rng
        m = sim._market()
        side = "B" if rng.random() < 0.5 else "A"
        opp = m.best("A" if side == "B" else "B")
        if opp is None:
            return
        px = sim._clamp(m.coin, opp + (m.coin.tick if side == "B" else -m.coin.tick) * 3)
        sz = sim._size(m)
        sim.next_twap += rng.randint(1, 20)
        o = Resting(sim._oid(), sim._user(), m.coin.name, side, px, sz, sz, self.ms, None, "Ioc")
        self.execute(o, m, ZERO_HASH, rest=False, twap_id=sim.next_twap)

    def place_trigger(self) -> None:
        """A trigger order waiting off book (``open``, ``isTrigger``); it fires in a later block."""
        sim, rng = self.sim, self.rng
        m = sim._market()
        coin = m.coin
        side = "B" if rng.random() < 0.5 else "A"
        kind = rng.choice(TRIGGER_TYPES)
        trigger_px = sim._clamp(coin, m.fair + coin.tick * rng.randint(-200, 200))
        trigger_px -= trigger_px % coin.tick
        if kind.endswith("Market"):
            slip = m.fair // 10 if side == "B" else -(m.fair // 10)
            limit = sim._clamp(coin, trigger_px + slip)
        else:
            limit = sim._clamp(coin, trigger_px + coin.tick * rng.randint(-20, 20))
        limit -= limit % coin.tick
        above = (kind.startswith("Stop")) == (side == "B")
        sz = sim._size(m)
        o = Resting(sim._oid(), sim._user(), coin.name, side, limit, sz, sz, self.ms, sim._cloid(0.3), None,
                    order_type=kind, reduce_only=rng.random() < 0.6 and not coin.is_spot, is_trigger=True,
                    trigger_px=trigger_px, trigger_condition=f"Price {'above' if above else 'below'} {_trigger_text(trigger_px)}",
                    limit_px=limit)
        self.status(o, "open", hash_=sim._hash())
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
        m = self.sim.market_of[o.coin]
        self.status(o, "triggered")
        remaining = self.match(o, m, self.sim._hash(), None)
        if remaining == 0:
            self.status(o, "filled", 0)
        elif o.order_type.endswith("Market"):
            self.status(o, "canceled", remaining)
        else:
            self.rest_triggered(o, m, remaining)

    def rest_triggered(self, o: Resting, m: Market, remaining: int) -> None:
        """The remainder of a triggered limit order rests, maybe one tick more passive than its limitPx."""
        coin = m.coin
        opp = m.best("A" if o.side == "B" else "B")
        px = o.px
        if self.rng.random() < 0.5:
            px = px - coin.tick if o.side == "B" else px + coin.tick
        if opp is not None:
            px = min(px, opp - coin.tick) if o.side == "B" else max(px, opp + coin.tick)
        o.px, o.sz = self.sim._clamp(coin, px), remaining
        o.is_trigger, o.trigger_condition, o.trigger_px, o.tif = False, "Triggered", 0, "Gtc"
        self.new(o)


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

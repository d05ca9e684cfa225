"""The history store: one SQLite file in WAL mode, written by the history
service only (one writer), read by its queries.

SQLite because it is in the standard library, needs no server, and its B-trees
answer what is asked (a user's newest fills, a coin's candles in a time range)
by index in well under a millisecond; candles are kept pre-aggregated (one row
per coin, interval and start, updated as trades come) so no query aggregates
trades. Rows hold the client's JSON of each fill, trade and order (``body``),
so an answer is the bodies joined, with no decoding.

A block is stored in the same transaction as the record that it is held
(table ``held``, spans of heights): a restart, or live blocks meeting a
backfill, never stores a block twice or skips one.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec

from hlbook.common import config, fixed
from hlbook.common.candles import INTERVALS, Candle, bounds, oldest_kept, seq
from hlbook.common.fills import aggregate_by_time, trades_of
from hlbook.common.models import Fill, OrderStatus, UserFill, block_time_ms
from hlbook.common.wire import Trade
from hlbook.services.history import metrics
from hlbook.services.history.spans import Spans

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS users(id INTEGER PRIMARY KEY, address TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS fills(user INTEGER NOT NULL, time INTEGER NOT NULL, tid INTEGER NOT NULL,
    oid INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY(user, time, tid, oid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS fills_by_time ON fills(time);
CREATE TABLE IF NOT EXISTS trades(coin TEXT NOT NULL, time INTEGER NOT NULL, tid INTEGER NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY(coin, time, tid)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS trades_by_time ON trades(time);
CREATE TABLE IF NOT EXISTS orders(oid INTEGER PRIMARY KEY, user INTEGER NOT NULL, cloid TEXT,
    seq INTEGER NOT NULL, time INTEGER NOT NULL, body BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS orders_by_user ON orders(user, seq);
CREATE INDEX IF NOT EXISTS orders_by_cloid ON orders(user, cloid) WHERE cloid IS NOT NULL;
CREATE INDEX IF NOT EXISTS orders_by_time ON orders(time);
CREATE TABLE IF NOT EXISTS candles(interval TEXT NOT NULL, coin TEXT NOT NULL, t INTEGER NOT NULL,
    o TEXT NOT NULL, c TEXT NOT NULL, h TEXT NOT NULL, l TEXT NOT NULL, v TEXT NOT NULL, n INTEGER NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL, body BLOB NOT NULL, PRIMARY KEY(interval, coin, t)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS held(first INTEGER PRIMARY KEY, last INTEGER NOT NULL);
"""

ORDERS_KEPT = 2000  # per user: historicalOrders answers at most this many
FILLS_ANSWER = 2000  # userFills / one userFillsByTime page
FILLS_REACH = 10_000  # userFillsByTime reaches a user's 10,000 most recent fills
RECENT_TRADES = 100
DELETE_CHUNK = 20_000  # rows a retention statement removes at once
DAY_MS = 86_400_000

_json = msgspec.json.Encoder()
_fill = msgspec.json.Decoder(Fill)


class _TwapOf(msgspec.Struct):
    twapId: int | None = None


_twap_of = msgspec.json.Decoder(_TwapOf)
TWAP_KEY, NOT_TWAP = b'"twapId":', b'"twapId":null'  # how a stored fill body says whether it is a TWAP slice
CandleKey = tuple[str, str, int]  # (coin, interval, start)


def order_body(status: OrderStatus) -> bytes:
    """historicalOrders / orderStatus entry: ``{"order": {frontend order}, "status", "statusTimestamp"}``;
    the order with every key the node writes, in its order, nulls included (``tif``, ``cloid``),
    as the public API sends it."""
    return b'{"order":%s,"status":%s,"statusTimestamp":%d}' % (_json.encode(status.order), _json.encode(status.status),
                                                             block_time_ms(status.time))


def _block_candles(height: int, trades: list[tuple[int, Trade]]) -> dict[tuple[str, int], Candle]:
    """The block's trades folded per coin and time (a block's trades share its time): one
    candle each, which every interval's candle then takes in at once."""
    out: dict[tuple[str, int], Candle] = {}
    for place, t in trades:
        px, sz, at = fixed.parse(t.px), fixed.parse(t.sz), seq(height, place)
        candle = out.get((t.coin, t.time))
        if candle is None:
            out[(t.coin, t.time)] = Candle(t.time, t.time, px, px, px, px, sz, 1, at, at)
        else:
            candle.merge(Candle(t.time, t.time, px, px, px, px, sz, 1, at, at))
    return out


def json_list(bodies: Iterable[bytes]) -> bytes:
    return b"[" + b",".join(bodies) + b"]"


class Store:
    def __init__(self, path: str | Path, days: float = 7.0) -> None:
        self.path = Path(path)
        self._lock = config.hold(self.path)  # one writer
        self.db = sqlite3.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "temp_store=MEMORY", "cache_size=-65536"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.executescript(SCHEMA)
        self.days = days
        self.held = Spans(self.db.execute("SELECT first, last FROM held"))
        self.users: dict[str, int] = {}
        self.current: dict[tuple[str, str], Candle | None] = {}  # (coin, interval) -> its newest candle
        self.dirty: dict[CandleKey, Candle] = {}  # candles changed since the last commit
        self.order_users: set[int] = set()  # users whose orders changed since the last prune
        self.in_transaction = False
        self.last_time = 0  # block time (ms) of the newest block stored by this process
        self._realign_weeks()

    def _realign_weeks(self) -> None:
        """Weekly candles written when weeks started on Monday are rebuilt from the daily
        ones (a week is whole days; each daily candle keeps its first and last trade's
        ``seq``, so open and close come out exact)."""
        week = INTERVALS["1w"]
        if self.db.execute("SELECT 1 FROM candles WHERE interval = '1w' AND t % ? != 0 LIMIT 1", (week,)).fetchone() is None:
            return
        weeks: dict[CandleKey, Candle] = {}
        for coin, t in self.db.execute("SELECT coin, t FROM candles WHERE interval = '1d'").fetchall():
            day = self._load_candle((coin, "1d", t))
            assert day is not None
            start, end = bounds("1w", t)
            day.start, day.end = start, end
            if (coin, "1w", start) in weeks:
                weeks[(coin, "1w", start)].merge(day)
            else:
                weeks[(coin, "1w", start)] = day
        self.db.execute("BEGIN")
        self.db.execute("DELETE FROM candles WHERE interval = '1w'")
        self.in_transaction = True
        self.dirty.update(weeks)
        self.commit()
        log.warning("weekly candles realigned to Thursday 00:00 UTC: %d rebuilt from the daily candles", len(weeks))

    # ------------------------------------------------------------ writing

    def add_block(self, height: int, time_ms: int, statuses: list[OrderStatus], fills: list[UserFill]) -> set[tuple[str, str]]:
        """Store one block (``statuses`` without rejections, in node order); returns the
        (coin, interval) series whose newest candle changed. Held once committed."""
        if not self.in_transaction:
            self.db.execute("BEGIN")
            self.in_transaction = True
        self._fills(fills)
        changed = self._trades(height, fills)
        self._orders(height, statuses)
        self.held.add(height, height)
        self.last_time = max(self.last_time, time_ms)
        return changed

    def mark_held(self, first: int, last: int) -> None:
        """Heights with nothing to store (empty, or missing from every file)."""
        self.held.add(first, last)

    def user_id(self, address: str) -> int:
        uid = self.users.get(address)
        if uid is None:
            row = self.db.execute("SELECT id FROM users WHERE address = ?", (address,)).fetchone()
            if row is None:
                row = self.db.execute("INSERT INTO users(address) VALUES (?) RETURNING id", (address,)).fetchone()
            uid = self.users[address] = row[0]
        return uid

    def _fills(self, fills: list[UserFill]) -> None:
        if not fills:
            return
        rows = [(self.user_id(user), f.time, f.tid, f.oid, _json.encode(f)) for user, f in fills]
        self.db.executemany("INSERT OR IGNORE INTO fills VALUES (?, ?, ?, ?, ?)", rows)
        metrics.ROWS.labels("fills").inc(len(rows))

    def _trades(self, height: int, fills: list[UserFill]) -> set[tuple[str, str]]:
        trades, unpaired = trades_of(fills)
        if unpaired:
            metrics.BAD_LINES.labels("fills", "unpaired").inc(unpaired)
        if not trades:
            return set()
        self.db.executemany("INSERT OR IGNORE INTO trades VALUES (?, ?, ?, ?)",
                            [(t.coin, t.time, t.tid, _json.encode(t)) for _, t in trades])
        metrics.ROWS.labels("trades").inc(len(trades))
        parts: dict[CandleKey, Candle] = {}
        for (coin, time_ms), candle in _block_candles(height, trades).items():
            for interval in INTERVALS:
                start, end = bounds(interval, time_ms)
                part = Candle(start, end, candle.open, candle.close, candle.high, candle.low, candle.volume, candle.trades,
                              candle.first, candle.last)
                key = (coin, interval, start)
                if key in parts:
                    parts[key].merge(part)
                else:
                    parts[key] = part
        return self._fold_candles(parts)

    def _fold_candles(self, parts: dict[CandleKey, Candle]) -> set[tuple[str, str]]:
        changed = set()
        for key, part in parts.items():
            coin, interval, start = key
            newest = self._newest(coin, interval)
            target = self.dirty.get(key)
            if target is None:
                target = newest if newest is not None and newest.start == start else self._load_candle(key)
            if target is None:
                target = part
            else:
                target.merge(part)
            self.dirty[key] = target
            if newest is None or start >= newest.start:
                self.current[(coin, interval)] = target
                changed.add((coin, interval))
        return changed

    def _newest(self, coin: str, interval: str) -> Candle | None:
        """The series' newest candle (loaded from the table the first time)."""
        series = (coin, interval)
        if series not in self.current:
            row = self.db.execute("SELECT t FROM candles WHERE interval = ? AND coin = ? ORDER BY t DESC LIMIT 1",
                                  (interval, coin)).fetchone()
            self.current[series] = self._load_candle((coin, interval, row[0])) if row else None
        return self.current[series]

    def _load_candle(self, key: CandleKey) -> Candle | None:
        row = self.db.execute("SELECT o, c, h, l, v, n, first, last FROM candles WHERE coin = ? AND interval = ? AND t = ?",
                              key).fetchone()
        if row is None:
            return None
        o, c, h, l, v, n, first, last = row
        start, end = bounds(key[1], key[2])
        return Candle(start, end, fixed.parse(o), fixed.parse(c), fixed.parse(h), fixed.parse(l), fixed.parse(v), n, first, last)

    def _orders(self, height: int, statuses: list[OrderStatus]) -> None:
        if not statuses:
            return
        rows = []
        for place, status in enumerate(statuses):
            uid = self.user_id(status.user)
            self.order_users.add(uid)
            rows.append((status.order.oid, uid, status.order.cloid, seq(height, place), block_time_ms(status.time), order_body(status)))
        # an order's latest status wins, whichever of live and backfill stores it first
        self.db.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(oid) DO UPDATE SET user = excluded.user, "
            "cloid = excluded.cloid, seq = excluded.seq, time = excluded.time, body = excluded.body WHERE excluded.seq > orders.seq",
            rows)
        metrics.ROWS.labels("orders").inc(len(rows))

    def commit(self) -> None:
        """Write the changed candles and the held spans, and commit (with the blocks since the last commit)."""
        if not self.in_transaction:
            return
        if self.dirty:
            self.db.executemany(
                "INSERT OR REPLACE INTO candles VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(interval, coin, c.start, fixed.fmt(c.open), fixed.fmt(c.close), fixed.fmt(c.high), fixed.fmt(c.low),
                  fixed.fmt(c.volume), c.trades, c.first, c.last, _json.encode(c.to_dict(coin, interval)))
                 for (coin, interval, _), c in self.dirty.items()])
            metrics.ROWS.labels("candles").inc(len(self.dirty))
            self.dirty.clear()
        self.db.execute("DELETE FROM held")
        self.db.executemany("INSERT INTO held VALUES (?, ?)", self.held.rows())
        self.db.execute("COMMIT")
        self.in_transaction = False
        if self.held.last is not None:
            metrics.HEIGHT.set(self.held.last)

    def rollback(self) -> None:
        """Drop what was stored since the last commit (the spans are reloaded to match). SQLite
        may have rolled back already (a COMMIT that failed for a full disk does)."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")
        self.in_transaction = False
        self.dirty.clear()
        self.current.clear()
        self.held = Spans(self.db.execute("SELECT first, last FROM held"))

    # ------------------------------------------------------------ retention

    def prune(self, now_ms: int | None = None) -> int:
        """Remove what is past retention: fills, trades and orders older than ``days``, orders
        beyond a user's ``ORDERS_KEPT`` newest, candles beyond a series' ``KEPT`` (5,000) newest."""
        self.commit()
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        cutoff = now_ms - int(self.days * DAY_MS)
        removed = 0
        for table, key in (("fills", "user, time, tid, oid"), ("trades", "coin, time, tid"), ("orders", "oid")):
            removed += self._delete(table, f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE time < ? LIMIT {DELETE_CHUNK})", cutoff)
        for uid in self.order_users:
            (count,) = self.db.execute("SELECT count(*) FROM orders WHERE user = ?", (uid,)).fetchone()
            if count > ORDERS_KEPT:
                removed += self._delete("orders", "DELETE FROM orders WHERE oid IN (SELECT oid FROM orders WHERE user = ? "
                                        "ORDER BY seq DESC LIMIT -1 OFFSET ?)", uid, ORDERS_KEPT)
        self.order_users.clear()
        for interval in INTERVALS:
            for coin, newest in self.db.execute("SELECT coin, max(t) FROM candles WHERE interval = ? GROUP BY coin", (interval,)).fetchall():
                removed += self._delete("candles", "DELETE FROM candles WHERE interval = ? AND coin = ? AND t < ?",
                                        interval, coin, oldest_kept(interval, newest))
        return removed

    def _delete(self, table: str, statement: str, *args: Any) -> int:
        removed = 0
        while True:
            count = self.db.execute(statement, args).rowcount
            removed += count
            if count < DELETE_CHUNK or "LIMIT" not in statement:
                break
        if removed:
            metrics.DELETED.labels(table).inc(removed)
        return removed

    def size(self) -> int:
        """Bytes on disk: the database and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    def close(self) -> None:
        try:
            self.commit()
        except sqlite3.Error as exc:  # a full disk: what the transaction held is read again at the next start
            log.error("cannot write the history store %s at close (%s)", self.path, exc)
            self.rollback()
        self.db.close()
        self._lock.close()

    # ------------------------------------------------------------ answers (JSON as clients get it)

    def _uid(self, address: str) -> int | None:
        uid = self.users.get(address)
        if uid is None:
            row = self.db.execute("SELECT id FROM users WHERE address = ?", (address,)).fetchone()
            uid = row[0] if row else None
        return uid

    def user_fills(self, user: str, aggregate: bool = False) -> bytes:
        """The user's ``FILLS_ANSWER`` newest fills, newest first."""
        uid = self._uid(user)
        if uid is None:
            return b"[]"
        rows = self.db.execute("SELECT body FROM fills WHERE user = ? ORDER BY time DESC, tid DESC, oid DESC LIMIT ?",
                               (uid, FILLS_ANSWER)).fetchall()
        return self._fills_json([r[0] for r in rows], aggregate)

    def user_fills_by_time(self, user: str, start: int, end: int, aggregate: bool = False, reverse: bool = False) -> bytes:
        """Fills with ``start <= time <= end``, oldest first, at most ``FILLS_ANSWER`` (page on by
        time), among the user's ``FILLS_REACH`` most recent; ``reverse``: newest first (the window's newest)."""
        uid = self._uid(user)
        if uid is None:
            return b"[]"
        reach = self.db.execute("SELECT time FROM fills WHERE user = ? ORDER BY time DESC LIMIT 1 OFFSET ?",
                                (uid, FILLS_REACH - 1)).fetchone()
        start = max(start, reach[0]) if reach else start
        order = "time DESC, tid DESC, oid DESC" if reverse else "time, tid, oid"
        rows = self.db.execute(f"SELECT body FROM fills WHERE user = ? AND time >= ? AND time <= ? ORDER BY {order} LIMIT ?",
                               (uid, start, end, FILLS_ANSWER)).fetchall()
        return self._fills_json([r[0] for r in rows], aggregate)

    def twap_slice_fills(self, user: str, start: int | None = None, end: int | None = None) -> bytes:
        """userTwapSliceFills: the user's ``FILLS_ANSWER`` newest TWAP slice fills, newest first, as
        ``[{"fill", "twapId"}]``; with ``start`` (userTwapSliceFillsByTime) those with
        ``start <= time <= end``, oldest first. A stored fill is a slice when its body has a twapId
        that is not null (the SQL looks at the bytes: no decoding of other fills)."""
        uid = self._uid(user)
        if uid is None:
            return b"[]"
        twap = "user = ? AND instr(body, ?) > 0 AND instr(body, ?) = 0"
        if start is None:
            rows = self.db.execute(f"SELECT body FROM fills WHERE {twap} ORDER BY time DESC, tid DESC, oid DESC LIMIT ?",
                                   (uid, TWAP_KEY, NOT_TWAP, FILLS_ANSWER)).fetchall()
        else:
            rows = self.db.execute(f"SELECT body FROM fills WHERE {twap} AND time >= ? AND time <= ? ORDER BY time, tid, oid LIMIT ?",
                                   (uid, TWAP_KEY, NOT_TWAP, start, end if end is not None else 2**63 - 1, FILLS_ANSWER)).fetchall()
        return _json.encode([{"fill": msgspec.Raw(body), "twapId": _twap_of.decode(body).twapId} for (body,) in rows])

    @staticmethod
    def _fills_json(bodies: list[bytes], aggregate: bool) -> bytes:
        if not aggregate:
            return json_list(bodies)
        return _json.encode(aggregate_by_time([_fill.decode(b) for b in bodies]))

    def historical_orders(self, user: str) -> bytes:
        uid = self._uid(user)
        if uid is None:
            return b"[]"
        rows = self.db.execute("SELECT body FROM orders WHERE user = ? ORDER BY seq DESC LIMIT ?", (uid, ORDERS_KEPT)).fetchall()
        return json_list(r[0] for r in rows)

    def order_status(self, user: str, oid: int | None = None, cloid: str | None = None) -> bytes:
        """``{"status": "order", "order": …}`` or ``{"status": "unknownOid"}``."""
        uid = self._uid(user)
        row = None
        if uid is not None and cloid is not None:
            row = self.db.execute("SELECT body FROM orders WHERE user = ? AND cloid = ? ORDER BY seq DESC LIMIT 1", (uid, cloid)).fetchone()
        elif uid is not None and oid is not None:
            row = self.db.execute("SELECT body FROM orders WHERE oid = ? AND user = ?", (oid, uid)).fetchone()
        return b'{"status":"order","order":' + row[0] + b"}" if row else b'{"status":"unknownOid"}'

    def recent_trades(self, coin: str) -> bytes:
        """The coin's ``RECENT_TRADES`` newest trades, oldest first."""
        rows = self.db.execute("SELECT body FROM trades WHERE coin = ? ORDER BY time DESC, tid DESC LIMIT ?",
                               (coin, RECENT_TRADES)).fetchall()
        return json_list(r[0] for r in reversed(rows))

    def candles(self, coin: str, interval: str, start: int, end: int) -> bytes:
        """Candles overlapping ``[start, end]``, oldest first, among the series' ``KEPT`` (5,000) newest."""
        newest = self._newest(coin, interval)
        if newest is None:
            return b"[]"
        first = max(oldest_kept(interval, newest.start), bounds(interval, max(start, 0))[0])
        bodies = dict(self.db.execute("SELECT t, body FROM candles WHERE interval = ? AND coin = ? AND t >= ? AND t <= ? ORDER BY t",
                                      (interval, coin, first, end)))
        for (c_coin, c_interval, t), candle in self.dirty.items():  # not written yet
            if c_coin == coin and c_interval == interval and first <= t <= end:
                bodies[t] = _json.encode(candle.to_dict(coin, interval))
        return json_list(bodies[t] for t in sorted(bodies))

    def newest_candle(self, coin: str, interval: str) -> dict[str, Any] | None:
        candle = self._newest(coin, interval)
        return candle.to_dict(coin, interval) if candle is not None else None

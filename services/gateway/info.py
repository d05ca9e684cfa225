"""Answers to info requests (``POST /info`` and WS ``post``), public API shapes.

What needs the books or the history is computed here (``HANDLERS``). With a
node info server configured (``--info-upstream``), every other type of the
public API (``compat.PUBLIC_INFO_TYPES``) is forwarded to it
(``upstream_info``), and so are ``UPSTREAM_FIRST``: meta,
spotMeta, perpDexs and the asset contexts come from the node, so asset ids
are the chain's. When the node refuses ``metaAndAssetCtxs`` /
``spotMetaAndAssetCtxs``, the node's meta gets hlbook's contexts (below).
Types outside the public API's never reach the node (its ``fileSnapshot``
writes files on its host): 422 like any unknown type.

Without an upstream, ``meta``/``spotMeta`` are built from the coins the books
hold (the fallback; asset ids are then *not* the chain's). What node files
do not carry is stated, not invented: ``szDecimals`` is the most decimals seen
in the coin's sizes (book and trades), ``maxLeverage`` is not known (reported
as 1), funding, open interest, oracle price and volumes are not in the node
files (reported as ``"0.0"``; ``markPx``/``oraclePx`` carry the mid).

Only coins the books hold are listed. Spot pairs keep their public ``index``
(``@107`` is index 107), so the spot universe is sparse; its base token is named
like the pair (``@107``) because node files do not carry token names.
``spotMetaAndAssetCtxs`` lists ctxs in the universe's order, as the public API
does. ccxt (``fetch_spot_markets``) looks a ctx up by the pair's ``index``, which
equals its position only in a dense universe: for a pair whose index is beyond
its position ccxt takes another pair's ctx or none (then a price precision of 1).

``perpDexs`` is ``null`` (the default dex) followed by the HIP-3 dexes whose
``dex:COIN`` coins the books hold, sorted by name; deployer, oracle updater, fee
recipient and open-interest caps are not in the node files (``null`` / ``[]``),
``fullName`` repeats the name, and the order (which clients use for builder-dex
asset ids from 110000) is not the chain's deployment order.

Requests about the past (``userFills``, ``userFillsByTime``, ``historicalOrders``,
``orderStatus`` of orders no longer resting or by cloid, ``candleSnapshot``,
``recentTrades``) are answered by the history service, which keeps every
user's fills and orders and every coin's trades and candles from the node's
files; its answers are the clients' JSON, passed through without decoding. A
gateway without one (no ``--history-query``) answers these from what it has:
resting orders from the books, trades seen since it started, and an error for
the rest.

Malformed requests get the public API's answer: 422 ``Failed to deserialize
the JSON body into the target type: …`` (unknown type, missing or mistyped
field; ``malformed``). Types of the public API that need a node answer 501
when no upstream is configured.

Every info type and its handler are in one table, ``HANDLERS``, at the end;
docs/COMPATIBILITY.md is generated from it (``compat.py``).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from hlbook.common import wire
from hlbook.common.candles import INTERVALS
from hlbook.services.gateway import metrics
from hlbook.services.gateway.compat import PUBLIC_INFO_TYPES
from hlbook.services.gateway.ctx import is_spot, perp_ctx, spot_ctx
from hlbook.services.gateway.hub import RECENT_TRADES, SHARD_SILENT, Hub, dex_of
from hlbook.services.gateway.kinds import L2BookKey, feed_key, normalise
from hlbook.services.gateway.past import Past, Refused
from hlbook.services.gateway.protocol import USER, RequestError
from hlbook.services.gateway.upstream import QueryError
from hlbook.services.gateway.upstream_info import TEXT, Answer, UpstreamInfo

SPOT_PAIR = re.compile(r"^@(\d+)$")
META_TTL = 10.0  # seconds a built meta is reused
CLOID_OR_OID = "oid must be a non-negative 64-bit integer or a cloid (0x and 32 hex digits)"
# a spot token's keys the books cannot know, as the public API gives them for a token without them
TOKEN_EXTRAS = {"evmContract": None, "fullName": None, "deployerTradingFeeShare": "0.0"}
USDC = {"name": "USDC", "szDecimals": 8, "weiDecimals": 8, "index": 0, "tokenId": "0x" + "0" * 32, "isCanonical": True,
        **TOKEN_EXTRAS}
# leverage is not known without the node: every coin at 1x, on the chain's convention that a margin
# table id under 50 is the plain table of that leverage
MARGIN_TABLE = (1, {"description": "", "marginTiers": [{"lowerBound": "0.0", "maxLeverage": 1}]})


def _level_dicts(side: list[wire.Level]) -> list[dict[str, Any]]:
    return [{"px": px, "sz": sz, "n": count} for px, sz, count in side]


DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
PUBLIC = frozenset(PUBLIC_INFO_TYPES)
UPSTREAM_FIRST = ("meta", "spotMeta", "perpDexs", "metaAndAssetCtxs", "spotMetaAndAssetCtxs")  # the node's when one is configured
REFUSALS = (400, 404, 405, 422, 501)  # a node that does not serve a type (AndAssetCtxs: composed instead)


class InfoError(Exception):
    """A request refused: HTTP ``status`` with ``text`` (plain text), or a post error with it."""

    def __init__(self, text: str, status: int = 400, content_type: str = TEXT, retry_after: int | None = None) -> None:
        super().__init__(text)
        self.text, self.status, self.content_type, self.retry_after = text, status, content_type, retry_after

    @classmethod
    def of(cls, answer: Answer) -> InfoError:
        return cls(answer.text, answer.status, answer.content_type, answer.retry_after)


def malformed(detail: str) -> InfoError:
    """422, as the public API answers a body that does not fit the request's type."""
    return InfoError(DESERIALIZE + detail, 422)


def label(kind: str) -> str:
    """The metrics label of an info type (bounded: clients may send any string)."""
    return kind if kind in PUBLIC or kind in HANDLERS else "other"


def decimals(value: str) -> int:
    return len(value.partition(".")[2].rstrip("0"))


class Info:
    def __init__(self, hub: Hub, upstream: UpstreamInfo | None = None, past: Past | None = None) -> None:
        self.hub = hub
        self.upstream = upstream
        self.past = past or Past(None, None, "by-block")
        self.sz_decimals: dict[str, int] = {}
        self._meta: tuple[float, dict[str, Any]] | None = None

    async def answer(self, payload: Any) -> Any:
        """The response body of one info request (``msgspec.Raw`` when it is the node's); InfoError when refused."""
        if not isinstance(payload, dict):
            metrics.INFO.labels("malformed", "error").inc()
            raise malformed(f"invalid type: {type(payload).__name__}, expected an object with a `type` field")
        kind = payload.get("type")
        if not isinstance(kind, str):
            metrics.INFO.labels("malformed", "error").inc()
            raise malformed("missing field `type`" if kind is None else "invalid type for field `type`, expected a string")
        handler = HANDLERS.get(kind)
        if self.upstream is not None and (kind in UPSTREAM_FIRST or (handler is None and kind in PUBLIC)):
            handler = Info.forward  # only the public API's types: never the node's own (fileSnapshot writes files)
        elif handler is None:
            metrics.INFO.labels(label(kind), "error").inc()
            if kind in PUBLIC:
                raise InfoError(f"{kind} needs the node's info server; this gateway runs without one (--info-upstream)", 501)
            raise malformed(f"unknown variant `{kind}`")
        try:
            result = await handler(self, payload)
        except (InfoError, QueryError, RequestError) as exc:
            metrics.INFO.labels(label(kind), "error").inc()
            if isinstance(exc, InfoError):
                raise
            raise InfoError(getattr(exc, "text", str(exc))) from None
        metrics.INFO.labels(label(kind), "ok").inc()
        return result

    # ------------------------------------------------------------ the node's

    async def forward(self, payload: dict[str, Any]) -> Any:
        """The node's answer, passed on as it came (its errors too)."""
        assert self.upstream is not None
        kind = payload["type"]
        answer = await self.upstream.ask(kind, payload)
        if answer.status in REFUSALS and kind in ("metaAndAssetCtxs", "spotMetaAndAssetCtxs"):
            return await self._with_our_ctxs(kind, payload)
        if not answer.ok:
            raise InfoError.of(answer)
        return msgspec.Raw(answer.body)

    async def _with_our_ctxs(self, kind: str, payload: dict[str, Any]) -> list[Any]:
        """A node that does not serve the asset contexts: its meta (the chain's asset ids) with hlbook's contexts."""
        assert self.upstream is not None
        dex = payload.get("dex") or ""
        if kind == "metaAndAssetCtxs":
            answer = await self.upstream.ask("meta", {"type": "meta", "dex": dex} if dex else {"type": "meta"})
        else:
            answer = await self.upstream.ask("spotMeta", {"type": "spotMeta"})
        if not answer.ok:
            raise InfoError.of(answer)
        meta = msgspec.json.decode(answer.body)
        mids = self.hub.all_mids(dex)
        if kind == "metaAndAssetCtxs":
            return [meta, [perp_ctx(mids.get(entry["name"])) for entry in meta["universe"]]]
        return [meta, [spot_ctx(pair["name"], mids.get(pair["name"])) for pair in meta["universe"]]]

    # ------------------------------------------------------------ books

    def _coin(self, payload: dict[str, Any]) -> str:
        coin = payload.get("coin")
        if not isinstance(coin, str) or not self.hub.coin_exists(coin):
            raise InfoError(f"unknown coin {coin!r}")
        return coin

    async def l2_book(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The book, as the public API answers it: ``null`` for a market that does not exist
        (once every shard said which coins it holds: before, 503, never a false ``null``)."""
        coin = payload.get("coin")
        if isinstance(coin, str) and not self.hub.coin_exists(coin):
            if not self.hub.knows_coins():
                raise InfoError("the book shards have not all said which coins they hold yet", 503, retry_after=1)
            return None
        key = feed_key(normalise({**payload, "type": "l2Book"}, self.hub.coin_exists))
        assert isinstance(key, L2BookKey)
        coin = key.coin
        if payload.get("time") is not None:
            return await self._as_of("l2Book", coin, payload, n_levels=key.n_levels, n_sig_figs=key.n_sig_figs,
                                     mantissa=key.mantissa)
        self._current(coin)
        query = wire.L2Query(coin=coin, n_sig_figs=key.n_sig_figs, mantissa=key.mantissa, n_levels=key.n_levels)
        reply = await self.hub.upstream.query(self.hub.owner(coin), query)
        self._current(coin, reply["time"])
        bids, asks = reply["levels"]
        self._note_sizes(coin, bids + asks)
        return {"coin": coin, "time": reply["time"], "levels": [_level_dicts(bids), _level_dicts(asks)]}

    async def l4_snapshot(self, payload: dict[str, Any]) -> msgspec.Raw:
        """Every order of the coin as of block time ``time`` (hlbook's own: an l4Book snapshot's data)."""
        return await self._as_of("l4Snapshot", self._coin(payload), payload)

    async def _as_of(self, kind: str, coin: str, payload: dict[str, Any], **levels: Any) -> Any:
        """The book as of ``payload["time"]`` (epoch ms), rebuilt off the loop (``past.py``)."""
        try:
            return await self.past.ask(kind, coin, _int(payload, "time"), **levels)
        except Refused as exc:
            raise InfoError(exc.text, exc.status, retry_after=exc.retry_after) from None

    def _current(self, coin: str, book_time: int | None = None) -> None:
        """503 rather than a book that may be stale: its shard silent, or the book (``book_time``,
        ms) older than ingest's newest block by more than ``SHARD_SILENT`` (a shard that was
        stopped answers the queries it held before it catches up)."""
        silent = self.hub.silent_for(coin)
        if silent is None and book_time is not None and self.hub.header_time - book_time > SHARD_SILENT * 1000:
            silent = (self.hub.header_time - book_time) / 1000
        if silent is not None:
            raise InfoError(f"{coin}: its book shard is behind or silent ({silent:.0f} s); no current book to answer with",
                            503, retry_after=1)

    async def all_mids(self, payload: dict[str, Any]) -> dict[str, str]:
        return self.hub.all_mids(payload.get("dex") or "")

    async def live_trades(self, payload: dict[str, Any]) -> list[wire.Trade]:
        """The coin's trades this gateway saw since it started (at most RECENT_TRADES)."""
        return list(self.hub.trades.get(self._coin(payload), ()))

    # ------------------------------------------------------------ meta

    def _note_sizes(self, coin: str, levels: list[Any]) -> None:
        seen = max((decimals(level[1]) for level in levels), default=0)
        seen = max([seen, *(decimals(t.sz) for t in self.hub.trades.get(coin, ()))])
        if seen > self.sz_decimals.get(coin, -1):
            self.sz_decimals[coin] = seen

    async def _learn_sizes(self, coins: list[str]) -> None:
        async def one(coin: str) -> None:
            try:
                reply = await self.hub.upstream.query(self.hub.owner(coin), wire.L2Query(coin=coin, n_levels=100))
            except QueryError:
                return
            self._note_sizes(coin, reply["levels"][0] + reply["levels"][1])

        await asyncio.gather(*(one(c) for c in coins if c not in self.sz_decimals))

    async def _universe(self) -> dict[str, Any]:
        if self._meta is not None and time.monotonic() - self._meta[0] < META_TTL:
            return self._meta[1]
        coins = sorted(self.hub.coins())
        await self._learn_sizes(coins)
        perps = [c for c in coins if not is_spot(c)]
        spots = sorted((c for c in coins if is_spot(c)), key=lambda c: (0 if "/" in c else int(c[1:]) if SPOT_PAIR.match(c) else 1 << 30, c))
        tokens, universe = [USDC], []
        for i, coin in enumerate(spots):
            index = 0 if "/" in coin else int(coin[1:]) if SPOT_PAIR.match(coin) else 100_000 + i
            tokens.append({"name": coin.split("/")[0], "szDecimals": self.sz_decimals.get(coin, 0), "weiDecimals": 8,
                           "index": len(tokens), "tokenId": "0x" + f"{len(tokens):032x}", "isCanonical": "/" in coin,
                           **TOKEN_EXTRAS})
            universe.append({"tokens": [len(tokens) - 1, 0], "name": coin, "index": index, "isCanonical": "/" in coin})
        built = {"perps": perps, "spot": {"universe": universe, "tokens": tokens}}
        self._meta = (time.monotonic(), built)
        return built

    async def meta(self, payload: dict[str, Any]) -> dict[str, Any]:
        dex = payload.get("dex") or ""
        perps = (await self._universe())["perps"]
        return {"universe": [{"name": c, "szDecimals": self.sz_decimals.get(c, 0), "maxLeverage": 1, "marginTableId": MARGIN_TABLE[0]}
                             for c in perps if dex_of(c) == dex],
                "marginTables": [list(MARGIN_TABLE)], "collateralToken": 0}

    async def spot_meta(self, payload: dict[str, Any]) -> dict[str, Any]:
        return (await self._universe())["spot"]

    async def perp_dexs(self, payload: dict[str, Any]) -> list[dict[str, Any] | None]:
        """``null`` for the default dex, then one entry per HIP-3 dex whose coins the books hold."""
        dexes = sorted({dex_of(c) for c in (await self._universe())["perps"]} - {""})
        return [None, *({"name": d, "fullName": d, "deployer": None, "oracleUpdater": None, "feeRecipient": None,
                         "assetToStreamingOiCap": []} for d in dexes)]

    async def meta_and_asset_ctxs(self, payload: dict[str, Any]) -> list[Any]:
        meta = await self.meta(payload)
        mids = self.hub.all_mids(payload.get("dex") or "")
        return [meta, [perp_ctx(mids.get(m["name"])) for m in meta["universe"]]]

    async def spot_meta_and_asset_ctxs(self, payload: dict[str, Any]) -> list[Any]:
        spot = await self.spot_meta(payload)
        mids = self.hub.all_mids("")
        return [spot, [spot_ctx(p["name"], mids.get(p["name"])) for p in spot["universe"]]]

    # ------------------------------------------------------------ orders (from the L4 books)

    def user_of(self, payload: dict[str, Any]) -> str:
        return user_param(payload)

    async def _resting(self, user: str, dex: str | None = None) -> list[dict[str, Any]]:
        return await resting_orders(self.hub, user, dex)

    async def open_orders(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """The public API's short shape: ``cloid`` when set, ``reduceOnly`` only when true."""
        return [open_order(o) for o in await self._resting(self.user_of(payload), dex_param(payload))]

    async def frontend_open_orders(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        return [frontend_order(o) for o in await self._resting(self.user_of(payload), dex_param(payload))]

    async def resting_status(self, payload: dict[str, Any]) -> dict[str, Any]:
        """orderStatus of an order the books hold now (``unknownOid`` when none does)."""
        self.user_of(payload)
        oid = payload.get("oid")
        if not isinstance(oid, int) or isinstance(oid, bool) or not 0 <= oid < 2**63:
            raise malformed(CLOID_OR_OID)
        replies = await asyncio.gather(*(self.hub.upstream.query(k, wire.OrderQuery(oid=oid)) for k in range(len(self.hub.shards))))
        for reply in replies:
            order = reply.get("order")
            if order is not None:
                body = {k: v for k, v in order.items() if k != "user"}
                return {"status": "order", "order": {"order": body, "status": "open", "statusTimestamp": order["timestamp"]}}
        return {"status": "unknownOid"}

    # ------------------------------------------------------------ the past (history service)

    async def _ask(self, query: wire.HistoryQuery) -> msgspec.Raw:
        """The history's answer once it holds every block this gateway has heard of: an order
        a client just saw in its feed is in ``orderStatus``, a fill in ``userFills``."""
        query.min_height = self.hub.heard_height
        try:
            return msgspec.Raw((await self.hub.upstream.history(query))[1])
        except QueryError as exc:
            raise InfoError(str(exc)) from None

    async def user_fills(self, payload: dict[str, Any]) -> msgspec.Raw:
        return await self._ask(wire.UserFillsQuery(user=self.user_of(payload), aggregate=_bool(payload, "aggregateByTime")))

    async def user_fills_by_time(self, payload: dict[str, Any]) -> msgspec.Raw:
        """``reversed: true``: the newest fills of the window first (and the page the newest 2,000)."""
        return await self._ask(wire.UserFillsByTimeQuery(user=self.user_of(payload), start=_int(payload, "startTime"),
                                                         end=_int(payload, "endTime", int(time.time() * 1000)),
                                                         aggregate=_bool(payload, "aggregateByTime"),
                                                         reversed=_bool(payload, "reversed")))

    async def user_twap_slice_fills(self, payload: dict[str, Any]) -> msgspec.Raw:
        """The user's newest TWAP slice fills (2,000 at most), newest first: ``[{fill, twapId}]``."""
        return await self._ask(wire.TwapSliceFillsQuery(user=self.user_of(payload)))

    async def user_twap_slice_fills_by_time(self, payload: dict[str, Any]) -> msgspec.Raw:
        return await self._ask(wire.TwapSliceFillsQuery(user=self.user_of(payload), start=_int(payload, "startTime"),
                                                        end=_int(payload, "endTime", int(time.time() * 1000))))

    async def historical_orders(self, payload: dict[str, Any]) -> msgspec.Raw:
        return await self._ask(wire.HistoricalOrdersQuery(user=self.user_of(payload)))

    async def order_status(self, payload: dict[str, Any]) -> Any:
        """A resting order as the books hold it now; else its last status in the history (by oid or cloid)."""
        user, oid = self.user_of(payload), payload.get("oid")
        if isinstance(oid, int) and not isinstance(oid, bool):
            resting = await self.resting_status(payload)
            if resting["status"] != "unknownOid" or not self.hub.upstream.has_history:
                return resting
            return await self._ask(wire.OrderStatusQuery(user=user, oid=oid))
        if isinstance(oid, str) and len(oid) == 34 and oid.startswith("0x"):
            return await self._ask(wire.OrderStatusQuery(user=user, cloid=oid.lower()))
        raise malformed(CLOID_OR_OID)

    async def recent_trades(self, payload: dict[str, Any]) -> Any:
        """The history's newest trades with those this gateway saw since (the history may be a block behind)."""
        live = await self.live_trades(payload)
        if not self.hub.upstream.has_history:
            return live
        stored = msgspec.json.decode(await self._ask(wire.RecentTradesQuery(coin=payload["coin"])), type=list[wire.Trade])
        merged = {t.tid: t for t in stored}
        for trade in live:
            merged.setdefault(trade.tid, trade)
        return sorted(merged.values(), key=lambda t: (t.time, t.tid))[-RECENT_TRADES:]

    async def candle_snapshot(self, payload: dict[str, Any]) -> msgspec.Raw:
        req = payload.get("req")
        if not isinstance(req, dict):
            raise malformed("missing field `req` ({coin, interval, startTime, endTime})")
        coin, interval = req.get("coin"), req.get("interval")
        if not isinstance(coin, str) or not self.hub.coin_exists(coin):
            raise InfoError(f"unknown coin {coin!r}")
        if interval not in INTERVALS:
            raise malformed(f"req.interval: unknown variant {interval!r}, expected one of {list(INTERVALS)}")
        return await self._ask(wire.CandlesQuery(coin=coin, interval=interval, start=_int(req, "startTime"),
                                                  end=_int(req, "endTime", int(time.time() * 1000))))


def _int(payload: dict[str, Any], field: str, default: int | None = None) -> int:
    """An epoch-ms field; absent or null takes ``default`` (the official SDK sends ``endTime: null`` for "now")."""
    value = payload.get(field)
    if value is None:
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise malformed(f"{field} must be an integer (epoch ms)" if value is not None else f"missing field `{field}`")
    return value


def _bool(payload: dict[str, Any], field: str) -> bool:
    """An optional flag (absent or null: false)."""
    value = payload.get(field)
    if value is not None and not isinstance(value, bool):
        raise malformed(f"{field}: invalid type, expected a boolean")
    return bool(value)


def user_param(payload: dict[str, Any]) -> str:
    user = payload.get("user")
    if not isinstance(user, str) or not USER.fullmatch(user):
        raise malformed(f"user must be a 0x address of 40 hex digits, not {user!r}" if user is not None else "missing field `user`")
    return user.lower()


def dex_param(payload: dict[str, Any]) -> str:
    """The perp dex asked for: "" (the default, with spot) when absent or null."""
    dex = payload.get("dex")
    if dex is not None and not isinstance(dex, str):
        raise malformed("dex: invalid type, expected a string")
    return dex or ""


async def resting_orders(hub: Hub, user: str, dex: str | None = None) -> list[dict[str, Any]]:
    """The user's resting orders in every shard (of one dex unless None), newest first (frontendOpenOrders' order + user)."""
    replies = await asyncio.gather(*(hub.upstream.query(k, wire.OpenOrdersQuery(user=user)) for k in range(len(hub.shards))))
    orders = [o for reply in replies for o in reply["orders"] if dex is None or dex_of(o["coin"]) == dex]
    return sorted(orders, key=lambda o: (-o["timestamp"], -o["oid"]))


OPEN_ORDER_KEYS = ("coin", "side", "limitPx", "sz", "oid", "timestamp", "origSz", "cloid")


def open_order(order: dict[str, Any]) -> dict[str, Any]:
    """openOrders' entry: the short shape, ``cloid`` when set, ``reduceOnly: true`` only when true."""
    out = {k: order[k] for k in OPEN_ORDER_KEYS if order.get(k) is not None}
    if order.get("reduceOnly"):
        out["reduceOnly"] = True
    return out


def frontend_order(order: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in order.items() if k != "user"}


Handler = Callable[[Info, dict[str, Any]], Awaitable[Any]]

# Every info type this gateway computes (POST /info and WebSocket post), and its handler; with an upstream,
# UPSTREAM_FIRST and every type not here go to the node instead.
HANDLERS: dict[str, Handler] = {
    "l2Book": Info.l2_book,
    "l4Snapshot": Info.l4_snapshot,
    "allMids": Info.all_mids,
    "meta": Info.meta,
    "spotMeta": Info.spot_meta,
    "perpDexs": Info.perp_dexs,
    "metaAndAssetCtxs": Info.meta_and_asset_ctxs,
    "spotMetaAndAssetCtxs": Info.spot_meta_and_asset_ctxs,
    "recentTrades": Info.recent_trades,
    "openOrders": Info.open_orders,
    "frontendOpenOrders": Info.frontend_open_orders,
    "orderStatus": Info.order_status,
    "userFills": Info.user_fills,
    "userFillsByTime": Info.user_fills_by_time,
    "historicalOrders": Info.historical_orders,
    "candleSnapshot": Info.candle_snapshot,
    "userTwapSliceFills": Info.user_twap_slice_fills,
    "userTwapSliceFillsByTime": Info.user_twap_slice_fills_by_time,
}

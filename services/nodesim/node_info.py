"""The simulator's info server answering as a node's ``--serve-info`` does: the node's
info types in the public API's shapes, from the simulated state.

- **meta, spotMeta, perpDexs** and their ``AndAssetCtxs``: the chain's listing
  (``universe.listing``): perps at mainnet's asset ids (BTC 0, ETH 1, SOL 5, …, mainnet
  coins not simulated listed ``isDelisted``), spot pairs at their index (``PURR/USDC`` 0,
  ``@107`` 107, pairs not simulated listed with a token ``TKN<i>``), HIP-3 dexes in
  deployment order. ``maxLeverage`` and margin tables are the simulator's (BTC 40×, ETH
  25×, tiered; others flat, ``marginTableId`` = ``maxLeverage`` as on mainnet). Asset
  contexts: mark and mid from the simulated book, oracle the simulator's fair price,
  ``prevDayPx`` the run's starting price, open interest the longs' total; funding,
  premium and volumes 0 (the simulator has none).
- **clearinghouseState / spotClearinghouseState** from the simulated fills: the engine
  keeps each user's position per coin (size and entry price, as its fills'
  ``startPosition``/``dir`` say), not balances. So positions, their value, unrealized PnL
  and margin are exact at the mark; the account is **approximate**: it is taken to hold
  exactly the margin its positions use plus their unrealized PnL (never below 0), so
  ``withdrawable`` is the unrealized profit, ``liquidationPx`` is null, funding 0. Spot
  balances are the base tokens the fills moved, and may be negative (the simulator sells
  without checking balances); USDC is not tracked and not listed.
- **Everything else a node answers for a user** (fees, staking, referral, sub-accounts,
  roles, rate limits, vaults, ledger and funding histories, portfolio): what a user with
  no such activity gets (empty lists, zeros, ``null``), in the public API's shapes.

Refusals are the node's: a body that is not JSON → 400 ``Failed to parse the request body
as JSON: …``; an unknown type, a missing or mistyped field → 422 ``Failed to deserialize
the JSON body into the target type: …`` (text/plain). Info types a gateway computes
itself (l2Book, allMids, openOrders, userFills, …) are not served here (422 like an
unknown type): hlbook never forwards them.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hlbook.common import fixed
from hlbook.common.fixed import fmt
from hlbook.services.nodesim.universe import Coin, Listing, listing, sz_decimals

if TYPE_CHECKING:
    from hlbook.services.nodesim.engine import Simulator
    from hlbook.services.nodesim.market import Market

DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
ONE = fixed.ONE
ZERO = "0.0"
TAKER_FEE, MAKER_FEE = "0.00045", "-0.00003"  # what the engine charges (engine.fill: 45 and -3 per 100,000)
DEFAULT_LEVERAGE = 20  # a user's leverage on a coin that allows it (the exchange's default for new positions)
MAX_LEVERAGE = {"BTC": 40, "ETH": 25, "SOL": 20, "XRP": 20, "HYPE": 10, "DOGE": 10}
TIERED = {"BTC": (56, [("0.0", 40), ("150000000.0", 20)]), "ETH": (55, [("0.0", 25), ("100000000.0", 15)])}
DEPLOYER = "0x" + "d" * 40  # the HIP-3 dexes' deployer (made up: the simulator has no deploy history)


class Refused(Exception):
    """A request the node refuses: HTTP ``status`` with a plain-text ``text``."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status, self.text = status, text


def malformed(detail: str) -> Refused:
    return Refused(422, DESERIALIZE + detail)


def max_leverage(coin: Coin) -> int:
    if coin.name in MAX_LEVERAGE:
        return MAX_LEVERAGE[coin.name]
    return 10 if coin.weight >= 1.0 or ":" in coin.name else 5 if coin.weight >= 0.4 else 3


def leverage(coin: Coin) -> int:
    return min(DEFAULT_LEVERAGE, max_leverage(coin))


def mark_of(market: Market) -> int:
    """The mark: the book's mid when both sides rest, else the fair price."""
    bid, ask = market.best_bid, market.best_ask
    return (bid + ask) // 2 if bid is not None and ask is not None else market.fair


def mid_of(market: Market) -> str | None:
    bid, ask = market.best_bid, market.best_ask
    return fmt((bid + ask) // 2) if bid is not None and ask is not None else None


def ratio(numerator: int, denominator: int) -> str:
    """numerator / denominator (fixed-point ints) as a decimal string."""
    return fmt(numerator * ONE // denominator) if denominator else ZERO


class NodeInfo:
    """The info types above, for one running ``Simulator`` (read under ``lock``, the block loop's)."""

    def __init__(self, sim: Simulator, lock: threading.Lock) -> None:
        self.sim, self.lock = sim, lock
        self.listing: Listing = listing(sim.coins)
        self.dex_coins = {"": [c for _, c in self.listing.perps if c is not None],
                          **{dex: coins for dex, coins in self.listing.dexes}}
        self.spot_coins = [c for c in self.listing.spots if c is not None]
        self._meta = {dex: self._build_meta(dex) for dex in self.dex_coins}
        self._spot_meta = self._build_spot_meta()

    # ------------------------------------------------------------ requests

    def answer(self, req: Any) -> Any:
        """The answer to one request (decoded JSON); Refused as the node refuses."""
        if not isinstance(req, dict):
            raise malformed(f"invalid type: {type(req).__name__}, expected internally tagged enum")
        kind = req.get("type")
        if not isinstance(kind, str):
            raise malformed("missing field `type`")
        handler = HANDLERS.get(kind)
        if handler is None:
            raise malformed(f"unknown variant `{kind}`")
        return handler(self, req)

    @staticmethod
    def user(req: dict[str, Any]) -> str:
        user = req.get("user")
        if user is None:
            raise malformed("missing field `user`")
        if not isinstance(user, str) or not ADDRESS.fullmatch(user):
            raise malformed(f"user: invalid value: {user!r}, expected a 0x address of 40 hex digits")
        return user.lower()

    @staticmethod
    def field(req: dict[str, Any], name: str, kind: type, optional: bool = False) -> Any:
        value = req.get(name)
        if value is None:
            if optional:
                return None
            raise malformed(f"missing field `{name}`")
        if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
            raise malformed(f"{name}: invalid type: {type(value).__name__}, expected {kind.__name__}")
        return value

    def dex(self, req: dict[str, Any]) -> str:
        dex = self.field(req, "dex", str, optional=True) or ""
        if dex not in self.dex_coins:
            raise Refused(422, DESERIALIZE + f"dex: unknown perp dex {dex!r}")
        return dex

    def now_ms(self) -> int:
        last = self.sim.last_ns
        return last // 1_000_000 if last is not None else int(time.time() * 1000)

    # ------------------------------------------------------------ the listing

    def _build_meta(self, dex: str) -> dict[str, Any]:
        entries = self.listing.perps if dex == "" else [(c.name, c) for c in self.dex_coins[dex]]
        universe: list[dict[str, Any]] = []
        tables: dict[int, list[tuple[str, int]]] = {}
        for name, coin in entries:
            if coin is None:
                universe.append({"szDecimals": 2, "name": name, "maxLeverage": 3, "marginTableId": 3, "isDelisted": True})
                tables[3] = [("0.0", 3)]
                continue
            most = max_leverage(coin)
            table_id, tiers = TIERED.get(coin.name, (most, [("0.0", most)]))
            tables[table_id] = tiers
            universe.append({"szDecimals": sz_decimals(coin), "name": name, "maxLeverage": most, "marginTableId": table_id})
        margin_tables = [[table_id, {"description": f"tiered {table_id}" if len(tiers) > 1 else "",
                                     "marginTiers": [{"lowerBound": bound, "maxLeverage": lev} for bound, lev in tiers]}]
                         for table_id, tiers in sorted(tables.items())]
        return {"universe": universe, "marginTables": margin_tables, "collateralToken": 0}

    def _build_spot_meta(self) -> dict[str, Any]:
        tokens: list[dict[str, Any]] = [{"name": "USDC", "szDecimals": 8, "weiDecimals": 8, "index": 0, "tokenId": "0x" + "0" * 32,
                                         "isCanonical": True, "evmContract": None, "fullName": None,
                                         "deployerTradingFeeShare": ZERO}]
        universe = []
        for index, coin in enumerate(self.listing.spots):
            token = index + 1  # the pair's base token (USDC is 0)
            name = "PURR" if index == 0 and coin is None else coin.base if coin is not None else f"TKN{index}"
            tokens.append({"name": name, "szDecimals": sz_decimals(coin) if coin is not None else 2, "weiDecimals": 8,
                           "index": token, "tokenId": f"0x{token:032x}", "isCanonical": index == 0, "evmContract": None,
                           "fullName": None, "deployerTradingFeeShare": ZERO})
            universe.append({"tokens": [token, 0], "name": "PURR/USDC" if index == 0 else f"@{index}", "index": index,
                             "isCanonical": index == 0})
        return {"universe": universe, "tokens": tokens}

    def meta(self, req: dict[str, Any]) -> Any:
        return self._meta[self.dex(req)]

    def spot_meta(self, req: dict[str, Any]) -> Any:
        return self._spot_meta

    def perp_dexs(self, req: dict[str, Any]) -> Any:
        return [None, *({"name": dex, "fullName": f"{dex} (simulated)", "deployer": DEPLOYER, "oracleUpdater": None,
                         "feeRecipient": None, "assetToStreamingOiCap": [], "assetToFundingMultiplier": []}
                        for dex, _ in self.listing.dexes)]

    def _prices(self, coins: list[Coin]) -> dict[str, tuple[int, str | None, int, list[str] | None]]:
        """(mark, mid, fair, impact prices) of each coin, read under the lock."""
        out = {}
        with self.lock:
            for coin in coins:
                m = self.sim.market_of[coin.name]
                impact = [fmt(m.best_bid), fmt(m.best_ask)] if m.best_bid is not None and m.best_ask is not None else None
                out[coin.name] = (mark_of(m), mid_of(m), m.fair, impact)
        return out

    def _open_interest(self) -> dict[str, int]:
        with self.lock:
            held = list(self.sim.positions.items())
        oi: dict[str, int] = {}
        for (_, coin), (size, _) in held:
            if size > 0:
                oi[coin] = oi.get(coin, 0) + size
        return oi

    def meta_and_asset_ctxs(self, req: dict[str, Any]) -> Any:
        meta = self.meta(req)
        coins = {c.name: c for c in self.dex_coins[self.dex(req)]}
        prices, oi = self._prices(list(coins.values())), self._open_interest()
        ctxs: list[dict[str, Any]] = []
        for entry in meta["universe"]:
            coin = coins.get(entry["name"])
            if coin is None:
                ctxs.append({"funding": ZERO, "openInterest": ZERO, "prevDayPx": ZERO, "dayNtlVlm": ZERO, "premium": None,
                             "oraclePx": ZERO, "markPx": ZERO, "midPx": None, "impactPxs": None, "dayBaseVlm": ZERO})
                continue
            mark, mid, fair, impact = prices[coin.name]
            ctxs.append({"funding": ZERO, "openInterest": fmt(oi.get(coin.name, 0)), "prevDayPx": fmt(coin.price),
                         "dayNtlVlm": ZERO, "premium": ZERO, "oraclePx": fmt(fair), "markPx": fmt(mark), "midPx": mid,
                         "impactPxs": impact, "dayBaseVlm": ZERO})
        return [meta, ctxs]

    def spot_meta_and_asset_ctxs(self, req: dict[str, Any]) -> Any:
        prices = self._prices(self.spot_coins)
        ctxs = []
        for pair, coin in zip(self._spot_meta["universe"], self.listing.spots):
            mark, mid, start = (prices[coin.name][0], prices[coin.name][1], coin.price) if coin is not None else (0, None, 0)
            ctxs.append({"prevDayPx": fmt(start), "dayNtlVlm": ZERO, "markPx": fmt(mark), "midPx": mid,
                         "circulatingSupply": ZERO, "coin": pair["name"], "totalSupply": ZERO, "dayBaseVlm": ZERO})
        return [self._spot_meta, ctxs]

    # ------------------------------------------------------------ a user's state

    def _positions(self, user: str, coins: list[Coin]) -> list[tuple[Coin, int, int, int]]:
        """(coin, size, entry price, mark) of the user's open positions among ``coins``."""
        out = []
        with self.lock:
            for coin in coins:
                held = self.sim.positions.get((user, coin.name))
                if held is not None and held[0] != 0:
                    out.append((coin, held[0], held[1], mark_of(self.sim.market_of[coin.name])))
        return out

    def clearinghouse_state(self, req: dict[str, Any]) -> Any:
        user, dex = self.user(req), self.dex(req)
        assets: list[dict[str, Any]] = []
        total_ntl = signed_ntl = margin_used = upnl_total = maintenance = 0
        for coin, size, entry, mark in self._positions(user, self.dex_coins[dex]):
            ntl = abs(size) * mark // ONE
            upnl = size * (mark - entry) // ONE
            lev = leverage(coin)
            margin = ntl // lev
            total_ntl, signed_ntl, margin_used, upnl_total = total_ntl + ntl, signed_ntl + size * mark // ONE, margin_used + margin, upnl_total + upnl
            maintenance += ntl // (2 * max_leverage(coin))
            assets.append({"type": "oneWay", "position": {
                "coin": coin.name, "szi": fmt(size), "leverage": {"type": "cross", "value": lev}, "entryPx": fmt(entry),
                "positionValue": fmt(ntl), "unrealizedPnl": fmt(upnl), "returnOnEquity": ratio(upnl * lev, abs(size) * entry // ONE),
                "liquidationPx": None, "marginUsed": fmt(margin), "maxLeverage": max_leverage(coin),
                "cumFunding": {"allTime": ZERO, "sinceOpen": ZERO, "sinceChange": ZERO}}})
        account = max(0, margin_used + upnl_total)
        summary = {"accountValue": fmt(account), "totalNtlPos": fmt(total_ntl), "totalRawUsd": fmt(account - signed_ntl),
                   "totalMarginUsed": fmt(margin_used)}
        return {"marginSummary": summary, "crossMarginSummary": dict(summary), "crossMaintenanceMarginUsed": fmt(maintenance),
                "withdrawable": fmt(max(0, account - margin_used)), "assetPositions": assets, "time": self.now_ms()}

    def spot_clearinghouse_state(self, req: dict[str, Any]) -> Any:
        user = self.user(req)
        balances = []
        for coin, size, entry, _ in self._positions(user, self.spot_coins):
            token = self.listing.spots.index(coin) + 1
            balances.append({"coin": coin.base, "token": token, "total": fmt(size), "hold": ZERO,
                             "entryNtl": fmt(abs(size) * entry // ONE)})
        return {"balances": balances}

    def active_asset_data(self, req: dict[str, Any]) -> Any:
        user, name = self.user(req), self.field(req, "coin", str)
        coin = next((c for coins in self.dex_coins.values() for c in coins if c.name == name), None)
        if coin is None:
            raise malformed(f"coin: unknown asset {name!r}")
        mark = self._prices([coin])[name][0]
        return {"user": user, "coin": name, "leverage": {"type": "cross", "value": leverage(coin)},
                "maxTradeSzs": [ZERO, ZERO], "availableToTrade": [ZERO, ZERO], "markPx": fmt(mark)}

    def portfolio(self, req: dict[str, Any]) -> Any:
        value = self.clearinghouse_state(req)["marginSummary"]["accountValue"]
        now = self.now_ms()
        period = {"accountValueHistory": [[now, value]], "pnlHistory": [[now, ZERO]], "vlm": ZERO}
        return [[name, period] for name in ("day", "week", "month", "allTime", "perpDay", "perpWeek", "perpMonth", "perpAllTime")]

    def user_fees(self, req: dict[str, Any]) -> Any:
        self.user(req)
        # mainnet's base tier, and the top market-maker tier, whose rebate the engine pays every maker
        # (the schedule's base rates are never negative: clients' schemas say so, e.g. @nktkas/hyperliquid's)
        schedule = {"cross": TAKER_FEE, "add": "0.00015", "spotCross": "0.0007", "spotAdd": "0.0004",
                    "tiers": {"vip": [], "mm": [{"makerFractionCutoff": "0.03", "add": MAKER_FEE}]},
                    "referralDiscount": ZERO, "stakingDiscountTiers": []}
        return {"dailyUserVlm": [], "feeSchedule": schedule, "userCrossRate": TAKER_FEE, "userAddRate": MAKER_FEE,
                "userSpotCrossRate": TAKER_FEE, "userSpotAddRate": MAKER_FEE, "activeReferralDiscount": ZERO, "trial": None,
                "feeTrialReward": ZERO, "feeTrialEscrow": ZERO, "nextTrialAvailableTimestamp": None, "stakingLink": None,
                "activeStakingDiscount": {"bpsOfMaxSupply": ZERO, "discount": ZERO}}

    def user_role(self, req: dict[str, Any]) -> Any:
        user = self.user(req)
        return {"role": "user" if user in self.sim.users else "missing"}

    def gas_auction(self) -> dict[str, Any]:
        start = self.now_ms() // 1000 // 111_600 * 111_600
        return {"startTimeSeconds": start, "durationSeconds": 111_600, "startGas": "500.0", "currentGas": "500.0", "endGas": None}

    def spot_deploy_state(self, req: dict[str, Any]) -> Any:
        self.user(req)
        return {"states": [], "gasAuction": self.gas_auction()}

    def time_range(self, req: dict[str, Any]) -> None:
        self.field(req, "startTime", int)
        self.field(req, "endTime", int, optional=True)


def _for_user(value: Callable[[], Any]) -> Callable[[NodeInfo, dict[str, Any]], Any]:
    """A type whose answer for any user of the simulator is ``value()`` (no such activity here)."""
    def handler(info: NodeInfo, req: dict[str, Any]) -> Any:
        info.user(req)
        return value()
    return handler


def _history(info: NodeInfo, req: dict[str, Any]) -> Any:
    info.user(req)
    info.time_range(req)
    return []


def _funding_history(info: NodeInfo, req: dict[str, Any]) -> Any:
    info.field(req, "coin", str)
    info.time_range(req)
    return []


def _constant(value: Callable[[], Any]) -> Callable[[NodeInfo, dict[str, Any]], Any]:
    return lambda info, req: value()


HANDLERS: dict[str, Callable[[NodeInfo, dict[str, Any]], Any]] = {
    "meta": NodeInfo.meta,
    "spotMeta": NodeInfo.spot_meta,
    "perpDexs": NodeInfo.perp_dexs,
    "metaAndAssetCtxs": NodeInfo.meta_and_asset_ctxs,
    "spotMetaAndAssetCtxs": NodeInfo.spot_meta_and_asset_ctxs,
    "clearinghouseState": NodeInfo.clearinghouse_state,
    "spotClearinghouseState": NodeInfo.spot_clearinghouse_state,
    "activeAssetData": NodeInfo.active_asset_data,
    "portfolio": NodeInfo.portfolio,
    "userFees": NodeInfo.user_fees,
    "userRole": NodeInfo.user_role,
    "exchangeStatus": lambda info, req: {"time": info.now_ms(), "specialStatuses": None},
    "perpDeployAuctionStatus": lambda info, req: info.gas_auction(),
    "spotDeployState": NodeInfo.spot_deploy_state,
    "userFunding": _history,
    "userNonFundingLedgerUpdates": _history,
    "fundingHistory": _funding_history,
    "predictedFundings": _constant(list),
    "delegatorSummary": _for_user(lambda: {"delegated": ZERO, "undelegated": ZERO, "totalPendingWithdrawal": ZERO,
                                           "nPendingWithdrawals": 0}),
    "delegations": _for_user(list),
    "delegatorRewards": _for_user(list),
    "delegatorHistory": _for_user(list),
    "referral": _for_user(lambda: {"referredBy": None, "cumVlm": ZERO, "unclaimedRewards": ZERO, "claimedRewards": ZERO,
                                   "builderRewards": ZERO, "referrerState": {"stage": "needToTrade", "data": {"required": "10000.0"}},
                                   "rewardHistory": [], "tokenToState": []}),
    "subAccounts": _for_user(lambda: None),
    "userToMultiSigSigners": _for_user(lambda: None),
    "userDexAbstraction": _for_user(lambda: None),
    "userAbstraction": _for_user(lambda: "default"),
    "userVaultEquities": _for_user(list),
    "userRateLimit": _for_user(lambda: {"cumVlm": ZERO, "nRequestsUsed": 0, "nRequestsCap": 10_000, "nRequestsSurplus": 0}),
    "extraAgents": _for_user(list),
    "leadingVaults": _for_user(list),
    "twapHistory": _for_user(list),
    "vaultSummaries": _constant(list),
    "liquidatable": _constant(list),
    "perpsAtOpenInterestCap": _constant(list),
}

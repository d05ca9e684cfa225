"""Typed subscription builders, checked before anything is sent.

``subs.l2_book("BTC", n_sig_figs=5)``, ``subs.trades("ETH")``,
``subs.user_fills("0x…")``: one function per feed hlbook's gateway serves, each
returning the subscription dict for ``HLClient.subscribe`` (the dict form keeps
working as it is). They raise ``ValueError`` on what the gateway would refuse
with ``Invalid subscription``: an unknown type or key, a missing coin or user,
an address that is not ``0x`` + 40 hex digits, ``nSigFigs`` outside 2..5, a
``mantissa`` other than 1, 2, 5 or without ``nSigFigs`` 5, ``nLevels``
outside 1..100, a candle interval not among the 14. ``check(dict)`` applies
the same rules to a subscription written as a dict. Whether a coin exists is
the server's to say.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from hlbook.common import l2rules
from hlbook.common.candles import INTERVALS

Subscription = dict[str, Any]
Check = Callable[[str, Any], Any]  # (field, value) -> the value to send; ValueError if not allowed

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _coin(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ValueError(f"{name} must be a coin name ('BTC', '@107', 'PURR/USDC'), not {value!r}")
    return value


def _user(name: str, value: Any) -> str:
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value):
        raise ValueError(f"{name} must be an address, 0x and 40 hex digits, not {value!r}")
    return value.lower()


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, not {value!r}")
    return value


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, not {value!r}")
    return value


def _one_of(choices: tuple[int, ...]) -> Check:
    def check(name: str, value: Any) -> int:
        if not _is_int(value) or value not in choices:
            raise ValueError(f"{name} must be one of {choices}, not {value!r}")
        return int(value)
    return check


def _levels(name: str, value: Any) -> int:
    if not _is_int(value) or not 1 <= value <= l2rules.MAX_LEVELS:
        raise ValueError(f"{name} must be an int in 1..{l2rules.MAX_LEVELS}, not {value!r}")
    return int(value)


def _interval(name: str, value: Any) -> str:
    if not isinstance(value, str) or value not in INTERVALS:
        raise ValueError(f"{name} must be one of {list(INTERVALS)}, not {value!r}")
    return str(value)


_COIN: dict[str, Check] = {"coin": _coin}
_USER: dict[str, Check] = {"user": _user}
#: Every type the gateway serves: its fields (with their checks) and the required ones.
SPECS: dict[str, tuple[dict[str, Check], tuple[str, ...]]] = {
    "l2Book": ({**_COIN, "nSigFigs": _one_of(l2rules.N_SIG_FIGS), "mantissa": _one_of(l2rules.MANTISSAS),
                "nLevels": _levels, "fast": _bool}, ("coin",)),
    "trades": (_COIN, ("coin",)),
    "bbo": (_COIN, ("coin",)),
    "l4Book": (_COIN, ("coin",)),
    "activeAssetCtx": (_COIN, ("coin",)),
    "candle": ({**_COIN, "interval": _interval}, ("coin", "interval")),
    "allMids": ({"dex": _text}, ()),
    "orderUpdates": (_USER, ("user",)),
    "userEvents": (_USER, ("user",)),
    "userTwapSliceFills": (_USER, ("user",)),
    "userFills": ({**_USER, "aggregateByTime": _bool}, ("user",)),
    "openOrders": ({**_USER, "dex": _text}, ("user",)),
    # node state: the gateway polls its node's info server (needs --info-upstream there)
    "clearinghouseState": ({**_USER, "dex": _text}, ("user",)),
    "spotState": (_USER, ("user",)),
    "activeAssetData": ({**_USER, **_COIN}, ("user", "coin")),
    "webData2": (_USER, ("user",)),
    "assetCtxs": ({"dex": _text}, ()),
    "userHistoricalOrders": (_USER, ("user",)),
    "allDexsClearinghouseState": (_USER, ("user",)),
    "allDexsAssetCtxs": ({}, ()),
}


def check(subscription: Subscription) -> Subscription:
    """``subscription`` checked by its type's rules, ``None`` values dropped, the user
    lower-cased; ``ValueError`` says what is wrong."""
    kind = subscription.get("type") if isinstance(subscription, dict) else None
    spec = SPECS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ValueError(f"unknown subscription type {kind!r}: one of {sorted(SPECS)}")
    fields, required = spec
    given = {k: v for k, v in subscription.items() if k != "type" and v is not None}
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ValueError(f"{kind} takes {sorted(fields)}, not {unknown}")
    missing = [k for k in required if k not in given]
    if missing:
        raise ValueError(f"{kind} needs {missing}")
    out = {"type": kind, **{k: fields[k](k, v) for k, v in given.items()}}
    if kind == "l2Book":
        l2rules.validate(out.get("nSigFigs"), out.get("mantissa"))
    return out


def l2_book(coin: str, *, n_sig_figs: int | None = None, mantissa: int | None = None, n_levels: int | None = None,
            fast: bool | None = None) -> Subscription:
    """``l2Book``: ``n_sig_figs`` 2..5, ``mantissa`` 1, 2 or 5 (2 and 5 with ``n_sig_figs`` 5),
    ``n_levels`` 1..100 (the gateway sends 20 by default), ``fast`` (5 levels unless ``n_levels``)."""
    return check({"type": "l2Book", "coin": coin, "nSigFigs": n_sig_figs, "mantissa": mantissa, "nLevels": n_levels, "fast": fast})


def trades(coin: str) -> Subscription:
    return check({"type": "trades", "coin": coin})


def bbo(coin: str) -> Subscription:
    return check({"type": "bbo", "coin": coin})


def l4_book(coin: str) -> Subscription:
    """``l4Book``: every resting order of the coin (use ``L4Book`` to keep the book)."""
    return check({"type": "l4Book", "coin": coin})


def active_asset_ctx(coin: str) -> Subscription:
    return check({"type": "activeAssetCtx", "coin": coin})


def candle(coin: str, interval: str) -> Subscription:
    """``candle``: ``interval`` one of 1m 3m 5m 15m 30m 1h 2h 4h 8h 12h 1d 3d 1w 1M."""
    return check({"type": "candle", "coin": coin, "interval": interval})


def all_mids(*, dex: str | None = None) -> Subscription:
    """``allMids`` (of a HIP-3 ``dex``: its mids)."""
    return check({"type": "allMids", "dex": dex})


def order_updates(user: str) -> Subscription:
    return check({"type": "orderUpdates", "user": user})


def user_events(user: str) -> Subscription:
    return check({"type": "userEvents", "user": user})


def user_twap_slice_fills(user: str) -> Subscription:
    return check({"type": "userTwapSliceFills", "user": user})


def user_fills(user: str, *, aggregate_by_time: bool | None = None) -> Subscription:
    return check({"type": "userFills", "user": user, "aggregateByTime": aggregate_by_time})


def open_orders(user: str, *, dex: str | None = None) -> Subscription:
    return check({"type": "openOrders", "user": user, "dex": dex})


def clearinghouse_state(user: str, *, dex: str | None = None) -> Subscription:
    """``clearinghouseState`` (node state: the gateway polls its node, pushes changes)."""
    return check({"type": "clearinghouseState", "user": user, "dex": dex})


def spot_state(user: str) -> Subscription:
    return check({"type": "spotState", "user": user})


def active_asset_data(user: str, coin: str) -> Subscription:
    return check({"type": "activeAssetData", "user": user, "coin": coin})


def web_data2(user: str) -> Subscription:
    return check({"type": "webData2", "user": user})


def asset_ctxs(*, dex: str | None = None) -> Subscription:
    return check({"type": "assetCtxs", "dex": dex})


def user_historical_orders(user: str) -> Subscription:
    """``userHistoricalOrders``: the user's orders (``isSnapshot`` first), then new ones and status changes."""
    return check({"type": "userHistoricalOrders", "user": user})


def all_dexs_clearinghouse_state(user: str) -> Subscription:
    return check({"type": "allDexsClearinghouseState", "user": user})


def all_dexs_asset_ctxs() -> Subscription:
    return check({"type": "allDexsAssetCtxs"})

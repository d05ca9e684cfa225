"""Asset contexts (metaAndAssetCtxs, spotMetaAndAssetCtxs, activeAssetCtx) from
what the books know: the mid. Funding, open interest, premium, oracle price,
supplies and day volumes are not in the node files: ``"0.0"`` (oracle and
mark carry the mid, ``prevDayPx`` too), ``impactPxs`` null."""

from __future__ import annotations

from typing import Any


def is_spot(coin: str) -> bool:
    return coin.startswith("@") or "/" in coin


def _common(mid: str | None) -> dict[str, Any]:
    return {"prevDayPx": mid or "0.0", "dayNtlVlm": "0.0", "markPx": mid or "0.0", "midPx": mid, "dayBaseVlm": "0.0"}


def perp_ctx(mid: str | None) -> dict[str, Any]:
    return {**_common(mid), "funding": "0.0", "openInterest": "0.0", "premium": "0.0", "oraclePx": mid or "0.0", "impactPxs": None}


def spot_ctx(coin: str, mid: str | None) -> dict[str, Any]:
    return {**_common(mid), "coin": coin, "circulatingSupply": "0.0", "totalSupply": "0.0"}


def active_asset_ctx_channel(coin: str) -> str:
    """Spot coins' contexts come on ``activeSpotAssetCtx``."""
    return "activeSpotAssetCtx" if is_spot(coin) else "activeAssetCtx"


def active_asset_ctx(coin: str, mid: str | None) -> dict[str, Any]:
    """The data of an activeAssetCtx / activeSpotAssetCtx message."""
    return {"coin": coin, "ctx": spot_ctx(coin, mid) if is_spot(coin) else perp_ctx(mid)}

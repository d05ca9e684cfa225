"""The simulated coin universe: perps, spot pairs, tick and lot sizes.

Prices follow Hyperliquid's rules: at most 5 significant figures and at most
``6 - szDecimals`` (perps) or ``8 - szDecimals`` (spot) decimals. Each coin keeps
one tick for its whole run, so its fair price is kept inside the decade it
started in (prices with fewer significant figures below it stay valid).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from hlbook.common import fixed

# (name, kind, initial price, szDecimals, base token, weight of activity)
_TABLE: list[tuple[str, str, str, int, str, float]] = [
    ("BTC", "perp", "81300.0", 5, "BTC", 10.0),
    ("ETH", "perp", "2350.0", 4, "ETH", 6.0),
    ("@107", "spot", "38.52", 2, "HYPE", 3.0),
    ("SOL", "perp", "152.3", 2, "SOL", 4.0),
    ("PURR/USDC", "spot", "0.1823", 0, "PURR", 1.0),
    ("kPEPE", "perp", "0.0123", 0, "kPEPE", 1.5),
    ("HYPE", "perp", "38.5", 2, "HYPE", 4.0),
    ("@1", "spot", "12.34", 2, "HFUN", 0.5),
    ("XRP", "perp", "2.184", 0, "XRP", 2.0),
    ("DOGE", "perp", "0.18234", 0, "DOGE", 2.0),
    ("@142", "spot", "81290.0", 5, "UBTC", 1.0),
    ("AVAX", "perp", "23.41", 2, "AVAX", 1.0),
    ("LINK", "perp", "14.62", 1, "LINK", 1.0),
    ("SUI", "perp", "3.452", 1, "SUI", 1.0),
    ("@151", "spot", "2349.5", 4, "UETH", 0.7),
    ("BNB", "perp", "605.2", 3, "BNB", 1.0),
    ("LTC", "perp", "85.21", 2, "LTC", 0.7),
    ("ADA", "perp", "0.6721", 0, "ADA", 0.8),
    ("kSHIB", "perp", "0.01562", 0, "kSHIB", 0.5),
    ("@156", "spot", "152.21", 3, "USOL", 0.5),
    ("TRX", "perp", "0.2453", 0, "TRX", 0.5),
    ("WIF", "perp", "0.8452", 0, "WIF", 0.8),
    ("ENA", "perp", "0.4123", 0, "ENA", 0.8),
    ("TAO", "perp", "415.3", 3, "TAO", 0.6),
    ("AAVE", "perp", "265.4", 2, "AAVE", 0.6),
    ("ARB", "perp", "0.3852", 1, "ARB", 0.5),
    ("OP", "perp", "0.7234", 1, "OP", 0.5),
    ("NEAR", "perp", "2.652", 1, "NEAR", 0.5),
    ("APT", "perp", "5.412", 2, "APT", 0.5),
    ("FARTCOIN", "perp", "1.1234", 1, "FARTCOIN", 0.8),
    ("PENDLE", "perp", "4.123", 0, "PENDLE", 0.4),
    ("TIA", "perp", "3.123", 1, "TIA", 0.4),
    ("INJ", "perp", "12.72", 1, "INJ", 0.4),
    ("SEI", "perp", "0.2153", 0, "SEI", 0.4),
    ("@184", "spot", "0.004521", 0, "PIP", 0.3),
]

MAX_DECIMALS = {"perp": 6, "spot": 8}


@dataclass(frozen=True, slots=True)
class Coin:
    """One market. Prices and sizes are fixed-point ints (``common.fixed``)."""

    name: str
    kind: str  # "perp" or "spot"
    index: int
    price: int  # initial fair price
    tick: int
    lot: int
    min_px: int
    max_px: int
    base: str
    weight: float

    @property
    def is_spot(self) -> bool:
        return self.kind == "spot"


def _tick_exp(price: int, kind: str, sz_decimals: int) -> int:
    """Exponent of the tick: 5 significant figures, capped by the max decimals, integers always allowed."""
    exp = math.floor(math.log10(price / fixed.ONE)) - 4
    return min(max(exp, -(MAX_DECIMALS[kind] - sz_decimals)), 0)


def _pow10(exp: int) -> int:
    """10**exp as a fixed-point int (exp may be negative, down to -DECIMALS)."""
    return fixed.ONE * 10**exp if exp >= 0 else fixed.ONE // 10**-exp


def make_coin(index: int, name: str, kind: str, price: str, sz_decimals: int, base: str, weight: float) -> Coin:
    """A Coin from its listing; prices stay below the next power of ten (5 significant figures)."""
    px = fixed.parse(price)
    tick = _pow10(_tick_exp(px, kind, sz_decimals))
    top = _pow10(math.floor(math.log10(px / fixed.ONE)) + 1)
    px -= px % tick
    return Coin(name, kind, index, px, tick, _pow10(-sz_decimals), tick, top - tick, base, weight)


def universe(n: int, seed: int = 0) -> list[Coin]:
    """The first ``n`` coins: the named table, then generated spot pairs ``@<k>``."""
    if n < 1:
        raise ValueError("coins must be at least 1")
    coins = [make_coin(i, *row) for i, row in enumerate(_TABLE[:n])]
    rng = random.Random(f"universe-{seed}")
    k = 200
    while len(coins) < n:
        mantissa = rng.uniform(1.2, 8.0)
        exp = rng.randint(-3, 4)
        sz_decimals = max(0, min(exp - 1, 5))
        price = f"{mantissa * 10**exp:.{max(1, 4 - exp)}f}"
        coins.append(make_coin(len(coins), f"@{k}", "spot", price, sz_decimals, f"TOKEN{k}", 0.3))
        k += 1
    return coins


# The whole market (``--profile full``): perps, HIP-3 dexes' perps (``dex:NAME``) and spot
# pairs, activity falling off with rank the way mainnet's does (a few majors, a long tail).
FULL_PERPS, FULL_HIP3, FULL_SPOT = 200, 50, 200
HIP3_DEXES = ("xyz", "flx")


def full_universe(seed: int = 0) -> list[Coin]:
    """~450 coins: the named table, then generated perps, HIP-3 perps and spot pairs; weights by rank."""
    rng = random.Random(f"full-universe-{seed}")
    rows = [row for row in _TABLE]
    perps = sum(1 for row in rows if row[1] == "perp")
    spots = len(rows) - perps

    def price() -> tuple[str, int]:
        exp = rng.randint(-3, 4)
        return f"{rng.uniform(1.2, 8.0) * 10**exp:.{max(1, 4 - exp)}f}", max(0, min(exp - 1, 5))

    for k in range(FULL_PERPS - perps):
        px, sz = price()
        rows.append((f"P{k:03d}", "perp", px, sz, f"P{k:03d}", 0.0))
    for k in range(FULL_HIP3):
        px, sz = price()
        rows.append((f"{HIP3_DEXES[k % len(HIP3_DEXES)]}:H{k:03d}", "perp", px, sz, f"H{k:03d}", 0.0))
    for k in range(FULL_SPOT - spots):
        px, sz = price()
        rows.append((f"@{300 + k}", "spot", px, sz, f"TOKEN{300 + k}", 0.0))
    # the table's majors keep their weights; the rest fall off with rank (Zipf-like)
    return [make_coin(i, name, kind, px, sz, base, weight or 8.0 / (i + 1) ** 1.1)
            for i, (name, kind, px, sz, base, weight) in enumerate(rows)]


# ------------------------------------------------------------------ the chain's listing

# Mainnet's perps in asset-id order (``meta``'s universe: an entry's position is the asset id an order
# for it is signed with), ids 0-194 as listed by mid-2025, delisted ones included (ids are never reused).
MAINNET_PERPS: tuple[str, ...] = tuple("""
BTC ETH ATOM MATIC DYDX SOL AVAX BNB APE OP LTC ARB DOGE INJ SUI kPEPE CRV LDO LINK STX RNDR CFX FTM GMX SNX XRP BCH
APT AAVE COMP MKR WLD FXS HPOS RLB UNIBOT YGG TRX kSHIB UNI SEI RUNE OX FRIEND SHIA CYBER ZRO BLZ DOT BANANA TRB FTT
LOOM OGN RDNT ARK BNT CANTO REQ BIGTIME KAS ORBS BLUR TIA BSV ADA TON MINA POLYX GAS PENDLE STG FET STRAX NEAR MEME
ORDI BADGER NEO ZEN FIL PYTH SUSHI ILV IMX kBONK GMT SUPER USTC NFTI JUP kLUNC RSR GALA JTO NTRN ACE MAV WIF CAKE
PEOPLE ENS ETC XAI MANTA UMA ONDO ALT ZETA DYM MAVIA W PANDORA STRK PIXEL AI TAO AR MYRO kFLOKI BOME ETHFI ENA MNT
TNSR SAGA MERL HBAR POPCAT OMNI EIGEN REZ NOT TURBO BRETT IO ZK BLAST LISTA MEW RENDER kDOGS POL CATI CELO HMSTR SCR
NEIROETH kNEIRO GOAT MOODENG GRASS PURR PNUT XLM CHILLGUY SAND IOTA ALGO HYPE ME MOVE VIRTUAL PENGU USUAL FARTCOIN
AI16Z AIXBT ZEREBRO BIO GRIFFAIN SPX S MORPHO TRUMP MELANIA ANIME VINE VVV JELLY BERA TST LAYER IP OM KAITO NIL PAXG
PROMPT BABY WCT HYPER ZORA INIT DOOD
""".split())


def sz_decimals(coin: Coin) -> int:
    """The coin's ``szDecimals`` (its lot is 10^-szDecimals)."""
    return round(-math.log10(coin.lot / fixed.ONE))


def spot_index(name: str) -> int | None:
    """A spot pair's index on the chain: ``@107`` is 107, ``PURR/USDC`` is 0 (the one canonical pair named so)."""
    if name == "PURR/USDC":
        return 0
    if name.startswith("@") and name[1:].isdigit():
        return int(name[1:])
    return None


@dataclass(frozen=True, slots=True)
class Listing:
    """The simulated coins where the chain lists them: ``perps`` the default dex's universe (a
    position is an asset id; None: a coin of mainnet's list that is not simulated, shown
    delisted), ``dexes`` the HIP-3 dexes in deployment order with their coins (asset ids
    110000 + 10000 × (dex's place - 1) + position), ``spots`` every pair index up to the
    highest simulated one (None: a pair not simulated)."""

    perps: list[tuple[str, Coin | None]]
    dexes: list[tuple[str, list[Coin]]]
    spots: list[Coin | None]


def listing(coins: list[Coin]) -> Listing:
    """Mainnet's order: known perps at their mainnet ids (BTC 0, ETH 1, SOL 5, …), the list cut
    after the highest one simulated; perps mainnet lacks (``P000``…) after it in universe order.
    Spot pairs at their index; HIP-3 coins (``dex:NAME``) by dex in ``HIP3_DEXES`` order."""
    by_name = {c.name: c for c in coins}
    default = [c for c in coins if not c.is_spot and ":" not in c.name]
    known = [MAINNET_PERPS.index(c.name) for c in default if c.name in MAINNET_PERPS]
    perps: list[tuple[str, Coin | None]] = [(name, by_name.get(name)) for name in MAINNET_PERPS[:max(known, default=-1) + 1]]
    perps += [(c.name, c) for c in default if c.name not in MAINNET_PERPS]
    dexes = [(dex, [c for c in coins if c.name.startswith(dex + ":")]) for dex in HIP3_DEXES]
    spot_coins = {index: c for c in coins if c.is_spot and (index := spot_index(c.name)) is not None}
    spots = [spot_coins.get(i) for i in range(max(spot_coins, default=-1) + 1)]
    return Listing(perps, [(dex, members) for dex, members in dexes if members], spots)

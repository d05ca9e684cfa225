"""ZeroMQ topic names. Every topic ends with ``|`` so prefix matching is exact
(``B|@1|`` never matches ``B|@10|``)."""

from __future__ import annotations

import functools
import zlib

SEP = b"|"

# ingest -> shards / gateways: a block's books phase (H|, B|, T|), then its details phase (D|, E|, U|, HIST|)
HEADER = b"H|"  # one BlockHeader per block
BOOK_PREFIX = b"B|"  # B|<coin>| BookSlice
DETAILS_PREFIX = b"D|"  # D|<coin>| BookDetails
BLOCK_END = b"E|"  # one BlockEnd per block
TRADES_PREFIX = b"T|"  # T|<coin>| Trades
USER_PREFIX = b"U|"  # U|<user>| UserEvents (only published while subscribed)
HISTORY = b"HIST|"  # HistoryBlock, every block while subscribed (the history service)

# book shard -> gateways
L2_PREFIX = b"L2|"  # L2|<coin>|<nSigFigs or ->|<mantissa or ->|<nLevels>| L2Book
BBO_PREFIX = b"BBO|"  # BBO|<coin>| Bbo
L4_PREFIX = b"L4|"  # L4|<coin>| L4Updates
SHARD_PREFIX = b"S|"  # S|<shard>| ShardBlock (mids, coin states), every block
HEARTBEAT_PREFIX = b"HB|"  # HB|<shard>| ShardStatus, every second, also when no block comes
RESET_PREFIX = b"RESET|"  # RESET|<coin>| Reset

# history service -> gateways
CANDLE_PREFIX = b"C|"  # C|<coin>|<interval>| CandleUpdate


def _t(prefix: bytes, *parts: str) -> bytes:
    return prefix + b"".join(p.encode() + SEP for p in parts)


def book(coin: str) -> bytes:
    return _t(BOOK_PREFIX, coin)


def details(coin: str) -> bytes:
    return _t(DETAILS_PREFIX, coin)


def trades(coin: str) -> bytes:
    return _t(TRADES_PREFIX, coin)


def user(address: str) -> bytes:
    return _t(USER_PREFIX, address.lower())


def l2(coin: str, n_sig_figs: int | None = None, mantissa: int | None = None, n_levels: int | None = None) -> bytes:
    """``L2|<coin>|<nSigFigs or ->|<mantissa or ->|<nLevels>|``; without ``n_levels`` the
    prefix of every depth of that aggregation."""
    nsf = "-" if n_sig_figs is None else str(n_sig_figs)
    man = "-" if mantissa is None else str(mantissa)
    return _t(L2_PREFIX, coin, nsf, man) if n_levels is None else _t(L2_PREFIX, coin, nsf, man, str(n_levels))


def bbo(coin: str) -> bytes:
    return _t(BBO_PREFIX, coin)


def l4(coin: str) -> bytes:
    return _t(L4_PREFIX, coin)


def shard_block(shard: int) -> bytes:
    return _t(SHARD_PREFIX, str(shard))


def heartbeat(shard: int) -> bytes:
    return _t(HEARTBEAT_PREFIX, str(shard))


def reset(coin: str) -> bytes:
    return _t(RESET_PREFIX, coin)


def candle(coin: str, interval: str) -> bytes:
    return _t(CANDLE_PREFIX, coin, interval)


def split(topic: bytes) -> list[str]:
    """Parts of a topic after its prefix: ``b"L2|BTC|5|2|"`` -> ``["L2", "BTC", "5", "2"]``."""
    return topic.decode().split("|")[:-1]


def coin_of(topic: bytes) -> str:
    """The second part of a topic (the coin of B/T/L2/BBO/L4/RESET, the user of U)."""
    start = topic.index(SEP) + 1
    return topic[start : topic.index(SEP, start)].decode()


# The most active markets of mainnet with their rough share of its activity. They are placed
# first, each on the least loaded shard, so that two majors never share one shard while another
# idles (by crc32 alone BTC, SOL, HYPE and @107 all land on one shard of four); every other coin
# goes by crc32. Every process computes the same placement from this table.
MAJORS: tuple[tuple[str, float], ...] = (
    ("BTC", 10.0), ("ETH", 6.0), ("SOL", 4.0), ("HYPE", 4.0), ("@107", 3.0), ("XRP", 2.0), ("DOGE", 2.0),
    ("kPEPE", 1.5), ("PURR/USDC", 1.0), ("@142", 1.0), ("AVAX", 1.0), ("LINK", 1.0), ("SUI", 1.0), ("BNB", 1.0),
    ("FARTCOIN", 0.8), ("ADA", 0.8),
)


@functools.lru_cache(maxsize=64)
def _placed(shards: int) -> dict[str, int]:
    load = [0.0] * shards
    placed = {}
    for coin, weight in MAJORS:
        k = min(range(shards), key=lambda i: (load[i], i))
        placed[coin] = k
        load[k] += weight
    return placed


def shard_of(coin: str, shards: int) -> int:
    """Shard that owns a coin: a major's place (``MAJORS``), else ``crc32(coin) % shards``."""
    placed = _placed(shards).get(coin)
    return placed if placed is not None else zlib.crc32(coin.encode()) % shards

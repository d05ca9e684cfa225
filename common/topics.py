"""ZeroMQ topic names. Every topic ends with ``|`` so prefix matching is exact
(``B|@1|`` never matches ``B|@10|``)."""

from __future__ import annotations

import zlib

SEP = b"|"

# ingest -> shards / gateways
HEADER = b"H|"  # one BlockHeader per block
BOOK_PREFIX = b"B|"  # B|<coin>| BookSlice
TRADES_PREFIX = b"T|"  # T|<coin>| Trades
USER_PREFIX = b"U|"  # U|<user>| UserEvents (only published while subscribed)
HISTORY = b"HIST|"  # HistoryBlock, every block while subscribed (the history service)

# book shard -> gateways
L2_PREFIX = b"L2|"  # L2|<coin>|<nSigFigs or ->|<mantissa or ->| L2Levels
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


def trades(coin: str) -> bytes:
    return _t(TRADES_PREFIX, coin)


def user(address: str) -> bytes:
    return _t(USER_PREFIX, address.lower())


def l2(coin: str, n_sig_figs: int | None = None, mantissa: int | None = None) -> bytes:
    nsf = "-" if n_sig_figs is None else str(n_sig_figs)
    man = "-" if mantissa is None else str(mantissa)
    return _t(L2_PREFIX, coin, nsf, man)


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


def shard_of(coin: str, shards: int) -> int:
    """Shard that owns a coin: ``crc32(coin) % shards``."""
    return zlib.crc32(coin.encode()) % shards

"""Wire contract between processes: ZeroMQ multipart ``[topic, msgpack payload]``.

Every stream message carries ``height`` (block number) and ``prev``: the height
of the previous message published on the same topic by the same publisher
(``None`` for the first since it started). ``common.chain`` decides from it
whether a message was lost; the consumer then recovers (replay or snapshot)
instead of serving a wrong book. docs/ARCHITECTURE.md lists them all.
"""

from __future__ import annotations

import enum
import logging
import typing
from typing import Any

import msgspec
import zmq

from hlbook.common.metrics import REPLIES_DROPPED
from hlbook.common.models import BookDiff, Fill, OrderStatus, UserFill

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- ingest PUB


class BlockHeader(msgspec.Struct):
    """``H|``: a block's books phase, one per block (empty ones too), published as soon
    as its diffs and fills were read: its ``B|`` and ``T|`` messages follow it (``book_coins``
    and ``trade_coins`` name them, so a lost one is known without waiting for its topic's next).
    Streaming mode: as soon as its diffs were read; its trades follow later, named by its
    ``E|`` (``n_fills`` 0 and ``trade_coins`` empty here)."""

    height: int
    prev: int | None
    time: int  # block_time, epoch ms
    block_time: str
    local_time: str
    n_diffs: int
    n_fills: int
    book_coins: list[str]  # coins with a BookSlice in this block
    incomplete: list[str] = []  # book streams whose line of this block never came (a damaged or truncated file)
    trade_coins: list[str] = []  # coins with a Trades message in this block: a consumer that lacks one lost it


class BookSlice(msgspec.Struct):
    """``B|<coin>|``: the coin's diffs of one block, published only for blocks with diffs
    for the coin (the books phase; the details of its new orders follow in ``D|<coin>|``)."""

    height: int
    prev: int | None
    time: int
    coin: str
    diffs: list[BookDiff]


class BookDetails(msgspec.Struct):
    """``D|<coin>|``: the statuses of one block whose oid has a diff of the coin in it (the
    details of its ``new`` orders: user's tif, cloid, timestamp, trigger fields…), node
    order; published in the block's details phase, for coins with such statuses."""

    height: int
    prev: int | None
    time: int
    coin: str
    statuses: list[OrderStatus]


class Dropped(msgspec.Struct):
    """Node data ingest dropped (a damaged line, a late row, a stream a block closed without):
    ``reason`` as in ``hlbook_ingest_bad_lines_total`` or ``incomplete``; ``height`` the block it
    was of (None: unknown); ``coins``/``users`` it concerned (None: unknown, i.e. any)."""

    stream: str
    reason: str
    height: int | None = None
    coins: list[str] | None = None
    users: list[str] | None = None


class BlockEnd(msgspec.Struct):
    """``E|``: a block's details phase is over, one per block after its ``D|`` messages and
    before its ``U|`` ones: ``detail_coins`` are the coins that got a ``D|``, ``users`` the
    users that get a ``U|``. ``incomplete``: ``["order_statuses"]``
    when the block's status line never came (its new orders have no details)."""

    height: int
    prev: int | None
    time: int
    n_statuses: int
    detail_coins: list[str]
    incomplete: list[str] = []
    users: list[str] = []  # users with a UserEvents message after this one (only followed users have them)
    trade_coins: list[str] = []  # streaming mode: coins whose Trades of this block came before it (by-block: in H|)
    dropped: list[Dropped] = []  # node data dropped since the previous E| (this block's missing streams included)


class Trade(msgspec.Struct):
    """One trade, public API shape (``users`` = [buyer, seller])."""

    coin: str
    side: str
    px: str
    sz: str
    hash: str
    time: int
    tid: int
    users: list[str]


class Trades(msgspec.Struct):
    """``T|<coin>|``: the trades of one coin in one block."""

    height: int
    prev: int | None
    time: int
    coin: str
    trades: list[Trade]


class UserEvents(msgspec.Struct):
    """``U|<user>|``: one user's statuses and fills of one block, node order.
    Published only while some subscriber follows that user (ingest's XPUB)."""

    height: int
    prev: int | None
    time: int
    user: str
    statuses: list[OrderStatus]
    fills: list[Fill]


class HistoryBlock(msgspec.Struct):
    """``HIST|``: what the history service keeps of one block, every block (empty ones
    too) while it is subscribed: every fill, and every status but rejections (over 95 %
    of them, rarely asked for). ``incomplete``: a stream's line never came (the history
    service reads that block from the node's files instead)."""

    height: int
    prev: int | None
    time: int
    statuses: list[OrderStatus]
    fills: list[UserFill]
    incomplete: list[str] = []


# ---------------------------------------------------------------- ingest replay (ROUTER)


class ReplayRequest(msgspec.Struct):
    """Ask ingest for the stored messages of heights ``>= from_height`` whose
    topic starts with one of ``prefixes`` (all when empty). ``partial``: when
    ingest no longer holds ``from_height``, answer with what it holds instead of
    refusing (the requester checks its chains to tell whether anything it needed
    is missing: a sparse topic may have had no message in between)."""

    from_height: int
    prefixes: list[bytes] = []
    op: str = "replay"
    partial: bool = False


class ReplayReply(msgspec.Struct):
    """First frame of the reply; ``topic, payload`` frame pairs follow in publish order."""

    ok: bool
    oldest: int | None  # oldest height held
    head: int | None  # newest height held
    error: str | None = None


# ---------------------------------------------------------------- book shard XPUB


class CoinState(enum.StrEnum):
    """A coin in a shard: ``initialising`` (snapshot + replay in progress), ``live``
    (served and published), ``resyncing`` (a gap or a bad diff: rebuilt from a
    fresh node snapshot, then ``RESET|<coin>|``)."""

    INITIALISING = "initialising"
    LIVE = "live"
    RESYNCING = "resyncing"


Level = tuple[str, str, int]  # (px, sz, n): canonical decimal strings, order count


class L2Book(msgspec.Struct):
    """``L2|<coin>|<nSigFigs|->|<mantissa|->|<nLevels>|``: the top ``nLevels`` levels a side
    after a block that changed them, as the ``data`` of the client's l2Book message
    (``{"coin","time","levels":[[{"px","sz","n"}…],[…]]}``: JSON rendered once, by the
    shard, for every gateway); computed only for topics some subscriber asked for (XPUB)."""

    height: int
    prev: int | None
    time: int
    coin: str
    data: bytes


class Bbo(msgspec.Struct):
    """``BBO|<coin>|``: best bid and ask, published only when they changed, as the ``data``
    of the client's bbo message (``{"coin","time","bbo":[level|null, level|null]}``, JSON)."""

    height: int
    prev: int | None
    time: int
    coin: str
    data: bytes


class L4Updates(msgspec.Struct, tag=True):
    """``L4|<coin>|``: the statuses and diffs one block applied to the coin's book
    (upstream order_book_server ``Updates`` content)."""

    height: int
    prev: int | None
    time: int
    coin: str
    order_statuses: list[OrderStatus]
    book_diffs: list[BookDiff]


class L4Sync(msgspec.Struct, tag=True):
    """Also on ``L4|<coin>|``, sent right after the shard saw a subscription to
    it: from here on that subscriber gets every update of the coin.
    ``height`` is the coin's height then; ``prev`` the height of its last
    change (the ``prev`` its next ``L4Updates`` will carry). A gateway asks for
    an l4 snapshot only after this (``L4Query.min_height = height``), so no update
    falls between the snapshot and the stream."""

    height: int
    prev: int | None
    coin: str


L4Message = L4Updates | L4Sync  # what ``L4|<coin>|`` carries (msgspec tagged union: field "type")


class ShardBlock(msgspec.Struct):
    """``S|<shard>|``: the shard finished a block; ``mids`` holds the mid of every
    live coin of the shard that has both sides (allMids), ``states`` each owned
    coin's state (``initialising``/``live``/``resyncing``)."""

    height: int
    prev: int | None
    time: int
    shard: int
    mids: dict[str, str]
    states: dict[str, str]


class ShardStatus(msgspec.Struct):
    """``HB|<shard>|``: the shard is up, every second whatever the node does (a gateway
    started while the node is silent learns the coins; a stalled node is told apart from
    a dead shard). Not a stream: no ``prev``."""

    shard: int
    phase: CoinState  # initialising until the snapshot is loaded and replayed
    height: int  # last block finished
    time: int  # its block time (ms)
    states: dict[str, str]


class Reset(msgspec.Struct):
    """``RESET|<coin>|``: the coin's book was rebuilt (gap, unknown oid, failed
    validation); consumers drop what they derived and fetch a fresh snapshot."""

    height: int
    coin: str
    reason: str
    state: str


# ---------------------------------------------------------------- book shard queries (ROUTER)


class _ShardQuery(msgspec.Struct, tag_field="op", omit_defaults=True):
    """Base of the shard's requests: a msgspec tagged union on ``op`` (``ShardQuery``).
    Replies are maps with ``ok`` and, when not ok, ``error``."""


class L4Query(_ShardQuery, tag="l4"):
    """The coin's L4 book (an ``L4Snapshot`` frame, then its JSON) at ``min_height`` or later."""

    coin: str | None = None
    min_height: int = 0  # the snapshot must be at least this recent


class L2Query(_ShardQuery, tag="l2"):
    """The coin's L2 levels, aggregated by ``n_sig_figs`` / ``mantissa``."""

    coin: str | None = None
    n_sig_figs: int | None = None
    mantissa: int | None = None
    n_levels: int = 20


class CoinsQuery(_ShardQuery, tag="coins"):
    """The shard's coins and their states."""


class OpenOrdersQuery(_ShardQuery, tag="open_orders"):
    """Every resting order of ``user`` in the shard's live books."""

    user: str | None = None


class OrderQuery(_ShardQuery, tag="order"):
    """The resting order ``oid``."""

    oid: int | None = None


ShardQuery = L4Query | L2Query | CoinsQuery | OpenOrdersQuery | OrderQuery


class _Op(msgspec.Struct):
    op: str


def op_of(payload: bytes) -> str | None:
    """The ``op`` of a request that did not decode as its union (None: not a map with a string ``op``):
    tells an unknown op from a known one with wrong fields."""
    try:
        return decode(payload, _Op).op
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def op_name(query: msgspec.Struct | type[msgspec.Struct]) -> str:
    """The ``op`` (tag) of a request struct or of its type."""
    return str(query.__struct_config__.tag)


SHARD_OPS: tuple[str, ...] = tuple(op_name(t) for t in typing.get_args(ShardQuery))


class L4Snapshot(msgspec.Struct):
    """First frame of an ``l4`` reply; the next frames, concatenated, are the JSON
    of the levels (``[[order+user…],[…]]``) as WebSocket clients get them."""

    ok: bool
    coin: str
    height: int
    time: int
    size: int  # bytes of JSON in the frames that follow


# ---------------------------------------------------------------- history service


class _HistoryQuery(msgspec.Struct, tag_field="op", omit_defaults=True, kw_only=True):
    """Base of the history service's requests (ROUTER): a msgspec tagged union on ``op``
    (``HistoryQuery``). The reply is a ``HistoryReply`` frame, then (when ok) the answer's
    JSON as clients get it. With ``min_height`` the answer waits (a second at most) until
    that block is stored."""

    min_height: int = 0  # answer once every block up to this one is held (or after WAIT_FOR_HEIGHT s)


class UserFillsQuery(_HistoryQuery, tag="user_fills"):
    user: str | None = None
    aggregate: bool = False


class UserFillsByTimeQuery(_HistoryQuery, tag="user_fills_by_time"):
    user: str | None = None
    start: int = 0
    end: int | None = None
    aggregate: bool = False
    reversed: bool = False  # newest first (the page: the window's newest fills)


class TwapSliceFillsQuery(_HistoryQuery, tag="twap_slice_fills"):
    """The user's TWAP slice fills as ``[{fill, twapId}]``: the newest, newest first, without
    ``start``; with it, those with ``start <= time <= end`` oldest first."""

    user: str | None = None
    start: int | None = None
    end: int | None = None


class HistoricalOrdersQuery(_HistoryQuery, tag="historical_orders"):
    user: str | None = None


class OrderStatusQuery(_HistoryQuery, tag="order_status"):
    """By ``oid`` or ``cloid``."""

    user: str | None = None
    oid: int | None = None
    cloid: str | None = None


class RecentTradesQuery(_HistoryQuery, tag="recent_trades"):
    coin: str | None = None


class CandlesQuery(_HistoryQuery, tag="candles"):
    coin: str | None = None
    interval: str | None = None
    start: int = 0
    end: int | None = None


class StatusQuery(_HistoryQuery, tag="status"):
    """Held heights and backfill progress."""


HistoryQuery = (UserFillsQuery | UserFillsByTimeQuery | HistoricalOrdersQuery | OrderStatusQuery | RecentTradesQuery
                | CandlesQuery | StatusQuery | TwapSliceFillsQuery)
HISTORY_OPS: tuple[str, ...] = tuple(op_name(t) for t in typing.get_args(HistoryQuery))


class HistoryReply(msgspec.Struct):
    ok: bool
    height: int | None  # newest block held
    error: str | None = None


class CandleUpdate(msgspec.Struct):
    """``C|<coin>|<interval>|`` (history service XPUB): the series' newest candle, public
    API fields, after every block that changed it, and at once to a new subscriber."""

    t: int
    T: int
    s: str
    i: str
    o: str
    c: str
    h: str
    l: str
    v: str
    n: int


def error_reply(text: str) -> dict[str, Any]:
    """A shard's refusal: ``{"ok": false, "error": text}``."""
    return {"ok": False, "error": text}


# ---------------------------------------------------------------- codec

_encoder = msgspec.msgpack.Encoder()
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def encode(message: Any) -> bytes:
    return _encoder.encode(message)


def decode(payload: bytes, message_type: Any = None) -> Any:
    """Decode a payload into ``message_type`` (validated) or plain Python objects."""
    if message_type is None:
        return msgspec.msgpack.decode(payload)
    decoder = _decoders.get(message_type)
    if decoder is None:
        decoder = _decoders[message_type] = msgspec.msgpack.Decoder(message_type)
    return decoder.decode(payload)


class PrevTracker:
    """Publisher side of the ``prev`` chain: last height sent per topic."""

    def __init__(self) -> None:
        self._last: dict[bytes, int] = {}

    def next(self, topic: bytes, height: int) -> int | None:
        prev = self._last.get(topic)
        self._last[topic] = height
        return prev

    def peek(self, topic: bytes) -> int | None:
        """The ``prev`` the next message on ``topic`` will carry."""
        return self._last.get(topic)

    def items(self) -> list[tuple[bytes, int]]:
        return list(self._last.items())

    def restore(self, last: dict[bytes, int]) -> None:
        """Continue the chains of an earlier run (its last height per topic)."""
        self._last.update(last)


# ---------------------------------------------------------------- the [topic, payload] frames

def send(sock: zmq.Socket, topic: bytes, payload: bytes) -> None:
    """Send one stream message. Two sends, not ``send_multipart``: pyzmq's costs ~3 µs more a
    message in Python (hundreds of messages a block in ingest and each shard)."""
    sock.send(topic, zmq.SNDMORE)
    sock.send(payload, 0, copy=len(payload) < 1 << 16)


def recv(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """Receive one whole message, its frames as bytes (zmq.Again when none waits with NOBLOCK).
    Reads each frame's ``more``: pyzmq's ``recv_multipart`` asks the socket option, ~2 µs more."""
    frame = sock.recv(flags, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = sock.recv(flags, copy=False)
        frames.append(frame.bytes)
    return frames


def router_replies(sock: zmq.Socket, queued: int) -> None:
    """A ROUTER holds at most ``queued`` replies per peer, and refuses (``ROUTER_MANDATORY``)
    rather than silently drops one past that or one to a peer that is gone: :func:`reply`."""
    sock.setsockopt(zmq.SNDHWM, queued)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)


_dropped: dict[str, int] = {}  # service -> replies dropped so far (for the log's pace)


def reply(sock: zmq.Socket, frames: list[bytes], service: str, copy: bool = True) -> bool:
    """Queue a ROUTER's reply without blocking the loop. One its peer cannot take now (its
    queue full) or at all (gone) is dropped, counted and logged (the first three, then every
    hundredth), never vanishes: the peer's request times out. False when dropped."""
    try:
        sock.send_multipart(frames, zmq.NOBLOCK, copy=copy)
        return True
    except zmq.ZMQError as exc:  # EAGAIN: the peer's queue is full; EHOSTUNREACH: the peer is gone
        REPLIES_DROPPED.labels(service).inc()
        dropped = _dropped[service] = _dropped.get(service, 0) + 1
        if dropped <= 3 or dropped % 100 == 0:
            log.warning("%s: a reply dropped (%s) [%d so far]: its asker's request times out", service, exc, dropped)
        return False

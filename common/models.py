"""Typed models of the three node streams (both modes share the line shape).

msgspec Structs: decoding a status line into them is faster than a bare
``orjson.loads`` into dicts (see docs/BENCHMARKS.md), validates every field, and
the same objects re-encode to msgpack for the wire without a copy to dicts.
Field order follows the node's JSON. Event structs are ``gc=False``: they are
plain data (no reference cycles), and the collector need not track the
thousands that per-user stores and replay buffers keep.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, Union

import msgspec

# Every integer the node writes (oids, tids, heights, ms times) is a non-negative
# int64 (msgpack carries it): a larger or negative one is a malformed line,
# refused at decoding instead of failing later (ints >= 2**64 cannot be encoded).
Count = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]

HIP2_USER = "0xffffffffffffffffffffffffffffffffffffffff"
ASSISTANCE_FUND_USER = "0xfefefefefefefefefefefefefefefefefefefefe"
ZERO_HASH = "0x" + "0" * 64


class Order(msgspec.Struct, gc=False):
    """The ``order`` of an order status (also the order shape of l4 snapshots)."""

    coin: str
    side: str
    limitPx: str
    sz: str
    oid: Count
    timestamp: Count
    triggerCondition: str
    isTrigger: bool
    triggerPx: str
    children: list[Any]
    isPositionTpsl: bool
    reduceOnly: bool
    orderType: str
    origSz: str
    tif: str | None = None
    cloid: str | None = None


class OrderStatus(msgspec.Struct, gc=False):
    time: str
    user: str
    hash: str | None
    builder: Any
    status: str
    order: Order

    @property
    def rejected(self) -> bool:
        return is_rejection(self.status)


def is_rejection(status: str) -> bool:
    """An order the node refused (``badAloPxRejected``, ``perpMarginRejected``, …)."""
    return status.endswith("Rejected")


class NewDiff(msgspec.Struct, gc=False):
    sz: str


class UpdateDiff(msgspec.Struct, gc=False):
    origSz: str
    newSz: str


class DiffBody(msgspec.Struct, omit_defaults=True, gc=False):
    """``{"new": {...}}`` or ``{"update": {...}}``; the bare string ``"remove"`` is the third form."""

    new: NewDiff | None = None
    update: UpdateDiff | None = None


class BookDiff(msgspec.Struct, gc=False):
    user: str
    oid: Count
    coin: str
    side: str
    px: str
    raw_book_diff: Union[DiffBody, str]


class Fill(msgspec.Struct, omit_defaults=True, gc=False):
    """A fill as the node writes it; optional fields the node leaves out stay out when re-encoded."""

    coin: str
    px: str
    sz: str
    side: str
    time: Count
    startPosition: str
    dir: str
    closedPnl: str
    hash: str
    oid: Count
    crossed: bool
    fee: str
    tid: Count
    cloid: str | None = None
    feeToken: str | None = None
    twapId: Count | None | msgspec.UnsetType = msgspec.UNSET  # the node writes null when not a TWAP slice: kept as written
    builderFee: str | None = None
    liquidation: Any = None


UserFill = tuple[str, Fill]


class StatusLine(msgspec.Struct):
    local_time: str
    block_time: str
    block_number: Count
    events: list[OrderStatus]


class DiffLine(msgspec.Struct):
    local_time: str
    block_time: str
    block_number: Count
    events: list[BookDiff]


class FillLine(msgspec.Struct):
    local_time: str
    block_time: str
    block_number: Count
    events: list[UserFill]


NodeLine = Union[StatusLine, DiffLine, FillLine]


class StatusHead(msgspec.Struct, gc=False):
    """An order status with its ``order`` left as raw JSON: over 95 % of statuses
    are rejections that never touch a book, and skipping their orders saves
    ~30 % of decoding a status line (docs/BENCHMARKS.md, "Ingest")."""

    time: str
    user: str
    hash: str | None
    builder: Any
    status: str
    order: msgspec.Raw

    @property
    def rejected(self) -> bool:
        return is_rejection(self.status)

    def full(self) -> OrderStatus:
        return OrderStatus(self.time, self.user, self.hash, self.builder, self.status, _order.decode(self.order))


class StatusHeadLine(msgspec.Struct):
    local_time: str
    block_time: str
    block_number: Count
    events: list[StatusHead]

    def resolve(self, wanted: Callable[[str], bool] | None = None) -> tuple[StatusLine, int]:
        """The line with the statuses that matter fully decoded: every one that is not a
        rejection, and the rejections of users ``wanted`` accepts. Also: how many were left out.
        (The rejection test is spelled out, not ``is_rejection``: a call per status costs
        ~1 ms a whole-market line.)"""
        if wanted is None:
            kept = [e.full() for e in self.events if not e.status.endswith("Rejected")]
        else:
            kept = [e.full() for e in self.events if not e.status.endswith("Rejected") or wanted(e.user)]
        return StatusLine(self.local_time, self.block_time, self.block_number, kept), len(self.events) - len(kept)

STREAMS = ("order_statuses", "raw_book_diffs", "fills")
LINE_TYPES: dict[str, type] = {
    "order_statuses": StatusLine,
    "raw_book_diffs": DiffLine,
    "fills": FillLine,
}
DECODERS: dict[str, msgspec.json.Decoder[Any]] = {stream: msgspec.json.Decoder(t) for stream, t in LINE_TYPES.items()}
STATUS_HEADS = msgspec.json.Decoder(StatusHeadLine)
_order = msgspec.json.Decoder(Order)


def diff_kind(diff: BookDiff) -> str:
    """``"new"``, ``"update"`` or ``"remove"``; ValueError for anything else."""
    body = diff.raw_book_diff
    if isinstance(body, str):
        if body == "remove":
            return "remove"
    elif body.new is not None:
        return "new"
    elif body.update is not None:
        return "update"
    raise ValueError(f"unknown raw_book_diff {body!r} for oid {diff.oid}")


@functools.lru_cache(maxsize=4096)  # the statuses of a block share their time string
def block_time_ms(block_time: str) -> int:
    """Epoch milliseconds of a node timestamp with nanoseconds (``2026-05-05T17:39:13.024084407``)."""
    whole, _, frac = block_time.partition(".")
    dt = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1000 + int((frac + "000")[:3])


def twap_id(fill: Fill) -> int | None:
    """The TWAP of a slice fill (None for other fills)."""
    return fill.twapId if isinstance(fill.twapId, int) else None

"""Order tracker over ``orderUpdates`` + ``userFills`` that understands cancel-replace.

Hyperliquid performs a modify as cancel-and-replace: ``canceled`` for the old
oid and ``open`` for a new oid with the same cloid, in one block (hence one
``orderUpdates`` message). The tracker folds that pair into one ``modified``
event. Fills and statuses travel on different channels, so a replacement's
fill can arrive before its ``open``: fills of an oid the tracker has not seen
are held (``hold_seconds``) and emitted right after the status that introduces
the order (or when the hold expires). Fills are deduplicated by ``(tid, oid)``
(``tid`` alone is shared by both sides of a self-trade) in a bounded FIFO set,
so the snapshot a ``userFills`` re-subscription sends after a reconnect never
emits a fill twice. A modify without a cloid cannot be told apart from a cancel
plus a new order and is reported as such.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hlbook.client.client import HLClient

#: Statuses after which an order rests no more.
TERMINAL = {"filled", "canceled", "rejected", "marginCanceled", "reduceOnlyCanceled", "scheduledCancel", "siblingFilledCanceled", "liquidatedCanceled", "selfTradeCanceled", "openInterestCapCanceled", "vaultWithdrawalCanceled", "delistedCanceled", "outcomeSettledCanceled"}


@dataclass
class OrderEvent:
    """``kind``: a status (``open``, ``canceled``, ``filled``, ``triggered``, ``*Rejected``…),
    ``modified`` (``prev_oid`` -> ``oid``) or ``fill`` (``fill`` set)."""

    kind: str
    oid: int
    coin: str | None = None
    cloid: str | None = None
    order: dict[str, Any] | None = None
    prev_oid: int | None = None
    fill: dict[str, Any] | None = None
    time: int | None = None
    raw: list[dict[str, Any]] = field(default_factory=list)


class FifoSet:
    """A set that forgets its oldest keys beyond ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: collections.OrderedDict[Any, None] = collections.OrderedDict()

    def add(self, key: Any) -> bool:
        """Add; False if it was already there."""
        if key in self._keys:
            return False
        self._keys[key] = None
        if len(self._keys) > self.capacity:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, key: Any) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


class OrderTracker:
    """Folds status and fill messages into order events (callback ``on_event``)."""

    def __init__(
        self,
        on_event: Callable[[OrderEvent], Any] | None = None,
        *,
        dedup_size: int = 10_000,
        hold_seconds: float = 5.0,
        max_held: int = 10_000,
        emit_initial_snapshot: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_event = on_event
        self.hold_seconds = hold_seconds
        self.max_held = max_held
        self.emit_initial_snapshot = emit_initial_snapshot
        self.clock = clock
        self.seen_fills = FifoSet(dedup_size)
        self.open_orders: dict[int, dict[str, Any]] = {}
        self.known_oids = FifoSet(dedup_size)
        self.held: collections.OrderedDict[int, list[tuple[float, dict[str, Any]]]] = collections.OrderedDict()
        self.duplicates = 0
        self._snapshots = 0
        self._timer: asyncio.Task[None] | None = None
        self.sub_ids: list[int] = []

    # -- wiring --------------------------------------------------------------------

    async def subscribe(self, client: HLClient, user: str) -> list[int]:
        """Subscribe orderUpdates and userFills of ``user``; flush held fills on a timer."""
        self.sub_ids = [
            await client.subscribe({"type": "orderUpdates", "user": user}, self.handle),
            await client.subscribe({"type": "userFills", "user": user}, self.handle),
        ]
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._flush_loop())
        return self.sub_ids

    async def close(self) -> None:
        """Stop the flush timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.hold_seconds / 4))
            self.flush_expired()

    def handle(self, message: dict[str, Any]) -> None:
        """Take an ``orderUpdates`` or ``userFills`` message."""
        channel = message.get("channel")
        if channel == "orderUpdates":
            self.on_order_updates(message["data"])
        elif channel == "userFills":
            self.on_user_fills(message["data"])
        self.flush_expired()

    # -- statuses ------------------------------------------------------------------

    def on_order_updates(self, updates: list[dict[str, Any]]) -> None:
        """One orderUpdates message (one block): pair modifies, emit in node order."""
        opens = {}
        for i, u in enumerate(updates):
            cloid = u["order"].get("cloid")
            if u["status"] == "open" and cloid:
                opens.setdefault(cloid, i)
        folded: dict[int, int] = {}  # index of canceled -> index of its open
        for i, u in enumerate(updates):
            cloid = u["order"].get("cloid")
            j = opens.get(cloid) if cloid else None
            if u["status"] == "canceled" and j is not None and j not in folded.values() and updates[j]["order"]["oid"] != u["order"]["oid"]:
                folded[i] = j
        replaced = {j: i for i, j in folded.items()}
        for i, u in enumerate(updates):
            if i in folded:
                continue
            if i in replaced:
                self._modified(updates[replaced[i]], u)
            else:
                self._status(u)

    def _status(self, u: dict[str, Any]) -> None:
        order, status = u["order"], u["status"]
        oid = order["oid"]
        terminal = status in TERMINAL
        if terminal:
            self.open_orders.pop(oid, None)
            self._release(oid)  # its fills come before the final status
        elif status == "open":
            self.open_orders[oid] = order
        self.known_oids.add(oid)
        self._emit(OrderEvent(status, oid, order.get("coin"), order.get("cloid"), order, time=u.get("statusTimestamp"), raw=[u]))
        if not terminal:
            self._release(oid)

    def _modified(self, canceled: dict[str, Any], opened: dict[str, Any]) -> None:
        old, new = canceled["order"], opened["order"]
        self.open_orders.pop(old["oid"], None)
        self.open_orders[new["oid"]] = new
        self.known_oids.add(old["oid"])
        self.known_oids.add(new["oid"])
        self._release(old["oid"])
        event = OrderEvent("modified", new["oid"], new.get("coin"), new.get("cloid"), new, prev_oid=old["oid"], time=opened.get("statusTimestamp"), raw=[canceled, opened])
        self._emit(event)
        self._release(new["oid"])

    # -- fills ---------------------------------------------------------------------

    def on_user_fills(self, data: dict[str, Any]) -> None:
        """One userFills message; a snapshot's fills are only recorded the first time."""
        is_snapshot = bool(data.get("isSnapshot"))
        emit = not is_snapshot or self._snapshots > 0 or self.emit_initial_snapshot
        if is_snapshot:
            self._snapshots += 1
        for fill in data.get("fills", ()):
            if not self.seen_fills.add((fill.get("tid"), fill.get("oid"))):
                self.duplicates += 1
            elif emit:
                self._fill(fill)

    def _fill(self, fill: dict[str, Any]) -> None:
        oid = fill.get("oid")
        if oid in self.known_oids or oid is None:
            self._emit_fill(fill)
            return
        self.held.setdefault(oid, []).append((self.clock(), fill))
        while sum(len(v) for v in self.held.values()) > self.max_held:
            _, fills = self.held.popitem(last=False)
            for _, f in fills:
                self._emit_fill(f)

    def _emit_fill(self, fill: dict[str, Any]) -> None:
        self._emit(OrderEvent("fill", fill.get("oid", -1), fill.get("coin"), fill.get("cloid"), fill=fill, time=fill.get("time")))

    def _release(self, oid: int) -> None:
        for _, fill in self.held.pop(oid, ()):
            self._emit_fill(fill)

    def flush_expired(self) -> None:
        """Emit held fills older than ``hold_seconds`` (their order predates the tracker)."""
        limit = self.clock() - self.hold_seconds
        for oid in [oid for oid, fills in self.held.items() if fills[0][0] <= limit]:
            self.known_oids.add(oid)
            self._release(oid)

    def _emit(self, event: OrderEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)

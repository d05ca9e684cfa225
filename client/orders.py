"""Order tracker over ``orderUpdates`` + ``userFills`` that understands cancel-replace.

Hyperliquid performs a modify as cancel-and-replace: ``canceled`` for the old
oid and ``open`` for a new oid with the same cloid. The tracker folds the two
legs into one ``modified`` event:

- in one ``orderUpdates`` message (hlbook sends a block's statuses in one), by cloid;
- in two messages (the public API may split them): an ``open`` whose cloid
  belongs to another resting order replaces it. A ``canceled`` that comes
  first can only be told from a plain cancel when the program marked the
  order when it sent the modify (``expect_modify(oid)``, nautilus_trader's
  pending-modify marker): that cancel is held until the replacement's
  ``open`` (same cloid, else the replacement oid the program declared: never
  by coin and side, which pairs unrelated orders), or emitted as a cancel
  after ``hold_seconds`` when none comes. A stale ``canceled`` of an order
  already reported as replaced is dropped.

Fills and statuses travel on different channels, so a fill can arrive before
the status that introduces its order: fills of an oid the tracker does not know
(not resting, not recently closed) are held ``hold_seconds`` and emitted right
after that status, or when the hold expires. Resting orders are known from the
start: ``frontendOpenOrders`` is loaded once the ``orderUpdates`` subscription
is live. Fills are deduplicated by ``(tid, oid)`` (both sides of a self-trade
share a ``tid``) in a FIFO set of ``dedup_size``, so the snapshot a
``userFills`` re-subscription sends after a reconnect never emits a fill
twice; the first snapshot is history (only recorded).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from hlbook.client.handlers import Handlers
from hlbook.client.registry import ClientClosed, SubscriptionError

if TYPE_CHECKING:
    from hlbook.client.client import HLClient

log = logging.getLogger("hlbook.client")

#: Statuses after which an order rests no more (besides any ``…Rejected`` / ``…Canceled``).
TERMINAL = {"filled", "canceled", "rejected", "scheduledCancel", "closed"}
#: ``reason`` of the events a reconciliation after a gap emits (not seen: inferred from the resting orders).
RECONCILED_CLOSED = "reconciled: no longer resting after a gap"
RECONCILED_OPEN = "reconciled: resting after a gap"

Update = dict[str, Any]  # one element of an orderUpdates message: {"order", "status", "statusTimestamp"}


def is_terminal(status: str) -> bool:
    return status in TERMINAL or status.endswith(("Rejected", "Canceled"))


@dataclass
class OrderEvent:
    """``kind``: a status (``open``, ``canceled``, ``filled``, ``triggered``, ``*Rejected``…),
    ``modified`` (``prev_oid`` -> ``oid``), ``fill`` (``fill`` set), or after a gap
    ``closed``/``open`` with ``reason`` set (``RECONCILED_CLOSED``/``RECONCILED_OPEN``)."""

    kind: str
    oid: int
    coin: str | None = None
    cloid: str | None = None
    order: dict[str, Any] | None = None
    prev_oid: int | None = None
    fill: dict[str, Any] | None = None
    time: int | None = None
    raw: list[dict[str, Any]] = field(default_factory=list)
    reason: str | None = None


@dataclass
class TrackerCounts:
    """What the tracker did, counted since it started."""

    fills: int = 0  # fill events emitted
    snapshots: int = 0  # userFills snapshots received (the first is history)
    duplicates: int = 0  # fills seen before, dropped
    held: int = 0  # fills held: their order was unknown
    released_on_status: int = 0  # held fills emitted after their order's status (or the resting orders' load)
    released_on_expiry: int = 0  # held fills emitted when the hold expired
    released_on_overflow: int = 0  # held fills emitted early: over ``max_held``
    modifies: int = 0  # modified events
    suppressed_cancels: int = 0  # canceled statuses of a modify's old leg, not reported
    open_orders_loaded: int | None = None  # resting orders from frontendOpenOrders; None until loaded
    reconciles: int = 0  # reloads of the resting orders after a gap
    reconciled: int = 0  # closed/open events those reloads emitted


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

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _modifies(updates: list[Update]) -> dict[int, int]:
    """The modifies of one block's updates, as (index of the old order's canceled -> index of the
    new one's open): a canceled and an open of another oid with the same cloid, the first such open
    after the cancel (an order placed and modified in one block: open X, canceled X, open Y), else
    one before it whose order is not canceled in the block too."""
    opens: dict[str, list[int]] = {}  # cloid -> indexes of its opens
    canceled: set[int] = set()
    for i, u in enumerate(updates):
        cloid = u["order"].get("cloid")
        if u["status"] == "open" and cloid:
            opens.setdefault(cloid, []).append(i)
        elif u["status"] == "canceled":
            canceled.add(u["order"]["oid"])
    folded: dict[int, int] = {}
    taken: set[int] = set()
    for i, u in enumerate(updates):
        cloid = u["order"].get("cloid")
        if u["status"] != "canceled" or not cloid:
            continue
        oid = u["order"]["oid"]
        candidates = [j for j in opens.get(cloid, ()) if j not in taken and updates[j]["order"]["oid"] != oid]
        after = [j for j in candidates if j > i]
        before = [j for j in candidates if j < i and updates[j]["order"]["oid"] not in canceled]
        j = after[0] if after else before[0] if before else None
        if j is not None:
            folded[i] = j
            taken.add(j)
    return folded


class OrderTracker:
    """Folds status and fill messages into order events (callback ``on_event``).

    ``dedup_size``: fills remembered for deduplication, and closed orders
    remembered (their late fills pass at once); ``hold_seconds``: how long a
    fill of an unknown order, or a marked order's cancel, is held;
    ``max_held``: held fills at most; ``load_open_orders``: ask
    ``frontendOpenOrders`` once subscribed (``wait_ready``).
    """

    def __init__(
        self,
        on_event: Callable[[OrderEvent], Any] | None = None,
        *,
        dedup_size: int = 10_000,
        hold_seconds: float = 5.0,
        max_held: int = 10_000,
        emit_initial_snapshot: bool = False,
        load_open_orders: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.on_event = on_event
        self.hold_seconds = hold_seconds
        self.max_held = max_held
        self.emit_initial_snapshot = emit_initial_snapshot
        self.load_open_orders = load_open_orders
        self.clock = clock
        self.counts = TrackerCounts()
        self.handlers = Handlers("order tracker's on_event")
        self.seen_fills = FifoSet(dedup_size)
        self.open_orders: dict[int, dict[str, Any]] = {}  # resting: exact, as many as the user has
        self._by_cloid: dict[str, int] = {}  # cloid -> resting oid
        self.closed = FifoSet(dedup_size)  # orders that reached a final status (or were replaced)
        self.expired = FifoSet(dedup_size)  # orders whose fills' hold expired: older than the tracker
        self.held: collections.OrderedDict[int, list[tuple[float, dict[str, Any]]]] = collections.OrderedDict()
        self.pending_modify: dict[int, tuple[float, int | None]] = {}  # oid -> (when marked by expect_modify, new oid)
        self.held_cancels: dict[int, tuple[float, Update]] = {}  # marked oid -> (when, its canceled update)
        self.replaced = FifoSet(dedup_size)  # old oids of reported modifies: a later canceled is stale
        self.ready = asyncio.Event()
        self.load_error: str | None = None
        self.stopped: str | None = None  # why it stopped: the tracker or its client closed
        self.sub_ids: list[int] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._since_gap: set[int] | None = None  # oids with a status since the last gap, while a reload is due
        self._reload: asyncio.Task[None] | None = None

    # -- wiring --------------------------------------------------------------------

    async def subscribe(self, client: HLClient, user: str) -> list[int]:
        """Subscribe orderUpdates and userFills of ``user`` on one connection
        (``user_grouped``: their relative order holds), load the resting orders
        in the background (``wait_ready``), expire holds on a timer."""
        on_gap = lambda since, until: self._gap(client, user)  # noqa: E731
        self.sub_ids = [
            await client.subscribe({"type": "orderUpdates", "user": user}, self.handle, strategy="user_grouped", on_gap=on_gap),
            await client.subscribe({"type": "userFills", "user": user}, self.handle, strategy="user_grouped"),
        ]
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._flush_loop()))
        if self.load_open_orders:
            self._tasks.append(loop.create_task(self._load(client, user)))
        else:
            self.ready.set()
        return self.sub_ids

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until the resting orders are loaded (or could not be: ``load_error``);
        ``ClientClosed`` if the tracker or its client closed first."""
        await asyncio.wait_for(self.ready.wait(), timeout)
        if self.stopped is not None and self.counts.open_orders_loaded is None:
            raise ClientClosed(self.stopped)

    def _stop(self, reason: str) -> None:
        """Closed: waiters end."""
        self.stopped = self.stopped or reason
        self.ready.set()

    async def close(self) -> None:
        """Stop the background tasks; ``wait_ready`` callers get ``ClientClosed``."""
        self._stop("order tracker closed")
        self.handlers.close()
        if self._reload is not None:
            self._tasks.append(self._reload)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _load(self, client: HLClient, user: str) -> None:
        """Load the resting orders (``wait_ready``): until done, failed or closed."""
        try:
            orders = await self._fetch_open_orders(client, user)
        except ClientClosed as exc:
            self._stop(str(exc))
            return
        except (SubscriptionError, RuntimeError, TimeoutError) as exc:
            self.load_error = str(exc)
            log.warning("order tracker of %s: resting orders not loaded: %s", user, exc)
        else:
            self.add_open_orders(orders)
        self.ready.set()

    def _gap(self, client: HLClient, user: str) -> None:
        """``orderUpdates`` is back after a lost connection: reload the resting orders and reconcile."""
        if self._since_gap is None:
            self._since_gap = set()
        if self._reload is not None:
            self._reload.cancel()
        self._reload = asyncio.get_running_loop().create_task(self._reconcile_later(client, user))

    async def _reconcile_later(self, client: HLClient, user: str) -> None:
        try:
            orders = await self._fetch_open_orders(client, user)
        except (SubscriptionError, RuntimeError, TimeoutError) as exc:
            log.warning("order tracker of %s: resting orders not reloaded after a gap: %s", user, exc)
            self._since_gap = None
            return
        self.reconcile(orders)

    async def _fetch_open_orders(self, client: HLClient, user: str) -> list[dict[str, Any]]:
        """``frontendOpenOrders``, asked once ``orderUpdates`` is live (statuses from then on reach
        the tracker), again when the connection drops meanwhile; ``ClientClosed`` if it closes."""
        while True:
            try:
                await client.wait_active(self.sub_ids[0])
                return list((await client.info({"type": "frontendOpenOrders", "user": user}, user=user))["data"])
            except ConnectionError:
                pass  # dropped meanwhile: asked again once resubscribed
            except SubscriptionError:
                if client.get_subscription(self.sub_ids[0]) is None:
                    raise ClientClosed("client closed") from None
                raise
            if client.get_subscription(self.sub_ids[0]) is None:
                raise ClientClosed("client closed")
            await asyncio.sleep(0.05)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(max(0.05, self.hold_seconds / 4))
            try:
                self.flush_expired()
            except Exception:  # the timer outlives any bad message
                log.exception("order tracker: expiring holds failed")

    def handle(self, message: dict[str, Any]) -> None:
        """Take an ``orderUpdates`` or ``userFills`` message."""
        channel = message.get("channel")
        if channel == "orderUpdates":
            self.on_order_updates(message["data"])
        elif channel == "userFills":
            self.on_user_fills(message["data"])
        self.flush_expired()

    def metrics(self) -> dict[str, Any]:
        """The counts, plus what is held and resting now."""
        return {
            **asdict(self.counts),
            "holding": sum(len(fills) for fills in self.held.values()),
            "held_cancels": len(self.held_cancels),
            "pending_modifies": len(self.pending_modify),
            "open_orders": len(self.open_orders),
            "handler_errors": self.handlers.errors,
        }

    # -- statuses ------------------------------------------------------------------

    def add_open_orders(self, orders: list[dict[str, Any]]) -> None:
        """Take resting orders (``frontendOpenOrders``): known from now on, their held
        fills released; those the tracker saw close meanwhile are skipped."""
        for order in orders:
            oid = order["oid"]
            if oid not in self.closed and oid not in self.open_orders:
                self._rest(order)
                self._release(oid)
        self.counts.open_orders_loaded = len(orders)

    def reconcile(self, orders: list[dict[str, Any]]) -> None:
        """After a gap, ``orders`` (``frontendOpenOrders``) are what rests: an order held
        as resting that rests no more is closed (``closed``), one not known is opened
        (``open``), both with ``reason``; an order with a status since the gap is as that says."""
        fresh = self._since_gap or set()
        self._since_gap = None
        resting = {order["oid"]: order for order in orders}
        gone = [oid for oid in self.open_orders if oid not in resting and oid not in fresh and oid not in self.held_cancels]
        for oid in gone:
            order = self.open_orders[oid]
            self._close(oid)
            self._release(oid)
            self._emit(OrderEvent("closed", oid, order.get("coin"), order.get("cloid"), order, reason=RECONCILED_CLOSED))
        new = [o for oid, o in resting.items() if oid not in self.open_orders and oid not in fresh and oid not in self.closed]
        for order in new:
            self._rest(order)
            self._emit(OrderEvent("open", order["oid"], order.get("coin"), order.get("cloid"), order, reason=RECONCILED_OPEN))
            self._release(order["oid"])
        self.counts.reconciles += 1
        self.counts.reconciled += len(gone) + len(new)

    def expect_modify(self, oid: int, new_oid: int | None = None) -> None:
        """Mark a resting order as being modified (call it when you send the modify):
        its ``canceled`` is held until the replacement's ``open`` (one ``modified``
        event), or emitted after ``hold_seconds`` if none comes. The replacement is
        the open with the order's cloid, or ``new_oid`` (the oid the exchange answered
        the modify with; call again once known): ``ValueError`` without either, since
        pairing by coin and side pairs unrelated orders."""
        order = self.open_orders.get(oid)
        if new_oid is None and (order is None or not order.get("cloid")):
            raise ValueError(f"expect_modify({oid}): no cloid known for the order; pass new_oid, the replacement's oid")
        self.pending_modify[oid] = (self.clock(), new_oid)

    def on_order_updates(self, updates: list[Update]) -> None:
        """One orderUpdates message (one block): pair modifies, emit in node order."""
        if self._since_gap is not None:
            self._since_gap.update(u["order"]["oid"] for u in updates)
        folded = _modifies(updates)  # index of canceled -> index of its replacement's open
        replaced = {j: i for i, j in folded.items()}
        for i, u in enumerate(updates):
            if i in folded:
                continue
            if i in replaced:
                canceled = updates[replaced[i]]
                self._modified(canceled["order"]["oid"], u, canceled)
            else:
                self._status(u)

    def _status(self, u: Update) -> None:
        order, status = u["order"], u["status"]
        oid = order["oid"]
        if status == "canceled" and self._cancel_of_modify(oid, u):
            return
        if status == "open" and oid not in self.open_orders:
            old = self._replaced_order(order)
            if old is not None:
                self._modified(old, u)
                return
        terminal = is_terminal(status)
        if terminal:
            self._close(oid)
            self._release(oid)  # its fills come before the final status
        else:
            self._rest(order)
        self._emit(OrderEvent(status, oid, order.get("coin"), order.get("cloid"), order, time=u.get("statusTimestamp"), raw=[u]))
        if not terminal:
            self._release(oid)

    def _cancel_of_modify(self, oid: int, u: Update) -> bool:
        """Whether a canceled is a modify's old leg: stale (the modify was reported) or held (marked)."""
        if oid in self.replaced:
            self.counts.suppressed_cancels += 1
            return True
        if oid in self.pending_modify:
            self.held_cancels[oid] = (self.clock(), u)
            self._release(oid)
            return True
        return False

    def _replaced_order(self, order: dict[str, Any]) -> int | None:
        """The oid a new ``open`` replaces: the resting or held-cancel order with its cloid,
        else the marked order whose declared replacement it is."""
        cloid = order.get("cloid")
        if cloid:
            for oid, (_, u) in self.held_cancels.items():
                if u["order"].get("cloid") == cloid:
                    return oid
            resting = self._by_cloid.get(cloid)
            if resting is not None and resting != order["oid"]:
                return resting
        return next((oid for oid, (_, new_oid) in self.pending_modify.items() if new_oid == order["oid"]), None)

    def _modified(self, old_oid: int, opened: Update, canceled: Update | None = None) -> None:
        new = opened["order"]
        if canceled is None:
            held = self.held_cancels.pop(old_oid, None)
            if held is not None:
                canceled = held[1]
                self.counts.suppressed_cancels += 1
            else:
                self.replaced.add(old_oid)  # its canceled is still to come
        self.pending_modify.pop(old_oid, None)
        self._close(old_oid)
        self._rest(new)
        self._release(old_oid)
        self.counts.modifies += 1
        raw = [canceled, opened] if canceled is not None else [opened]
        self._emit(OrderEvent("modified", new["oid"], new.get("coin"), new.get("cloid"), new, prev_oid=old_oid, time=opened.get("statusTimestamp"), raw=raw))
        self._release(new["oid"])

    def _rest(self, order: dict[str, Any]) -> None:
        self.open_orders[order["oid"]] = order
        if order.get("cloid"):
            self._by_cloid[order["cloid"]] = order["oid"]

    def _close(self, oid: int) -> None:
        order = self.open_orders.pop(oid, None)
        if order is not None and order.get("cloid") and self._by_cloid.get(order["cloid"]) == oid:
            del self._by_cloid[order["cloid"]]
        self.closed.add(oid)

    # -- fills ---------------------------------------------------------------------

    def on_user_fills(self, data: dict[str, Any]) -> None:
        """One userFills message; a snapshot's fills are only recorded the first time."""
        is_snapshot = bool(data.get("isSnapshot"))
        emit = not is_snapshot or self.counts.snapshots > 0 or self.emit_initial_snapshot
        if is_snapshot:
            self.counts.snapshots += 1
        for fill in data.get("fills", ()):
            if not self.seen_fills.add((fill.get("tid"), fill.get("oid"))):
                self.counts.duplicates += 1
            elif emit:
                self._fill(fill)

    def _known(self, oid: int) -> bool:
        return oid in self.open_orders or oid in self.closed or oid in self.expired or oid in self.held_cancels

    def _fill(self, fill: dict[str, Any]) -> None:
        oid = fill.get("oid")
        if oid is None or self._known(oid):
            self._emit_fill(fill)
            return
        self.held.setdefault(oid, []).append((self.clock(), fill))
        self.counts.held += 1
        while sum(len(v) for v in self.held.values()) > self.max_held:
            _, fills = self.held.popitem(last=False)
            self.counts.released_on_overflow += len(fills)
            for _, f in fills:
                self._emit_fill(f)

    def _emit_fill(self, fill: dict[str, Any]) -> None:
        self.counts.fills += 1
        self._emit(OrderEvent("fill", fill.get("oid", -1), fill.get("coin"), fill.get("cloid"), fill=fill, time=fill.get("time")))

    def _release(self, oid: int, expired: bool = False) -> None:
        fills = self.held.pop(oid, ())
        if expired:
            self.counts.released_on_expiry += len(fills)
        else:
            self.counts.released_on_status += len(fills)
        for _, fill in fills:
            self._emit_fill(fill)

    def flush_expired(self) -> None:
        """Emit what waited ``hold_seconds``: held fills (their order predates the
        tracker) and held cancels (no replacement came); forget stale markers."""
        limit = self.clock() - self.hold_seconds
        for oid in [oid for oid, fills in self.held.items() if fills[0][0] <= limit]:
            self.expired.add(oid)
            self._release(oid, expired=True)
        for oid in [oid for oid, (at, _) in self.held_cancels.items() if at <= limit]:
            _, u = self.held_cancels.pop(oid)
            self.pending_modify.pop(oid, None)
            self._status(u)
        for oid in [oid for oid, (at, _) in self.pending_modify.items() if at <= limit and oid not in self.held_cancels]:
            del self.pending_modify[oid]

    def _emit(self, event: OrderEvent) -> None:
        """Hand ``event`` to ``on_event`` (see ``Handlers``: never raises, awaitables awaited in order)."""
        if self.on_event is not None:
            self.handlers.call(self.on_event, event)

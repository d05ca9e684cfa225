"""WebSocket subscriptions made of node state, served by polling the node's info server.

``clearinghouseState``, ``spotState``, ``activeAssetData``, ``webData2`` and
``assetCtxs`` are what a node knows (margin, balances, leverage, funding, open
interest) and its blocks do not say. Each is the answer of one info request
(``Polled.request``), so a gateway with ``--info-upstream`` serves them by
asking that request again and again (``allDexsClearinghouseState`` and
``allDexsAssetCtxs``: that of every perp dex ``perpDexs`` lists, ``[[dex, …]]``):

- **one poll per key**: the hub keeps one feed per subscription key however
  many clients subscribe; that feed (``PolledFeed``) runs the only poll of its
  request, every ``Polls.interval`` seconds (``--node-poll-interval``, 1 s), while
  it has subscribers; it stops by itself when the last one leaves.
- **push on change**: the answer, in the public API's WebSocket shape
  (``Polled.shape``), goes out the first time and whenever it differs from
  the last one sent (conflated: a slow client gets the newest only). None of
  these kinds marks a snapshot (``isSnapshot``): each message is the whole state.
- **errors are told, never passed off as data**: an answer that is not 200
  (the node's 4xx, or hlbook's 502/503/504 for an unreachable, busy or slow
  node) goes to the subscribers as ``{"channel": "error", "data": …}``, once
  per streak; the next good answer is sent again even if unchanged.
- **bounded**: at most ``max_keys`` polled keys gateway-wide (``--node-poll-max-keys``),
  ``max_per_address`` subscriptions from one address (``--node-poll-max-per-ip``: one
  address cannot take the others' share) and ``max_per_connection`` per connection
  (``--node-poll-max-per-connection``); user
  keys also count against the followed-user budgets (``UserKey``). Polls go
  through ``UpstreamInfo``, so its timeout and concurrency bound them; one poll
  per key is in flight at a time and nothing is queued.
- without ``--info-upstream`` the subscribe of a node kind is refused (``{"channel": "error"}``).

``userHistoricalOrders`` is polled the same way from hlbook's own
``historicalOrders`` (the history service, which holds every order of the
user, rejections included; no node needed): a list the public API sends as
``isSnapshot: true`` first, then increments (``ListedFeed``). Other lists
pushed as increments (userFundings, userNonFundingLedgerUpdates: the node's
answers start at a ``startTime`` and are capped) and aggregates with no info
request (webData3, twapStates) are not served (docs/COMPATIBILITY.md).
``hlbook_gateway_polls_total{kind, outcome}`` counts polls (``changed``,
``same``, ``error``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from hlbook.common.metrics import Counter
from hlbook.services.gateway.feeds import Feed
from hlbook.services.gateway.protocol import USER, FeedKey, RequestError, UserKey, invalid, message

if TYPE_CHECKING:
    from hlbook.services.gateway.hub import Hub
    from hlbook.services.gateway.info import Info
    from hlbook.services.gateway.session import Session

log = logging.getLogger(__name__)

INTERVAL = 1.0  # seconds between two polls of one key
MAX_KEYS = 1000  # polled keys gateway-wide
MAX_PER_CONNECTION = 20  # polled keys one connection may hold
MAX_PER_ADDRESS = 100  # polled subscriptions one address may hold across its connections

POLLS = Counter("hlbook_gateway_polls_total",
                "Polls of the node's info server for WebSocket subscriptions made of node state, by kind and outcome "
                "(changed, same, error)", ["kind", "outcome"])


# ------------------------------------------------------------------ keys


class ClearinghouseStateKey(UserKey, frozen=True):
    kind: ClassVar[str] = "clearinghouseState"
    dex: str


class SpotStateKey(UserKey, frozen=True):
    kind: ClassVar[str] = "spotState"


class ActiveAssetDataKey(UserKey, frozen=True):
    kind: ClassVar[str] = "activeAssetData"
    coin: str


class WebData2Key(UserKey, frozen=True):
    kind: ClassVar[str] = "webData2"


class UserHistoricalOrdersKey(UserKey, frozen=True):
    kind: ClassVar[str] = "userHistoricalOrders"


class AllDexsClearinghouseStateKey(UserKey, frozen=True):
    kind: ClassVar[str] = "allDexsClearinghouseState"


class AllDexsAssetCtxsKey(FeedKey, frozen=True):
    kind: ClassVar[str] = "allDexsAssetCtxs"


class AssetCtxsKey(FeedKey, frozen=True):
    kind: ClassVar[str] = "assetCtxs"
    dex: str


# ------------------------------------------------------------------ requests and shapes


@dataclass(frozen=True, slots=True)
class Polled:
    """One kind: the info request its key polls, and the answer as the data of its WebSocket message."""

    request: Callable[[Any], dict[str, Any]]
    shape: Callable[[Any, msgspec.Raw], Any]
    node: bool = True  # asks the node (False: hlbook answers the request itself)
    each_dex: Callable[[Any, str], dict[str, Any]] | None = None  # one request per perp dex (perpDexs), answers as [dex, …]


async def _raw(info: Info, request: dict[str, Any], node: bool = True) -> msgspec.Raw:
    """The answer to ``request``: the node's as it came (never hlbook's stand-in contexts for a
    node that refuses metaAndAssetCtxs: that refusal is told), or hlbook's own (``node`` False)."""
    from hlbook.services.gateway.info import InfoError  # info imports kinds, which imports this module

    if not node:
        answer = await info.answer(request)
        return answer if isinstance(answer, msgspec.Raw) else msgspec.Raw(msgspec.json.encode(answer))
    assert info.upstream is not None
    reply = await info.upstream.ask(request["type"], request)
    if not reply.ok:
        raise InfoError.of(reply)
    return msgspec.Raw(reply.body)


async def _dex_names(info: Info) -> list[str]:
    """The perp dexes, the default one ("") first, as perpDexs lists them (cached 5 s by UpstreamInfo)."""
    dexs = msgspec.json.decode(await _raw(info, {"type": "perpDexs"}), type=list[dict[str, Any] | None])
    return [str(dex["name"]) if dex else "" for dex in dexs]


async def _all_dexs(info: Info, key: Any, polled: Polled) -> msgspec.Raw:
    """``[[dex, answer], …]``: the answers of every perp dex, asked at once (UpstreamInfo bounds them)."""
    assert polled.each_dex is not None
    dexs = await _dex_names(info)
    answers = await asyncio.gather(*(_raw(info, polled.each_dex(key, dex)) for dex in dexs))
    return msgspec.Raw(msgspec.json.encode([[dex, answer] for dex, answer in zip(dexs, answers)]))


def _ctxs_of(raw: msgspec.Raw) -> msgspec.Raw:
    _meta, ctxs = msgspec.json.decode(raw, type=tuple[msgspec.Raw, msgspec.Raw])
    return ctxs


def _all_ctxs(key: AllDexsAssetCtxsKey, raw: msgspec.Raw) -> dict[str, Any]:
    pairs = msgspec.json.decode(raw, type=list[tuple[str, msgspec.Raw]])
    return {"ctxs": [[dex, _ctxs_of(answer)] for dex, answer in pairs]}


def _answer(key: Any, raw: msgspec.Raw) -> msgspec.Raw:
    return raw


def _ctxs(key: AssetCtxsKey, raw: msgspec.Raw) -> dict[str, Any]:
    """metaAndAssetCtxs is ``[meta, ctxs]``: the event carries the contexts."""
    return {"dex": key.dex, "ctxs": _ctxs_of(raw)}


def _with_dex(request: dict[str, Any], dex: str) -> dict[str, Any]:
    return {**request, "dex": dex} if dex else request


POLLED: dict[str, Polled] = {
    "clearinghouseState": Polled(
        lambda k: _with_dex({"type": "clearinghouseState", "user": k.user}, k.dex),
        lambda k, raw: {"dex": k.dex, "user": k.user, "clearinghouseState": raw}),
    "spotState": Polled(lambda k: {"type": "spotClearinghouseState", "user": k.user},
                        lambda k, raw: {"user": k.user, "spotState": raw}),
    "activeAssetData": Polled(lambda k: {"type": "activeAssetData", "user": k.user, "coin": k.coin}, _answer),
    "webData2": Polled(lambda k: {"type": "webData2", "user": k.user}, _answer),
    "assetCtxs": Polled(lambda k: _with_dex({"type": "metaAndAssetCtxs"}, k.dex), _ctxs),
    "allDexsClearinghouseState": Polled(
        lambda k: {"type": "perpDexs"}, lambda k, raw: {"user": k.user, "clearinghouseStates": raw},
        each_dex=lambda k, dex: _with_dex({"type": "clearinghouseState", "user": k.user}, dex)),
    "allDexsAssetCtxs": Polled(lambda k: {"type": "perpDexs"}, _all_ctxs,
                               each_dex=lambda k, dex: _with_dex({"type": "metaAndAssetCtxs"}, dex)),
    # hlbook's own historicalOrders (the history service: every order of the user, rejections too)
    "userHistoricalOrders": Polled(lambda k: {"type": "historicalOrders", "user": k.user}, _answer, node=False),
}


# ------------------------------------------------------------------ subscriptions


def _user(sub: dict[str, Any]) -> str:
    user = sub.get("user")
    if not isinstance(user, str) or not USER.fullmatch(user):
        raise invalid(sub)
    return user.lower()


def _dex(sub: dict[str, Any]) -> str:
    dex = sub.get("dex")
    if dex is not None and (not isinstance(dex, str) or len(dex) > 64):
        raise invalid(sub)
    return dex or ""


def parse_user_dex(sub: dict[str, Any], coin_exists: Any) -> dict[str, Any]:
    """``dex`` echoed only when sent (the data always says it)."""
    out = {"type": sub["type"], "user": _user(sub)}
    if "dex" in sub:
        out["dex"] = _dex(sub)
    return out


def parse_user(sub: dict[str, Any], coin_exists: Any) -> dict[str, Any]:
    return {"type": sub["type"], "user": _user(sub)}


def parse_user_coin(sub: dict[str, Any], coin_exists: Any) -> dict[str, Any]:
    """Any coin name: the node knows coins (spot, HIP-3) the books may not hold."""
    coin = sub.get("coin")
    if not isinstance(coin, str) or not 0 < len(coin) <= 64:
        raise invalid(sub)
    return {"type": sub["type"], "user": _user(sub), "coin": coin}


def parse_type(sub: dict[str, Any], coin_exists: Any) -> dict[str, Any]:
    return {"type": sub["type"]}


def parse_dex(sub: dict[str, Any], coin_exists: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": sub["type"]}
    if "dex" in sub:
        out["dex"] = _dex(sub)
    return out


# ------------------------------------------------------------------ the polls


class Polls:
    """The gateway's polled feeds: their source (``Info``: the node's answers, through
    ``UpstreamInfo``'s bounds) and their limits."""

    def __init__(self, info: Info, interval: float = INTERVAL, max_keys: int = MAX_KEYS,
                 max_per_connection: int = MAX_PER_CONNECTION, max_per_address: int = MAX_PER_ADDRESS) -> None:
        self.info = info
        self.interval = interval
        self.max_keys = max_keys
        self.max_per_connection = max_per_connection
        self.max_per_address = max_per_address
        self.feeds: set[PolledFeed] = set()  # feeds with a poll running
        self.by_address: dict[str, int] = {}  # address -> polled subscriptions its connections hold

    def admit(self, hub: Hub, session: Session, key: FeedKey) -> None:
        """RequestError when ``key`` cannot be polled for this session: no upstream, too many keys."""
        if key.kind not in POLLED:
            return
        if POLLED[key.kind].node and self.info.upstream is None:
            raise RequestError(f"{key.kind} subscriptions need the node's info server; this server runs without one "
                               "(--info-upstream).", "no_info_upstream")
        held = sum(1 for stats in session.subs.values() if stats.feed.kind in POLLED)
        if held >= self.max_per_connection:
            raise RequestError(f"Cannot subscribe to more than {self.max_per_connection} polled channels (node state, "
                               "userHistoricalOrders) on one connection.", "too_many_polled")
        if self.by_address.get(session.ip, 0) >= self.max_per_address:
            raise RequestError(f"Cannot subscribe to more than {self.max_per_address} polled channels (node state, "
                               "userHistoricalOrders) from one address.", "too_many_polled_per_ip")
        if key not in hub.feeds and len(self.feeds) >= self.max_keys:
            raise RequestError(f"Cannot poll more than {self.max_keys} distinct subscriptions (node state, "
                               "userHistoricalOrders) on this server.", "too_many_polled_keys")

    async def ask(self, key: FeedKey) -> tuple[Any, str | None]:
        """(the WebSocket data, None) or (None, the error text)."""
        from hlbook.services.gateway.info import InfoError  # info imports kinds, which imports this module

        polled = POLLED[key.kind]
        try:
            if polled.each_dex is not None:
                raw = await _all_dexs(self.info, key, polled)
            else:
                raw = await _raw(self.info, polled.request(key), polled.node)
            return polled.shape(key, raw), None
        except InfoError as exc:
            return None, f"{exc.status} {exc.text}"
        except (msgspec.DecodeError, ValueError, TypeError) as exc:
            return None, f"the node's answer is not a {polled.request(key)['type']} answer: {exc}"


class PolledFeed(Feed):
    """One key's poll and its subscribers (see the module docstring)."""

    def __init__(self, polls: Polls, key: FeedKey) -> None:
        super().__init__(key, key.kind, True, None)
        self.polls = polls
        self.error: str | None = None  # the streak of errors the subscribers were told of
        self.task: asyncio.Task[None] | None = None

    def add(self, session: Session, ident: str) -> None:
        super().add(session, ident)
        if self.last is None and self.error is not None:
            session.reply(self._error_text(self.error))
        self._started(session)

    def _started(self, session: Session) -> None:
        """A subscriber came: counted for its address; the poll runs."""
        self.polls.by_address[session.ip] = self.polls.by_address.get(session.ip, 0) + 1
        if self.task is None:
            self.polls.feeds.add(self)
            self.task = asyncio.create_task(self._run())

    def remove(self, session: Session) -> None:
        if session in self.subscribers:
            held = self.polls.by_address.pop(session.ip, 1) - 1
            if held:
                self.polls.by_address[session.ip] = held
        super().remove(session)
        if not self.subscribers and self.task is not None:  # the hub drops the feed: its poll ends now
            self.task.cancel()
            self.polls.feeds.discard(self)

    async def _run(self) -> None:
        try:
            while self.subscribers:
                try:
                    await self.poll()
                except Exception:  # a bug costs one poll, not the feed
                    log.exception("%s poll failed", self.key.kind)
                    self.poll_failed("internal error")
                await asyncio.sleep(self.polls.interval)
        finally:
            self.polls.feeds.discard(self)

    async def poll(self) -> None:
        data, error = await self.polls.ask(self.key)
        if error is not None:
            self.poll_failed(error)
            return
        text = message(self.channel, data)
        changed = text != self.last
        POLLS.labels(self.key.kind, "changed" if changed else "same").inc()
        self.error = None
        if changed:
            self.publish_text(text)

    def poll_failed(self, error: str) -> None:
        """Told to the subscribers once a streak; the next good answer is sent again."""
        POLLS.labels(self.key.kind, "error").inc()
        if error != self.error:
            log.warning("%s poll: %s", self.key.kind, error)
            text = self._error_text(error)
            for session in list(self.subscribers):
                session.reply(text)
        self.error, self.last = error, None

    def _error_text(self, error: str) -> str:
        source = "the node's info server" if POLLED[self.key.kind].node else "hlbook"
        return message("error", f"{self.key.kind}: {source} could not answer: {error}")


class ListedFeed(PolledFeed):
    """userHistoricalOrders: the answer is a list the public API sends as ``isSnapshot: true``
    first (to each subscriber, the whole list), then as increments: the entries that were not
    in the previous answer (a new order, or one whose status changed). Not conflated."""

    def __init__(self, polls: Polls, key: FeedKey) -> None:
        super().__init__(polls, key)
        self.conflate = False
        self.entries: list[msgspec.Raw] | None = None  # the last good answer
        self.snapshotted: set[Session] = set()

    def add(self, session: Session, ident: str) -> None:
        self.subscribers[session] = ident
        if self.error is not None:  # the last answer is stale while polls fail: no snapshot of it
            session.reply(self._error_text(self.error))
        elif self.entries is not None:
            self._snapshot(session)
        self._started(session)

    def remove(self, session: Session) -> None:
        self.snapshotted.discard(session)
        super().remove(session)

    def _list(self, entries: list[msgspec.Raw]) -> dict[str, Any]:
        return {"user": getattr(self.key, "user", ""), "orderHistory": entries}

    def _snapshot(self, session: Session) -> None:
        assert self.entries is not None
        session.push(message(self.channel, {**self._list(self.entries), "isSnapshot": True}), None)
        self.snapshotted.add(session)

    async def poll(self) -> None:
        data, error = await self.polls.ask(self.key)
        if error is not None:
            self.poll_failed(error)
            return
        try:
            entries = msgspec.json.decode(data, type=list[msgspec.Raw])
        except msgspec.DecodeError:
            self.poll_failed("the answer is not a list")
            return
        self.error = None
        known = {bytes(e) for e in self.entries or ()}
        new = [e for e in entries if bytes(e) not in known] if self.entries is not None else []
        POLLS.labels(self.key.kind, "changed" if new or self.entries is None else "same").inc()
        self.entries = entries
        if new:
            text = message(self.channel, self._list(new))
            self.encoded.inc()
            for session in self.snapshotted:
                session.push(text, None)
        for session in [s for s in self.subscribers if s not in self.snapshotted]:
            self._snapshot(session)


def new_polled_feed(hub: Hub, key: FeedKey, kind: Any) -> Feed:
    assert hub.polls is not None, "polled kinds are admitted only with Polls"
    if isinstance(key, UserHistoricalOrdersKey):
        return ListedFeed(hub.polls, key)
    return PolledFeed(hub.polls, key)

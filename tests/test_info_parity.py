"""Drop-in parity with the public API's info side.

- The simulator's info server answers as a node does: meta, spotMeta, perpDexs in
  mainnet's order; clearinghouseState / spotClearinghouseState from the simulated fills;
  the node's refusals (400 not JSON, 422 ``Failed to deserialize…``).
- Forwarding (``upstream_info``) against a scripted upstream: bodies and errors passed
  through, the cache, shared requests, the time, size and concurrency bounds, metrics.
- ``hlbook up --simulate``: every ``Info`` method of the official SDK called with its
  defaults answers; meta is the simulator's; clearinghouseState is answered as the
  simulator answers it; the WebSocket openOrders subscription, l2Book ``fast``, acks
  that echo what the client sent.
- docs/COMPATIBILITY.md is what the code's tables say.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from hyperliquid.info import Info as SdkInfo
from hyperliquid.utils.types import Cloid

from conftest import metric
from hlbook.common import wire
from hlbook.common.models import ASSISTANCE_FUND_USER, HIP2_USER, Fill
from hlbook.services.gateway import compat
from hlbook.services.gateway.info import HANDLERS, open_order
from hlbook.services.gateway.kinds import KINDS, AllMidsKey, feed_key, normalise, prime_l2, publish_mids
from hlbook.services.gateway.upstream_info import UpstreamInfo
from hlbook.services.history.store import Store
from hlbook.services.nodesim.engine import Simulator
from hlbook.services.nodesim.node_info import NodeInfo
from hlbook.services.nodesim.service import NodeSim, SimConfig
from hlbook.services.nodesim.universe import full_universe, listing
from pipeline import Up, post_info, running, wait_until
from scripted import JsonHandler, ScriptedInfo

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 3, 1, 12, tzinfo=timezone.utc)
DESERIALIZE = "Failed to deserialize the JSON body into the target type: "
WAIT = 10.0


# ---------------------------------------------------------------- the simulator's info server


def test_simulator_lists_coins_where_mainnet_does() -> None:
    sim = Simulator(seed=1, coins=40, start_time=START)
    info = NodeInfo(sim, threading.Lock())
    meta = info.answer({"type": "meta"})
    names = [u["name"] for u in meta["universe"]]
    assert names[:2] == ["BTC", "ETH"] and names[5] == "SOL" and names[12] == "DOGE" and names[159] == "HYPE"
    assert names[-1] == "FARTCOIN"  # the highest mainnet id simulated ends the list
    live = {u["name"] for u in meta["universe"] if not u.get("isDelisted")}
    assert live == {c.name for c in sim.coins if not c.is_spot}
    tables = {table_id for table_id, _ in meta["marginTables"]}
    assert all(u["marginTableId"] in tables and u["maxLeverage"] >= 1 for u in meta["universe"]) and meta["collateralToken"] == 0
    btc = meta["universe"][0]
    assert btc["szDecimals"] == 5 and btc["maxLeverage"] == 40
    assert info.answer({"type": "meta", "dex": ""}) == meta

    spot = info.answer({"type": "spotMeta"})
    pairs, tokens = spot["universe"], spot["tokens"]
    assert [p["index"] for p in pairs] == list(range(len(pairs))) and [t["index"] for t in tokens] == list(range(len(tokens)))
    assert pairs[0]["name"] == "PURR/USDC" and tokens[pairs[0]["tokens"][0]]["name"] == "PURR"
    assert pairs[107]["name"] == "@107" and tokens[pairs[107]["tokens"][0]]["name"] == "HYPE" and pairs[107]["tokens"][1] == 0
    simulated = {c.name for c in sim.coins if c.is_spot}
    assert simulated <= {p["name"] for p in pairs}
    assert info.answer({"type": "perpDexs"}) == [None]

    meta_ctxs, ctxs = info.answer({"type": "metaAndAssetCtxs"})
    assert meta_ctxs == meta and len(ctxs) == len(names)
    assert Decimal(ctxs[0]["markPx"]) > 0 and ctxs[0]["midPx"] is not None and ctxs[2]["markPx"] == "0.0"  # ATOM: not simulated
    spot_meta, spot_ctxs = info.answer({"type": "spotMetaAndAssetCtxs"})
    assert spot_meta == spot and [c["coin"] for c in spot_ctxs] == [p["name"] for p in pairs]


def test_the_whole_market_lists_hip3_dexes_and_new_perps() -> None:
    coins = full_universe(0)
    listed = listing(coins)
    assert [dex for dex, _ in listed.dexes] == ["xyz", "flx"]
    assert all(c.name.startswith(dex + ":") for dex, members in listed.dexes for c in members)
    names = [name for name, _ in listed.perps]
    assert names[0] == "BTC" and names.index("P000") > names.index("FARTCOIN") and len(names) == len(set(names))
    assert {c.name for _, c in listed.perps if c is not None} == {c.name for c in coins if not c.is_spot and ":" not in c.name}


def _signed(fill: dict[str, Any]) -> Decimal:
    return Decimal(fill["sz"]) if fill["side"] == "B" else -Decimal(fill["sz"])


def test_clearinghouse_state_follows_the_fills() -> None:
    """Positions are what the users' fills add up to (from 0 at the simulator's start)."""
    sim = Simulator(seed=4, coins=12, start_time=START, volume=4.0)
    held: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for _ in range(300):
        for user, fill in sim.step().fills:
            held[(user, fill["coin"])] += _signed(fill)
    info = NodeInfo(sim, threading.Lock())
    perps = {c.name for c in sim.coins if not c.is_spot}
    users = sorted({user for (user, coin), size in held.items() if size and coin in perps})
    assert len(users) > 20
    for user in users[:40]:
        state = info.answer({"type": "clearinghouseState", "user": user.upper().replace("0X", "0x")})
        positions = {p["position"]["coin"]: p["position"] for p in state["assetPositions"]}
        assert {coin: Decimal(p["szi"]) for coin, p in positions.items()} == \
            {coin: size for (u, coin), size in held.items() if u == user and size and coin in perps}
        total = sum(Decimal(p["positionValue"]) for p in positions.values())
        assert Decimal(state["marginSummary"]["totalNtlPos"]) == total and state["crossMarginSummary"] == state["marginSummary"]
        assert Decimal(state["marginSummary"]["accountValue"]) >= 0 and Decimal(state["withdrawable"]) >= 0
        for p in positions.values():
            assert p["leverage"]["type"] == "cross" and Decimal(p["marginUsed"]) <= Decimal(p["positionValue"])
            assert set(p) >= {"entryPx", "unrealizedPnl", "returnOnEquity", "liquidationPx", "maxLeverage", "cumFunding"}
        spot = info.answer({"type": "spotClearinghouseState", "user": user})
        bases = {c.base: c.name for c in sim.coins if c.is_spot}
        assert {bases[b["coin"]]: Decimal(b["total"]) for b in spot["balances"]} == \
            {coin: size for (u, coin), size in held.items() if u == user and size and coin not in perps}
    assert info.answer({"type": "clearinghouseState", "user": "0x" + "00" * 20})["assetPositions"] == []


@pytest.fixture(scope="module")
def sim_info(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeSim, str]]:
    cfg = SimConfig(data_dir=str(tmp_path_factory.mktemp("node")), info_port=0, blocks_per_sec=40, coins=8, seed=2,
                    start_time=START, mode="by-block", partial_write_p=0.0)
    node = NodeSim(cfg)
    node.start()
    assert node.info_url
    yield node, node.info_url
    node.stop()


def test_simulator_refuses_what_a_node_refuses(sim_info: tuple[NodeSim, str]) -> None:
    _, url = sim_info
    bad_json = httpx.post(url, content=b"{not json", timeout=5)
    assert bad_json.status_code == 400 and bad_json.text.startswith("Failed to parse the request body as JSON: ")
    for body, detail in [({"type": "nope"}, "unknown variant `nope`"), ({"type": "clearinghouseState"}, "missing field `user`"),
                         ({"type": "userFees", "user": "bob"}, "user: invalid value"), ([1, 2], "invalid type"),
                         ({"type": "fundingHistory", "coin": "BTC"}, "missing field `startTime`"),
                         ({"type": "l2Book", "coin": "BTC"}, "unknown variant `l2Book`")]:  # a gateway computes it: never sent here
        answer = httpx.post(url, json=body, timeout=5)
        assert answer.status_code == 422 and answer.headers["content-type"].startswith("text/plain"), body
        assert answer.text.startswith(DESERIALIZE) and detail in answer.text, (body, answer.text)
    bad_snapshot = httpx.post(url, json={"type": "fileSnapshot", "request": {"type": "l4Snapshots"}, "outPath": "x"}, timeout=5)
    assert bad_snapshot.status_code == 400 and bad_snapshot.json()["error"]
    assert httpx.post(url, json={"type": "exchangeStatus"}, timeout=5).json()["specialStatuses"] is None


# ---------------------------------------------------------------- forwarding, against a scripted upstream


class Script(JsonHandler):
    """``POST``: the body's ``type`` picks the behaviour; every request is recorded."""

    server: ScriptedInfo

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        req = json.loads(body)
        self.server.seen.append(req)
        kind = req.get("type")
        if kind == "slow":
            time.sleep(req.get("seconds", 1.0))
        if kind == "huge":
            self._send(200, b'"' + b"x" * 200_000 + b'"')
        elif kind == "notJson":
            self._send(200, b"<html>")
        elif kind == "refused":
            self._send(422, DESERIALIZE.encode() + b"unknown variant `refused`", "text/plain; charset=utf-8")
        else:
            self._send(200, json.dumps({"echo": req}).encode())


@pytest.fixture
def scripted() -> Iterator[ScriptedInfo]:
    with ScriptedInfo(Script).serving() as server:
        yield server


def test_forwarding_is_bounded_cached_and_passes_answers_through(scripted: ScriptedInfo) -> None:
    async def run() -> None:
        up = UpstreamInfo(scripted.url, timeout=0.5, max_in_flight=2, max_bytes=100_000, cache_ttl=0.3)
        try:
            answer = await up.ask("userFees", {"type": "userFees", "user": "0xab"})
            assert answer.status == 200 and json.loads(answer.body) == {"echo": {"type": "userFees", "user": "0xab"}}
            refused = await up.ask("refused", {"type": "refused"})
            assert (refused.status, refused.text) == (422, DESERIALIZE + "unknown variant `refused`")
            assert refused.content_type.startswith("text/plain")
            assert (await up.ask("huge", {"type": "huge"})).status == 502
            assert (await up.ask("notJson", {"type": "notJson"})).status == 502

            # meta: one request for many askers, at once and within the cache's life; another after it
            before = len(scripted.seen)
            answers = await asyncio.gather(*(up.ask("meta", {"type": "meta"}) for _ in range(5)))
            await up.ask("meta", {"type": "meta"})
            assert len(scripted.seen) == before + 1 and len({a.body for a in answers}) == 1
            await asyncio.sleep(0.35)
            await up.ask("meta", {"type": "meta"})
            assert len(scripted.seen) == before + 2
            assert (await up.ask("meta", {"type": "meta", "dex": "xyz"})).ok and len(scripted.seen) == before + 3

            # two in flight at most: a third is refused at once; past the timeout: 504
            slow = [asyncio.create_task(up.ask("slow", {"type": "slow", "seconds": 0.3, "n": n})) for n in range(2)]
            await asyncio.sleep(0.05)
            started = time.monotonic()
            busy = await up.ask("userFees", {"type": "userFees"})
            assert busy.status == 503 and busy.retry_after == 1 and time.monotonic() - started < 0.1
            assert all(a.ok for a in await asyncio.gather(*slow))
            late = await up.ask("slow", {"type": "slow", "seconds": 1.0})
            assert late.status == 504 and "did not answer within 0.5 s" in late.text
        finally:
            await up.close()
        gone = UpstreamInfo("http://127.0.0.1:9/info", timeout=1.0)  # nothing listens on the discard port
        assert (await gone.ask("userFees", {"type": "userFees"})).status == 502
        await gone.close()

    asyncio.run(run())


# ---------------------------------------------------------------- the gateway's own tables


def test_compatibility_doc_matches_the_code() -> None:
    doc = (ROOT / "docs" / "COMPATIBILITY.md").read_text()
    assert doc == compat.document(), "docs/COMPATIBILITY.md is stale: python -m hlbook.services.gateway.compat --write docs/COMPATIBILITY.md"
    info, subs = compat.rows()
    answered = dict(info)
    assert all(answered[kind] in ("hlbook", "node, else hlbook") for kind in HANDLERS)
    assert answered["clearinghouseState"] == "node" and answered["meta"] == "node, else hlbook"
    assert dict(subs)["openOrders"] == "served" and dict(subs)["webData3"].startswith("not served")
    assert dict(subs)["clearinghouseState"].startswith("polled from the node")
    assert "docs/COMPATIBILITY.md" in (ROOT / "README.md").read_text()


def test_acks_echo_what_the_client_sent() -> None:
    user = "0x" + "Ab" * 20
    exists = lambda coin: coin == "BTC"  # noqa: E731
    fast = normalise({"type": "l2Book", "coin": "BTC", "fast": True, "nSigFigs": None, "mantissa": None}, exists)
    assert fast == {"type": "l2Book", "coin": "BTC", "nSigFigs": None, "mantissa": None, "fast": True}
    key = feed_key(fast)
    assert key.n_levels == 5 and key != feed_key(normalise({"type": "l2Book", "coin": "BTC", "nLevels": 5}, exists))
    assert normalise({"type": "openOrders", "user": user}, exists) == {"type": "openOrders", "user": user.lower(), "dex": ""}
    assert normalise({"type": "openOrders", "user": user, "dex": "xyz"}, exists)["dex"] == "xyz"
    assert normalise({"type": "userFills", "user": user, "aggregateByTime": False}, exists)["aggregateByTime"] is False


def test_a_fast_book_starts_from_the_feed_that_shares_its_topic() -> None:
    exists = lambda coin: coin == "BTC"  # noqa: E731
    kind = KINDS["l2Book"]
    five = kind.feed(None, feed_key(normalise({"type": "l2Book", "coin": "BTC", "nLevels": 5}, exists)))  # type: ignore[arg-type]
    fast = kind.feed(None, feed_key(normalise({"type": "l2Book", "coin": "BTC", "fast": True}, exists)))  # type: ignore[arg-type]
    assert five.topic == fast.topic
    data = {"coin": "BTC", "time": 5, "levels": [[{"px": "1.0", "sz": "2.0", "n": 1}], []]}
    five.on_upstream(wire.L2Book(height=1, prev=None, time=5, coin="BTC", data=json.dumps(data, separators=(",", ":")).encode()))
    assert json.loads(five.last or "")["data"] == data

    class Hub:
        by_topic = {five.topic: [five, fast]}

    prime_l2(Hub(), fast)  # type: ignore[arg-type]
    assert json.loads(fast.last or "")["data"] == {**data, "fast": True}
    fast.on_upstream(wire.L2Book(height=2, prev=1, time=6, coin="BTC", data=json.dumps({**data, "time": 6}).encode()))
    assert json.loads(fast.last or "")["data"] == {**data, "time": 6, "fast": True}


def test_all_mids_data_carries_a_hip3_dex_and_open_orders_keep_reduce_only() -> None:
    class Hub:
        def all_mids(self, dex: str) -> dict[str, str]:
            return {f"{dex}:X" if dex else "BTC": "1.5"}

    class Feed:
        def __init__(self, key: Any) -> None:
            self.key, self.sent = key, []

        def publish(self, data: Any) -> None:
            self.sent.append(data)

    default, xyz = Feed(AllMidsKey("")), Feed(AllMidsKey("xyz"))
    publish_mids(Hub(), default)  # type: ignore[arg-type]
    publish_mids(Hub(), xyz)  # type: ignore[arg-type]
    assert default.sent == [{"mids": {"BTC": "1.5"}}] and xyz.sent == [{"mids": {"xyz:X": "1.5"}, "dex": "xyz"}]
    order = {"coin": "BTC", "side": "A", "limitPx": "1.0", "sz": "2.0", "oid": 7, "timestamp": 5, "origSz": "2.0", "cloid": None,
             "reduceOnly": True, "orderType": "Limit", "user": "0x1"}
    assert open_order(order) == {"coin": "BTC", "side": "A", "limitPx": "1.0", "sz": "2.0", "oid": 7, "timestamp": 5,
                                 "origSz": "2.0", "reduceOnly": True}
    assert "reduceOnly" not in open_order({**order, "reduceOnly": False})


def test_history_twap_slice_fills_and_reversed_pages(tmp_path: Path) -> None:
    store = Store(tmp_path / "h.sqlite")
    user, other = "0x" + "11" * 20, "0x" + "22" * 20

    def fill(t: int, twap: int | None, tid: int) -> Fill:
        return Fill(coin="BTC", px="100.0", sz="1.0", side="B", time=t, startPosition="0.0", dir="Open Long", closedPnl="0.0",
                    hash="0x" + "00" * 32, oid=tid, crossed=True, fee="0.0", tid=tid, twapId=twap)

    fills = [(user, fill(1000 + i, 77 if i % 3 == 0 else None, i)) for i in range(9)] + [(other, fill(2000, 5, 99))]
    store.add_block(1, 1000, [], fills)
    store.commit()
    newest = json.loads(store.twap_slice_fills(user))
    assert [f["fill"]["tid"] for f in newest] == [6, 3, 0] and {f["twapId"] for f in newest} == {77}
    assert [f["fill"]["tid"] for f in json.loads(store.twap_slice_fills(user, start=1001, end=1008))] == [3, 6]
    assert json.loads(store.twap_slice_fills("0x" + "33" * 20)) == []
    forward = [f["tid"] for f in json.loads(store.user_fills_by_time(user, 1002, 1006))]
    assert forward == [2, 3, 4, 5, 6] and [f["tid"] for f in json.loads(store.user_fills_by_time(user, 1002, 1006, reverse=True))] == forward[::-1]
    store.close()


# ---------------------------------------------------------------- hlbook up --simulate


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with running(tmp_path_factory.mktemp("parity"), shards=2, coins=12, seed=9) as pipeline:
        yield pipeline


def post(base: str, payload: Any) -> Any:
    response = httpx.post(f"{base}/info", json=payload, timeout=10)
    assert response.status_code == 200, (payload, response.status_code, response.text)
    return response.json()


def traders(up: Up) -> list[str]:
    """Users seen in the latest BTC and ETH trades (they hold positions, most of them); not the
    simulator's special users (their orders rest without statuses: no per-user events)."""
    users: list[str] = []
    for coin in ("BTC", "ETH"):
        for trade in post(up.http, {"type": "recentTrades", "coin": coin}):
            users += [u for u in trade["users"] if u not in users and u not in (ASSISTANCE_FUND_USER, HIP2_USER)]
    return users


def test_meta_is_the_simulators(up: Up) -> None:
    for kind in ("meta", "spotMeta", "perpDexs"):
        assert post(up.http, {"type": kind}) == post(up.sim_info[: -len("/info")], {"type": kind})
    meta = post(up.http, {"type": "meta"})
    assert [u["name"] for u in meta["universe"]][:2] == ["BTC", "ETH"]
    sdk = SdkInfo(base_url=up.http, skip_ws=True)
    assert sdk.name_to_asset("BTC") == 0 and sdk.name_to_asset("ETH") == 1 and sdk.name_to_asset("SOL") == 5
    assert sdk.name_to_asset("PURR/USDC") == 10_000 and sdk.name_to_asset("@107") == 10_107


def test_clearinghouse_state_is_answered_as_the_simulator_answers_it(up: Up) -> None:
    sim = up.sim_info[: -len("/info")]
    users = wait_until(lambda: [u for u in traders(up) if post(sim, {"type": "clearinghouseState", "user": u})["assetPositions"]],
                       WAIT, "a trader with a position")
    for user in users[:3]:
        deadline = time.monotonic() + 30  # the state moves with every block: the two answers of one block agree
        while True:  # (a loaded machine may put a block between the two requests many times in a row)
            ours, theirs = post(up.http, {"type": "clearinghouseState", "user": user}), post(sim, {"type": "clearinghouseState", "user": user})
            if ours == theirs:
                break
            assert time.monotonic() < deadline, f"clearinghouseState of {user}: {ours} != {theirs}"
        assert ours["assetPositions"] or user != users[0]
        spot = post(up.http, {"type": "spotClearinghouseState", "user": user})
        assert isinstance(spot["balances"], list)
    assert metric(up.port, "hlbook_gateway_info_upstream_total", type="clearinghouseState", outcome="ok") >= 3
    for _ in range(3):
        post(up.http, {"type": "perpDexs"})
    assert metric(up.port, "hlbook_gateway_info_upstream_total", type="perpDexs", outcome="cached") >= 1


def sdk_calls(info: SdkInfo, user: str, oid: int, now: int) -> dict[str, Any]:
    """Every public ``Info`` method of the SDK with its required arguments only (the rest: its defaults)."""
    hour = now - 3_600_000
    return {
        "user_state": lambda: info.user_state(user), "spot_user_state": lambda: info.spot_user_state(user),
        "open_orders": lambda: info.open_orders(user), "frontend_open_orders": lambda: info.frontend_open_orders(user),
        "all_mids": lambda: info.all_mids(), "user_fills": lambda: info.user_fills(user),
        "user_fills_by_time": lambda: info.user_fills_by_time(user, hour), "meta": lambda: info.meta(),
        "meta_and_asset_ctxs": lambda: info.meta_and_asset_ctxs(), "perp_dexs": lambda: info.perp_dexs(),
        "spot_meta": lambda: info.spot_meta(), "spot_meta_and_asset_ctxs": lambda: info.spot_meta_and_asset_ctxs(),
        "funding_history": lambda: info.funding_history("BTC", hour),
        "user_funding_history": lambda: info.user_funding_history(user, hour), "l2_snapshot": lambda: info.l2_snapshot("BTC"),
        "candles_snapshot": lambda: info.candles_snapshot("BTC", "1m", hour, now), "user_fees": lambda: info.user_fees(user),
        "user_staking_summary": lambda: info.user_staking_summary(user),
        "user_staking_delegations": lambda: info.user_staking_delegations(user),
        "user_staking_rewards": lambda: info.user_staking_rewards(user), "delegator_history": lambda: info.delegator_history(user),
        "query_order_by_oid": lambda: info.query_order_by_oid(user, oid),
        "query_order_by_cloid": lambda: info.query_order_by_cloid(user, Cloid.from_int(1)),
        "query_referral_state": lambda: info.query_referral_state(user), "query_sub_accounts": lambda: info.query_sub_accounts(user),
        "query_user_to_multi_sig_signers": lambda: info.query_user_to_multi_sig_signers(user),
        "query_perp_deploy_auction_status": lambda: info.query_perp_deploy_auction_status(),
        "query_user_dex_abstraction_state": lambda: info.query_user_dex_abstraction_state(user),
        "query_user_abstraction_state": lambda: info.query_user_abstraction_state(user),
        "historical_orders": lambda: info.historical_orders(user),
        "user_non_funding_ledger_updates": lambda: info.user_non_funding_ledger_updates(user, hour),
        "portfolio": lambda: info.portfolio(user), "user_twap_slice_fills": lambda: info.user_twap_slice_fills(user),
        "user_vault_equities": lambda: info.user_vault_equities(user), "user_role": lambda: info.user_role(user),
        "user_rate_limit": lambda: info.user_rate_limit(user),
        "query_spot_deploy_auction_status": lambda: info.query_spot_deploy_auction_status(user),
        "extra_agents": lambda: info.extra_agents(user),
    }


NOT_API = {"set_perp_meta", "disconnect_websocket", "subscribe", "unsubscribe", "name_to_asset", "post"}


def test_every_sdk_info_method_answers_with_its_defaults(up: Up) -> None:
    info = SdkInfo(base_url=up.http, skip_ws=True)
    user = traders(up)[0]
    resting = post(up.http, {"type": "openOrders", "user": user})
    calls = sdk_calls(info, user, resting[0]["oid"] if resting else 1, int(time.time() * 1000))
    methods = {name for name, _ in inspect.getmembers(SdkInfo, inspect.isfunction) if not name.startswith("_")} - NOT_API
    assert set(calls) == methods, "an Info method of the SDK is not called here"
    answers = {name: call() for name, call in calls.items()}  # an HTTP error would raise the SDK's ClientError / ServerError
    assert answers["user_state"]["marginSummary"] and isinstance(answers["user_fills"], list)
    assert [u["name"] for u in answers["meta"]["universe"]][:2] == ["BTC", "ETH"]
    assert answers["l2_snapshot"]["coin"] == "BTC" and isinstance(answers["user_twap_slice_fills"], list)
    assert len(answers["portfolio"]) == 8 and answers["user_role"]["role"] == "user"
    assert not any(isinstance(a, dict) and "error" in a for a in answers.values()), answers


def test_malformed_requests_get_the_public_apis_errors(up: Up) -> None:
    def raw(body: bytes) -> httpx.Response:
        return httpx.post(f"{up.http}/info", content=body, headers={"Content-Type": "application/json"}, timeout=10)

    assert raw(b"{nope").status_code == 400 and raw(b"{nope").text.startswith("Failed to parse the request body as JSON")
    unknown = raw(b'{"type":"l2Book","coin":"NOPE"}')  # the public API: null for a market that does not exist
    assert unknown.status_code == 200 and unknown.json() is None
    out = up.tmp / "written-by-the-node.json"  # the node's fileSnapshot is not the public API's: never forwarded
    snapshot = {"type": "fileSnapshot", "request": {"type": "l4Snapshots", "includeUsers": True, "includeTriggerOrders": False},
                "outPath": str(out)}
    assert raw(json.dumps(snapshot).encode()).status_code == 422 and not out.exists()
    for body, detail in [(b"[1]", "invalid type"), (b'{"type":"userFills"}', "missing field `user`"),
                         (b'{"type":"clearinghouseState"}', "missing field `user`"),  # the node's own answer, passed on
                         (b'{"type":"nope"}', "unknown variant `nope`"),
                         (b'{"type":"openOrders","user":"bob"}', "user must be a 0x address")]:
        answer = raw(body)
        assert answer.status_code == 422 and answer.text.startswith(DESERIALIZE) and detail in answer.text, (body, answer.text)


async def _ws(up: Up) -> Any:
    return await websockets.connect(up.ws, max_size=None)


async def _next(ws: Any, channel: str) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        while True:
            message = json.loads(await ws.recv())
            if message["channel"] == channel:
                return message


def test_websocket_posts_subscriptions_and_acks(up: Up) -> None:
    user = max(traders(up), key=lambda u: len(post(up.http, {"type": "frontendOpenOrders", "user": u})))

    async def run() -> None:
        ws = await _ws(up)
        await ws.send(json.dumps({"method": "post", "id": 3, "request": {"type": "info", "payload": {"type": "clearinghouseState", "user": user}}}))
        reply = (await _next(ws, "post"))["data"]
        assert reply["id"] == 3 and reply["response"]["type"] == "info"
        assert reply["response"]["payload"]["type"] == "clearinghouseState" and "marginSummary" in reply["response"]["payload"]["data"]
        await ws.send(json.dumps({"method": "post", "id": 4, "request": {"type": "info", "payload": {"type": "nope"}}}))
        error = (await _next(ws, "post"))["data"]
        assert error["id"] == 4 and error["response"]["type"] == "error" and "unknown variant `nope`" in error["response"]["payload"]

        # the TypeScript SDK's l2Book with fast: true finds its subscription in the ack
        sent = {"type": "l2Book", "coin": "BTC", "nSigFigs": None, "mantissa": None, "fast": True}
        await ws.send(json.dumps({"method": "subscribe", "subscription": sent}))
        ack = (await _next(ws, "subscriptionResponse"))["data"]
        assert ack == {"method": "subscribe", "subscription": sent}
        book = (await _next(ws, "l2Book"))["data"]
        assert book["coin"] == "BTC" and book["fast"] is True and all(0 < len(side) <= 5 for side in book["levels"])

        sent = {"type": "openOrders", "user": user.upper().replace("0X", "0x"), "dex": ""}
        await ws.send(json.dumps({"method": "subscribe", "subscription": sent}))
        ack = (await _next(ws, "subscriptionResponse"))["data"]
        assert ack["subscription"] == {**sent, "user": user}
        first = (await _next(ws, "openOrders"))["data"]
        assert first["dex"] == "" and first["user"] == user and first["orders"]
        listed = post(up.http, {"type": "frontendOpenOrders", "user": user})
        assert {o["oid"] for o in first["orders"]} & {o["oid"] for o in listed}
        assert all(set(o) >= {"coin", "side", "limitPx", "sz", "oid", "orderType", "reduceOnly", "isTrigger"} for o in first["orders"])
        changed = (await _next(ws, "openOrders"))["data"]  # an active trader's orders change within seconds
        assert changed["user"] == user and changed["orders"] != first["orders"]
        await ws.close()

    asyncio.run(run())


def test_open_orders_filter_by_dex(up: Up) -> None:
    """The simulator's coins are all on the default dex: a HIP-3 dex holds none of them."""
    user = max(traders(up), key=lambda u: len(post(up.http, {"type": "openOrders", "user": u})))
    assert post(up.http, {"type": "openOrders", "user": user, "dex": ""})
    assert post(up.http, {"type": "openOrders", "user": user, "dex": "xyz"}) == []
    assert post(up.http, {"type": "frontendOpenOrders", "user": user, "dex": "xyz"}) == []
    bad = httpx.post(f"{up.http}/info", json={"type": "openOrders", "user": user, "dex": 5}, timeout=10)
    assert bad.status_code == 422 and "dex" in bad.text

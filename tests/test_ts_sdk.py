"""Issue 21, compatibility: the TypeScript SDK ``@nktkas/hyperliquid`` (version pinned in
``tests/ts_sdk/package.json`` and its lock file) talks to a running hlbook unmodified, only its
URLs pointed at it, and every answer fits the SDK's own response schemas.

``tests/ts_sdk/sdk_calls.mjs`` runs under Node.js (20.19 or later, as the SDK requires; Node 20's
WebSocket is behind ``--experimental-websocket``, the same undici class Node 22 has by default)
against ``hlbook up --simulate``: every InfoClient method that hlbook computes (``l2Book`` with
each ``nSigFigs``, ``recentTrades``, ``candleSnapshot``, the user's fills, orders and TWAP slice
fills…) or forwards to the node's info server (here the simulator's: ``meta``,
``clearinghouseState``, ``userFees``…), with the SDK's defaults, once over HTTP (``POST /info``)
and once over the WebSocket (``post``); then the SubscriptionClient feeds hlbook serves (l2Book,
trades, bbo, allMids, candle, activeAssetCtx, userFills, userEvents, orderUpdates, openOrders,
userTwapSliceFills). The SDK validates only its requests at run time; each answer and event is
checked here against the valibot schema the SDK exports beside the method (``L2BookResponse``,
``TradesEvent``…), so a key hlbook leaves out, a null where the SDK wants a value, a number as a
string or a negative where it wants an unsigned decimal fails the call; the main answers must also
be non-empty (an empty list fits any list's schema). A second gateway, without a node info
server, answers meta, spotMeta, perpDexs and the asset contexts from its own builder: checked too.

Why 0.31.0: it is the last release that ships its response schemas as valibot objects (0.32 made
them TypeScript types, which only a TypeScript compiler can check against), and 0.33 needs Node.js
22.12, newer than the Node 20 of CI. Where its schemas are stricter than the public API (as the
SDK's later types say), sdk_calls.mjs relaxes them and says why.

The SDK is installed with ``npm ci`` from the lock file into ``.venv/ts-sdk`` (ignored by git; its
npm cache with it), again only when the lock file changes. Without node or npm the test fails."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import free_port
from pipeline import Up, running

SOURCE = Path(__file__).resolve().parent / "ts_sdk"
ROOT = SOURCE.parent.parent
INSTALL = ROOT / ".venv" / "ts-sdk"
FILES = ("package.json", "package-lock.json", "sdk_calls.mjs")
NODE_MIN = (20, 19)  # the SDK's engines.node
READY_TIMEOUT = 60.0
COIN = "BTC"

def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH: tests/test_ts_sdk.py runs the TypeScript SDK under Node.js "
                    f"(>= {'.'.join(map(str, NODE_MIN))}) and installs it with npm; install both (Debian: apt-get install nodejs npm)")
    return path


def install() -> Path:
    """``.venv/ts-sdk`` with the SDK installed from the lock file (npm ci, once per lock file)."""
    node, npm = tool("node"), tool("npm")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    major, minor = (int(x) for x in version.lstrip("v").split(".")[:2])
    assert (major, minor) >= NODE_MIN, f"node {version}: the SDK needs >= {'.'.join(map(str, NODE_MIN))}"
    INSTALL.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(SOURCE / name, INSTALL / name)
    stamp, digest = INSTALL / ".installed", hashlib.sha256((SOURCE / "package-lock.json").read_bytes()).hexdigest()
    if not (stamp.exists() and stamp.read_text() == digest and (INSTALL / "node_modules").is_dir()):
        # npm's cache and logs beside it, not in ~/.npm; no audit, fund or update-notifier requests
        env = {**os.environ, "npm_config_cache": str(INSTALL / ".npm"), "npm_config_update_notifier": "false"}
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=INSTALL, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, f"npm ci in {INSTALL} failed:\n{done.stdout}{done.stderr}"
        stamp.write_text(digest)
    return INSTALL


@pytest.fixture(scope="module")
def sdk() -> Path:
    return install()


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``hlbook up --simulate`` (2 shards, 12 coins), its gateway forwarding to the simulator's info server."""
    with running(tmp_path_factory.mktemp("ts-sdk"), READY_TIMEOUT, shards=2, coins=12, seed=3) as pipeline:
        yield pipeline


def run_calls(sdk: Path, base: str, *mode: str) -> dict[str, dict[str, Any]]:
    """sdk_calls.mjs's results by call; fails on any call the SDK rejects."""
    proc = subprocess.run([tool("node"), "--experimental-websocket", "--no-warnings", str(sdk / "sdk_calls.mjs"), base, COIN, *mode],
                          cwd=sdk, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"sdk_calls.mjs exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}"
    results = {r["call"]: r for r in map(json.loads, proc.stdout.splitlines())}
    failed = {call: r["error"] for call, r in results.items() if not r["ok"]}
    assert not failed, "calls whose answers the TypeScript SDK rejects:\n" + "\n".join(
        f"  {call}: {error} {results[call].get('data', '')}" for call, error in failed.items())
    return results


def test_ts_sdk(sdk: Path, up: Up) -> None:
    results = run_calls(sdk, up.http)
    for prefix in ("http", "ws"):  # the script ran whole
        assert {f"{prefix}.l2Book.nSigFigs5", f"{prefix}.userFills", f"{prefix}.historicalOrders", f"{prefix}.meta",
                f"{prefix}.clearinghouseState", f"{prefix}.fundingHistory"} <= set(results)
    assert {"sub.l2Book", "sub.userEvents", "sub.userTwapSliceFills"} <= set(results)
    # not empty answers that fit trivially: the busiest trader of the recent trades has fills and orders
    for call in ("recentTrades", "allMids", "l2Book", "l2Book.nSigFigs2", "candleSnapshot", "userFills", "userFillsByTime",
                 "historicalOrders", "meta", "spotMeta", "clearinghouseState"):
        for prefix in ("http", "ws"):
            assert results[f"{prefix}.{call}"]["size"] > 0, f"{prefix}.{call}: empty answer"
    assert results["http.orderStatus"]["status"] == "order" and results["http.orderStatus.unknownOid"]["status"] == "unknownOid"


def test_ts_sdk_without_node(sdk: Path, up: Up) -> None:
    """A gateway with no node info server builds meta, spotMeta, perpDexs and the asset contexts
    from its books: those answers fit the SDK's schemas too."""
    port = free_port()
    up.start_gateway(port)
    results = run_calls(sdk, f"http://127.0.0.1:{port}", "own")
    assert set(results) == {f"own.{m}" for m in ("meta", "spotMeta", "metaAndAssetCtxs", "spotMetaAndAssetCtxs", "perpDexs")}

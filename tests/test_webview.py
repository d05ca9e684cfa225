"""The live web view at ``/`` in a real browser: ``hlbook up --simulate`` with a
gateway token, Debian's headless Chromium driven over the DevTools protocol.
The page must connect (keeping ``?token=``), draw the chosen coin's book as
POST /info sees it, the depth chart, trades, best bid/offer and /ready's shards,
follow a change of coin, come back after its socket drops, and mark the coin stale
while its shard is stopped."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import struct
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import websockets

from pipeline import Up, post_info, stop_group
from test_up import children

CHROMIUM = "/usr/bin/chromium"
TOKEN = "webview-token"
ROWS = 10  # at least this many bid and ask rows on the page
WIDTH, HEIGHT = 1280, 900

# What the page shows, read from its DOM (and the canvas' pixels).
SNAPSHOT_JS = """(() => {
  const $ = (id) => document.getElementById(id);
  const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)].map((r) => r.dataset.px);
  const c = $("depth");
  if (!c || !$("conn")) return null;  // still loading
  let green = 0, red = 0;
  if (c.width && c.height) {
    const px = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    for (let i = 0; i < px.length; i += 4) {
      if (px[i + 1] > px[i] + 40) green++;
      else if (px[i] > px[i + 1] + 60) red++;
    }
  }
  const s = window.hlview && window.hlview.state;
  return {
    conn: $("conn").dataset.state, coin: $("coin").value, bookLabel: $("book-time").textContent,
    bids: rows("bids"), asks: rows("asks"), trades: document.querySelectorAll("#trades tbody tr").length,
    bbo: [$("bbo-bid-px").textContent, $("bbo-ask-px").textContent], drawn: Number(c.dataset.drawn || 0),
    green, red, pixels: c.width * c.height, ready: $("ready").dataset.state, stale: !!$("coin-stale") && !$("coin-stale").hidden,
    shards: [...document.querySelectorAll("#shards tbody tr")].map((r) => r.cells[1].textContent),
    error: $("error").hidden ? null : $("error").textContent, url: location.href,
    wsUrl: s && s.ws ? s.ws.url : null, bookTime: s && s.book ? s.book.time : 0, opened: s ? s.opened : 0,
  };
})()"""


class Cdp:
    """Just enough of the Chrome DevTools Protocol: calls with ids, events kept."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.last = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await self._dispatch()

    async def _dispatch(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            future = self.pending.pop(msg["id"], None) if "id" in msg else None
            if future is not None and not future.done():
                future.set_result(msg)
            elif "method" in msg:
                self.events.append(msg)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last += 1
        future = asyncio.get_running_loop().create_future()
        self.pending[self.last] = future
        await self.ws.send(json.dumps({"id": self.last, "method": method, "params": params}))
        msg = await asyncio.wait_for(future, 15)
        assert "error" not in msg, f"{method}: {msg['error']}"
        return msg["result"]

    async def eval(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, f"{expression[:80]}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def exceptions(self) -> list[str]:
        return [json.dumps(e["params"])[:500] for e in self.events if e["method"] == "Runtime.exceptionThrown"]


def start_chromium(tmp: Path, scratch: Path) -> tuple[subprocess.Popen[bytes], int]:
    """Chromium with its profile in ``tmp`` and its own temporary files (org.chromium.*, its
    sockets: a short path) in ``scratch``."""
    profile = tmp / "chromium-profile"
    profile.mkdir()
    log = open(tmp / "chromium.log", "wb")
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync",
                             "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}",
                             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(scratch)})
    log.close()
    active = profile / "DevToolsActivePort"  # Chromium writes the port it chose here
    deadline = time.monotonic() + 20
    while not (active.exists() and active.read_text().strip()):
        assert proc.poll() is None, f"chromium exited with {proc.returncode}: {(tmp / 'chromium.log').read_text()[-2000:]}"
        assert time.monotonic() < deadline, "chromium did not open its DevTools port within 20 s"
        time.sleep(0.1)
    return proc, int(active.read_text().split()[0])


async def wait_for(cdp: Cdp, ok: Any, what: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        seen = await cdp.eval(SNAPSHOT_JS)
        if seen is not None and ok(seen):
            return seen
        assert time.monotonic() < deadline, f"page never showed {what}: {json.dumps(seen)[:1500]}; exceptions {cdp.exceptions()}"
        await asyncio.sleep(0.2)


def showing(coin: str) -> Any:
    def ok(s: dict[str, Any]) -> bool:
        return (s["conn"] == "open" and s["coin"] == coin and s["bookLabel"].startswith(f"{coin} ·")
                and len(s["bids"]) >= ROWS and len(s["asks"]) >= ROWS and s["drawn"] > 0 and "–" not in s["bbo"]
                and s["trades"] > 0 and s["ready"] == "ready" and len(s["shards"]) == 1)
    return ok


def matches(seen: dict[str, Any], book: dict[str, Any]) -> str | None:
    """Why the rendered levels do not fit the gateway's book (None when they do); the book may move between the two."""
    bids, asks = ([lvl["px"] for lvl in side] for side in book["levels"])
    shown_bids, shown_asks = seen["bids"], seen["asks"]
    if [float(p) for p in shown_bids] != sorted((float(p) for p in shown_bids), reverse=True) or len(set(shown_bids)) != len(shown_bids):
        return f"bids not strictly descending: {shown_bids}"
    if [float(p) for p in shown_asks] != sorted(float(p) for p in shown_asks) or len(set(shown_asks)) != len(shown_asks):
        return f"asks not strictly ascending: {shown_asks}"
    if not float(shown_bids[0]) < float(shown_asks[0]):
        return f"crossed: best bid {shown_bids[0]} >= best ask {shown_asks[0]}"
    if shown_bids[0] not in bids[:5] and bids[0] not in shown_bids[:5]:
        return f"best bid {shown_bids[0]} vs the gateway's {bids[:5]}"
    if shown_asks[0] not in asks[:5] and asks[0] not in shown_asks[:5]:
        return f"best ask {shown_asks[0]} vs the gateway's {asks[:5]}"
    for name, shown, truth in (("bid", shown_bids, bids), ("ask", shown_asks, asks)):
        common = len(set(shown) & set(truth))
        if common < len(shown) // 2:
            return f"only {common} of {len(shown)} shown {name} prices are in the gateway's book"
    return None


async def check_book(cdp: Cdp, up: Up, coin: str) -> dict[str, Any]:
    """The page's rows against POST /info l2Book (nLevels 100), a few tries as the book moves."""
    why = None
    for _ in range(10):
        seen = await cdp.eval(SNAPSHOT_JS)
        status, book = await asyncio.to_thread(post_info, up.http, {"type": "l2Book", "coin": coin, "nLevels": 100},
                                               {"Authorization": f"Bearer {TOKEN}"})
        assert status == 200, book
        why = matches(seen, book)
        if why is None:
            return seen
        await asyncio.sleep(0.3)
    raise AssertionError(f"{coin}: {why}")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


async def drive(up: Up, port: int, tmp: Path) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
        target = next(t for t in json.loads(r.read()) if t["type"] == "page")
    async with websockets.connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
        cdp = Cdp(ws)
        await cdp.call("Runtime.enable")
        await cdp.call("Page.enable")
        await cdp.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        await cdp.call("Page.navigate", url=f"{up.http}/?token={TOKEN}")

        # BTC by default: connected, rows, depth, trades, bbo and the pipeline's shard
        seen = await wait_for(cdp, showing("BTC"), "BTC's book, trades, bbo and pipeline status")
        assert seen["opened"] == 1, seen
        assert f"token={TOKEN}" in seen["wsUrl"] and seen["wsUrl"].startswith(f"ws://127.0.0.1:{up.port}/ws"), seen["wsUrl"]
        assert seen["green"] > seen["pixels"] // 50 and seen["red"] > seen["pixels"] // 50, f"depth chart barely drawn: {seen}"
        assert int(seen["shards"][0]) > 0, seen["shards"]
        await check_book(cdp, up, "BTC")

        shot = base64.b64decode((await cdp.call("Page.captureScreenshot", format="png"))["data"])
        (tmp / "webview.png").write_bytes(shot)
        width, height = png_size(shot)
        assert (width, height) == (WIDTH, HEIGHT), (width, height)
        assert len(shot) > 30_000, f"screenshot of {len(shot)} bytes looks blank"

        # pick another coin the way a user does; the URL keeps the token and names the coin
        await cdp.eval('(() => { const s = document.getElementById("coin"); s.value = "ETH"; s.dispatchEvent(new Event("change")); })()')
        seen = await wait_for(cdp, showing("ETH"), "ETH after choosing it")
        assert "coin=ETH" in seen["url"] and f"token={TOKEN}" in seen["url"], seen["url"]
        await check_book(cdp, up, "ETH")

        # the socket drops: the page reconnects, subscribes again and the book keeps moving
        before = seen["bookTime"]
        await cdp.eval("window.__dropped = window.hlview.state.ws; window.hlview.reconnect()")
        seen = await wait_for(cdp, lambda s: showing("ETH")(s) and s["opened"] == 2 and s["bookTime"] > before,
                              "ETH again after reconnecting")
        assert await cdp.eval("window.hlview.state.ws !== window.__dropped && window.__dropped.readyState === WebSocket.CLOSED")
        await check_book(cdp, up, "ETH")

        assert seen["error"] is None, f"the page showed an error: {seen['error']}"
        assert not seen["stale"], seen

        # the shard stops: the coin is marked stale (/ready's stale_coins), and no longer once it is back
        shard = children(up.proc.pid)["book-0"]
        os.kill(shard, signal.SIGSTOP)
        try:
            await wait_for(cdp, lambda s: s["stale"], "ETH marked stale while its shard is stopped", 15)
        finally:
            os.kill(shard, signal.SIGCONT)
        await wait_for(cdp, lambda s: showing("ETH")(s) and not s["stale"], "ETH no longer stale", 30)
        assert not cdp.exceptions(), cdp.exceptions()


def test_web_view_in_chromium(tmp_path: Path) -> None:
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"{CHROMIUM} is missing: the web view test needs Debian's Chromium "
                    "(apt-get install -y --no-install-recommends chromium; .ci/run installs it)")
    up = Up(tmp_path, shards=1, coins=8, env={"HLBOOK_TOKEN": TOKEN})
    browser = None
    scratch = Path(tempfile.mkdtemp(prefix="hlbook-chromium-"))
    try:
        up.wait_ready(60)
        assert post_info(up.http, {"type": "allMids"})[0] == 401, "the gateway should require the token"
        browser, port = start_chromium(tmp_path, scratch)
        asyncio.run(drive(up, port, tmp_path))
    finally:
        if browser is not None:
            stop_group(browser)
        up.stop()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)

"""``hlbook client TYPE [PARAMS…]``: watch a feed in the terminal (light imports)."""

from __future__ import annotations

import asyncio
import difflib
import logging
import sys
from typing import Annotated, Any, TextIO
from urllib.parse import urlsplit

import typer

INT_PARAMS = {"nSigFigs", "mantissa", "nLevels"}


class WatchError(Exception):
    """Why watching stopped: the subscription was refused, or the connection gave up."""


def parse_params(kind: str, params: list[str]) -> dict[str, Any]:
    """``["coin=BTC", "nSigFigs=5"]`` -> a subscription dict. A bare first value is the
    coin (``BTC``), or the user when it is an address (``0x…``)."""
    sub: dict[str, Any] = {"type": kind}
    for i, item in enumerate(params):
        key, sep, value = item.partition("=")
        if not sep and i == 0:
            key, value = ("user" if item.startswith("0x") else "coin"), item
        elif not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        sub[key] = _value(key, value)
    return sub


def _value(key: str, value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    if value == "null":
        return None
    if key in INT_PARAMS:
        return int(value)
    return value


def client(
    kind: Annotated[str, typer.Argument(metavar="TYPE", help="Subscription type: l2Book, trades, bbo, allMids, candle, l4Book, orderUpdates, userFills…")],
    params: Annotated[list[str] | None, typer.Argument(metavar="PARAMS", help="key=value, e.g. coin=BTC nSigFigs=5 interval=1m user=0x… (a bare first value is the coin, or the user if 0x…)")] = None,
    url: Annotated[str, typer.Option(envvar="HLBOOK_URL", help="WebSocket URL")] = "ws://127.0.0.1:8000/ws",
    json_out: Annotated[bool, typer.Option("--json", envvar="HLBOOK_JSON", help="One JSON message per line")] = False,
    count: Annotated[int | None, typer.Option(envvar="HLBOOK_COUNT", min=1, show_default=False, help="Stop after N messages (default: never)")] = None,
    depth: Annotated[int, typer.Option(envvar="HLBOOK_CLIENT_DEPTH", min=1, help="Book levels shown per side")] = 10,
) -> None:
    """Watch a feed: a book table or JSON lines; survives server restarts.

    Exits 1 with one line on stderr when the server refuses the subscription or
    the connection gives up."""
    try:
        sub = parse_params(kind, params or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="PARAMS") from None
    logging.getLogger("hlbook.client").setLevel(logging.CRITICAL)  # this command says what happens itself, one line each
    problem = url_problem(url)
    if problem:
        raise typer.BadParameter(problem, param_hint="--url")
    try:
        asyncio.run(watch(sub, url, json_out=json_out, count=count, depth=depth))
    except KeyboardInterrupt:
        pass
    except WatchError as exc:
        print(f"[hlbook client] {exc}", file=sys.stderr, flush=True)
        raise typer.Exit(1) from None


def url_problem(url: str) -> str | None:
    """What is wrong with a gateway URL, if anything (said before connecting)."""
    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        secure = "s" if parts.scheme == "https" else ""
        return f"{url} is an HTTP URL; the WebSocket is ws{secure}://{parts.netloc}/ws"
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        return f"{url} is not a WebSocket URL (ws://HOST:PORT/ws)"
    try:
        parts.port
    except ValueError as exc:
        return f"{url}: {exc}"
    if parts.path in ("", "/"):
        return f"{url} has no path; the WebSocket is at /ws: {parts.scheme}://{parts.netloc}/ws"
    return None


class _Printer:
    """Formats messages of one subscription for the terminal."""

    def __init__(self, sub: dict[str, Any], json_out: bool, depth: int, out: TextIO) -> None:
        from hlbook.client.books import L2BookView, L4Book

        self.sub, self.json_out, self.depth, self.out = sub, json_out, depth, out
        self.tty = out.isatty()
        self.l2 = L2BookView(sub.get("coin"))
        self.l4 = L4Book(sub.get("coin", "")) if sub["type"] == "l4Book" else None

    def show(self, message: dict[str, Any]) -> None:
        import orjson

        if self.json_out:
            self.out.write(orjson.dumps(message).decode() + "\n")
        else:
            self.out.write(self._pretty(message) + "\n")
        self.out.flush()

    def _pretty(self, message: dict[str, Any]) -> str:
        import orjson

        channel = message.get("channel")
        data: Any = message.get("data")  # the channel's payload, as received
        clear = "\x1b[2J\x1b[H" if self.tty else ""
        if channel == "l2Book":
            self.l2.apply(data)
            return clear + self.l2.render(self.depth)
        if channel == "l4Book" and self.l4 is not None:
            self.l4.handle(message)
            return clear + self.l4.render(self.depth)
        if channel == "trades":
            return "\n".join(f"{t['time']} {t['coin']} {'buy ' if t['side'] == 'B' else 'sell'} {t['sz']} @ {t['px']} tid={t['tid']}" for t in data)
        if channel == "bbo":
            bid, ask = data["bbo"]
            side = lambda lv: f"{lv['sz']} @ {lv['px']}" if lv else "-"  # noqa: E731
            return f"{data['time']} {data['coin']} bid {side(bid)} | ask {side(ask)}"
        return orjson.dumps(message).decode()


async def watch(sub: dict[str, Any], url: str, *, json_out: bool = False, count: int | None = None, depth: int = 10, out: TextIO = sys.stdout) -> int:
    """Print the feed until ``count`` messages (forever if None); returns the count printed."""
    from hlbook.client.client import HLClient

    printer = _Printer(sub, json_out, depth, out)
    done = asyncio.Event()
    seen = 0

    def on_message(message: dict[str, Any]) -> None:
        nonlocal seen
        if count is not None and seen >= count:
            return
        seen += 1
        printer.show(message)
        if count is not None and seen >= count:
            done.set()

    async with HLClient(url) as hl:
        sid = await hl.subscribe(sub, on_message)
        if printer.l4 is not None:
            printer.l4._client, printer.l4.sub_id = hl, sid
        watchers = [asyncio.create_task(done.wait()), asyncio.create_task(_report_state(hl, url)),
                    asyncio.create_task(_until_refused(hl, sid, sub))]
        try:
            finished, _ = await asyncio.wait(watchers, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()  # a WatchError: refused, or gave up
        finally:
            for task in watchers:
                task.cancel()
    return seen


async def _until_refused(hl: Any, sid: int, sub: dict[str, Any]) -> None:
    """Wait for the server's answer; a refusal ends the watch with what was wrong."""
    from hlbook.client.registry import SubscriptionError

    try:
        await hl.wait_active(sid)
    except SubscriptionError as exc:
        if not str(exc).startswith("Invalid subscription"):
            raise WatchError(f"gave up: {exc}") from None
        raise WatchError(f"refused: {exc}{await refusal_hint(hl, sub)}") from None
    await asyncio.Event().wait()  # acknowledged: watch on


async def refusal_hint(hl: Any, sub: dict[str, Any]) -> str:
    """What was likely wrong with a refused subscription: its coin, or else its other parameters."""
    coin = sub.get("coin")
    if not isinstance(coin, str):
        return ""
    try:
        coins = sorted((await hl.info({"type": "allMids"}, timeout=3))["data"])
    except Exception:  # noqa: BLE001 - a hint only
        return ""
    if coin in coins:
        return f" ({coin} exists: check the other parameters)"
    same = [c for c in coins if c.lower() == coin.lower()]
    if same:
        return f" (coin names are case-sensitive: did you mean {same[0]}?)"
    close = difflib.get_close_matches(coin, coins, n=3)
    if close:
        return f" (unknown coin {coin}: did you mean {', '.join(close)}?)"
    return f" (unknown coin {coin}; {len(coins)} coins here, e.g. {', '.join(coins[:5])}; spot pairs are @N or PURR/USDC)"


async def _report_state(hl: Any, url: str) -> None:
    """Tell stderr when the connection goes down or comes back (once per change); a
    connection that gave up ends the watch (WatchError)."""
    last = "connecting"
    while True:
        info = hl.connection_info()
        state = info[0]["state"] if info else "connecting"
        kind = {"open": "open", "failed": "failed", "backoff": "down"}.get(state, last)
        if kind != last:
            error = (info[0].get("last_error") or "").strip().splitlines()
            reason = error[0][:200] if error else "no reason given"  # a refused handshake's first line, not its headers
            if kind == "failed":
                raise WatchError(f"gave up connecting to {url}: {reason}")
            text = {"open": "connected", "down": f"disconnected ({reason}); reconnecting"}[kind]
            print(f"[hlbook client] {text}", file=sys.stderr, flush=True)
            last = kind
        await asyncio.sleep(0.2)

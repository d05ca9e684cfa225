"""The simulator's info server: ``POST /info`` ``fileSnapshot`` (``l4Snapshots``), as the node's,
and the node's other info types from the simulated state (``node_info``: meta, spotMeta,
perpDexs in mainnet's order, clearinghouse states from the simulated fills, …).

The snapshot is taken under the lock the block loop holds while it generates
and writes a block, so its height is always a block already written and
flushed to every stream. Under the lock only the resting orders and their
sizes are captured (``Captured``: ~0.3 s for the whole market's ~630,000);
they are encoded after it is released (building the dicts under it stopped
the block loop ~7 s). Bad fileSnapshot requests get 400 with ``{"error": "..."}``; other
requests are refused as the node refuses them (``node_info``: 400 for a body that is not
JSON, 422 text for a type or fields it does not know).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from itertools import chain
from operator import attrgetter
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import orjson
from sortedcontainers import SortedDict

from hlbook.common.private import is_private
from hlbook.services.nodesim.market import Resting, json_str
from hlbook.services.nodesim.node_info import NodeInfo, Refused

if TYPE_CHECKING:
    from hlbook.services.nodesim.engine import Simulator

log = logging.getLogger(__name__)
_SIZE = attrgetter("sz")

Side = tuple[list[Resting], list[int]]  # a side's orders best first, and their sizes


class Captured:
    """The true state at a height: per coin, its bids and asks as (orders best first, their sizes then).
    A resting order's other fields never change, so it is encoded later, outside the lock."""

    def __init__(self, height: int, coins: list[tuple[str, Side, Side]]) -> None:
        self.height, self.coins = height, coins

    @staticmethod
    def side(levels: SortedDict) -> Side:
        """A book side's orders (``levels``: price -> {oid: order}) and their sizes now."""
        orders = list(chain.from_iterable(map(dict.values, levels.values())))
        return orders, list(map(_SIZE, orders))

    def encode(self, include_users: bool, include_height: bool) -> bytes:
        """``render(height, snapshot body, ...)``'s bytes, from the orders' templates."""
        if include_users:
            def side(orders: Side) -> bytes:
                return b",".join([b'["%s",%s]' % (o.user.encode(), o.order_json(sz)) for o, sz in zip(*orders)])
        else:
            def side(orders: Side) -> bytes:
                return b",".join([o.order_json(sz) for o, sz in zip(*orders)])
        body = b"[" + b",".join([b'["%s",[[%s],[%s]]]' % (json_str(name), side(bids), side(asks))
                                 for name, bids, asks in self.coins]) + b"]"
        return (b"[%d,%s]\n" % (self.height, body)) if include_height else body + b"\n"


SnapshotSource = Callable[[], Captured]
MAX_BODY = 1 << 20


class RequestError(Exception):
    """A request the server rejects with 400."""


def parse_request(body: bytes) -> dict[str, Any]:
    """Validate a fileSnapshot request; RequestError with a clear message otherwise."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(f"body is not valid JSON: {exc}") from None
    if not isinstance(req, dict):
        raise RequestError("body must be a JSON object")
    if req.get("type") != "fileSnapshot":
        raise RequestError(f"unsupported request type {req.get('type')!r}; the simulator serves only fileSnapshot")
    inner = req.get("request")
    if not isinstance(inner, dict) or inner.get("type") != "l4Snapshots":
        raise RequestError("fileSnapshot supports only request {\"type\":\"l4Snapshots\", ...}")
    if inner.get("includeTriggerOrders"):
        raise RequestError("includeTriggerOrders=true is not supported by the simulator")
    out = req.get("outPath")
    if not isinstance(out, str) or not os.path.isabs(out):
        raise RequestError("outPath must be an absolute path")
    if not is_private(Path(out).parent):  # no request may have a file written where others can reach
        raise RequestError("outPath must be in a folder of the simulator's user that no one else can use")
    return req


def render(height: int, coins: list[Any], include_users: bool, include_height: bool) -> bytes:
    """The snapshot file's bytes (compact JSON and a newline, as the node writes it)."""
    if not include_users:
        coins = [[coin, [[order for _, order in side] for side in sides]] for coin, sides in coins]
    return orjson.dumps([height, coins] if include_height else coins) + b"\n"


def write_snapshot(req: dict[str, Any], source: SnapshotSource, lock: threading.Lock) -> int:
    """Capture the state under ``lock``, encode it and write it to ``outPath``; returns its height."""
    with lock:
        captured = source()
    inner = req["request"]
    data = captured.encode(bool(inner.get("includeUsers", True)), bool(req.get("includeHeightInOutput", False)))
    out = req["outPath"]
    tmp = f"{out}.tmp{os.getpid()}.{threading.get_ident()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, out)
    except OSError as exc:
        raise RequestError(f"cannot write {out}: {exc.strerror}") from None
    return captured.height


class _Handler(BaseHTTPRequestHandler):
    server: InfoServer

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        if self.path.rstrip("/") != "/info":
            self._reply(404, {"error": f"unknown path {self.path}; POST /info"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise RequestError("body too large")
            body = self.rfile.read(length)
            try:
                decoded = orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                self._text(400, f"Failed to parse the request body as JSON: {exc}")
                return
            if not (isinstance(decoded, dict) and decoded.get("type") == "fileSnapshot"):
                self._node_info(decoded)
                return
            req = parse_request(body)
            height = write_snapshot(req, self.server.source, self.server.lock)
            log.info("fileSnapshot at height %d -> %s", height, req["outPath"])
            self._reply(200, None)
        except (RequestError, ValueError) as exc:
            self.server.errors += 1
            self._reply(400, {"error": str(exc)})
        except Exception as exc:  # a bug must not kill the server
            log.exception("fileSnapshot failed")
            self._reply(500, {"error": f"internal error: {exc}"})

    def _node_info(self, req: Any) -> None:
        """Any other info type, as the node answers it (``node_info``)."""
        if self.server.node_info is None:
            self._text(422, f"Failed to deserialize the JSON body into the target type: unknown variant "
                            f"`{req.get('type') if isinstance(req, dict) else req!r}`")
            return
        try:
            answer = self.server.node_info.answer(req)
        except Refused as exc:
            self.server.errors += 1
            self._text(exc.status, exc.text)
            return
        self._reply(200, answer)

    def _text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._reply(405, {"error": "use POST /info"})

    def _reply(self, code: int, body: Any) -> None:
        data = orjson.dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("%s " + format, self.address_string(), *args)


class InfoServer(ThreadingHTTPServer):
    """``ThreadingHTTPServer`` serving fileSnapshot from ``source`` (a capture: called under ``lock``)
    and, given the simulator (``sim``), the node's other info types (``node_info``)."""

    daemon_threads = True

    def __init__(self, host: str, port: int, source: SnapshotSource, lock: threading.Lock, sim: Simulator | None = None) -> None:
        super().__init__((host, port), _Handler)
        self.source = source
        self.lock = lock
        self.node_info = NodeInfo(sim, lock) if sim is not None else None
        self.errors = 0
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def start(self) -> None:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="nodesim-info", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

"""What `hlbook up` checks before it starts anything: each problem is one line
naming the flag and the fix (``up`` then exits 2 instead of restarting a child
that cannot work)."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from hlbook.common import nodefiles
from hlbook.services.supervisor.pipeline import Pipeline

INFO_URL_TIMEOUT = 2.0


def problems(p: Pipeline) -> list[str]:
    """Everything wrong with ``p`` that would make a child fail (empty: go)."""
    found = []
    if p.mode not in nodefiles.MODES:
        found.append(f"--mode {p.mode}: use by-block (the node's --batch-by-block files) or streaming (--stream-with-block-info)")
    if p.shards < 1 or p.gateways < 1:
        found.append("--shards and --gateways need at least 1")
    if not p.simulate:
        found += _node(p)
    found += _ports(p)
    return found


def _node(p: Pipeline) -> list[str]:
    found = []
    data = Path(p.data_dir or "")
    if not data.is_dir():  # hl/data/ itself may come later: the node creates it when it starts writing
        found.append(f"--data-dir {p.data_dir}: no such directory (give the directory that holds the node's hl/data/, e.g. ~)")
    if p.snapshot_file:
        if not Path(p.snapshot_file).is_file():
            found.append(f"--snapshot-file {p.snapshot_file}: no such file")
    elif not p.info_url:
        found.append("--no-simulate needs --info-url (the node's info server, e.g. http://127.0.0.1:3001/info) or --snapshot-file")
    else:
        problem = _reachable(p.info_url)
        if problem:
            found.append(f"--info-url {p.info_url}: {problem} (is the node running with --serve-info?)")
    return found


def _reachable(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "not an http:// URL"
    try:
        with socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), INFO_URL_TIMEOUT):
            return None
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"


def _ports(p: Pipeline) -> list[str]:
    wanted = [(p.host, p.port + i, f"--port {p.port}" + (f" (gateway {i})" if i else ""), "--port") for i in range(p.gateways)]
    if p.metrics_base_port:
        base = p.metrics_base_port
        wanted += [("127.0.0.1", base + i, f"--metrics-base-port {base}: port {base + i} ({name})", "--metrics-base-port (0: no metrics)")
                   for i, name in [(-1, "history metrics"), (0, "ingest metrics")] + [(1 + k, f"shard {k} metrics") for k in range(p.shards)]
                   if i >= 0 or p.history]
    if p.simulate and p.info_port:
        wanted.append(("127.0.0.1", p.info_port, f"--info-port {p.info_port} (the simulator's info server)", "--info-port"))
    found = []
    for host, port, what, flag in wanted:
        problem = _bindable(host, port)
        if problem:
            found.append(f"{what}: {problem}; pick another with {flag}")
    return found


def _bindable(host: str, port: int) -> str | None:
    if not 0 < port < 65536:
        return "not a port number"
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if os.name != "nt":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and prometheus bind
            sock.bind((host, port))
        return None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "already in use (another hlbook up, or another server)"
        if exc.errno == errno.EACCES:
            return "not allowed (ports below 1024 need root)"
        return exc.strerror or str(exc)

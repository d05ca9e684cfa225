"""Configuration defaults shared by services and the CLI.

Every CLI flag also reads an environment variable ``HLBOOK_<FLAG>`` (see
``env``). Endpoints are ZeroMQ addresses, so services run on one host over
``ipc://``/``tcp://127.0.0.1`` or across hosts over ``tcp://``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import IO

ENV_PREFIX = "HLBOOK_"
DEFAULT_HOST = "127.0.0.1"
INGEST_PUB = "tcp://127.0.0.1:5550"
INGEST_REPLAY = "tcp://127.0.0.1:5551"
HISTORY_PUB = "tcp://127.0.0.1:5560"
HISTORY_QUERY = "tcp://127.0.0.1:5561"
BOOK_BASE_PORT = 5600  # shard k: PUB on base+2k, queries (ROUTER) on base+2k+1
REPLAY_BLOCKS = 1000  # blocks ingest keeps for replay (~67 s at 15 blocks/s)
STATE_DIR = os.path.join(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "hlbook")
CHECKPOINT_DIR = os.path.join(STATE_DIR, "checkpoints")


def env(flag: str) -> str:
    """Environment variable read for a CLI flag: ``data-dir`` -> ``HLBOOK_DATA_DIR``."""
    return ENV_PREFIX + flag.replace("-", "_").upper()


def book_endpoints(shard: int, host: str = DEFAULT_HOST, base_port: int = BOOK_BASE_PORT) -> tuple[str, str]:
    """(pub, query) endpoints of book shard ``shard`` on ``host``."""
    port = base_port + 2 * shard
    return f"tcp://{host}:{port}", f"tcp://{host}:{port + 1}"


def ipc_endpoint(directory: str, name: str) -> str:
    """An ``ipc://`` endpoint in ``directory`` (tests, single-host runs)."""
    return f"ipc://{os.path.join(directory, name)}"


def state_file(state_dir: str | Path, service: str, data_dir: str | Path, mode: str, suffix: str) -> Path:
    """A service's state file for one node's files (``ingest-<key>.json``): several nodes' data
    dirs, or both modes of one, can share a state dir."""
    key = hashlib.sha256(f"{os.path.abspath(data_dir)}\0{mode}".encode()).hexdigest()[:16]
    return Path(state_dir) / f"{service}-{key}{suffix}"


class StateInUse(RuntimeError):
    """Another process holds a state file (two instances on the same node files and state dir)."""


def hold(path: Path) -> IO[str]:
    """Lock ``<path>.lock`` for the life of this process (keep the returned file open)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_name(path.name + ".lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise StateInUse(f"{path} is in use by another process (a second hlbook on the same node files?); "
                         "give this one another --state-dir") from None
    return lock

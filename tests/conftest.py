"""Shared test fixtures: the real mainnet node data of tests/data (see its
README), extracted once per session into a temporary directory (never edited in place)."""

from __future__ import annotations

import os
import socket
import tarfile
import tempfile
from pathlib import Path

import pytest

# ingest's position files (--state-dir) of the processes the tests start go to a scratch folder
os.environ.setdefault("HLBOOK_STATE_DIR", tempfile.mkdtemp(prefix="hlbook-test-state-"))

DATA = Path(__file__).resolve().parent / "data"
BTC_FIXTURE = "mainnet_btc_985148181_985148206.tar.gz"
BTC_NOSNAPSHOT_FIXTURE = "mainnet_btc_978995377_978995416_nosnapshot.tar.gz"


def _extract(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    path = DATA / name
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: the repository's real node data (tests/data) is required")
    target = tmp_path_factory.mktemp(name.split(".")[0])
    with tarfile.open(path) as tar:
        tar.extractall(target, filter="data")
    return target


@pytest.fixture(scope="session")
def btc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data dir of mainnet_btc_985148181_985148206 (hl/data/… and snapshot_985148181.json)."""
    return _extract(tmp_path_factory, BTC_FIXTURE)


@pytest.fixture(scope="session")
def btc_nosnapshot_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data dir of mainnet_btc_978995377_978995416_nosnapshot (hl/data/… only)."""
    return _extract(tmp_path_factory, BTC_NOSNAPSHOT_FIXTURE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

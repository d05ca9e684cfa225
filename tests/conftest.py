"""Shared test fixtures: the real mainnet node data of tests/data (see its
README), extracted once per session into a temporary directory (never edited in place)."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

# ingest's position files (--state-dir) of the processes the tests start go to a scratch folder,
# made by the first process of the run (pytest-xdist's workers inherit it) and removed by it at the end
_STATE_DIR: str | None = None
if "HLBOOK_STATE_DIR" not in os.environ:
    _STATE_DIR = os.environ["HLBOOK_STATE_DIR"] = tempfile.mkdtemp(prefix="hlbook-test-state-")

DATA = Path(__file__).resolve().parent / "data"
BTC_FIXTURE = "mainnet_btc_985148181_985148206.tar.gz"
BTC_NOSNAPSHOT_FIXTURE = "mainnet_btc_978995377_978995416_nosnapshot.tar.gz"


# The long modules (whole process trees, real-time waits: ~10-45 s each on 2 cores), longest first.
# Marked `slow` (`pytest -m "not slow"` is a quick loop while editing; `python3 dev.py test` and CI
# run every test) and collected first, so that under `pytest -n 2 --dist loadfile` (dev.py) the
# short modules fill the two workers' ends instead of one long module running on alone at the end.
LONG = ("test_book_shard.py", "test_up.py", "test_history.py", "test_client_gateway.py", "test_faults.py",
        "test_nodesim.py", "test_l4_live.py", "test_gateway_users.py", "test_readme.py", "test_ingest_live.py",
        "test_streaming_fixture.py", "test_replay.py", "test_past.py",
        "test_gateway.py", "test_book_full.py", "test_gateway_ready.py", "test_ts_sdk.py",
        "test_gateway_polled.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG)}
    for item in items:
        if item.path.name in rank:
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module is kept


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


_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # set alike in every worker of one `pytest -n N` run
_PORTS = Path(tempfile.gettempdir()) / f"hlbook-test-ports-{_RUN}" if _RUN else None
_given: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 that no other call in this test run was given: the
    ports handed out are recorded (under ``pytest -n``, in a file the workers share,
    under a lock), so two tests running at once never get the same one."""
    lock = open(_PORTS, "a+") if _PORTS else None
    try:
        if lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lock.seek(0)
            _given.update(int(line) for line in lock.read().split())
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _given:
                break
        _given.add(port)
        if lock:
            lock.write(f"{port}\n")
        return port
    finally:
        if lock:
            lock.close()  # flushes, then unlocks


def metric_samples(where: int | str, timeout: float = 5.0) -> dict[str, float]:
    """Every sample of a Prometheus ``/metrics`` page (``where``: a port on 127.0.0.1, or a
    ``host:port``), parsed by prometheus_client, keyed ``name{label="value",…}`` (labels in
    the page's order; no braces without labels)."""
    out: dict[str, float] = {}
    for family in _metrics_page(where, timeout):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sample.labels.items())
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def metric(where: int | str, name: str, default: float | None = 0.0, timeout: float = 5.0, **labels: str) -> float | None:
    """Sum of the samples named ``name`` whose labels include ``labels`` (``default`` when there
    are none; also when the page cannot be read, if ``default`` is None)."""
    try:
        families = _metrics_page(where, timeout)
    except OSError:
        if default is None:
            return None
        raise
    values = [sample.value for family in families for sample in family.samples
              if sample.name == name and labels.items() <= sample.labels.items()]
    return sum(values) if values else default


def _metrics_page(where: int | str, timeout: float) -> list[Any]:
    """The metric families of a ``/metrics`` page (``where``: a port on 127.0.0.1, or ``host:port``)."""
    base = f"127.0.0.1:{where}" if isinstance(where, int) else where
    text = urllib.request.urlopen(f"http://{base}/metrics", timeout=timeout).read().decode()
    return list(text_string_to_metric_families(text))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The shared record goes with the first worker to finish: its processes are stopped, and the
    other worker still knows the ports it was given."""
    if _PORTS:
        _PORTS.unlink(missing_ok=True)
    if _STATE_DIR is not None:
        shutil.rmtree(_STATE_DIR, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """pytest removes each run's own folder (``tmp_path_retention_policy``) but leaves the one of
    all runs of this user (``pytest-of-<user>``) behind: removed too when nothing is left in it
    (another run may be using it: then it stays)."""
    if hasattr(config, "workerinput") or config.option.basetemp:
        return
    import getpass

    try:
        (Path(tempfile.gettempdir()) / f"pytest-of-{getpass.getuser()}").rmdir()
    except OSError:
        pass  # not empty, or gone

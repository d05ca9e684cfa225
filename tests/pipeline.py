"""The whole system for tests: ``hlbook up --simulate`` as a real process tree
(simulator, ingest, shards, gateway) on free ports, ZeroMQ over ipc in a
known directory so tests can attach more processes (e.g. a second gateway)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import free_port


class Up:
    def __init__(self, tmp: Path, shards: int = 2, coins: int = 10, seed: int = 5, extra: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.shards = shards
        self.port = free_port()
        self.info_port = free_port()
        self.sockets = tmp / "zmq"
        self.data = tmp / "node"
        self.log = open(tmp / "up.log", "wb")
        args = ["up", "--simulate", "--data-dir", str(self.data), "--shards", str(shards), "--port", str(self.port),
                "--info-port", str(self.info_port), "--coins", str(coins), "--seed", str(seed),
                "--metrics-base-port", "0", "--sockets", str(self.sockets), *(extra or [])]
        self.proc = subprocess.Popen([sys.executable, "-m", "hlbook.cli", *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
        self.extra: list[subprocess.Popen[bytes]] = []

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def sim_info(self) -> str:
        return f"http://127.0.0.1:{self.info_port}/info"

    def gateway_args(self) -> list[str]:
        """Flags that attach another gateway to this pipeline's shards."""
        args = ["--shards", str(self.shards), "--ingest-pub", f"ipc://{self.sockets}/ingest-pub"]
        for k in range(self.shards):
            args += ["--book-pub", f"ipc://{self.sockets}/book-{k}-pub", "--book-query", f"ipc://{self.sockets}/book-{k}-query"]
        return args

    def start_gateway(self, port: int, *flags: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "hlbook.cli", "gateway", "--port", str(port), *self.gateway_args(), *flags],
                                stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.extra.append(proc)
        wait_ready(f"http://127.0.0.1:{port}", proc)
        return proc

    def wait_ready(self, timeout: float = 90.0) -> Up:
        wait_ready(self.http, self.proc, timeout)
        return self

    def stop(self) -> None:
        for proc in [*self.extra, self.proc]:
            stop_group(proc)
        self.log.close()


@contextlib.contextmanager
def running(tmp: Path, ready_timeout: float = 90.0, **kwargs: Any) -> Iterator[Up]:
    """An ``Up`` pipeline, ready; stopped (whole process groups) on exit."""
    pipeline = Up(tmp, **kwargs)
    try:
        yield pipeline.wait_ready(ready_timeout)
    finally:
        pipeline.stop()


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL what is left of it after 15 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:  # the leader or children that outlived it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)


def http_get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body.decode()


def get_from(source: str, url: str) -> tuple[int, bytes]:
    """GET ``url`` from the local address ``source`` (e.g. 127.0.0.2: another client
    address on loopback, with its own per-address connection budget)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def post_info(base: str, payload: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(f"{base}/info", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{proc.args} exited with {proc.returncode}"
        try:
            if http_get(f"{base}/ready")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"{base}/ready never answered 200"
        time.sleep(0.2)


def wait_until(condition: Any, timeout: float, what: str, every: float = 0.1) -> Any:
    """The first truthy value of ``condition()``, polled every ``every`` s; fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(every)

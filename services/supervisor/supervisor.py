"""A small process supervisor for `hlbook up`: starts the services as child
processes, restarts a crashed child with exponential backoff, and stops
everything on SIGTERM/SIGINT (children also get SIGTERM if the supervisor
itself dies, via PR_SET_PDEATHSIG on Linux). A child that fails
``FAILED_STARTS`` times in a row within ``START_WINDOW_S`` of starting cannot
work as configured: everything stops and ``ChildFailed`` carries its last error
line (children's stderr passes through the supervisor, which keeps its tail).
A child killed by a signal did not fail to start (someone killed it), and an
*optional* child (the history service) never stops the others: it is restarted
with backoff as long as it fails, the live feed going on without it."""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TextIO

from hlbook.common.signals import stop_on_signals

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 30.0  # a child up this long has its backoff reset
STOP_GRACE_S = 8.0
START_WINDOW_S = 10.0  # an exit this soon after starting is a failed start
FAILED_STARTS = 3  # failed starts in a row after which `up` gives up
TAIL_LINES = 20
PANEL = "│╭╮╰╯─ "  # the frame of typer's error panels


class ChildFailed(Exception):
    """A child keeps failing at start."""

    def __init__(self, name: str, code: int, last_error: str) -> None:
        super().__init__(f"{name} failed {FAILED_STARTS} times in a row at start (exit code {code}): {last_error}")
        self.name, self.code, self.last_error = name, code, last_error


@dataclass
class ChildSpec:
    name: str
    args: list[str]  # arguments of the `hlbook` command
    optional: bool = False  # the others work without it: its failures never stop them

    @property
    def argv(self) -> list[str]:
        return [sys.executable, "-m", "hlbook.cli", *self.args]


@dataclass
class Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_START_S
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)
    failed_starts: int = 0  # exits within START_WINDOW_S of starting, in a row
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))  # its last stderr lines

    def last_error(self) -> str:
        """The last line of its stderr that says something (a traceback ends with the exception)."""
        tail = [line.strip() for line in self.tail if line.strip()]
        if tail and tail[-1].startswith("╰"):  # typer's error panel: its text, joined
            top = max((i for i, line in enumerate(tail) if line.startswith("╭")), default=0)
            return " ".join(text for text in (line.strip(PANEL) for line in tail[top:]) if text)
        return tail[-1] if tail else "(it printed nothing)"


class Output:
    """Our stderr for `up` and its children's lines, never blocking a writer: lines wait in a
    bounded queue for one writer thread; when whoever reads our stderr stops (a paused terminal,
    a full pipe), lines past ``QUEUED_LINES`` are dropped and counted, and said once it reads
    again. Before, a paused reader stopped every child at its next log line (ingest too)."""

    QUEUED_LINES = 10_000

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lines: queue.Queue[str] = queue.Queue(self.QUEUED_LINES)
        self.dropped = 0
        threading.Thread(target=self._write, daemon=True, name="stderr").start()

    def write(self, text: str) -> int:
        try:
            self.lines.put_nowait(text)
        except queue.Full:
            self.dropped += 1
        return len(text)

    def flush(self) -> None:
        """Lines are written by the writer thread (see :meth:`drain`)."""

    def drain(self, timeout: float = 2.0) -> None:
        """Wait (at most ``timeout``) until what is queued is written: at exit."""
        deadline = time.monotonic() + timeout
        while self.lines.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _write(self) -> None:
        while True:
            text = self.lines.get()
            dropped, self.dropped = self.dropped, 0
            try:
                if dropped:
                    self.stream.write(f"[hlbook up] {dropped} lines of output dropped: stderr was not being read\n")
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):  # closed: nothing more can be said
                pass
            finally:
                self.lines.task_done()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def __getattr__(self, name: str) -> object:  # encoding, fileno…: the stream's
        return getattr(self.stream, name)


def _pass_through(stream: IO[bytes], tail: deque[str]) -> None:
    """Copy a child's stderr to ours, keeping its last lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace")
        tail.append(line)
        sys.stderr.write(line)
        sys.stderr.flush()
    stream.close()


def _child_setup() -> None:
    """Child side, before exec: a process group of its own (a terminal's Ctrl-C reaches the
    supervisor alone, which stops the children: SIGINT in the middle of a child's imports printed
    its KeyboardInterrupt traceback), and SIGTERM when the supervisor dies (Linux only)."""
    os.setpgrp()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Supervisor:
    def __init__(self, specs: list[ChildSpec], env: dict[str, str] | None = None) -> None:
        self.children = [Child(spec) for spec in specs]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.stopping = False

    def start(self, child: Child) -> None:
        preexec = _child_setup if sys.platform.startswith("linux") else None
        child.proc = subprocess.Popen(child.spec.argv, env=self.env, preexec_fn=preexec, stderr=subprocess.PIPE)
        threading.Thread(target=_pass_through, args=(child.proc.stderr, child.tail), daemon=True,
                         name=f"stderr-{child.spec.name}").start()
        child.started_at = time.monotonic()
        child.restart_at = None
        log.info("started %s (pid %d): %s", child.spec.name, child.proc.pid, " ".join(child.spec.args))

    def start_all(self) -> None:
        for child in self.children:
            self.start(child)

    def check(self, now: float | None = None) -> None:
        """Notice exited children and restart them when their backoff has passed."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if child.restart_at is not None:
                if now >= child.restart_at and not self.stopping:
                    child.restarts += 1
                    self.start(child)
                continue
            if child.proc is None or child.proc.poll() is None:
                continue
            code = child.proc.returncode
            child.exit_codes.append(code)
            if now - child.started_at >= STABLE_AFTER_S:
                child.backoff = BACKOFF_START_S
            failed = code > 0 and now - child.started_at < START_WINDOW_S  # killed by a signal: not a failed start
            child.failed_starts = child.failed_starts + 1 if failed else 0
            if child.failed_starts >= FAILED_STARTS and not self.stopping:
                time.sleep(0.2)  # the rest of its stderr
                if not child.spec.optional:
                    raise ChildFailed(child.spec.name, code, child.last_error())
                log.error("%s failed %d times in a row at start (%s); the rest goes on without it, retrying it in %.0f s",
                          child.spec.name, child.failed_starts, child.last_error(), child.backoff)
            log.error("%s exited with %s; restarting in %.1fs", child.spec.name, code, child.backoff)
            child.restart_at = now + child.backoff
            child.backoff = min(child.backoff * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        """SIGTERM every child (newest service first), SIGKILL what outlives the grace period."""
        self.stopping = True
        live = [c.proc for c in reversed(self.children) if c.proc is not None and c.proc.poll() is None]
        for proc in live:
            proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in live:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def run(self, on_tick: Callable[[], None] | None = None, tick_s: float = 1.0) -> None:
        """Supervise until SIGTERM/SIGINT; ``on_tick`` runs every ``tick_s`` (status line)."""

        stop_on_signals(lambda: setattr(self, "stopping", True))
        self.start_all()
        next_tick = time.monotonic()
        try:
            while not self.stopping:
                self.check()
                if on_tick is not None and time.monotonic() >= next_tick:
                    next_tick += tick_s
                    on_tick()
                time.sleep(0.1)
        finally:
            self.stop()

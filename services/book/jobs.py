"""Work on a frozen copy of the shard, in forked children (as Redis does for BGSAVE).

An l4 snapshot of a 51k-order book takes ~100 ms to render, a validation
seconds; the shard's block loop must never stop that long. ``fork()`` gives a
child an exact copy-on-write image of the books at this instant for ~0.5-1 ms
of the parent's time; the child renders (or compares) and streams its result
through a pipe, at a lower CPU priority than the pipeline's processes; the
parent reads the pipe from its poll loop, at most ``READ_BUDGET`` bytes per
iteration, and keeps applying blocks meanwhile.

The child must not touch anything it shares with the parent: ZeroMQ sockets
(their io threads live in the parent), locks held by the parent's other
threads. So it runs with the garbage collector off (no finaliser of a shared
object runs), writes only to its pipe and leaves with ``os._exit``.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hlbook.services.book import metrics

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20  # bytes a pipe buffers (Linux F_SETPIPE_SZ; the default 64 kB costs 16x the reads)
READ_BUDGET = 1 << 20  # bytes read from children per loop iteration (~0.1-0.3 ms of copying)
CHILD_NICENESS = 10
MAX_CHILDREN = 2
_F_SETPIPE_SZ = 1031

MAX_QUEUED = 256  # jobs waiting for a free child; past it ``submit`` refuses

Work = Callable[[], Iterable[bytes]]
Done = Callable[[list[bytes] | None, str | None], None]
Prepare = Callable[[], tuple[Work, Done] | None]  # called right before the fork (None: nothing to do any more)


class JobsBusy(Exception):
    """Every child slot is taken and the queue is full."""


@dataclass
class Job:
    name: str
    pid: int
    fd: int
    done: Done
    started: float = field(default_factory=time.monotonic)
    chunks: list[bytes] = field(default_factory=list)


class Jobs:
    """Forked children and their result pipes (register :meth:`fds` in the poller)."""

    def __init__(self, max_children: int = MAX_CHILDREN, max_queued: int = MAX_QUEUED,
                 ready: Callable[[], bool] = lambda: True) -> None:
        """``ready``: whether a child may be forked now (queued jobs wait until it is)."""
        self.max_children = max_children
        self.max_queued = max_queued
        self.ready = ready
        self.running: dict[int, Job] = {}  # by pipe fd
        self.queued: deque[tuple[str, Prepare]] = deque()

    def __len__(self) -> int:
        return len(self.running)

    def free(self) -> bool:
        return len(self.running) < self.max_children

    def submit(self, name: str, prepare: Prepare) -> None:
        """Run a job as soon as a child slot is free: ``prepare()`` (in this process,
        at fork time) returns the child's work and what to do with its result."""
        if len(self.queued) >= self.max_queued:
            metrics.JOBS.labels(name, "refused").inc()
            raise JobsBusy(f"{len(self.running)} jobs running and {len(self.queued)} queued")
        self.queued.append((name, prepare))
        self.start_queued()

    def start_queued(self) -> None:
        while self.queued and self.free() and self.ready():
            name, prepare = self.queued.popleft()
            prepared = prepare()
            if prepared is None:
                continue
            work, done = prepared
            try:
                self.start(name, work, done)
            except OSError as exc:  # fork or pipe failed (memory, process limit)
                log.error("job %s: cannot fork: %s", name, exc)
                metrics.JOBS.labels(name, "error").inc()
                done(None, f"cannot fork: {exc}")

    def start(self, name: str, work: Work, done: Done) -> Job:
        """Fork a child that writes ``work()``'s chunks to a pipe; ``done(chunks, None)``
        or ``done(None, error)`` runs in this process once the child is finished."""
        if not self.free():
            raise JobsBusy(f"{len(self.running)} jobs running")
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # not Linux, or above /proc/sys/fs/pipe-max-size: the default size works too
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's exit status is what the tests see
            os.close(r)
            _child(work, w)
        os.close(w)
        os.set_blocking(r, False)
        job = self.running[r] = Job(name, pid, r, done)
        metrics.JOBS.labels(name, "started").inc()
        return job

    def fds(self) -> list[int]:
        return list(self.running)

    def read(self, fd: int, budget: int = READ_BUDGET) -> int:
        """Read what child ``fd`` wrote (up to ``budget`` bytes); finish it at EOF. Bytes read."""
        job = self.running.get(fd)
        if job is None:
            return 0
        got = 0
        while got < budget:
            try:
                chunk = os.read(fd, PIPE_SIZE)
            except BlockingIOError:
                return got
            if not chunk:
                self._finish(job)
                return got
            job.chunks.append(chunk)
            got += len(chunk)
        return got

    def _finish(self, job: Job) -> None:
        del self.running[job.fd]
        os.close(job.fd)
        _, status = os.waitpid(job.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - job.started
        metrics.JOB_SECONDS.labels(job.name).observe(seconds)
        if code == 0:
            metrics.JOBS.labels(job.name, "ok").inc()
            job.done(job.chunks, None)
            self.start_queued()
            return
        error = b"".join(job.chunks).decode("utf-8", "replace")[-500:] or f"child exited with {code}"
        metrics.JOBS.labels(job.name, "error").inc()
        log.error("job %s failed after %.2fs: %s", job.name, seconds, error)
        job.done(None, error)
        self.start_queued()

    def close(self) -> None:
        """Stop every child (shutdown)."""
        for job in list(self.running.values()):
            try:
                os.kill(job.pid, 9)
                os.waitpid(job.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(job.fd)
        self.running.clear()
        self.queued.clear()


def _child(work: Work, fd: int) -> None:  # pragma: no cover - runs in the forked child
    gc.disable()
    os.nice(CHILD_NICENESS)  # the pipeline's processes go first; a render may take a little longer
    code = 0
    try:
        os.set_blocking(fd, True)
        for chunk in work():
            _write_all(fd, chunk)
    except BaseException as exc:  # the parent reads the reason from the pipe
        code = 1
        try:
            _write_all(fd, f"\n{type(exc).__name__}: {exc}".encode())
        except OSError:
            pass
    os._exit(code)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]

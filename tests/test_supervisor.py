"""The supervisor behind `hlbook up`, with real child processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from hlbook.services.supervisor.supervisor import ChildFailed, ChildSpec, Supervisor


def ingest_spec(tmp_path: Path, name: str) -> ChildSpec:
    return ChildSpec(name, ["ingest", "--data-dir", str(tmp_path), "--pub", f"ipc://{tmp_path}/{name}-pub",
                            "--replay", f"ipc://{tmp_path}/{name}-replay", "--state-dir", str(tmp_path / name)])


def wait_until(condition, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def handles_sigterm(pid: int) -> bool:
    """The process has installed its SIGTERM handler (a clean stop from then on)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_killed_child_is_restarted_with_backoff_and_stop_leaves_no_process(tmp_path: Path) -> None:
    supervisor = Supervisor([ingest_spec(tmp_path, "a"), ingest_spec(tmp_path, "b")])
    supervisor.start_all()
    try:
        victim, other = supervisor.children
        first_pid = victim.proc.pid
        os.kill(first_pid, signal.SIGKILL)
        wait_until(lambda: (supervisor.check(), victim.restarts == 1)[1])
        assert victim.exit_codes == [-signal.SIGKILL]
        assert victim.proc.pid != first_pid and victim.proc.poll() is None
        assert other.restarts == 0 and other.proc.poll() is None
        assert victim.backoff == 1.0  # doubled from 0.5 s for the next crash
        # both started (a SIGTERM during the imports ends a process with -15, as for any program)
        wait_until(lambda: all(handles_sigterm(c.proc.pid) for c in supervisor.children), 30)
    finally:
        supervisor.stop()
    pids = [c.proc.pid for c in supervisor.children]
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    assert other.proc.returncode == 0 and victim.proc.returncode == 0  # SIGTERM -> clean exit


def test_an_optional_child_failing_at_start_never_stops_the_others(tmp_path: Path) -> None:
    """A required child failing at start three times stops everything (ChildFailed); an optional
    one (history) is retried with backoff while the rest goes on; a child killed by a signal did
    not fail to start."""
    bad = ["ingest", "--data-dir", str(tmp_path), "--mode", "sideways"]  # refused at once
    supervisor = Supervisor([ChildSpec("history", bad, optional=True), ingest_spec(tmp_path, "a")])
    supervisor.start_all()
    try:
        optional, required = supervisor.children
        wait_until(lambda: (supervisor.check(), len(optional.exit_codes) >= 3)[1], 30)
        assert optional.failed_starts == 3 and all(code > 0 for code in optional.exit_codes)
        assert optional.restart_at is not None  # retried, with backoff
        assert required.proc.poll() is None and required.restarts == 0  # never stopped
        for _ in range(3):  # killed three times at once: no failed starts
            pid = required.proc.pid
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: (supervisor.check(), required.proc.pid != pid and required.proc.poll() is None)[1], 30)
        assert required.failed_starts == 0 and required.exit_codes == [-signal.SIGKILL] * 3
    finally:
        supervisor.stop()
    failing = Supervisor([ChildSpec("ingest", bad)])
    failing.start_all()
    try:
        with pytest.raises(ChildFailed, match="ingest failed 3 times in a row at start"):
            wait_until(lambda: (failing.check(), False)[1], 30)
    finally:
        failing.stop()


def test_a_reader_that_stops_reading_our_stderr_blocks_no_child(tmp_path: Path) -> None:
    """`up`'s stderr (its lines and its children's) is written by one thread from a bounded
    queue: a child printing 8 MB while nobody reads finishes at once; the lines that did not fit
    are counted and said when the reader reads again."""
    import subprocess
    import sys
    import threading
    from collections import deque

    from hlbook.services.supervisor import supervisor as module

    read_end, write_end = os.pipe()  # nobody reads it until the end
    output = module.Output(os.fdopen(write_end, "w"))
    saved, sys.stderr = sys.stderr, output  # type: ignore[assignment]
    try:
        chatty = subprocess.Popen([sys.executable, "-c", "import sys\nfor i in range(100_000): print('x' * 80, file=sys.stderr)"],
                                  stderr=subprocess.PIPE)
        tail: deque[str] = deque(maxlen=5)
        relay = threading.Thread(target=module._pass_through, args=(chatty.stderr, tail), daemon=True)
        relay.start()
        assert chatty.wait(20) == 0  # blocked for good before: the pipe to us, then ours, full
        relay.join(10)
        assert not relay.is_alive() and output.dropped > 0 and tail[-1] == "x" * 80 + "\n"
    finally:
        sys.stderr = saved
    deadline = time.monotonic() + 10
    with os.fdopen(read_end, "rb") as reader:  # reading again: what was queued, and the drop said
        seen = b""
        while b"lines of output dropped: stderr was not being read" not in seen:
            assert time.monotonic() < deadline, "the dropped lines were never said"
            seen += os.read(reader.fileno(), 1 << 20)


def test_folders_left_by_a_killed_up_are_removed_by_the_next(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from hlbook.services.supervisor.pipeline import OWNER_FILE, owned_tmpdir, sweep_dead_owners

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left = tmp_path / "hlbook-sim-left"  # a killed `up`'s simulator files
    (left / "hl" / "data").mkdir(parents=True)
    (left / OWNER_FILE).write_text(dead)
    mine = Path(owned_tmpdir("hlbook-zmq-"))  # a running one's (this process)
    unmarked = tmp_path / "hlbook-tmp-unmarked"  # not ours to judge
    unmarked.mkdir()
    assert sweep_dead_owners() == [left]
    assert not left.exists() and mine.exists() and unmarked.exists()

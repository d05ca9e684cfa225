"""`hlbook up` as a user runs it: the README's run command on a clean clone, and
the supervisor with the real system (children killed and restarted, SIGTERM
stopping the whole process tree)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from conftest import free_port
from pipeline import Up, http_get, post_info, stop_group, wait_until

from hlbook.common.topics import shard_of

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- process tree


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, pgid, start time) of a live (non-zombie) process, None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[1]), int(fields[2]), int(fields[19])


def tree(root: int) -> dict[int, int]:
    """pid -> start time of ``root``, its descendants and its process group (a pid
    with its start time names one process even if the pid is reused later)."""
    procs = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    found = {pid for pid, (_, pgid, _) in procs.items() if pgid == root}
    if root in procs:
        found.add(root)
    grew = True
    while grew:
        new = {pid for pid, (ppid, _, _) in procs.items() if ppid in found} - found
        found |= new
        grew = bool(new)
    return {pid: procs[pid][2] for pid in found}


def alive(pids: dict[int, int]) -> list[int]:
    return [pid for pid, start in pids.items() if (s := _stat(pid)) is not None and s[2] == start]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def children(root: int) -> dict[str, int]:
    """Service name (sim, ingest, book-K, gateway) -> pid of hlbook up's live children."""
    named = {}
    for pid in tree(root):
        args = cmdline(pid).split()
        if "hlbook.cli" not in args or pid == root:
            continue
        command = args[args.index("hlbook.cli") + 1]
        if command == "book":
            command = f"book-{args[args.index('--shard') + 1]}"
        named[command] = pid
    return named


def assert_tree_gone(pids: dict[int, int], timeout: float = 15.0) -> None:
    try:
        wait_until(lambda: not alive(pids), timeout, "process tree gone")
    except AssertionError:
        left = alive(pids)
        descriptions = [f"{pid}: {cmdline(pid)}" for pid in left]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"processes left after SIGTERM: {descriptions}") from None


# ----------------------------------------------------------------- WebSocket


def l2_book(ws_url: str, coin: str, timeout: float = 20.0) -> dict[str, Any]:
    """Subscribe to l2Book of ``coin``, check the ack, return the first book with bids and asks."""
    with connect(ws_url, open_timeout=10) as ws:
        ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "l2Book", "coin": coin}}))
        ack = json.loads(ws.recv(timeout=10))
        assert ack["channel"] == "subscriptionResponse", ack
        assert ack["data"]["method"] == "subscribe"
        assert ack["data"]["subscription"] == {"type": "l2Book", "coin": coin, "nSigFigs": None, "mantissa": None}
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message["channel"] == "l2Book" and message["data"]["coin"] == coin:
                bids, asks = message["data"]["levels"]
                if bids and asks:
                    assert float(bids[0]["px"]) < float(asks[0]["px"])
                    return message["data"]
            assert time.monotonic() < deadline, f"no l2Book of {coin} with both sides"


# ----------------------------------------------------------------- the README's run command


def _python3() -> str:
    """The ``python3`` a user would type: the one on PATH outside this test's venv."""
    path = os.environ.get("PATH", "")
    if sys.prefix != sys.base_prefix:
        path = os.pathsep.join(p for p in path.split(os.pathsep) if not p.startswith(sys.prefix))
    return shutil.which("python3", path=path) or getattr(sys, "_base_executable", sys.executable)


@pytest.mark.timeout(300)  # a fresh .venv install: ~15-30 s on the 2-core dev box, more on a cold pip cache
def test_readme_run_command_on_a_clean_clone(tmp_path: Path) -> None:
    """`python3 dev.py up` (README "Two commands") on a fresh clone of the committed HEAD:
    creates .venv, installs, runs `hlbook up` on the simulator; a WebSocket client gets
    an l2Book; SIGTERM to the process group leaves no process behind. Nothing outside
    the clone is needed (no ../shared beside it)."""
    readme = (ROOT / "README.md").read_text()
    assert "python3 dev.py up" in readme
    clone = tmp_path / "hlbook"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (clone / ".venv").exists() and not (tmp_path / "shared").exists()
    port, info_port = free_port(), free_port()
    scratch = Path(tempfile.mkdtemp(prefix="hlup-"))  # TMPDIR: the sim's data and ipc sockets (short paths)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(TMPDIR=str(scratch), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "up.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([_python3(), "dev.py", "up", "--port", str(port), "--info-port", str(info_port),
                                 "--metrics-base-port", "0"],
                                cwd=clone, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    pids: dict[int, int] = {}
    try:
        base = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert proc.poll() is None, f"dev.py up exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            try:
                return http_get(f"{base}/ready")[0] == 200
            except OSError:
                return False

        wait_until(lambda: (clone / ".venv" / ".installed").exists(), 240, "dev.py installed .venv")
        installed = time.monotonic()
        wait_until(ready, 240 - (installed - started), "GET /ready == 200")
        up_ready = time.monotonic()
        print(f"\nclean clone: install {installed - started:.1f} s, then ready {up_ready - installed:.1f} s")

        wait_until(lambda: "hlbook up: ready:" in log_path.read_text(), 10, "the ready line")
        output = log_path.read_text()
        ws_url = f"ws://127.0.0.1:{port}/ws"
        assert re.search(rf"ready: WebSocket {re.escape(ws_url)}; POST http://127.0.0.1:{port}/info; web view http://127.0.0.1:{port}/",
                         output), output[-3000:]
        book = l2_book(ws_url, "BTC")
        assert book["coin"] == "BTC" and book["time"] > 0

        pids = tree(proc.pid)
        names = set(children(proc.pid))
        assert {"sim", "ingest", "book-0", "gateway"} <= names, names
        assert proc.pid in pids  # dev.py exec'd into `hlbook up`: the leader is the supervisor
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text()[-3000:]
        assert_tree_gone(pids)
    finally:
        if proc.poll() is None:
            stop_group(proc)
        for pid in alive(pids):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


# ----------------------------------------------------------------- mistakes: one line, a non-zero exit


def hlbook_up(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hlbook.cli", "up", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, start_new_session=True)


def test_wrong_arguments_are_named_before_anything_starts(tmp_path: Path) -> None:
    result = hlbook_up("--no-simulate", "--data-dir", str(tmp_path / "nowhere"), "--mode", "fast")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert f"hlbook up: --data-dir {tmp_path / 'nowhere'}: no such directory (give the directory that holds the node's hl/data/, e.g. ~)" in lines
    assert any(line.startswith("hlbook up: --mode fast: use by-block") for line in lines)
    assert any("--info-url" in line and "--snapshot-file" in line for line in lines)
    (tmp_path / "node" / "hl" / "data").mkdir(parents=True)
    dead = free_port()  # nothing listens there
    result = hlbook_up("--no-simulate", "--data-dir", str(tmp_path / "node"), "--info-url", f"http://127.0.0.1:{dead}/info",
                       "--port", str(free_port()), "--metrics-base-port", "0")
    assert result.returncode == 2
    assert f"--info-url http://127.0.0.1:{dead}/info: cannot connect" in result.stderr and "--serve-info" in result.stderr


def test_ports_in_use_are_refused_not_shared(tmp_path: Path) -> None:
    """A second instance on the same ports: refused with the flag to change, never cross-talk."""
    import socket

    taken = [socket.socket() for _ in range(2)]
    try:
        for sock in taken:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        http, info = (sock.getsockname()[1] for sock in taken)
        result = hlbook_up("--port", str(http), "--info-port", str(info), "--metrics-base-port", "0")
        assert result.returncode == 2, result.stderr
        assert f"hlbook up: --port {http}: already in use" in result.stderr
        assert f"hlbook up: --info-port {info} (the simulator's info server): already in use" in result.stderr
    finally:
        for sock in taken:
            sock.close()


def test_a_child_failing_at_every_start_stops_up_with_its_error(tmp_path: Path) -> None:
    result = hlbook_up("--port", str(free_port()), "--info-port", str(free_port()), "--metrics-base-port", "0",
                       "--sockets", str(tmp_path / "zmq"), env={"HLBOOK_QUEUE_SIZE": "many"}, timeout=90)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hlbook up: gateway-0 failed 3 times in a row at start (exit code 2):"), last
    assert "--queue-size" in last and "HLBOOK_QUEUE_SIZE" in last


def test_a_second_ingest_on_the_same_state_is_refused(tmp_path: Path) -> None:
    (tmp_path / "node" / "hl" / "data").mkdir(parents=True)

    def ingest(name: str) -> list[str]:
        return [sys.executable, "-m", "hlbook.cli", "ingest", "--data-dir", str(tmp_path / "node"), "--state-dir", str(tmp_path / "state"),
                "--pub", f"ipc://{tmp_path}/{name}-pub", "--replay", f"ipc://{tmp_path}/{name}-replay"]

    first = subprocess.Popen(ingest("a"), stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: list((tmp_path / "state").glob("ingest-*.json.lock")), 20, "the first ingest's lock")
        second = subprocess.run(ingest("b"), capture_output=True, text=True, timeout=30)
        assert second.returncode == 2
        assert "is in use by another process (a second hlbook on the same node files?)" in second.stderr
        assert first.poll() is None
    finally:
        stop_group(first)


# ----------------------------------------------------------------- supervisor with the real system


def shard_height(base: str, shard: int) -> int:
    status, body = http_get(f"{base}/ready")
    if not isinstance(body, dict):
        return -1
    entry = body["shards"][shard]
    return entry["height"] if status == 200 and entry["live"] else -1


@pytest.fixture
def up(tmp_path: Path):  # type: ignore[no-untyped-def]
    system = Up(tmp_path, shards=2, coins=10).wait_ready()
    yield system
    system.stop()


def test_killed_shard_and_gateway_are_restarted_and_serve_again(up: Up) -> None:
    def shard_0_perp() -> str | None:  # a coin has a mid once its simulated book has both sides
        status, mids = post_info(up.http, {"type": "allMids"})
        assert status == 200
        return next((c for c in sorted(mids) if shard_of(c, 2) == 0 and not c.startswith("@")), None)

    coin = wait_until(shard_0_perp, 30, "a perp of shard 0 has a mid")
    started = (up.tmp / "up.log").read_text()
    assert " ERROR " not in started and "exited" not in started, started[-3000:]  # a clean start: no child failed
    first = children(up.proc.pid)
    assert {"sim", "ingest", "book-0", "book-1", "gateway"} <= set(first), first
    # the lag from block time, and hlbook's part of it from the node's write (the simulator writes ~0.3 s after block time)
    body = http_get(f"{up.http}/ready")[1]
    assert body["delay_s"] is not None and 0 <= body["delay_s"] < body["lag_s"] - 0.1, body

    # a book shard: SIGKILL, restarted, its books live again (height moves on past the kill), l2Book served
    before = wait_until(lambda: max(shard_height(up.http, 0), 0), 30, "shard 0 live")
    os.kill(first["book-0"], signal.SIGKILL)
    new_shard = wait_until(lambda: (p := children(up.proc.pid).get("book-0")) not in (None, first["book-0"]) and p,
                           15, "book-0 restarted")
    wait_until(lambda: shard_height(up.http, 0) > before + 5, 45, "restarted shard 0 publishes blocks")
    assert http_get(f"{up.http}/ready")[0] == 200
    assert l2_book(up.ws, coin)["coin"] == coin
    after_shard = children(up.proc.pid)
    assert after_shard["book-0"] == new_shard
    assert {n: after_shard[n] for n in ("sim", "ingest", "book-1", "gateway")} == \
        {n: first[n] for n in ("sim", "ingest", "book-1", "gateway")}, "only the killed child restarts"

    # the gateway: SIGKILL, restarted on the same port, ready, serves l2Book of both shards
    os.kill(first["gateway"], signal.SIGKILL)
    wait_until(lambda: (p := children(up.proc.pid).get("gateway")) not in (None, first["gateway"]) and p,
               15, "gateway restarted")

    def ready() -> bool:
        try:
            return http_get(f"{up.http}/ready")[0] == 200
        except OSError:
            return False

    wait_until(ready, 45, "restarted gateway ready")
    assert l2_book(up.ws, coin)["coin"] == coin
    assert l2_book(up.ws, "BTC")["coin"] == "BTC"
    assert up.proc.poll() is None


def test_sigterm_to_hlbook_up_stops_every_process(up: Up) -> None:
    # a restarted child is part of the tree too
    victim = children(up.proc.pid)["book-1"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: children(up.proc.pid).get("book-1") not in (None, victim), 15, "book-1 restarted")
    pids = tree(up.proc.pid)
    assert len(pids) >= 6, [cmdline(p) for p in pids]  # up, sim, ingest, 2 shards, gateway
    os.kill(up.proc.pid, signal.SIGTERM)  # the supervisor alone, not the group
    assert up.proc.wait(20) == 0
    assert_tree_gone(pids)


def test_ctrl_c_in_the_first_second_is_quiet(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the terminal's foreground process group) while the children are still
    importing: `up` stops them, and no child prints a KeyboardInterrupt traceback (they used to
    share up's group and get the SIGINT too)."""
    proc = subprocess.Popen([sys.executable, "-m", "hlbook.cli", "up", "--port", str(free_port()), "--info-port", str(free_port()),
                             "--metrics-base-port", "0", "--sockets", str(tmp_path / "zmq")],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(0.7)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert proc.returncode == 0


def perps(up: Up) -> tuple[str, str]:
    """A perp of shard 0 and one of shard 1 (of 2), once each has a mid."""
    def perp_of(shard: int) -> str | None:
        mids = post_info(up.http, {"type": "allMids"})[1]
        return next((c for c in sorted(mids) if shard_of(c, 2) == shard and not c.startswith("@")), None)

    return wait_until(lambda: perp_of(0), 30, "a coin of shard 0"), wait_until(lambda: perp_of(1), 30, "a coin of shard 1")


def wait_silent(up: Up, shard: int) -> dict[str, Any]:
    """/ready's body once it says ``shard`` is not live (its 5 s without a message passed)."""
    return wait_until(lambda: (body := http_get(f"{up.http}/ready")[1])["shards"][shard]["live"] is False and body,
                      12, f"shard {shard} seen silent")


def test_a_stopped_shard_is_said_stale_for_its_coins_alone(up: Up) -> None:
    """SIGSTOP of one shard: its coins' book subscribers are told once that the book may be
    stale, and allMids subscribers that its coins' mids are not updated; /info l2Book of its
    coins answers 503 instead of an old book (also right after SIGCONT, while the shard answers
    the queries it held), the other shard's coins go on."""
    stopped, other = perps(up)
    shard = children(up.proc.pid)["book-0"]
    with connect(up.ws, open_timeout=10) as ws:
        for coin in (stopped, other):
            ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "l2Book", "coin": coin}}))
        ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "allMids"}}))
        os.kill(shard, signal.SIGSTOP)
        try:
            said: list[str] = []
            other_books = 0
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline and len(said) < 2:
                message = json.loads(ws.recv(timeout=12))
                if message["channel"] == "error":
                    said.append(message["data"])
                elif message["channel"] == "l2Book" and message["data"]["coin"] == other:
                    other_books += 1
            said.sort()
            assert len(said) == 2 and said[1].startswith(f"l2Book {stopped}: no update for") and "stale" in said[1], said
            named = said[0].split("(", 1)[1].split(")", 1)[0].split(", ")  # 10 coins, 5 a shard: all named
            assert said[0].startswith("allMids: the mids of") and stopped in named and other not in named, said
            assert other_books > 0
            with connect(up.ws, open_timeout=10) as late:  # a new allMids subscriber is told at once
                late.send(json.dumps({"method": "subscribe", "subscription": {"type": "allMids"}}))
                channels = [json.loads(late.recv(timeout=5))["channel"] for _ in range(2)]
                assert "error" in channels, channels
            status, body = post_info(up.http, {"type": "l2Book", "coin": stopped})
            assert status == 503 and "silent" in str(body), (status, body)
            assert post_info(up.http, {"type": "l2Book", "coin": other})[0] == 200
        finally:
            os.kill(shard, signal.SIGCONT)
        newest = time.time() * 1000
        for _ in range(20):  # right after: an old book is never a 200
            status, body = post_info(up.http, {"type": "l2Book", "coin": stopped})
            if status == 200:
                assert body["time"] > newest - 6000, "a book from before the stop passed off as current"
                break
            time.sleep(0.25)
        else:
            raise AssertionError("the shard's coin never answered again after SIGCONT")


def test_ready_stays_200_and_names_a_stopped_shards_coins_stale(up: Up) -> None:
    """SIGSTOP of one shard of two: /ready stays 200 for the server (the other shard's coins are
    served), lists the stopped shard's coins in ``stale_coins`` and answers 503 for them alone
    with ``?coin=``; ``?fresh=1`` (monitoring) answers 503 while a shard is not live."""
    stopped, other = perps(up)
    shard = children(up.proc.pid)["book-0"]
    os.kill(shard, signal.SIGSTOP)
    try:
        wait_silent(up, 0)
        status, body = http_get(f"{up.http}/ready")
        assert status == 200 and body["ready"], (status, body)
        assert stopped in body["stale_coins"] and all(shard_of(c, 2) == 0 for c in body["stale_coins"]), body
        assert body["shards"][0]["silent_s"] > 5 and body["shards"][1]["live"] and body["shards"][1]["silent_s"] is None, body
        assert http_get(f"{up.http}/ready?coin={stopped}")[0] == 503
        assert http_get(f"{up.http}/ready?coin={other}")[0] == 200
        assert http_get(f"{up.http}/ready?fresh=1")[0] == 503
        assert http_get(f"{up.http}/ready?coin=NOSUCHCOIN")[0] == 404
    finally:
        os.kill(shard, signal.SIGCONT)
    wait_until(lambda: http_get(f"{up.http}/ready?coin={stopped}")[0] == 200, 20, f"{stopped} ready again")
    wait_until(lambda: http_get(f"{up.http}/ready?fresh=1")[0] == 200, 10, "every coin fresh again")
    assert http_get(f"{up.http}/ready")[1]["stale_coins"] == []



def test_a_new_l4book_subscriber_of_a_stale_coin_is_told_at_once(up: Up) -> None:
    """A new l4Book subscriber of a stopped shard's coin gets the stale-book error at once
    (it waited silently until the shard came back), no snapshot while the shard is stopped,
    then the snapshot once it is back."""
    stopped, _ = perps(up)
    shard = children(up.proc.pid)["book-0"]
    os.kill(shard, signal.SIGSTOP)
    try:
        wait_silent(up, 0)
        with connect(up.ws, open_timeout=10) as ws:
            ws.send(json.dumps({"method": "subscribe", "subscription": {"type": "l4Book", "coin": stopped}}))
            assert json.loads(ws.recv(timeout=5))["channel"] == "subscriptionResponse"
            told = json.loads(ws.recv(timeout=3))
            assert told["channel"] == "error" and told["data"].startswith(f"l4Book {stopped}: no update for"), told
            assert "stale" in told["data"], told
            try:
                more = ws.recv(timeout=1)
            except TimeoutError:
                more = None
            assert more is None, f"while the shard is stopped: {str(more)[:300]}"  # nothing passed off as the book
            os.kill(shard, signal.SIGCONT)
            message = json.loads(ws.recv(timeout=20))
            assert message["channel"] == "l4Book" and message["data"]["Snapshot"]["coin"] == stopped, str(message)[:300]
            assert any(message["data"]["Snapshot"]["levels"]), "an empty snapshot"
    finally:
        os.kill(shard, signal.SIGCONT)

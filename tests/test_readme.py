"""Every snippet of README.md and client/README.md runs as written, against a
running ``hlbook up --simulate`` (its port put in place of 8000):

- each ``python`` block is a script that runs (no top-level ``await``), prints,
  and shows no traceback within its time (scripts that stream run until then);
- each line of each ``sh`` block is recognised: ``hlbook`` commands parse with
  the real CLI (and ``client``/``--version``/``--help`` run), ``python
  examples/…`` run, the JSON lines typed into websocat each get an answer that
  is not an error; a line this test does not know fails it (so new snippets
  get checked too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import typer.main
import websockets

from hlbook import cli
from pipeline import Up, running

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "client" / "README.md"]
BLOCK = re.compile(r"^( *)```(\w+)\n(.*?)^\1```", re.S | re.M)
SCRIPT_SECONDS = 12.0  # streaming snippets are stopped after this long
COMMANDS = typer.main.get_command(cli.app).commands
SKIPPED = (  # run elsewhere: the two top commands by CI and this fixture, the containers by tests/test_deploy.py
    "python3 dev.py up", "python3 dev.py test", "docker compose ", ". .venv/bin/activate",
)


def blocks(language: str) -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for match in BLOCK.finditer(doc.read_text()):
            if match.group(2) == language:
                found.append((f"{doc.name}:{doc.read_text()[: match.start()].count(chr(10)) + 1}", match.group(3)))
    return found


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with running(tmp_path_factory.mktemp("readme"), shards=1, coins=8, seed=4) as pipeline:
        yield pipeline


def local(text: str, up: Up) -> str:
    return text.replace("127.0.0.1:8000", f"127.0.0.1:{up.port}").replace("localhost:8000", f"127.0.0.1:{up.port}")


def run_for(argv: list[str], seconds: float, env: dict[str, str] | None = None) -> tuple[int | None, str, str]:
    """(exit code or None when still running at ``seconds``, stdout, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, start_new_session=True,
                            env={**os.environ, **(env or {})})
    try:
        out, err = proc.communicate(timeout=seconds)
        return proc.returncode, out.decode(), err.decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        return None, out.decode(), err.decode()


def sh_lines() -> list[tuple[str, str]]:
    lines = []
    for where, text in blocks("sh"):
        for line in text.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command:
                lines.append((where, command))
    return lines


def runs_of(up: Up, scripts: Path) -> dict[tuple[str, str], Callable[[], tuple[int | None, str, str]]]:
    """(where, snippet or shell line) -> the run that the tests below check: each python
    snippet for SCRIPT_SECONDS, the shell lines that start a process as this test runs them."""
    runs: dict[tuple[str, str], Callable[[], tuple[int | None, str, str]]] = {}
    for i, (where, code) in enumerate(blocks("python")):
        script = scripts / f"snippet{i}.py"
        script.write_text(local(code, up))
        runs[where, code] = functools.partial(run_for, [sys.executable, str(script)], SCRIPT_SECONDS)
    for where, line in sh_lines():
        argv = shlex.split(line)
        if line.startswith("python examples/"):
            runs[where, line] = functools.partial(run_for, [sys.executable, *argv[1:], "--url", up.ws], 30)
        elif argv[:2] in (["hlbook", "--version"], ["hlbook", "--help"]):
            runs[where, line] = functools.partial(run_for, [sys.executable, "-m", "hlbook.cli", *argv[1:]], 30)
        elif argv[:2] == ["hlbook", "client"]:
            runs[where, line] = functools.partial(run_for, [sys.executable, "-m", "hlbook.cli", *argv[1:]], 8,
                                                  env={"HLBOOK_URL": up.ws})
    return runs


@pytest.fixture(scope="module")
def started(up: Up, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Future[tuple[int | None, str, str]]]]:
    """Every run of ``runs_of``, started at once (they stream for seconds: side by side, the
    module takes the longest one's time, not their sum); each test checks its own runs' results."""
    runs = runs_of(up, tmp_path_factory.mktemp("snippets"))
    with concurrent.futures.ThreadPoolExecutor(len(runs) or 1) as pool:
        yield {key: pool.submit(run) for key, run in runs.items()}


@pytest.mark.parametrize("where, code", blocks("python"), ids=lambda v: v if ":" in str(v) else "")
def test_python_snippets_run(where: str, code: str, started: dict[tuple[str, str], Future[tuple[int | None, str, str]]]) -> None:
    compile(code, where, "exec")  # a top-level await is a SyntaxError in a script
    code_, out, err = started[where, code].result()  # the snippet, its port replaced, run for SCRIPT_SECONDS
    assert "Traceback" not in err and code_ in (0, None), f"{where}: exit {code_}\n{err[-2000:]}"
    assert out.strip(), f"{where}: printed nothing"


def test_every_shell_line_is_known_and_works(up: Up, started: dict[tuple[str, str], Future[tuple[int | None, str, str]]]) -> None:
    typed: list[str] = []
    for where, line in sh_lines():
        if line.startswith(SKIPPED):
            continue
        if line.startswith("{"):  # typed into websocat
            typed.append(line)
        elif line.startswith("websocat ") or line.startswith("wscat "):
            assert "ws://127.0.0.1:8000/ws" in line, f"{where}: {line}"
        elif line.startswith("hlbook "):
            check_hlbook(where, shlex.split(line)[1:], started.get((where, line)))
        elif line.startswith("python examples/"):
            code, out, err = started[where, line].result()  # run with --url of this test's gateway
            assert code == 0 and "Traceback" not in err and out.strip(), f"{where}: {line}: exit {code}\n{err[-2000:]}"
        else:
            pytest.fail(f"{where}: this test does not know how to check `{line}`")
    assert typed, "the websocat lines were not found"
    answers = asyncio.run(send_typed(up.ws, typed))
    for line, answer in zip(typed, answers):
        assert answer.get("channel") not in (None, "error"), f"{line} -> {answer}"


def check_hlbook(where: str, args: list[str], run: Future[tuple[int | None, str, str]] | None) -> None:
    if args[:1] in (["--version"], ["--help"]):
        assert run is not None
        code, out, err = run.result()
        assert code == 0 and out.strip(), f"{where}: hlbook {args}: {err[-500:]}"
        return
    name = args[0]
    assert name in COMMANDS, f"{where}: hlbook {name} is no command"
    try:
        COMMANDS[name].make_context(name, args[1:])
    except Exception as exc:
        pytest.fail(f"{where}: hlbook {shlex.join(args)}: {exc}")
    if name == "client":
        assert run is not None
        code, out, err = run.result()  # with HLBOOK_URL of this test's gateway, stopped after 8 s
        assert code is None and "Traceback" not in err and out.strip(), f"{where}: hlbook {args}: exit {code}\n{err[-1000:]}"


async def send_typed(url: str, lines: list[str]) -> list[dict[str, Any]]:
    """The first answer to each line (an ack, a post response or a pong), in order."""
    answers = []
    async with websockets.connect(url) as ws:
        for line in lines:
            await ws.send(line)
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if message.get("channel") in ("subscriptionResponse", "post", "pong", "error"):
                    answers.append(message)
                    break
    return answers

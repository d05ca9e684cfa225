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
import json
import os
import re
import shlex
import signal
import subprocess
import sys
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


@pytest.mark.parametrize("where, code", blocks("python"), ids=lambda v: v if ":" in str(v) else "")
def test_python_snippets_run(where: str, code: str, up: Up, tmp_path: Path) -> None:
    compile(code, where, "exec")  # a top-level await is a SyntaxError in a script
    script = tmp_path / "snippet.py"
    script.write_text(local(code, up))
    code_, out, err = run_for([sys.executable, str(script)], SCRIPT_SECONDS)
    assert "Traceback" not in err and code_ in (0, None), f"{where}: exit {code_}\n{err[-2000:]}"
    assert out.strip(), f"{where}: printed nothing"


def sh_lines() -> list[tuple[str, str]]:
    lines = []
    for where, text in blocks("sh"):
        for line in text.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command:
                lines.append((where, command))
    return lines


def test_every_shell_line_is_known_and_works(up: Up) -> None:
    typed: list[str] = []
    for where, line in sh_lines():
        if line.startswith(SKIPPED):
            continue
        if line.startswith("{"):  # typed into websocat
            typed.append(line)
        elif line.startswith("websocat ") or line.startswith("wscat "):
            assert "ws://127.0.0.1:8000/ws" in line, f"{where}: {line}"
        elif line.startswith("hlbook "):
            check_hlbook(where, shlex.split(line)[1:], up)
        elif line.startswith("python examples/"):
            argv = shlex.split(line)
            code, out, err = run_for([sys.executable, *argv[1:], "--url", up.ws], 30)
            assert code == 0 and "Traceback" not in err and out.strip(), f"{where}: {line}: exit {code}\n{err[-2000:]}"
        else:
            pytest.fail(f"{where}: this test does not know how to check `{line}`")
    assert typed, "the websocat lines were not found"
    answers = asyncio.run(send_typed(up.ws, typed))
    for line, answer in zip(typed, answers):
        assert answer.get("channel") not in (None, "error"), f"{line} -> {answer}"


def check_hlbook(where: str, args: list[str], up: Up) -> None:
    if args[:1] in (["--version"], ["--help"]):
        code, out, err = run_for([sys.executable, "-m", "hlbook.cli", *args], 30)
        assert code == 0 and out.strip(), f"{where}: hlbook {args}: {err[-500:]}"
        return
    name = args[0]
    assert name in COMMANDS, f"{where}: hlbook {name} is no command"
    try:
        COMMANDS[name].make_context(name, args[1:])
    except Exception as exc:
        pytest.fail(f"{where}: hlbook {shlex.join(args)}: {exc}")
    if name == "client":
        code, out, err = run_for([sys.executable, "-m", "hlbook.cli", *args], 8, env={"HLBOOK_URL": up.ws})
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

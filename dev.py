#!/usr/bin/env python3
"""Fresh-machine entry point: needs only python3.

    python3 dev.py up     # the whole system on the node simulator (hlbook up --simulate)
    python3 dev.py test   # the test suite

Creates ./.venv and installs the project into it when pyproject.toml changed
since the last install: the server's dependencies for ``up``, with the test
extras (ccxt, the official SDK, pytest) for ``test``. Extra arguments go to the
command (``python3 dev.py up --shards 4``, ``python3 dev.py test -k history``).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def ensure_venv(extras: str) -> None:
    """The venv with the project installed (``extras``: "" or "test"; a test install serves ``up`` too)."""
    stamp = VENV / ".installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    done = stamp.read_text().split() if stamp.exists() else []
    if done[:1] == [digest] and (not extras or extras in done[1:]):
        return
    if not (BIN / "python").exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    target = f"{ROOT}[{extras}]" if extras else str(ROOT)
    print(f"dev.py: installing hlbook{f' with its {extras} extras' if extras else ''} into {VENV} "
          "(the first time takes a minute or two)", flush=True)
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", target], check=True)
    stamp.write_text(" ".join([digest, extras] if extras else [digest]))
    print("dev.py: installed", flush=True)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("up", "test"):
        print(__doc__)
        return 2
    command, extra = sys.argv[1], sys.argv[2:]
    ensure_venv("test" if command == "test" else "")
    if command == "up":
        argv = [str(BIN / "hlbook"), "up", *(extra or ["--simulate"])]
    else:
        argv = [str(BIN / "python"), "-m", "pytest", *extra]
        if not os.path.exists("/usr/bin/chromium"):
            print("dev.py: tests/test_webview.py drives Debian's Chromium, which is missing here: "
                  "apt-get install -y --no-install-recommends chromium", flush=True)
    os.chdir(ROOT)
    sys.stdout.flush()
    # Replace this process, so that SIGTERM/SIGINT reach `hlbook up` (whose
    # supervisor stops its children) instead of killing dev.py and orphaning it.
    os.execv(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fresh-machine entry point: needs only python3.

    python3 dev.py up     # the whole system on the node simulator (hlbook up --simulate)
    python3 dev.py test   # the test suite

Creates ./.venv and installs the project (with test extras) when pyproject.toml
changed since the last install. Extra arguments go to the command.
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


def ensure_venv() -> None:
    stamp = VENV / ".installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    stamp.write_text(digest)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("up", "test"):
        print(__doc__)
        return 2
    ensure_venv()
    command, extra = sys.argv[1], sys.argv[2:]
    if command == "up":
        argv = [str(BIN / "hlbook"), "up", *(extra or ["--simulate"])]
    else:
        argv = [str(BIN / "python"), "-m", "pytest", *extra]
    os.chdir(ROOT)
    sys.stdout.flush()
    # Replace this process, so that SIGTERM/SIGINT reach `hlbook up` (whose
    # supervisor stops its children) instead of killing dev.py and orphaning it.
    os.execv(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())

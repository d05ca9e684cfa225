#!/usr/bin/env python3
"""Fresh-machine entry point: needs only python3.

    python3 dev.py up     # the whole system on the node simulator (hlbook up --simulate)
    python3 dev.py test   # the type check, then the test suite
    python3 dev.py check  # the type check alone (mypy, as pyproject's [tool.mypy] says)

Creates ./.venv and installs the project into it when pyproject.toml changed
since the last install: the server's dependencies for ``up``, with the test
extras (ccxt, the official SDK, pytest, mypy) for ``test`` and ``check``. Extra
arguments go to the command (``python3 dev.py up --shards 4``,
``python3 dev.py test -k history``, ``python3 dev.py check --no-incremental``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tomllib
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


def link_packages() -> dict[str, str]:
    """Link pyproject's package-dir folders into .venv/mypy-path under their import names
    (hlbook/common -> common/, ...), where [tool.mypy] finds them: mypy can neither map
    the folders itself nor follow the editable install's import hook. Returns each
    link's path prefix -> its folder's, to name the real files in mypy's report."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    tree = VENV / "mypy-path"
    shutil.rmtree(tree, ignore_errors=True)  # unlinks the links, never follows them
    prefixes: dict[str, str] = {}
    for name, folder in sorted(package_dir.items()):
        link, source = tree.joinpath(*name.split(".")), ROOT / folder
        if any(other.startswith(name + ".") for other in package_dir):  # a parent: link its entries
            link.mkdir(parents=True)
            for entry in source.iterdir():
                if entry.name != "__pycache__":
                    (link / entry.name).symlink_to(entry)
        else:
            link.symlink_to(source, target_is_directory=True)
        prefixes[f"{link.relative_to(ROOT)}/"] = f"{folder}/"
    return dict(sorted(prefixes.items(), key=lambda item: -len(item[0])))  # the deepest first


def typecheck(extra: list[str]) -> int:
    """mypy over the package; its exit status."""
    prefixes = link_packages()
    result = subprocess.run([str(BIN / "python"), "-m", "mypy", *extra], cwd=ROOT, capture_output=True, text=True)
    report = result.stdout + result.stderr
    for link, folder in prefixes.items():
        report = report.replace(link, folder)
    print(report, end="", flush=True)
    return result.returncode


CHROMIUM_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]


def ensure_chromium() -> bool:
    """tests/test_webview.py drives Debian's Chromium: installed here when missing and run as
    root (apt-get), else the one command to run is said and the tests do not start."""
    if os.path.exists("/usr/bin/chromium"):
        return True
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("dev.py: installing Debian's Chromium for tests/test_webview.py (apt-get)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        if subprocess.run([*CHROMIUM_INSTALL, "-qq"], check=False).returncode == 0 and os.path.exists("/usr/bin/chromium"):
            return True
    print("dev.py: tests/test_webview.py drives Debian's Chromium, which is missing here; install it with:\n"
          f"    sudo {' '.join(CHROMIUM_INSTALL)}\n"
          "(or run the other tests: python3 dev.py test --deselect tests/test_webview.py::test_web_view_in_chromium)", flush=True)
    return False


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("up", "test", "check"):
        print(__doc__)
        return 2
    command, extra = sys.argv[1], sys.argv[2:]
    ensure_venv("" if command == "up" else "test")
    if command == "check":
        return typecheck(extra)
    if command == "test":
        status = typecheck([])
        if status:
            print("dev.py: mypy found type errors (above), so the tests did not run "
                  "(.venv/bin/python -m pytest runs them alone)", flush=True)
            return status
    if command == "up":
        argv = [str(BIN / "hlbook"), "up", *(extra or ["--simulate"])]
    else:
        # two test processes (pytest-xdist), whole files to each (a module's fixture, e.g. a started
        # pipeline, is started once), in the order collected (tests/conftest.py: the long modules
        # first): about half the time on CI's 2 cores. `-n 0` runs the tests in one process.
        parallel = [] if "no:xdist" in extra else ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder"]
        argv = [str(BIN / "python"), "-m", "pytest", *parallel, *extra]
        if not ensure_chromium():
            return 1
    os.chdir(ROOT)
    sys.stdout.flush()
    # Replace this process, so that SIGTERM/SIGINT reach `hlbook up` (whose
    # supervisor stops its children) instead of killing dev.py and orphaning it.
    os.execv(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())

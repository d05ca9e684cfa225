"""hlbook's folder in the temporary directory is its user's alone: one planted by someone
else (or left open to others) is never used for the shards' shared snapshot and lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hlbook.common.private import is_private, private_dir
from hlbook.services.book import snapshot


def test_the_folder_is_made_private_and_a_planted_one_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() reads TMPDIR again
    mine = private_dir()
    assert mine == tmp_path / f"hlbook-{os.getuid()}" and is_private(mine) and mine.stat().st_mode & 0o777 == 0o700
    latest, _, lock = snapshot.shared_paths("http://127.0.0.1:3001/info")
    assert latest.parent == mine and lock.parent == mine

    mine.rmdir()
    mine.mkdir()
    mine.chmod(0o777)  # as another local user could leave it: open to all
    fallback = private_dir()
    assert fallback != mine and is_private(fallback) and fallback.parent == tmp_path
    fallback.rmdir()
    mine.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    mine.symlink_to(tmp_path / "elsewhere")  # a link to a folder of someone else's choosing
    assert not is_private(mine) and private_dir() != mine


def test_the_folder_is_removed_by_whoever_leaves_it_empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A standalone shard's snapshot fetch leaves no folder behind (nothing else in it)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)

    class Node(BaseHTTPRequestHandler):  # a node's info server: writes the file it is asked for
        def do_POST(self) -> None:  # noqa: N802
            import json

            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            Path(body["outPath"]).write_bytes(b"[1,[]]\\n")
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Node)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/info"
        with snapshot.fetch(url) as fh:
            assert fh.read() == b"[1,[]]\\n"
        assert list(tmp_path.iterdir()) == []
        fh, shared = snapshot.fetch_shared(url, "shard 0 of 1")
        with fh:
            assert fh.read() == b"[1,[]]\\n" and not shared and list(tmp_path.iterdir()) == [private_dir()]
        snapshot.remove_shared(url, "shard 0 of 1")
        assert list(tmp_path.iterdir()) == []
    finally:
        server.shutdown()


def test_a_fetch_whose_shard_was_killed_is_swept_by_the_next(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left = tmp_path / f"{snapshot.FETCHING}{dead}-abc.json"  # the node was writing it when its shard was killed
    left.write_bytes(b"[1,")
    mine = tmp_path / f"{snapshot.FETCHING}{os.getpid()}-def.json"  # a fetch in flight
    mine.write_bytes(b"")
    snapshot.sweep_dead_fetches(str(tmp_path))
    assert not left.exists() and mine.exists()

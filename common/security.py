"""ZeroMQ CURVE: with ``--curve-dir``, every hlbook socket is authenticated and encrypted.

On one host the default ``ipc://`` endpoints are protected by the file system;
across hosts (``tcp://``) anyone who reaches a port could read every user's
events or ask for replays, so the processes then share keys (``hlbook keys DIR``
writes them):

- ``DIR/server.key_secret``: the binders' (ingest, shards) key pair;
- ``DIR/client.key_secret``: the connectors' (shards, gateways) key pair;
- ``DIR/authorized/*.key``: the public keys a binder accepts (``client.key``
  to begin with; add one per other client, remove one to lock it out).

A binder runs pyzmq's ZAP handler (a thread) that admits only the authorized
keys; a connection without them never completes its handshake.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


class Curve:
    """The key pairs of one installation (``DIR`` as ``hlbook keys`` wrote it)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.server_public, self.server_secret = zmq.auth.load_certificate(self.directory / "server.key_secret")
        self.client_public, self.client_secret = zmq.auth.load_certificate(self.directory / "client.key_secret")
        self.authorized = self.directory / "authorized"
        if self.server_secret is None or self.client_secret is None or not self.authorized.is_dir():
            raise ValueError(f"{self.directory}: the secret keys and an authorized/ folder are needed (hlbook keys DIR)")
        self.authenticators: list[ThreadAuthenticator] = []

    @classmethod
    def from_dir(cls, directory: str | None) -> Curve | None:
        return cls(directory) if directory else None

    def serve(self, sock: zmq.Socket, ctx: zmq.Context) -> None:
        """Make a binding socket a CURVE server (the ZAP handler of its context checks clients)."""
        self._authenticate(ctx)
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True

    def connect(self, sock: Any) -> None:
        """Make a connecting socket a CURVE client of the binders."""
        sock.curve_secretkey = self.client_secret
        sock.curve_publickey = self.client_public
        sock.curve_serverkey = self.server_public

    def _authenticate(self, ctx: zmq.Context) -> None:
        if any(auth.context is ctx for auth in self.authenticators):
            return
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("hlbook.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=str(self.authorized))
        self.authenticators.append(auth)

    def close(self) -> None:
        for auth in self.authenticators:
            auth.stop()
        self.authenticators.clear()


def create_keys(directory: str | Path) -> Path:
    """Write a server and a client key pair into ``directory`` and authorize the client."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if not (directory / f"{name}.key_secret").exists():
            zmq.auth.create_certificates(str(directory), name)
        (directory / f"{name}.key_secret").chmod(0o600)
    authorized = directory / "authorized"
    authorized.mkdir(exist_ok=True)
    shutil.copy(directory / "client.key", authorized / "client.key")
    return directory

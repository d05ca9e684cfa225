"""Graceful stop of a service process on SIGTERM (supervisor, systemd, Kubernetes) or SIGINT (Ctrl-C)."""

from __future__ import annotations

import signal
from collections.abc import Callable


def stop_on_signals(stop: Callable[[], None]) -> None:
    """Call ``stop`` (which asks the main loop to finish) on SIGTERM or SIGINT."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop())

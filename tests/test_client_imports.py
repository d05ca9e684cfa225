"""The client and the servers import apart: ``hlbook.client`` pulls in no service,
a service no client, and ``hlbook`` (every command's entry, the servers' too)
only the client's light CLI module."""

from __future__ import annotations

import subprocess
import sys

import pytest


def modules_after(statement: str) -> set[str]:
    """The hlbook modules loaded by ``statement`` in a fresh interpreter."""
    code = f"import sys; {statement}; print('\\n'.join(m for m in sys.modules if m.startswith('hlbook')))"
    return set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())


def test_the_client_imports_no_service() -> None:
    loaded = modules_after("import hlbook.client; from hlbook.client import *; import hlbook.client.testing, hlbook.client.cli")
    assert {"hlbook.client.client", "hlbook.client.connection", "hlbook.client.orders", "hlbook.client.events", "hlbook.client.models"} <= loaded
    assert not [m for m in loaded if m.startswith("hlbook.services")]
    timing = subprocess.run([sys.executable, "-X", "importtime", "-c", "import hlbook.client.client"], capture_output=True, text=True, check=True).stderr
    assert "hlbook.client.connection" in timing and "services" not in timing


@pytest.mark.parametrize("service", ["hlbook.services.gateway.app", "hlbook.services.book.shard", "hlbook.services.ingest.cli", "hlbook.services.supervisor.cli"])
def test_a_service_imports_no_client(service: str) -> None:
    assert not [m for m in modules_after(f"import {service}") if m.startswith("hlbook.client")]


def test_the_command_line_loads_only_the_client_cli() -> None:
    assert {m for m in modules_after("import hlbook.cli") if m.startswith("hlbook.client")} == {"hlbook.client", "hlbook.client.cli"}

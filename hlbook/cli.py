"""The ``hlbook`` command: one subcommand per service.

Each service keeps its typer command in ``services/<name>/cli.py`` (light
imports only; the service is imported when the command runs).
"""

from __future__ import annotations

import typer

from hlbook.client.cli import client
from hlbook.services.book.cli import book
from hlbook.services.gateway.cli import gateway
from hlbook.services.ingest.cli import ingest
from hlbook.services.nodesim.cli import sim
from hlbook.services.supervisor.cli import up

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])


@app.callback()
def main() -> None:
    """hlbook: Hyperliquid node files -> L4 books -> public-API-compatible WebSocket/HTTP."""


app.command()(ingest)
app.command()(sim)
app.command()(up)
app.command()(book)
app.command()(gateway)
app.command()(client)

if __name__ == "__main__":
    app()

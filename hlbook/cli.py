"""The ``hlbook`` command: one subcommand per service.

Each service keeps its typer command in ``services/<name>/cli.py`` (light
imports only; the service is imported when the command runs).
"""

from __future__ import annotations

import typer

from hlbook.client.cli import client
from hlbook.services.book.cli import book
from hlbook.services.gateway.cli import gateway
from hlbook.services.history.cli import history
from hlbook.services.ingest.cli import ingest
from hlbook.services.nodesim.cli import sim
from hlbook.services.replay.cli import replay
from hlbook.services.supervisor.cli import up

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,  # plain help reads well at 80 columns
                  help="hlbook: one subcommand per service.")


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"hlbook {version('hlbook')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit"),
) -> None:
    """hlbook: Hyperliquid node files -> L4 books -> public-API-compatible WebSocket/HTTP."""


def keys(directory: str = typer.Argument(..., help="Folder to write the keys into (kept private: mode 0600 secrets)")) -> None:
    """Write ZeroMQ CURVE keys for --curve-dir: a server pair (ingest, shards), a client pair, authorized/."""
    from hlbook.common.security import create_keys

    path = create_keys(directory)
    typer.echo(f"keys in {path}: pass --curve-dir {path} (or HLBOOK_CURVE_DIR) to every hlbook process; "
               f"copy other clients' public keys into {path / 'authorized'} to admit them")


# one line each in `hlbook --help` (the commands' own first lines are longer)
app.command(short_help="Tail the node's files; publish blocks over ZeroMQ")(ingest)
app.command(short_help="Node simulator: node-format files and an info server")(sim)
app.command(short_help="Run the whole system as supervised processes")(up)
app.command(short_help="Keep one shard's L4 books; publish L2, BBO, L4")(book)
app.command(short_help="Serve the public API: WebSocket and /info")(gateway)
app.command(short_help="Keep fills, trades, orders and candles")(history)
app.command(short_help="Serve a past span of the node's files from checkpoints")(replay)
app.command(short_help="Watch a feed: a book table or JSON lines")(client)
app.command(short_help="Write ZeroMQ CURVE keys for --curve-dir")(keys)

if __name__ == "__main__":
    app()

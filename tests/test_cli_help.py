"""The command line as an operator first meets it: ``--help`` of every command reads
well at 80 columns, and an environment variable means one thing wherever it is read."""

from __future__ import annotations

from collections import defaultdict

from typing import Any

import typer.main
from typer.testing import CliRunner

from hlbook.cli import app

COMMAND: Any = typer.main.get_command(app)  # a group of the commands


def help_of(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], prog_name="hlbook", terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_help_reads_well_at_80_columns() -> None:
    texts = {"hlbook": help_of(), **{name: help_of(name) for name in COMMAND.commands}}
    for name, text in texts.items():
        for line in text.splitlines():
            assert len(line) <= 80, f"{name}: {line!r}"
            assert "<bool>" not in line and "``" not in line, f"{name}: {line!r}"
            assert line.startswith("Usage:") or not line.endswith("..."), f"{name}, cut: {line!r}"
            # a flag's default named by the flag itself ("[default: history]") says nothing
            assert "default: no-" not in line and "default: history]" not in line, f"{name}: {line!r}"
    for name, command in COMMAND.commands.items():  # each command listed on one whole line
        assert f"  {name}  " in texts["hlbook"] and command.short_help, name


def test_an_environment_variable_has_one_default_wherever_it_is_read() -> None:
    defaults: dict[str, set[str]] = defaultdict(set)
    for name, command in COMMAND.commands.items():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str) and param.default is not None:
                defaults[envvar].add(f"{param.default!r}")
    # HLBOOK_SHARDS: `up` takes 0 for one per core, gateway and book are told the number by whoever starts them
    differing = {env: seen for env, seen in defaults.items() if len(seen) > 1 and env != "HLBOOK_SHARDS"}
    assert not differing

"""Every command's --help reads well at 80 columns: paragraphs rewrapped, no line over 80, no
`<bool>` beside flags."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app

COMMANDS = ["", "demo", "data", "data fashion-mnist", "download", "inspect", "poison", "warmup", "embed", "split",
            "query", "report", "export", "pretrain", "eval"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns(command):
    result = CliRunner().invoke(app, [*command.split(), "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, [line for line in lines if len(line) > 80]
    assert "<bool>" not in result.output and "Show this message and exit." in result.output
    assert lines[0].startswith("Usage: safeclip")


def test_command_list_shows_each_first_sentence_whole():
    result = CliRunner().invoke(app, ["--help"], terminal_width=80, env={"COLUMNS": "80"})
    commands = result.output.split("Commands:")[1]
    assert "..." not in commands  # click cuts a first sentence that does not fit

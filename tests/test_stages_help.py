"""Every stage's ``--help`` documents each of its options (python -m stages.<name> --help)."""

import importlib
import re

import pytest
from typer.testing import CliRunner

STAGES = ["download", "prepare", "init", "train", "logits", "crf", "evaluate"]
# An option row of the help, rich panel or plain click: "--name <type>  help text".
ROW = re.compile(r"^\s*(--[\w-]+)(?:\s+<[^>]+>)?\s+(.*?)\s*$")


def option_rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.replace("│", " ").splitlines():
        if m := ROW.match(line):
            rows[m[1]] = m[2]
    return rows


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_option_has_help(name):
    app = importlib.import_module(f"stages.{name}").app
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert result.exit_code == 0, result.output
    rows = option_rows(result.output)
    assert "--params" in rows and "--out" in rows
    for option, text in rows.items():
        assert text and not text.startswith("["), f"stages.{name} {option} has no help: {text!r}"
    assert rows["--params"].startswith("Params file to read")


@pytest.mark.parametrize("name", STAGES)
def test_stage_help_shows_no_value_placeholder_after_flags(name):
    result = CliRunner().invoke(importlib.import_module(f"stages.{name}").app, ["--help"],
                                env={"COLUMNS": "250", "TERMINAL_WIDTH": "250"})
    assert "<bool>" not in result.output and "--help" in result.output

"""The docs stay true: the tutorial runs as written, and every CLI command is documented."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from click.testing import CliRunner

from cryopool.cli.main import cli

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _commands(markdown: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", markdown, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_tutorial_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = _commands((DOCS / "tutorial.md").read_text())
    assert len(commands) >= 15
    runner = CliRunner()
    for line in commands:
        words = shlex.split(line)
        assert words[0] == "cryopool", line
        result = runner.invoke(cli, words[1:], catch_exceptions=False)
        assert result.exit_code == 0, f"{line}\n{result.output}"
    assert "OK" in runner.invoke(cli, ["-C", "pop", "verify"]).output


def test_every_command_is_in_cli_md():
    text = (DOCS / "cli.md").read_text()
    names = cli.list_commands(None)  # the lazy group's table as well as what is registered eagerly
    assert len(names) > 20
    for name in names:
        assert f"`{name}" in text, f"command {name} missing from docs/cli.md"

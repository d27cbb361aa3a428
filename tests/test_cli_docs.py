"""Every command and every option of the CLI is in the README's CLI section, as users read it there."""

from __future__ import annotations

import click
import typer.main

from tests.conftest import REPO
from trtforge.cli import app


def cli_section() -> str:
    readme = (REPO / "README.md").read_text()
    return readme.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]


def usage_lines(section: str) -> dict[str, str]:
    """Each command's usage in the section's code block: its line and the indented lines after it."""
    block = section.split("```", 2)[1]
    usages: dict[str, str] = {}
    name = None
    for line in block.splitlines():
        if line.startswith("trtforge "):
            name = line.split()[1]
            usages[name] = usages.get(name, "") + "\n" + line
        elif line.startswith(" ") and name is not None:
            usages[name] += "\n" + line
    return usages


def test_every_command_and_option_is_documented():
    usages = usage_lines(cli_section())
    group = typer.main.get_group(app)
    missing = []
    for name, command in group.commands.items():
        if name not in usages:
            missing.append(f"command {name}")
            continue
        for param in command.params:
            if isinstance(param, click.Option):
                flags = [f for f in param.opts if f.startswith("--") and f != "--help"]
                if flags and not any(f in usages[name] for f in flags):
                    missing.append(f"{name} {flags[0]}")
    assert not missing, f"not in the README's CLI section: {missing}"

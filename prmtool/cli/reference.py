"""docs/cli.md: every command's `--help`, generated, so the reference can never drift from the
code. `python -m prmtool.cli.reference > docs/cli.md` writes it; a test checks it is current."""

from __future__ import annotations

import typer

from prmtool.cli.commands import app

WIDTH = 100  # a fixed width: the page must not depend on the terminal that wrote it


def help_text(*path: str) -> str:
    """What `prmtool PATH... --help` prints, at a fixed width."""
    group = typer.main.get_command(app)
    context = group.make_context(
        "prmtool", list(path) + ["--help"], resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH
    )
    command, parent = group, context
    for name in path:
        command = command.get_command(parent, name)
        parent = command.make_context(
            name, [], parent=parent, resilient_parsing=True, terminal_width=WIDTH, max_content_width=WIDTH
        )
    return command.get_help(parent).rstrip() + "\n"


def reference() -> str:
    group = typer.main.get_command(app)
    context = group.make_context("prmtool", [], resilient_parsing=True)
    parts = [
        "# Command-line reference\n\n",
        "Generated from `--help` by `python -m prmtool.cli.reference > docs/cli.md`; do not edit by hand.\n\n",
        "```text\n",
        help_text(),
        "```\n",
    ]
    for name in group.list_commands(context):
        parts += [f"\n## prmtool {name}\n\n```text\n", help_text(name), "```\n"]
    return "".join(parts)


if __name__ == "__main__":
    print(reference(), end="")

"""The `prmtool` command line: the typer app (`commands.py`), the options shared by every command
(`options.py`), recipes (`recipe.py`), the charts `stats --plot` draws (`plots.py`) and the
generated reference (`reference.py`).

The app is imported on first use: stages import `prmtool.core.options`, and the app imports the
stages."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from prmtool.cli.commands import main as app_main

    return app_main(argv)


def run() -> None:
    from prmtool.cli.commands import run as app_run

    app_run()


def __getattr__(name: str):
    if name == "app":
        from prmtool.cli.commands import app

        return app
    raise AttributeError(name)

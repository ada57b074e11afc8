"""The `prmtool` command: one subcommand per stage, each a thin layer over its stage module."""

from __future__ import annotations

import contextlib
import errno
import io
import math
import os
import signal
import sys
import threading
from contextvars import ContextVar

import typer
from rich.console import Console

from prmtool import __version__
from prmtool.core.errors import exit_code_of

try:  # typer >= 0.26 vendors click: its usage errors are not `click`'s own classes
    from typer._click.exceptions import BadParameter, ClickException, MissingParameter
except ImportError:
    from click import BadParameter, ClickException, MissingParameter
from prmtool.cli import evaluate, recipe, review, stats, view
from prmtool.cli.stage_command import stage_command
from prmtool.stages import STAGES, stage

app = typer.Typer(
    name="prmtool",
    help="Curate process-supervision data for LLM reasoning, one stage per command over "
    "directories of Parquet shards. Run `prmtool COMMAND --help` for examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def first_sentence(doc: str) -> str:
    """A command's line in `prmtool --help`: its help's first sentence, whole (click would cut
    it at 45 characters)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    return paragraph.split(". ")[0].rstrip(".") + "."


for name in STAGES:
    app.command(name, epilog=stage(name).examples, short_help=first_sentence(stage(name).help))(
        stage_command(stage(name))
    )
# stats and eval read shards and write none, view and review are for a person: they are not stages
for name, module in (("stats", stats), ("eval", evaluate), ("view", view), ("review", review), ("run", recipe)):
    app.command(name, epilog=module.EXAMPLES, short_help=first_sentence(module.command.__doc__))(module.command)


def _version(value: bool) -> None:
    if value:
        print(f"prmtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


# The command line being run, without the program name: `prmtool run` repeats it in the
# message that says how to resume a failed recipe.
typed_argv: ContextVar[list[str] | None] = ContextVar("typed_argv", default=None)


class ClosedStream(io.TextIOBase):
    """Standard input or output that the shell closed (`prmtool stats DIR >&-`): Python has None
    there. Reading or printing is then an OSError that names it, a one-line error."""

    def __init__(self, name: str) -> None:
        self.name = name

    @property
    def buffer(self):
        return self

    def _closed(self, *args):
        raise OSError(errno.EBADF, f"standard {self.name} is closed", "-")

    read = readline = write = _closed


def guard_closed_streams() -> None:
    """A closed descriptor 0, 1 or 2 would be handed to the next file opened (a shard being
    written would then get whatever a library prints): hold each with /dev/null, and make
    Python's own stream one that says it is closed."""
    for fd, name, said in ((0, "stdin", "input"), (1, "stdout", "output"), (2, "stderr", "error")):
        try:
            os.fstat(fd)
        except OSError:
            opened = os.open(os.devnull, os.O_RDWR)
            if opened != fd:
                os.dup2(opened, fd)
                os.close(opened)
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w") if fd == 2 else ClosedStream(said))


@contextlib.contextmanager
def interrupts_remembered():
    """Yields a list that gets an entry when Ctrl-C comes (which still raises KeyboardInterrupt
    where the main thread is). Code in C may catch that exception and raise another: numpy turns
    one raised inside an array comparison into a TypeError. The list tells main that the error
    is the interrupt. Only in the main thread, and only where SIGINT is not ignored."""
    received: list[bool] = []
    previous = signal.getsignal(signal.SIGINT)  # None: a handler installed outside Python
    if threading.current_thread() is not threading.main_thread() or previous in (None, signal.SIG_IGN):
        yield received
        return

    def on_interrupt(number, frame):
        received.append(True)
        if callable(previous):
            return previous(number, frame)  # Python's own handler raises KeyboardInterrupt
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code: 0 ok, 1 runtime failure, 2 usage or input error,
    130 interrupted."""
    with interrupts_remembered() as interrupted:
        return _main(argv, interrupted)


def _main(argv: list[str] | None, interrupted: list[bool]) -> int:
    guard_closed_streams()
    stderr = Console(stderr=True, highlight=False)
    typed_argv.set(list(sys.argv[1:] if argv is None else argv))
    try:
        code = app(args=argv, prog_name="prmtool", standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except ClickException as exc:  # usage errors: a missing option, a bad value, an unknown command
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `prmtool`: the help is the answer
            exc.show()
            return 2
        stderr.print(f"error: {usage_line(exc, sys.argv[1:] if argv is None else argv)}", markup=False, soft_wrap=True)
        return 2
    except typer.Abort:
        stderr.print("interrupted; rerun the same command to resume where it stopped")
        return 130
    except KeyboardInterrupt:
        stderr.print("interrupted; rerun the same command to resume where it stopped")
        return 130
    except Exception as exc:
        if interrupted:  # the interrupt, turned into another error on its way out
            stderr.print("interrupted; rerun the same command to resume where it stopped")
            return 130
        known = exit_code_of(exc)
        if known is None:
            raise
        stderr.print(f"error: {known[1]}", markup=False, soft_wrap=True)
        return known[0]
    # typer >= 0.26 returns the code of an Exit it caught instead of raising it; it turns
    # Ctrl-C into Exit(130).
    if code == 130:
        stderr.print("interrupted; rerun the same command to resume where it stopped")
    return code if isinstance(code, int) else 0


# click's wording for a value out of its range, in ours
_RANGE_WORDS = [
    ("Input should be greater than or equal to", "must be at least"),
    ("Input should be less than or equal to", "must be at most"),
    ("Input should be greater than", "must be above"),
    ("Input should be less than", "must be below"),
    ("Input should be", "must be"),
]


def usage_line(exc: ClickException, argv: list[str]) -> str:
    """A usage error on one line, naming the option and the value as typed:
    `--num-shards 0: must be at least 1 (see 'prmtool export -h')`."""
    message = exc.format_message()
    param = getattr(exc, "param", None)
    if (
        isinstance(exc, BadParameter)
        and not isinstance(exc, MissingParameter)
        and param is not None
        and getattr(param, "opts", None)
    ):
        message = exc.message
        for before, after in _RANGE_WORDS:
            message = message.replace(before, after)
        typed = _typed(param.opts, argv)
        if typed is not None and _not_finite(typed[1]) and "must be" in message:
            message = "must be a finite number"  # click calls nan out of any range: "at most 3600"
        if typed is not None:
            message = f"{typed[0]} {typed[1]}: {message}"
        else:
            message = f"{param.opts[-1]}: {message}"
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see '{ctx.command_path} -h')" if ctx is not None else message


def _not_finite(text: str) -> bool:
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False


def _typed(options: list[str], argv: list[str]) -> tuple[str, str] | None:
    """The last `--option value` or `--option=value` of `options` in argv."""
    found = None
    for number, token in enumerate(argv):
        for option in options:
            if token == option and number + 1 < len(argv):
                found = (option, argv[number + 1])
            elif token.startswith(option + "=") and option.startswith("--"):
                found = (option, token[len(option) + 1 :])
    return found


def run() -> None:
    sys.exit(main())

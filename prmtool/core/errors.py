"""The two kinds of failure a command can end with, and their exit codes."""


class InputError(Exception):
    """Bad input or usage: a missing file, a wrong column, a clashing output. Exit code 2.

    The message is one line that names the file, row or column at fault.
    """

    exit_code = 2


class StageError(Exception):
    """A failure while doing the work on valid input. Exit code 1."""

    exit_code = 1


def exit_code_of(error: BaseException) -> tuple[int, str] | None:
    """The exit code and one-line message a failure ends a command with, or None for a bug
    (which keeps its traceback). Engines' errors are InputErrors: a model that cannot be used
    as asked."""
    if isinstance(error, (InputError, StageError)):
        return error.exit_code, str(error)
    if isinstance(error, OSError):  # a read-only or full disk, a path that cannot be made: the system's word
        where = f"{error.filename}: " if error.filename else ""
        return 2, f"{where}{error.strerror or error}"
    return None

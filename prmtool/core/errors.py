"""The two kinds of failure a command can end with, and their exit codes."""


class InputError(Exception):
    """Bad input or usage: a missing file, a wrong column, a clashing output. Exit code 2.

    The message is one line that names the file, row or column at fault.
    """

    exit_code = 2


class StageError(Exception):
    """A failure while doing the work on valid input. Exit code 1."""

    exit_code = 1

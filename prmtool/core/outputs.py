"""Where a command may write, checked once for every path it writes, and the lock that keeps two
different runs out of one output directory.

Every path a command writes (`-o`, `--rejects`, `--tree-output`, `--hf-dataset`, `--report`,
`--plot`, a recipe's workdir) goes through `check_outputs` before anything is written: it may not
be an input, lie inside an input directory, or hold an input below it (an `--overwrite` clears
an output directory's Parquet files, which would then be the input's), and two outputs of one
command may not be the same or nested. Names that become paths (export's split names, recipe
stage names) go through `plain_name`.

Every file is written by `replace_atomically`: into a new hidden file created exclusively
beside its final name (so never through a link, never onto a file someone else made), renamed
into place when whole; a final name that is a symbolic link, a FIFO, a device or anything else
but a regular file is refused, never replaced.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prmtool.core.errors import InputError

LOCK = ".lock"
JOURNAL = "_JOURNAL"  # a run's record of the files it may write (prmtool.core.shards)
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def plain_name(name: str, what: str) -> str:
    """A name that becomes one path component: letters, digits, `.`, `_` and `-`, starting with
    a letter or digit (so never `..`, `_SUCCESS` or a hidden file), and no `/`."""
    if not isinstance(name, str) or not _PLAIN.fullmatch(name) or len(name) > 100:
        raise InputError(f"{what} {name!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit")
    return name


def input_roots(specs: Iterable[str | Path], files: Iterable[Path] = ()) -> list[Path]:
    """The paths a command reads: each input as given (a file or a directory; a glob by what it
    matches), and the files found in them."""
    roots: list[Path] = []
    for spec in specs:
        text = str(spec)
        if text == "-":
            continue
        roots.extend(Path(m) for m in glob.glob(text, recursive=True)) if glob.has_magic(text) else roots.append(
            Path(text)
        )
    roots.extend(files)
    return [_absolute(root) for root in roots]


def check_outputs(inputs: list[Path], outputs: dict[str, Path | None]) -> None:
    """Refuse an output that is an input, lies inside an input directory or is an ancestor of
    an input, and two outputs that are the same or nested. `outputs` maps each option (`-o`,
    `--rejects`, ...) to its path; None entries are options not given."""
    given = {option: _absolute(path) for option, path in outputs.items() if path is not None}
    for option, out in given.items():
        for source in inputs:
            if out == source:
                raise InputError(f"{outputs[option]}: {option} is an input of this command; choose another {option}")
            if source in out.parents and source.is_dir():
                raise InputError(
                    f"{outputs[option]}: {option} lies inside the input {source}; choose another {option}, outside it"
                )
            if out in source.parents:
                raise InputError(f"{outputs[option]}: {option} holds the input {source}; choose another {option}")
    options = list(given)
    for number, first in enumerate(options):
        for second in options[number + 1 :]:
            a, b = given[first], given[second]
            if a == b or a in b.parents or b in a.parents:
                raise InputError(
                    f"{outputs[second]}: {second} and {first} {outputs[first]} must be separate paths, neither "
                    f"inside the other"
                )


def check_regular_file(path: Path, option: str = "output") -> None:
    """A file prmtool is to write: absent, or a regular file it may replace. A symbolic link
    (even to a regular file), a FIFO or a device is refused: replacing it would break the link
    or the device, writing through it would write somewhere else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InputError(f"{path}: cannot use the {option} file ({exc.strerror})") from None
    if stat.S_ISREG(mode):
        return
    kind = (
        "a symbolic link"
        if stat.S_ISLNK(mode)
        else "a directory"
        if stat.S_ISDIR(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device or socket"
    )
    hint = "; give - to print to standard output" if option == "--json" else ""
    raise InputError(f"{path}: {option} is {kind}, not a regular file; prmtool writes only regular files{hint}")


def check_replaceable(path: Path, option: str, ours: Callable[[bytes], bool], what: str) -> None:
    """A single file prmtool is to write where the user said: absent, empty, or a regular file
    that `ours` recognises by its first 64 KiB as one prmtool wrote there, which a rerun
    replaces. Any other file is refused: it is not prmtool's to delete."""
    check_regular_file(path, option)
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InputError(f"{path}: cannot read the existing {option} file ({exc.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        head = handle.read(65536)
    if head and not ours(head):
        raise InputError(f"{path}: {option} exists and is not {what} prmtool wrote; move it away or give another path")


@contextmanager
def naming_the_path(path: Path):
    """An OSError without a file name (pyarrow's full disk: `No space left on device`) names
    `path`, the file that could not be written."""
    try:
        yield
    except OSError as error:
        if error.filename is not None:
            raise
        raise OSError(error.errno, error.strerror or " ".join(str(error).split()), str(path)) from None


def replace_atomically(path: Path, write: Callable[[object], None], option: str = "output") -> None:
    """Write `path` whole or not at all: `write(handle)` fills a new hidden file, created
    exclusively beside `path` (`.NAME.tmp-PID`, a name no input has: hidden files are never
    read as shards), which is synced and renamed over `path`. A `path` that is not a regular
    file is refused before and again just before the rename."""
    check_regular_file(path, option)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary, descriptor = _new_temporary(path, option)
    try:
        with naming_the_path(path), os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        check_regular_file(path, option)
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    finally:
        temporary.unlink(missing_ok=True)


def _new_temporary(path: Path, option: str = "output") -> tuple[Path, int]:
    """A file of our own beside `path`: O_EXCL, so an existing file or link of that name is
    never opened (a stale one from a killed process with this pid gets the next number)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    for attempt in range(1000):
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}{attempt or ''}")
        try:
            return temporary, os.open(temporary, flags, 0o644)
        except FileExistsError:
            continue
        except OSError as exc:  # a read-only or full file system, a folder not ours: named by the file asked for
            raise InputError(f"{path}: cannot write the {option} file ({exc.strerror})") from None
    raise InputError(f"{path.parent}: cannot create a temporary file beside {path.name}")


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _absolute(path: Path | str) -> Path:
    """The real path, symbolic links followed, for a path that need not exist yet."""
    return Path(os.path.realpath(os.path.abspath(path)))


def run_key(*parts) -> str:
    """What identifies one run (stage, options, inputs): partitions of a run share it."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


# Lock descriptors this process holds. A forked child (a verify worker, which may outlive the
# run in a long-lived Python process) closes its copies: an flock belongs to the open file, so a
# child still holding one would keep the directory locked after the run ended.
_HELD: set[int] = set()


def _forget_locks_in_child() -> None:
    for descriptor in _HELD:
        os.close(descriptor)
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_locks_in_child)


@contextmanager
def output_lock(directories: Iterable[Path], key: str, slot: str | None = None) -> Iterator[None]:
    """Hold `DIR/.lock` for every output directory while the run writes there.

    The partitions of one run (same `key`) share the lock and write side by side; a run with
    another key finds it held and fails at once, instead of mixing its shards with the other's.
    `slot` names the part of the run this process writes (a partition's label, `00000-of-00001`
    for a whole run): it is held alone (`DIR/.lock-SLOT`), so the same command started twice at
    once fails at once too, instead of taking the other's half-written files for an interrupted
    run of its own. The locks are flocks, so they go with the process: a killed run leaves no
    stale lock. A directory the run made and left with nothing but its locks (a model that
    failed to load) is removed again: nothing half-written.
    """
    held: list[tuple[Path, list[int], bool]] = []
    try:
        for directory in directories:
            made = not directory.exists()
            descriptor = _lock(directory, key)
            if descriptor is None:
                continue  # read-only: no run can write here
            descriptors = [descriptor]
            held.append((directory, descriptors, made))
            _HELD.add(descriptor)
            if slot is not None and (slot_descriptor := _lock_slot(directory, slot)) is not None:
                descriptors.append(slot_descriptor)
                _HELD.add(slot_descriptor)
        yield
    finally:
        for directory, descriptors, made in held:
            if made:
                _remove_if_unused(directory, descriptors[0])
            for descriptor in descriptors:
                _HELD.discard(descriptor)
                os.close(descriptor)  # closing releases the flock


def _open_lock_file(path: Path) -> int:
    """Open (or create) a lock file: never through a symlink, never anything but a regular file
    (a lock file is truncated and written: someone's link there must not lead elsewhere)."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise InputError(f"{path}: is not a regular file (prmtool's lock file): move it away")
    return descriptor


def _lock_file_error(path: Path, exc: OSError) -> InputError:
    if exc.errno == errno.ELOOP:
        return InputError(f"{path}: is a symbolic link, not prmtool's lock file: move it away")
    return InputError(f"{path.parent}: cannot write the output directory ({exc.strerror})")


def is_lock(name: str) -> bool:
    return name == LOCK or name.startswith(f"{LOCK}-")


def _remove_if_unused(directory: Path, descriptor: int) -> None:
    """Remove a directory that holds only its locks (and the journals of a run that wrote
    nothing), if no partition of the run still holds it."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # another partition is still writing here
    try:
        names = [p.name for p in directory.iterdir()]
        if all(is_lock(name) or name.startswith(JOURNAL) for name in names):
            for name in names:
                (directory / name).unlink()
            directory.rmdir()
    except OSError:
        pass


def _read_only(directory: Path, exc: OSError) -> bool:
    """An existing directory on a read-only file system (a shared dataset, a mounted snapshot):
    no run can write there, so none needs keeping out. Its lock is skipped; a complete output is
    still found complete and skipped, and a run that has to write fails at its first write."""
    return exc.errno == errno.EROFS and directory.is_dir()


def _lock_slot(directory: Path, slot: str) -> int | None:
    try:
        descriptor = _open_lock_file(directory / f"{LOCK}-{slot}")
    except OSError as exc:
        if _read_only(directory, exc):
            return None
        raise _lock_file_error(directory / f"{LOCK}-{slot}", exc) from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        part = "" if slot.endswith("-of-00001") else f" (partition {slot})"
        raise InputError(
            f"{directory}: the same prmtool command{part} is already writing here; wait for it to end"
        ) from None
    return descriptor


@contextmanager
def exclusive_lock(directory: Path, what: str) -> Iterator[None]:
    """Hold `DIR/.lock-run` alone while `what` (a `prmtool run` of a recipe) uses the directory:
    a second one fails at once, having touched nothing but the lock file."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = _open_lock_file(directory / f"{LOCK}-run")
    except OSError as exc:
        if not _read_only(directory, exc):
            raise _lock_file_error(directory / f"{LOCK}-run", exc) from None
        descriptor = None
    # read-only: no run can write here (yielded outside the except, so that a stage's own error
    # does not carry the OSError as its context)
    if descriptor is None:
        yield
        return
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
        os.close(descriptor)
        raise InputError(
            f"{directory}: another {what} is using this directory{f' (pid {holder})' if holder else ''}; "
            "wait for it to end, or give another --workdir"
        ) from None
    _HELD.add(descriptor)
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, str(os.getpid()).encode(), 0)
        yield
    finally:
        _HELD.discard(descriptor)
        os.close(descriptor)


def _lock(directory: Path, key: str) -> int | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        descriptor = _open_lock_file(directory / LOCK)
    except OSError as exc:
        if _read_only(directory, exc):
            return None
        raise _lock_file_error(directory / LOCK, exc) from None
    busy = InputError(
        f"{directory}: another prmtool run, with other options or inputs, is writing here; "
        "wait for it to end or choose another output"
    )
    deadline = time.monotonic() + 2.0
    while True:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:  # alone: claim the directory for this run, then let its other partitions in
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, key.encode(), 0)
            fcntl.flock(descriptor, fcntl.LOCK_SH)  # not atomic: another run may have come in between
            if _holder(descriptor) != key:
                os.close(descriptor)
                raise busy
            return descriptor
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # someone is claiming it right now: look again in a moment
            if time.monotonic() > deadline:
                os.close(descriptor)
                raise busy from None
            time.sleep(0.02)
            continue
        if _holder(descriptor) == key:
            return descriptor  # a partition of the same run
        os.close(descriptor)
        raise busy


def _holder(descriptor: int) -> str:
    return os.pread(descriptor, 64, 0).decode(errors="replace")

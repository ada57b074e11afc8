"""Everything a run tells its user, on stderr: logs, progress bars and the closing summary.

Stats are collected in one place (`RunStats`) and printed once at the end, as datatrove does.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text


class Tracker:
    """What a stage advances while it works: rows done, tokens generated if any, and the work
    (rollouts, probes) of rows still in progress where a row takes long.

    Progress is finished rows, plus, for the rows in progress, the share of their expected work
    done (`expect_work`): label's rows each wait on many rounds of rollouts, and a count of
    finished rows alone stands still for minutes while the rollouts advance."""

    def __init__(self, total: int | None, bar: Progress | None = None, task=None) -> None:
        self.total, self.bar, self.task = total, bar, task
        self.description: str | None = None  # set by describe(); the stage's name until then
        self.rows, self.tokens, self.work = 0, 0, 0
        self.skipped = 0  # rows done without work (resumed shards, label's trusted rows): not in the rate
        self.work_unit: str | None = None
        self.tokens_per_row: int | None = None
        self.started = time.perf_counter()
        # the rows whose work is counted, and how much of it there is (at most) and is done
        self._work_rows = self._work_rows_done = 0
        self._work_expected = self._work_done = 0

    def advance(self, rows: int = 1, tokens: int = 0, work: int = 0) -> None:
        self.rows += rows
        self.tokens += tokens
        self.work += work
        self._work_done += work
        if self._work_rows:
            self._work_rows_done = min(self._work_rows, self._work_rows_done + rows)
        if self.bar is not None:
            self.bar.update(self.task, advance=rows, tokens=self.tokens)

    def skip(self, rows: int) -> None:
        """Rows done at once, without the work the others take (a resumed shard, a response
        whose outcome proves its steps): counted done, but left out of the rate the time left
        comes from, which they would make look many times faster than it is."""
        self.skipped += rows
        self.advance(rows)

    def describe(self, text: str) -> None:
        """A new description at the bar's left (or the plain lines'), e.g. train's running loss."""
        self.description = text
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def set_total(self, total: int) -> None:
        """The total, once the stage knows it (train: its optimizer steps)."""
        self.total = total
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def expect_tokens_per_row(self, tokens: int) -> None:
        """The most tokens a row can cost (e.g. n x max-tokens): the time left is then estimated
        from tokens, which arrive steadily, rather than from rows, which finish in bursts."""
        self.tokens_per_row = tokens
        if self.bar is not None:
            self.bar.update(self.task, tokens_per_row=tokens)

    def expect_work(self, rows: int, amount: int, unit: str) -> None:
        """The next `rows` rows take at most `amount` units of work (label: rollouts), which
        `advance(work=...)` counts as they are done."""
        self.work_unit = unit
        self._work_rows, self._work_rows_done = rows, 0
        self._work_expected, self._work_done = amount, 0

    def completed(self) -> float:
        """Rows done, counting the rows in progress by the share of their work done."""
        in_progress = self._work_rows - self._work_rows_done
        if in_progress <= 0 or self._work_expected <= 0:
            return float(self.rows)
        return self.rows + in_progress * min(1.0, self._work_done / self._work_expected)

    def worked(self) -> float:
        """Rows done by the stage's work (completed less skipped): what its rate is made of."""
        return self.completed() - self.skipped

    def seconds_left(self, elapsed: float) -> tuple[float | None, bool]:
        """Time left at the mean rate since the start, and whether it is an upper bound: of
        tokens where the stage gave the most tokens per row, else of (work-weighted) rows.
        None before there is a rate."""
        if self.total is None or elapsed < MIN_RATE_SECONDS:
            return None, False
        if self.tokens_per_row and self.tokens:  # at most: every sample may stop before max-tokens
            most = (self.total - self.skipped) * self.tokens_per_row  # skipped rows sample nothing
            return max(0.0, (most - self.tokens) * elapsed / self.tokens), True
        if self.worked() <= 0:
            return None, False
        return max(0.0, (self.total - self.completed()) * elapsed / self.worked()), False


def clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class TokenRateColumn(ProgressColumn):
    """Generated tokens per second, shown once a stage reports tokens."""

    def render(self, task) -> Text:
        tokens, elapsed = task.fields.get("tokens", 0), task.elapsed
        return Text(f"{tokens / elapsed:,.0f} tok/s" if tokens and elapsed else "")


class WorkColumn(ProgressColumn):
    """The work done inside rows, e.g. `1,204 rollouts`, where a stage counts it."""

    def render(self, task) -> Text:
        tracker = task.fields.get("tracker")
        if tracker is None or tracker.work_unit is None:
            return Text("")
        return Text(f"{tracker.work:,} {tracker.work_unit}")


class RateColumn(ProgressColumn):
    """Items per second, e.g. `412.3 rows/s` (rich only ships a bytes-per-second column)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        # The mean since the start, and only after a few seconds: rows often arrive in bulk
        # (a shard, trusted rows at once), and rich's windowed speed then shows absurd rates.
        elapsed = task.elapsed or 0.0
        tracker = task.fields.get("tracker")
        done = task.completed - (tracker.skipped if tracker is not None else 0)  # rows done by work
        if elapsed < MIN_RATE_SECONDS or done <= 0:
            return Text("")
        return Text(f"{done / elapsed:,.1f} {self.unit}/s")


MIN_RATE_SECONDS = 3.0


class RemainingColumn(ProgressColumn):
    """Time left at the mean rate since the start (rich's own follows the same bursty window),
    as `Tracker.seconds_left` says; an upper bound is marked ≤."""

    def render(self, task) -> Text:
        tracker = task.fields.get("tracker")
        if tracker is None:  # a bar without a Tracker: its own fields
            tracker = Tracker(task.total)
            tracker.rows, tracker.tokens = task.completed, task.fields.get("tokens", 0)
            tracker.tokens_per_row = task.fields.get("tokens_per_row")
        left, bound = tracker.seconds_left(task.elapsed or 0.0)
        if left is None:
            return Text("-:--:--")
        return Text(("≤" if bound else "") + clock(left))


# Seconds between progress lines where stderr is not a terminal (a log file, nohup, make).
PROGRESS_SECONDS_VARIABLE = "PRMTOOL_PROGRESS_SECONDS"
PROGRESS_SECONDS = 30.0


class PlainProgress:
    """Progress as plain lines, one every `interval` seconds, where stderr is not a terminal
    and a bar would print nothing: `label: 28/48 rows, 1,536 rollouts, 3.1 rows/s, 9,120
    tokens (184 tok/s), 0:02:10 elapsed, 0:01:20 left`. A thread prints them, so a line comes
    even while the stage waits minutes on one engine call."""

    def __init__(self, console: Console, description: str, tracker: Tracker, unit: str, interval: float) -> None:
        self.console, self.description, self.tracker, self.unit = console, description, tracker, unit
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress-lines", daemon=True)

    def line(self) -> str:
        tracker = self.tracker
        elapsed = time.perf_counter() - tracker.started
        total = "" if tracker.total is None else f"/{tracker.total:,}"
        parts = [f"{tracker.rows:,}{total} {self.unit}"]
        if tracker.work_unit is not None:
            parts.append(f"{tracker.work:,} {tracker.work_unit}")
        if elapsed >= MIN_RATE_SECONDS and tracker.worked() > 0:
            parts.append(f"{tracker.worked() / elapsed:,.1f} {self.unit}/s")
        if tracker.tokens:
            parts.append(f"{tracker.tokens:,} tokens ({tracker.tokens / elapsed:,.0f} tok/s)")
        parts.append(f"{clock(elapsed)} elapsed")
        left, bound = tracker.seconds_left(elapsed)
        if left is not None:
            parts.append(f"{'at most ' if bound else ''}{clock(left)} left")
        return f"{tracker.description or self.description}: {', '.join(parts)}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.console.print(self.line(), markup=False, soft_wrap=True, highlight=False)

    def __enter__(self) -> PlainProgress:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()


def progress_interval() -> float:
    try:
        return max(0.05, float(os.environ.get(PROGRESS_SECONDS_VARIABLE, PROGRESS_SECONDS)))
    except ValueError:
        return PROGRESS_SECONDS


@dataclass
class RunStats:
    stage: str
    quiet: bool = False
    rows_in: int = 0
    rows_out: int = 0
    problem_ids: set = field(default_factory=set)
    shards_written: int = 0
    shards_skipped: int = 0
    counts: Counter = field(default_factory=Counter)  # stage-specific, e.g. verify statuses
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.console = Console(stderr=True, quiet=self.quiet, highlight=False)

    def log(self, message: str) -> None:
        # soft_wrap: a message stays one line (paths in it intact) whatever the terminal width
        self.console.print(message, soft_wrap=True)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)

    @contextmanager
    def progress(self, description: str, total: int | None, unit: str = "rows"):
        """A progress bar on a terminal, plain periodic lines elsewhere; yields a Tracker."""
        if not self.quiet and not self.console.is_terminal:
            tracker = Tracker(total)
            with PlainProgress(self.console, description, tracker, unit, progress_interval()):
                yield tracker
            return
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            WorkColumn(),
            RateColumn(unit),
            TokenRateColumn(),
            TimeElapsedColumn(),
            RemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=True, disable=self.quiet) as bar:
            task = bar.add_task(description, total=total, tokens=0)
            tracker = Tracker(total, bar, task)
            bar.update(task, tracker=tracker)
            yield tracker

    def summary(self) -> Summary:
        return Summary(
            stage=self.stage,
            rows_in=self.rows_in,
            rows_out=self.rows_out,
            problems=len(self.problem_ids),
            shards_written=self.shards_written,
            shards_skipped=self.shards_skipped,
            seconds=round(time.perf_counter() - self.started, 3),
            counts=dict(sorted(self.counts.items())),
        )

    def print_summary(self) -> None:
        table = Table(title=f"prmtool {self.stage}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        for key, value in self.summary().as_dict().items():
            if key != "stage":
                table.add_row(key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value))
        self.console.print(table)

    def finish(self) -> Summary:
        """Print the closing summary (unless quiet) and return it."""
        self.print_summary()
        return self.summary()


@dataclass(frozen=True)
class Summary:
    """What one stage run did: the table the command line prints at the end, as data."""

    stage: str
    rows_in: int  # rows read (of this partition, with --shard-index)
    rows_out: int  # rows written to -o
    problems: int  # distinct problem_ids written
    shards_written: int
    shards_skipped: int  # complete from an earlier run with the same options and inputs (resume)
    seconds: float
    counts: dict = field(default_factory=dict)  # the stage's own: verify statuses, rollouts, rows removed...

    def as_dict(self) -> dict:
        """One flat dict, the counts after the common fields: the printed table, row by row."""
        common = {f: getattr(self, f) for f in ("stage", "rows_in", "rows_out", "problems")}
        common |= {f: getattr(self, f) for f in ("shards_written", "shards_skipped", "seconds")}
        return {**common, **self.counts}

"""Everything a run tells its user, on stderr: logs, progress bars and the closing summary.

Stats are collected in one place (`RunStats`) and printed once at the end, as datatrove does.
"""

from __future__ import annotations

import datetime
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
    """What a stage advances while it works: rows done, and tokens generated if any."""

    def __init__(self, bar: Progress, task) -> None:
        self.bar, self.task, self.tokens = bar, task, 0

    def advance(self, rows: int = 1, tokens: int = 0) -> None:
        self.tokens += tokens
        self.bar.update(self.task, advance=rows, tokens=self.tokens)

    def describe(self, text: str) -> None:
        """A new description at the bar's left, e.g. train's running loss."""
        self.bar.update(self.task, description=text)

    def expect_tokens_per_row(self, tokens: int) -> None:
        """The most tokens a row can cost (e.g. n x max-tokens): the time left is then estimated
        from tokens, which arrive steadily, rather than from rows, which finish in bursts."""
        self.bar.update(self.task, tokens_per_row=tokens)


class TokenRateColumn(ProgressColumn):
    """Generated tokens per second, shown once a stage reports tokens."""

    def render(self, task) -> Text:
        tokens, elapsed = task.fields.get("tokens", 0), task.elapsed
        return Text(f"{tokens / elapsed:,.0f} tok/s" if tokens and elapsed else "")


class RateColumn(ProgressColumn):
    """Items per second, e.g. `412.3 rows/s` (rich only ships a bytes-per-second column)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        # The mean since the start, and only after a few seconds: rows often arrive in bulk
        # (a shard, trusted rows at once), and rich's windowed speed then shows absurd rates.
        elapsed = task.elapsed or 0.0
        if elapsed < MIN_RATE_SECONDS or not task.completed:
            return Text("")
        return Text(f"{task.completed / elapsed:,.1f} {self.unit}/s")


MIN_RATE_SECONDS = 3.0


class RemainingColumn(ProgressColumn):
    """Time left at the mean rate since the start (rich's own follows the same bursty window):
    of tokens where the stage gave the most tokens per row (an upper bound, marked ≤), else of
    rows."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        tokens, per_row = task.fields.get("tokens", 0), task.fields.get("tokens_per_row")
        if task.total is None or elapsed < MIN_RATE_SECONDS:
            return Text("-:--:--")
        if per_row and tokens:  # at most: every sample may stop before max-tokens
            left = (task.total * per_row - tokens) * elapsed / tokens
            return Text("≤" + str(datetime.timedelta(seconds=int(max(0.0, left)))))
        if not task.completed:
            return Text("-:--:--")
        left = (task.total - task.completed) * elapsed / task.completed
        return Text(str(datetime.timedelta(seconds=int(max(0.0, left)))))


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
        """A progress bar; yields a Tracker."""
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(unit),
            RateColumn(unit),
            TokenRateColumn(),
            TimeElapsedColumn(),
            RemainingColumn(),
        ]
        with Progress(*columns, console=self.console, transient=True, disable=self.quiet) as bar:
            yield Tracker(bar, bar.add_task(description, total=total, tokens=0))

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

"""`prmtool stats`: what a shard set holds, at a glance."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NamedTuple

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from prmtool.cli import plots
from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.core.options import AllowIncomplete, Inputs, Quiet
from prmtool.core.outputs import check_outputs, check_replaceable, input_roots
from prmtool.core.report import RunStats
from prmtool.core.schema import check_columns


def shard_set_stats(frame: pl.LazyFrame) -> dict:
    """Pure core: a dict of figures about the rows in `frame` (any contract columns present)."""
    columns = frame.collect_schema().names()
    figures: dict = {"rows": frame.select(pl.len()).collect().item()}
    if "problem_id" in columns:
        per_problem = frame.group_by("problem_id").len().collect()["len"]
        figures["problems"] = per_problem.len()
        figures["responses_per_problem"] = _describe(per_problem)
    if "correct" in columns:
        figures["accuracy"] = frame.select(pl.col("correct").mean()).collect().item()
        if "problem_id" in columns:
            per_problem = frame.group_by("problem_id").agg(pl.col("correct").mean()).collect()["correct"]
            figures["problems_all_correct"] = int((per_problem == 1).sum())
            figures["problems_none_correct"] = int((per_problem == 0).sum())
    if "verify_status" in columns:
        figures["verify_status"] = dict(
            frame.group_by("verify_status").len().sort("verify_status").collect().iter_rows()
        )
    if "steps" in columns:
        figures["steps_per_response"] = _describe(frame.select(pl.col("steps").list.len()).collect().to_series())
    if "thinking_steps" in columns:  # reasoning traces (--split think)
        figures["thinking_steps"] = _describe(frame.select("thinking_steps").collect().to_series().drop_nulls())
    if "finished" in columns:
        finished = frame.select("finished").collect().to_series()
        figures["finished"] = {
            "yes": int(finished.sum()),
            "no": int((~finished).sum()),
            "unknown": finished.null_count(),
        }
    if "step_labels" in columns:
        labels = frame.select(pl.col("step_labels").explode()).collect().to_series()
        figures["step_labels"] = {
            "good": int((labels == 1).sum()),
            "bad": int((labels == 0).sum()),
            "unlabeled": int(labels.is_null().sum()),
        }
    if "first_error" in columns:
        first_error = frame.select("first_error").collect().to_series().drop_nulls()
        figures["first_error"] = {
            "none": int((first_error == -1).sum()),
            **_describe(first_error.filter(first_error >= 0)),
        }
    if "step_mc" in columns:
        figures["step_mc"] = _describe(frame.select(pl.col("step_mc").explode()).collect().to_series().drop_nulls())
    if "prm_score" in columns:
        figures["prm_score"] = _describe(frame.select("prm_score").collect().to_series().drop_nulls())
    return figures


def _describe(values: pl.Series) -> dict:
    """Count, mean, min, median and max; NaN values are counted apart (`nan`), not described."""
    nan = int(values.is_nan().sum()) if values.dtype.is_float() else 0
    if nan:
        values = values.filter(~values.is_nan())
    if values.len() == 0:
        return {"count": 0, **({"nan": nan} if nan else {})}
    return {
        **({"nan": nan} if nan else {}),
        "count": values.len(),
        "mean": round(float(values.mean()), 4),
        "min": values.min(),
        "median": values.median(),
        "max": values.max(),
    }


def mc_values(frame: pl.LazyFrame) -> pl.Series:
    """Every step's MC value, over all rows (nulls skipped)."""
    return frame.select(pl.col("step_mc").explode()).collect().to_series().drop_nulls()


def first_error_positions(frame: pl.LazyFrame) -> pl.Series:
    """first_error / len(steps) of the responses that have a first error."""
    steps = pl.col("steps").list.len()
    return (
        frame.filter((pl.col("first_error") >= 0) & (steps > 0))
        .select(pl.col("first_error") / steps)
        .collect()
        .to_series()
    )


def problem_accuracies(frame: pl.LazyFrame) -> pl.Series:
    """Each problem's share of correct responses (null `correct` skipped; a problem with none is left out)."""
    return frame.group_by("problem_id").agg(pl.col("correct").mean()).collect()["correct"].drop_nulls()


def filter_reason_counts(frame: pl.LazyFrame) -> dict[str, int]:
    """Rows per filter outcome: "kept" (no filter_reason: the filter's -o rows) first, then each
    reason, the most frequent first."""
    counts = frame.group_by(pl.col("filter_reason").fill_null("kept")).len().collect()
    counts = counts.sort([pl.col("filter_reason") != "kept", "len", "filter_reason"], descending=[False, True, False])
    return dict(counts.iter_rows())


PNG = b"\x89PNG\r\n\x1a\n"  # every PNG file's first bytes


class Plot(NamedTuple):
    file: str
    columns: tuple[str, ...]  # all needed; the plot is skipped without one of them
    data: Callable[[pl.LazyFrame], pl.Series | dict]
    draw: Callable[[list | dict, Path], None]
    counted: str  # what `data` holds one of, for the log


PLOTS = (
    Plot("mc_values.png", ("step_mc",), mc_values, plots.mc_values, "step MC values"),
    Plot(
        "first_error_position.png",
        ("first_error", "steps"),
        first_error_positions,
        plots.first_error_position,
        "first errors",
    ),
    Plot(
        "accuracy_per_problem.png",
        ("correct", "problem_id"),
        problem_accuracies,
        plots.accuracy_per_problem,
        "problems with an outcome",
    ),
    Plot("filter_reasons.png", ("filter_reason",), filter_reason_counts, plots.filter_reasons, "filter outcomes"),
)


def plot_shard_set(frame: pl.LazyFrame, directory: Path) -> list[str]:
    """Write into `directory` the plots whose columns `frame` has; returns one line per plot
    saying where it was written or why it was skipped."""
    columns = frame.collect_schema().names()
    lines = []
    for plot in PLOTS:
        missing = [column for column in plot.columns if column not in columns]
        if missing:
            lines.append(f"skipped {plot.file}: " + ", ".join(f"no {column} column" for column in missing))
            continue
        data = plot.data(frame)
        if len(data) == 0:
            lines.append(f"skipped {plot.file}: no {plot.counted}")
            continue
        plot.draw(data if isinstance(data, dict) else data.to_list(), directory / plot.file)
        lines.append(f"wrote {directory / plot.file} ({len(data):,} {plot.counted})")
    return lines


EXAMPLES = """\b
Examples:
  prmtool stats data_samples/gsm8k/responses
  prmtool stats work/labeled --json > labeled_stats.json
  prmtool stats work/prof work/prof_rejects --plot work/plots
"""


def command(
    inputs: Inputs,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of a table.")] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Also write PNG plots (MC values, first-error position, accuracy per problem, "
            "filter reasons; those whose columns exist) into this directory.",
            show_default=False,
        ),
    ] = None,
    quiet: Quiet = False,
    allow_incomplete: AllowIncomplete = False,
) -> None:
    """Rows, problems, responses per problem, accuracy, steps, labels and first errors of a
    shard set. Prints to stdout."""
    allowed = shards.READ_INCOMPLETE.set(allow_incomplete)
    try:
        found = shards.open_inputs(inputs)
    finally:
        shards.READ_INCOMPLETE.reset(allowed)
    for shard in found:  # a contract column of another type (text scores, a struct) is named, not summed
        check_columns(shard.schema, str(shard.path))
    check_outputs(input_roots(inputs, [s.path for s in found]), {"--plot": plot})
    if plot is not None:
        if plot.exists() and not plot.is_dir():
            raise InputError(f"{plot}: --plot exists and is not a directory")
        for each in PLOTS:  # a plot's file is replaced only if it is a PNG (an earlier run's)
            check_replaceable(plot / each.file, "--plot", lambda head: head.startswith(PNG), "a PNG image")
        try:  # before any work, so that a bad --plot is a usage error with nothing printed
            plot.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(f"{plot}: cannot create the --plot directory ({exc.strerror})") from None
    frame = pl.concat([pl.scan_parquet(s.path) for s in found], how="diagonal_relaxed")
    try:
        figures = {"shards": len(found), **shard_set_stats(frame)}
        if plot is not None:
            log = RunStats("stats", quiet=quiet)
            for line in plot_shard_set(frame, plot):
                log.log(line)
    except (pl.exceptions.PolarsError, OSError) as exc:  # a damaged page is found only as it is read
        raise InputError(f"{_damaged(found)}: cannot read the data ({shards._one_line(exc)})") from None
    if as_json:
        print(json.dumps(_json_safe(figures), indent=2, default=str, allow_nan=False))
        return
    table = Table(title=f"{len(found)} shard(s)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in figures.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
        table.add_row(key.replace("_", " "), _fmt(value))
    Console().print(table)


def _json_safe(value):
    """JSON has no NaN or infinity: such a figure is null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _damaged(found: list[shards.InputShard]) -> str:
    """The first shard whose data pages cannot be read (its footer could be)."""
    import pyarrow.parquet as pq

    for shard in found:
        try:
            pq.read_table(shard.path)
        except Exception:
            return str(shard.path)
    return ", ".join(str(s.path) for s in found[:3])


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)

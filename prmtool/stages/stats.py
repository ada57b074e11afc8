"""`prmtool stats`: what a shard set holds, at a glance."""

from __future__ import annotations

import json
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from prmtool import shards
from prmtool.options import Inputs


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
        figures["verify_status"] = dict(frame.group_by("verify_status").len().sort("verify_status").collect().iter_rows())
    if "steps" in columns:
        figures["steps_per_response"] = _describe(frame.select(pl.col("steps").list.len()).collect().to_series())
    if "step_labels" in columns:
        labels = frame.select(pl.col("step_labels").explode()).collect().to_series()
        figures["step_labels"] = {"good": int((labels == 1).sum()), "bad": int((labels == 0).sum()), "unlabeled": int(labels.is_null().sum())}
    if "first_error" in columns:
        first_error = frame.select("first_error").collect().to_series().drop_nulls()
        figures["first_error"] = {"none": int((first_error == -1).sum()), **_describe(first_error.filter(first_error >= 0))}
    if "step_mc" in columns:
        figures["step_mc"] = _describe(frame.select(pl.col("step_mc").explode()).collect().to_series().drop_nulls())
    if "prm_score" in columns:
        figures["prm_score"] = _describe(frame.select("prm_score").collect().to_series().drop_nulls())
    return figures


def _describe(values: pl.Series) -> dict:
    if values.len() == 0:
        return {"count": 0}
    return {"count": values.len(), "mean": round(float(values.mean()), 4), "min": values.min(), "median": values.median(), "max": values.max()}


EXAMPLES = """\b
Examples:
  prmtool stats data_samples/gsm8k_responses
  prmtool stats work/labeled --json > labeled_stats.json
"""


def command(
    inputs: Inputs,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of a table.")] = False,
) -> None:
    """Rows, problems, responses per problem, accuracy, steps, labels and first errors of a
    shard set. Prints to stdout."""
    found = shards.open_inputs(inputs)
    figures = shard_set_stats(pl.concat([pl.scan_parquet(s.path) for s in found], how="diagonal_relaxed"))
    figures = {"shards": len(found), **figures}
    if as_json:
        print(json.dumps(figures, indent=2, default=str))
        return
    table = Table(title=f"{len(found)} shard(s)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in figures.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
        table.add_row(key.replace("_", " "), _fmt(value))
    Console().print(table)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


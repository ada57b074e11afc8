"""`prmtool eval`: step labels or step scores against human first errors, as ProcessBench
scores them (prmtool/methods/evaluation.py)."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.core.options import AllowIncomplete, Inputs, finite
from prmtool.core.outputs import check_outputs, check_replaceable, input_roots
from prmtool.methods.evaluation import agreement, best_of_n, best_threshold, first_below, first_error_scores, step_auroc

SCORE_COLUMNS = ("step_rewards", "step_values", "step_mc")

EXAMPLES = """\b
Examples:
  prmtool import data_samples/processbench-gsm8k/gsm8k.jsonl --preset processbench -o work/pb
  prmtool score work/pb -o work/pb-scored --no-ref
  prmtool eval work/pb-scored --pred-from step_values --sweep --by generator --json work/pb-eval.json
  prmtool label work/verified -o work/agreed --method consensus --rejects work/disagreed
  prmtool eval work/agreed work/disagreed --pred first_error --against judge_first_error
  prmtool eval work/scored --best-of-n --score prm_score --n 1,4,8
"""


def command(
    inputs: Inputs,
    truth: Annotated[str, typer.Option(help="The column of true first errors (-1: no error).")] = "human_first_error",
    pred: Annotated[str, typer.Option(help="The column of predicted first errors.")] = "first_error",
    pred_from: Annotated[
        str | None,
        typer.Option(
            help="Predict from step scores instead: step_rewards, step_values or step_mc (first step below "
            "--threshold).",
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="With --pred-from: a step scoring below this is an error.", callback=finite)
    ] = 0.0,
    sweep: Annotated[
        bool, typer.Option("--sweep", help="With --pred-from: report the threshold with the best F1.")
    ] = False,
    by: Annotated[
        str | None, typer.Option(help="Also one row per value of this column (e.g. generator).", show_default=False)
    ] = None,
    against: Annotated[
        str | None,
        typer.Option(
            help="Instead of the truth: how --pred agrees with this other first-error column (e.g. "
            "judge_first_error), as a confusion summary.",
            show_default=False,
        ),
    ] = None,
    best: Annotated[
        bool,
        typer.Option(
            "--best-of-n",
            help="Response level instead: per problem, the accuracy of the response with the highest --score, "
            "of the majority answer (pred_answer) and of any correct response (the oracle).",
        ),
    ] = False,
    score: Annotated[str, typer.Option(help="With --best-of-n: the response score to choose by.")] = "prm_score",
    n: Annotated[
        str | None,
        typer.Option(
            help="With --best-of-n: group sizes to evaluate, e.g. 4,8,16 (each problem's first N responses; "
            "default: all of them).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        Path | None,
        typer.Option(
            "--json",
            help="Also write the table as JSON to this file (- prints it to standard output).",
            show_default=False,
        ),
    ] = None,
    allow_incomplete: AllowIncomplete = False,
) -> None:
    """ProcessBench's first-error metrics: the share of erroneous responses whose first error is
    found exactly, the share of correct ones called error-free, and their harmonic mean (F1);
    beside them, how the erroneous responses' misses fall: too early, too late, or missed;
    with --pred-from, also the step-level AUROC of the scores. --against compares two label
    sets; --best-of-n evaluates response scores by Best-of-N."""
    if not (best or against):
        if pred_from is not None and pred_from not in SCORE_COLUMNS:
            raise InputError(f"--pred-from {pred_from!r}: expected one of {', '.join(SCORE_COLUMNS)}")
        if sweep and pred_from is None:
            raise InputError("--sweep needs --pred-from (a score column to threshold)")
    allowed = shards.READ_INCOMPLETE.set(allow_incomplete)
    try:
        found = shards.open_inputs(inputs)
    finally:
        shards.READ_INCOMPLETE.reset(allowed)
    to_stdout = as_json is not None and str(as_json) == "-"
    if as_json is not None and not to_stdout:
        check_outputs(input_roots(inputs, [s.path for s in found]), {"--json": as_json})
        if as_json.is_dir():
            raise InputError(f"{as_json}: --json is a directory; give a file path")
        check_replaceable(as_json, "--json", _is_eval_report, "an eval report")
    # --json -: the JSON alone on standard output, the table on standard error
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if to_stdout else contextlib.nullcontext():
        if best or against:
            report = _best_of_n_report(found, score, _sizes(n)) if best else _agreement_report(found, pred, against)
            if as_json is not None:
                _write_json(report, as_json, stdout)
            return
        kinds = {truth: ("--truth", FIRST_ERROR), "steps": ("steps", STEPS)}
        kinds[pred_from or pred] = ("--pred-from", STEP_SCORES) if pred_from else ("--pred", FIRST_ERROR)
        frame = _read(found, list(dict.fromkeys([truth, pred_from or pred, "steps", *([by] if by else [])])), kinds)
        if not frame.height:
            raise InputError(f"{', '.join(inputs)}: no rows to evaluate")
        without_truth = frame[truth].null_count()
        if without_truth:  # a row without a true first error tells nothing: left out, and said so
            Console(stderr=True).print(
                f"warning: {without_truth:,} rows have no --truth {truth} (null) and are left out", markup=False
            )

        groups = [("all", frame)]
        if by:
            groups += [(str(key[0]), part) for key, part in frame.group_by(by, maintain_order=True)]
        threshold_used = threshold
        if sweep:  # the threshold is chosen on all rows, then applied to every group
            threshold_used, _ = best_threshold(frame[truth].to_list(), frame[pred_from].to_list())
        results = []
        for name, part in groups:
            if pred_from is not None:
                predicted = [first_below(row, threshold_used) for row in part[pred_from].to_list()]
            else:
                predicted = part[pred].to_list()
            scores = first_error_scores(part[truth].to_list(), predicted, part["steps"].list.len().to_list())
            extra = {"step_auroc": step_auroc(part[truth].to_list(), part[pred_from].to_list())} if pred_from else {}
            results.append({"group": name, **scores.as_dict(), "rows_without_truth": part[truth].null_count(), **extra})
        report = {
            "truth": truth,
            "pred": pred if pred_from is None else f"{pred_from} < {threshold_used:g}",
            "threshold": threshold_used if pred_from is not None else None,
            "results": results,
        }
        if as_json is not None:
            _write_json(report, as_json, stdout)
        table = Table(title=f"{report['pred']} against {truth}", title_justify="left")
        headers = ["group", "rows", "error rows", "error acc", "correct acc", "F1", "early", "late", "missed"]
        headers += ["step AUROC"] if pred_from else []
        for header in headers:
            table.add_column(header, justify="left" if header == "group" else "right")
        for row in results:
            table.add_row(
                row["group"], f"{row['rows']:,}", f"{row['error_rows']:,}",
                *(_percent(row[key]) for key in ("error_accuracy", "correct_accuracy", "f1")),
                *(_percent(row[key]) for key in ("error_too_early", "error_too_late", "error_missed")),
                *([_percent(row["step_auroc"])] if pred_from else []),
            )  # fmt: skip
        Console().print(table)


def _numbers(dtype) -> bool:
    return dtype.is_numeric() or dtype == pl.Null


# What each column eval reads must hold: (a test of its type, what the error calls it)
FIRST_ERROR = (lambda dtype: dtype.is_integer() or dtype == pl.Null, "integer first errors (-1: no error)")
STEP_SCORES = (
    lambda dtype: dtype == pl.Null or (isinstance(dtype, pl.List) and _numbers(dtype.inner)),
    "a list of numbers per row (one score per step)",
)
SCORE = (_numbers, "a number per response")
STEPS = (lambda dtype: isinstance(dtype, pl.List), "a list of steps")


def _read(found, columns: list[str], kinds: dict[str, tuple[str, tuple]] | None = None) -> pl.DataFrame:
    """The columns of every shard, each checked: present, of the type it is read as (`kinds`:
    column -> the option naming it and what it must hold), and a first error -1 or a step
    index (a truth also within the response's steps)."""
    kinds = kinds or {}
    for shard in found:
        for column in columns:
            if column not in shard.schema:
                raise InputError(f"{shard.path}: missing column '{column}' (has: {', '.join(shard.schema)})")
            option, (accepts, expected) = kinds.get(column, ("", (lambda dtype: True, "")))
            if not accepts(shard.schema[column]):
                raise InputError(
                    f"{shard.path}: {option} {column!r} has type {shard.schema[column]}; expected {expected}"
                )
    frames = []
    for shard in found:
        frame = pl.read_parquet(shard.path, columns=columns)
        for column, (option, kind) in kinds.items():
            if kind is FIRST_ERROR:
                _check_first_errors(frame, column, option, shard.path, within_steps=option == "--truth")
        frames.append(frame)
    return pl.concat(frames, how="diagonal_relaxed")


def _check_first_errors(frame: pl.DataFrame, column: str, option: str, path, within_steps: bool) -> None:
    """A first error is -1 (none) or a step index: -5 is no "no error", and a true first error
    past the last step is no step at all (a predicted one there counts as "no error found")."""
    values = frame[column].cast(pl.Int64)
    wrong = values < -1
    if within_steps and "steps" in frame.columns:
        wrong = wrong | (values >= frame["steps"].list.len())
    wrong = wrong.fill_null(False)
    if wrong.any():
        row = int(wrong.arg_true()[0])
        count = frame["steps"].list.len()[row] if "steps" in frame.columns else None
        steps = f" (the response has {count} steps)" if count is not None else ""
        raise InputError(
            f"{path}: row {row}: {option} {column} {values[row]} is not -1 (no error) or a step index{steps}"
        )


def _sizes(spec: str | None) -> list[int | None]:
    if spec is None:
        return [None]
    try:
        sizes = [int(part) for part in spec.split(",")]
    except ValueError:
        raise InputError(f"--n {spec!r}: expected group sizes such as 4,8,16") from None
    if any(size < 1 for size in sizes):
        raise InputError(f"--n {spec!r}: sizes must be at least 1")
    return sizes


def _is_eval_report(head: bytes) -> bool:
    """Whether a file's start is one of eval's JSON reports (keys sorted, so these come first)."""
    return head.lstrip().startswith(b"{") and (b'"results": [' in head or b'"agreement":' in head)


def _write_json(report: dict, path: Path, stdout) -> None:
    """`--json FILE` writes the file atomically; `--json -` prints to standard output (never
    through a device path such as /dev/stdout, which would be replaced)."""
    if str(path) == "-":
        stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
        stdout.flush()
    else:
        shards.write_json_atomic(report, path, "--json")


def _best_of_n_report(found, score: str, sizes: list[int | None]) -> dict:
    kinds = {score: ("--score", SCORE)}
    frame = _read(found, ["problem_id", "response_id", score, "pred_answer", "correct"], kinds).sort(
        "problem_id", "response_id"
    )
    if not frame.height:
        raise InputError(f"{', '.join(str(s.path) for s in found)}: no rows to evaluate")
    unscored = frame.select(pl.col(score).cast(pl.Float64).fill_nan(None).null_count()).item()
    if unscored:  # best-of-N never picks them: a problem whose responses have none counts as wrong
        Console(stderr=True).print(
            f"warning: {unscored:,} responses have no --score {score} (null or NaN); best of N never picks them",
            markup=False,
        )
    groups = [
        list(zip(part[score].to_list(), part["pred_answer"].to_list(), part["correct"].fill_null(False).to_list()))
        for _, part in frame.group_by("problem_id", maintain_order=True)
    ]
    largest = max(len(group) for group in groups)
    results = [best_of_n(groups, size or largest) for size in sizes]
    table = Table(title=f"Best-of-N by {score} (responses in response_id order)", title_justify="left")
    for header in ("N", "problems", f"best of N by {score}", "majority vote", "oracle"):
        table.add_column(header, justify="right")
    for row in results:
        table.add_row(
            str(row["n"]), f"{row['problems']:,}", *(_percent(row[k]) for k in ("best_of_n", "majority", "oracle"))
        )
    Console().print(table)
    return {"score": score, "responses_without_score": unscored, "results": results}


def _agreement_report(found, pred: str, against: str) -> dict:
    kinds = {pred: ("--pred", FIRST_ERROR), against: ("--against", FIRST_ERROR), "steps": ("steps", STEPS)}
    frame = _read(found, list(dict.fromkeys([pred, against, "steps"])), kinds)
    counts = agreement(frame[pred].to_list(), frame[against].to_list(), frame["steps"].list.len().to_list())
    compared = counts["rows"] - counts["missing"]
    table = Table(title=f"{pred} against {against}", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    for key, value in counts.items():
        table.add_row(key.replace("first", pred).replace("second", against).replace("_", " "), f"{value:,}")
    agreed = counts["same_step"] + counts["both_error_free"]
    table.add_row("agreement", _percent(agreed / compared if compared else None))
    Console().print(table)
    return {"pred": pred, "against": against, **counts, "agreement": agreed / compared if compared else None}


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"

"""`prmtool eval`: step labels or step scores against human first errors, as ProcessBench
scores them (prmtool/methods/evaluation.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import polars as pl
import typer
from rich.console import Console
from rich.table import Table

from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.core.options import Inputs, finite
from prmtool.core.outputs import check_outputs, input_roots
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
        Path | None, typer.Option("--json", help="Also write the table as JSON to this file.", show_default=False)
    ] = None,
) -> None:
    """ProcessBench's first-error metrics: the share of erroneous responses whose first error is
    found exactly, the share of correct ones called error-free, and their harmonic mean (F1);
    with --pred-from, also the step-level AUROC of the scores. --against compares two label
    sets; --best-of-n evaluates response scores by Best-of-N."""
    if not (best or against):
        if pred_from is not None and pred_from not in SCORE_COLUMNS:
            raise InputError(f"--pred-from {pred_from!r}: expected one of {', '.join(SCORE_COLUMNS)}")
        if sweep and pred_from is None:
            raise InputError("--sweep needs --pred-from (a score column to threshold)")
    found = shards.open_inputs(inputs)
    check_outputs(input_roots(inputs, [s.path for s in found]), {"--json": as_json})
    if best or against:
        report = _best_of_n_report(found, score, _sizes(n)) if best else _agreement_report(found, pred, against)
        if as_json is not None:
            shards.write_json_atomic(report, as_json)
        return
    frame = _read(found, list(dict.fromkeys([truth, pred_from or pred, "steps", *([by] if by else [])])))

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
        results.append({"group": name, **scores.as_dict(), **extra})
    report = {
        "truth": truth,
        "pred": pred if pred_from is None else f"{pred_from} < {threshold_used:g}",
        "threshold": threshold_used if pred_from is not None else None,
        "results": results,
    }
    if as_json is not None:
        shards.write_json_atomic(report, as_json)
    table = Table(title=f"{report['pred']} against {truth}", title_justify="left")
    headers = ["group", "rows", "error rows", "error acc", "correct acc", "F1"] + (["step AUROC"] if pred_from else [])
    for header in headers:
        table.add_column(header, justify="left" if header == "group" else "right")
    for row in results:
        table.add_row(
            row["group"], f"{row['rows']:,}", f"{row['error_rows']:,}",
            *(_percent(row[key]) for key in ("error_accuracy", "correct_accuracy", "f1")),
            *([_percent(row["step_auroc"])] if pred_from else []),
        )  # fmt: skip
    Console().print(table)


def _read(found, columns: list[str]) -> pl.DataFrame:
    for shard in found:
        for column in columns:
            if column not in shard.schema:
                raise InputError(f"{shard.path}: missing column '{column}' (has: {', '.join(shard.schema)})")
    return pl.concat([pl.read_parquet(s.path, columns=columns) for s in found], how="diagonal_relaxed")


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


def _best_of_n_report(found, score: str, sizes: list[int | None]) -> dict:
    frame = _read(found, ["problem_id", "response_id", score, "pred_answer", "correct"]).sort(
        "problem_id", "response_id"
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
    return {"score": score, "results": results}


def _agreement_report(found, pred: str, against: str) -> dict:
    frame = _read(found, list(dict.fromkeys([pred, against, "steps"])))
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

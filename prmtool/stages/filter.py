"""`prmtool filter`: keep the training responses whose process and outcome agree.

Methods (docs/algorithms.md, "PROF consistency filtering"):
- `prof` (default): PROF's consistency filter, per problem group (`problem_id`, over all input
  shards). Responses whose step count is outside [--min-steps, --max-steps] go first. Then,
  of the k responses to remove, c = min(k, round((n_correct - n_incorrect + k) / 2)) come from
  the correct ones, those with the lowest value, and k - c from the wrong ones, those with the
  highest value; c <= 0 means all k come from the wrong ones.
- `consensus`: Qwen2.5-Math-PRM's consensus filtering. A wrong response is kept when its MC
  first error (`first_error`) equals the PRM's first error (the first step whose value is below
  --threshold, -1 if none); a correct response is kept when the PRM flags none of its steps.
- `accuracy-band`: keep the problems whose accuracy (share of correct responses) is in --band.
- `none`: only --where.

Defined behaviour (README.md, "prmtool filter", says the same to users):
- Order: --where first (rows where it is false or null are rejected), then rows with a null
  `correct` (`no_outcome`; methods that read outcomes), then the method. A group is what is
  left of a problem's responses after these two, over all shards.
- PROF's length penalty counts toward k: its removals are made first and the balance rule
  removes k' = max(0, k - L) more from the L-less rest (n_correct and n_incorrect counted
  there). So `--keep m` keeps exactly min(m, responses of acceptable length) per group, and
  a group never loses fewer than its badly sized responses.
- `--keep m` means k = max(0, n - m) for a group of n. `--remove k` with k >= n rejects the
  whole group (`group_too_small`), groups of one included; `--keep` never does.
- `--mode correct` removes only the c correct ones and `--mode incorrect` only the k - c wrong
  ones (c as in `both`); the length penalty applies in every mode.
- round() is Python's: halves go to the even integer (round(2.5) = 2, round(-0.5) = 0).
- Values: the mean over a response's steps (`prm_score` as it is). NaN counts as missing;
  missing steps are skipped. A response with no value at all (null, empty, all missing)
  ranks as the worst of its side in `prof` (first of the correct ones to go, first of the wrong
  ones to go) and is rejected as `no_value` by `consensus`. Ties go by `response_id`: the
  smaller id is removed first, so decisions do not depend on shard layout or row order.
"""

from __future__ import annotations

import bisect
import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import polars as pl
import typer

from prmtool.core.partition import Partition
from prmtool.core.report import Summary
from prmtool.core.stage import Stage
from prmtool.core import outputs, shards
from prmtool.core.errors import InputError
from prmtool.cli.options import (
    finite,
)
from prmtool.core.report import RunStats
from prmtool.core.schema import check_columns
from prmtool.core.where import check_where, where_filter

METHODS = ("prof", "consensus", "accuracy-band", "none")
MODES = ("both", "correct", "incorrect")
VALUES = ("step_rewards", "step_values", "step_mc", "prm_score")
LIST_VALUES = ("step_rewards", "step_values", "step_mc")
DEFAULT_REMOVE = 4  # the paper's k for groups of n = 8

# Every filter_reason, in the order the rules apply. Stable: scripts may match on them.
REASONS = (
    "where",  # --where is false or null
    "no_outcome",  # `correct` is null
    "too_few_steps",  # prof: fewer than --min-steps steps
    "too_many_steps",  # prof: more than --max-steps steps
    "group_too_small",  # prof: --remove k with k >= the group's size
    "prof_correct_low_value",  # prof: a correct response with one of the c lowest values
    "prof_incorrect_high_value",  # prof: a wrong response with one of the k - c highest values
    "no_value",  # consensus: no step value to compare
    "no_label",  # consensus: a wrong response without first_error
    "consensus_disagree",  # consensus: the PRM and MC/outcome disagree
    "accuracy_band",  # accuracy-band: the problem's accuracy is outside --band
)

# Which options each method reads; giving one to another method is a usage error.
APPLIES = {
    "--remove": ("prof",),
    "--keep": ("prof",),
    "--mode": ("prof",),
    "--min-steps": ("prof",),
    "--max-steps": ("prof",),
    "--value": ("prof", "consensus"),
    "--threshold": ("consensus",),
    "--band": ("accuracy-band",),
}


@dataclass(frozen=True)
class FilterConfig:
    method: str = "prof"
    remove: int | None = None  # prof: k per group (default 4 unless --keep)
    keep: int | None = None  # prof: m per group, k = n - m
    mode: str = "both"
    value: str = "step_rewards"
    min_steps: int = 2
    max_steps: int = 30
    threshold: float | None = None  # consensus: default 0.5 for step_mc, else 0
    band: tuple[float, float] = (0.2, 0.8)
    where: str | None = None

    def __post_init__(self) -> None:
        for flag, given, allowed in [
            ("--method", self.method, METHODS),
            ("--mode", self.mode, MODES),
            ("--value", self.value, VALUES),
        ]:
            if given not in allowed:
                raise InputError(f"{flag} {given!r}: expected one of {', '.join(allowed)}")
        if self.remove is not None and self.keep is not None:
            raise InputError("--remove and --keep exclude each other: give one")
        if self.remove is not None and self.remove < 0:
            raise InputError(f"--remove {self.remove}: expected 0 or more")
        if self.keep is not None and self.keep < 1:
            raise InputError(f"--keep {self.keep}: expected 1 or more")
        if self.min_steps < 0 or self.max_steps < self.min_steps:
            raise InputError(f"--min-steps {self.min_steps} --max-steps {self.max_steps}: expected 0 <= min <= max")
        low, high = self.band
        if not 0 <= low <= high <= 1:
            raise InputError(f"--band {low},{high}: expected LOW,HIGH with 0 <= LOW <= HIGH <= 1")
        if self.method == "consensus" and self.value not in LIST_VALUES:
            raise InputError(
                f"--method consensus --value {self.value}: needs per-step values, one of {', '.join(LIST_VALUES)}"
            )

    @property
    def k(self) -> int:
        return DEFAULT_REMOVE if self.remove is None and self.keep is None else (self.remove or 0)

    @property
    def prm_threshold(self) -> float:
        """step_mc is a probability (a step is bad below 0.5); implicit-PRM rewards and values
        are log-ratios, where a negative one marks a bad step."""
        if self.threshold is not None:
            return self.threshold
        return 0.5 if self.value == "step_mc" else 0.0

    @property
    def required(self) -> tuple[str, ...]:
        """The input columns the method reads (without --where's)."""
        return {
            "prof": ("problem_id", "response_id", "correct", "steps", self.value),
            "consensus": ("problem_id", "correct", "first_error", self.value),
            "accuracy-band": ("problem_id", "correct"),
            "none": ("problem_id",),
        }[self.method]

    def arguments(self) -> dict:
        """The options that decide the output (provenance and resume checks)."""
        chosen: dict = {"method": self.method, "where": self.where}
        if self.method == "prof":
            chosen.update(mode=self.mode, value=self.value, min_steps=self.min_steps, max_steps=self.max_steps)
            chosen.update({"keep": self.keep} if self.keep is not None else {"remove": self.k})
        elif self.method == "consensus":
            chosen.update(value=self.value, threshold=self.prm_threshold)
        elif self.method == "accuracy-band":
            chosen.update(band=list(self.band))
        return chosen


def parse_band(spec: str) -> tuple[float, float]:
    """`0.2,0.8` -> (0.2, 0.8); both bounds are inclusive."""
    try:
        low, high = (float(part) for part in spec.split(","))
    except ValueError:
        raise InputError(f"--band {spec!r}: expected LOW,HIGH, e.g. 0.2,0.8") from None
    if not 0 <= low <= high <= 1:
        raise InputError(f"--band {spec!r}: expected 0 <= LOW <= HIGH <= 1")
    return low, high


# --- the pure core --------------------------------------------------------------------------


def row_features(frame: pl.DataFrame, options: FilterConfig) -> pl.DataFrame:
    """Per-row inputs of the decision, one narrow row per input row, same order: problem_id,
    and whichever of _correct, response_id, _n_steps, _value, _first_error, _prm_first,
    _where the method reads. No group operation: shards can be done one at a time."""
    return frame.select(feature_expressions(frame.columns, options))


def feature_expressions(names: list[str], options: FilterConfig) -> list[pl.Expr]:
    """row_features' expressions, for a frame with columns `names` (also run on a lazy scan,
    so that a shard's list columns are reduced as they are read)."""
    expressions = [pl.col("problem_id").cast(pl.String)]
    if "correct" in names:  # also for the balance figures of `none`
        expressions.append(pl.col("correct").cast(pl.Boolean).alias("_correct"))
    if options.method == "prof":
        expressions += [
            pl.col("response_id").cast(pl.String),
            pl.col("steps").list.len().fill_null(0).alias("_n_steps"),
            _mean_value(options.value).alias("_value"),
        ]
    elif options.method == "consensus":
        below = (
            pl.col(options.value)
            .cast(pl.List(pl.Float64))
            .list.eval((pl.element().fill_nan(None) < options.prm_threshold).fill_null(False))
        )
        expressions += [
            pl.col("first_error").cast(pl.Int64).alias("_first_error"),
            pl.when(below.list.any()).then(below.list.arg_max().cast(pl.Int64)).otherwise(-1).alias("_prm_first"),
            _mean_value(options.value).is_null().alias("_no_value"),
        ]
    if options.where:
        expressions.append(where_filter(options.where).alias("_where"))
    return expressions


def _mean_value(column: str) -> pl.Expr:
    """The response's value: the mean of its steps' values, NaN, infinities and null skipped
    (a value no scorer can mean: counted as missing); null when none is left. A scalar column
    (prm_score) is taken as it is, a non-finite one made null."""
    if column in LIST_VALUES:
        values = pl.col(column).cast(pl.List(pl.Float64))
        # list.mean is fast; the skipping mean only where a NaN or an infinity made the fast one so
        fast = values.list.mean()
        finite_only = values.list.eval(pl.when(pl.element().is_finite()).then(pl.element())).list.mean()
        return pl.when(fast.is_finite()).then(fast).otherwise(finite_only).fill_nan(None)
    value = pl.col(column).cast(pl.Float64)
    return pl.when(value.is_finite()).then(value)


def _reject(reason: str, condition: pl.Expr) -> pl.Expr:
    """Give rows that are still kept and meet `condition` this reason (the first one sticks)."""
    still_kept = pl.col("_reason").is_null()
    return (
        pl.when(still_kept & condition.fill_null(False))
        .then(pl.lit(reason))
        .otherwise(pl.col("_reason"))
        .alias("_reason")
    )


def decide(features: pl.DataFrame, options: FilterConfig) -> pl.Series:
    """The filter_reason of each row of `features` (null: kept), group-wise over the whole
    frame with window expressions: no Python loop over groups."""
    # Eager steps: polars runs them on its in-memory engine, faster for windows and sorts
    # than the streaming engine a lazy collect() picks.
    frame = features.with_row_index("_i").with_columns(pl.lit(None, dtype=pl.String).alias("_reason"))
    if "_where" in features.columns:
        frame = frame.with_columns(_reject("where", ~pl.col("_where").fill_null(False)))
    if options.method != "none":
        frame = frame.with_columns(_reject("no_outcome", pl.col("_correct").is_null()))
    if options.method == "prof":
        frame = _prof(frame, options)
    elif options.method == "consensus":
        correct = pl.col("_correct")
        frame = frame.with_columns(_reject("no_value", pl.col("_no_value")))
        frame = frame.with_columns(_reject("no_label", ~correct & pl.col("_first_error").is_null()))
        disagree = (
            pl.when(correct).then(pl.col("_prm_first") >= 0).otherwise(pl.col("_prm_first") != pl.col("_first_error"))
        )
        frame = frame.with_columns(_reject("consensus_disagree", disagree))
    elif options.method == "accuracy-band":
        active = pl.col("_reason").is_null()
        accuracy = (active & pl.col("_correct")).sum().over("problem_id") / active.sum().over("problem_id")
        low, high = options.band
        frame = frame.with_columns(_reject("accuracy_band", (accuracy < low) | (accuracy > high)))
    return frame.sort("_i")["_reason"].alias("filter_reason")


def _prof(frame: pl.DataFrame, options: FilterConfig) -> pl.DataFrame:
    group, correct = "problem_id", pl.col("_correct")
    in_group = pl.col("_reason").is_null()
    frame = frame.with_columns(in_group.alias("_in_group"))
    frame = frame.with_columns(_reject("too_few_steps", pl.col("_n_steps") < options.min_steps))
    frame = frame.with_columns(_reject("too_many_steps", pl.col("_n_steps") > options.max_steps))
    rest = pl.col("_reason").is_null()
    counts = {
        "_n": pl.col("_in_group"),
        "_length_removed": pl.col("_in_group") & ~rest,
        "_n_correct": rest & correct,
        "_n_incorrect": rest & ~correct,
    }  # signed: k = n - m and k - L may go below zero before they are clipped
    frame = frame.with_columns(flag.sum().over(group).cast(pl.Int64).alias(name) for name, flag in counts.items())
    k = pl.lit(options.k) if options.keep is None else (pl.col("_n") - options.keep).clip(lower_bound=0)
    frame = frame.with_columns(k.cast(pl.Int64).alias("_k"))
    frame = frame.with_columns(_reject("group_too_small", pl.col("_k") >= pl.col("_n")))

    # The balance rule on what the length penalty left: k' = k - L, c = round((nc - ni + k') / 2).
    k_rest = (pl.col("_k") - pl.col("_length_removed")).clip(lower_bound=0)
    x = pl.col("_n_correct") - pl.col("_n_incorrect") + k_rest
    half = x // 2  # floor; an odd x is half-way between half and half + 1: take the even one
    rounded = pl.when(x % 2 == 0).then(half).otherwise(half + half % 2)
    c = pl.min_horizontal(rounded.clip(lower_bound=0), k_rest)
    frame = frame.with_columns(c.alias("_c"), (k_rest - c).alias("_w"))
    frame = frame.with_columns(
        pl.min_horizontal("_c", "_n_correct").alias("_c") if options.mode != "incorrect" else pl.lit(0).alias("_c"),
        pl.min_horizontal("_w", "_n_incorrect").alias("_w") if options.mode != "correct" else pl.lit(0).alias("_w"),
    )

    # Removal order within each side: a missing value first, then the lowest value for the
    # correct side (the highest for the wrong side), then the smaller response_id.
    eligible = pl.col("_reason").is_null()
    removal_key = pl.when(correct).then(pl.col("_value")).otherwise(-pl.col("_value"))
    frame = frame.with_columns(removal_key.alias("_key"), eligible.alias("_eligible"))
    frame = frame.sort([group, "_correct", "_key", "response_id"], nulls_last=False)
    # Each (problem, side) is now a run of adjacent rows: a row's position among its run's
    # eligible rows is a running count minus the count where the run began (no hashing).
    run_starts = pl.col(group).ne_missing(pl.col(group).shift()) | correct.ne_missing(correct.shift())
    seen = pl.col("_eligible").cast(pl.Int64).cum_sum()
    before_run = pl.when(run_starts).then(seen - pl.col("_eligible").cast(pl.Int64)).forward_fill()
    frame = frame.with_columns((seen - before_run - 1).alias("_position"))
    frame = frame.with_columns(
        _reject("prof_correct_low_value", pl.col("_eligible") & correct & (pl.col("_position") < pl.col("_c")))
    )
    return frame.with_columns(
        _reject("prof_incorrect_high_value", pl.col("_eligible") & ~correct & (pl.col("_position") < pl.col("_w")))
    )


def split_rows(frame: pl.DataFrame, reasons: pl.Series) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Kept rows (every input column) and rejected rows (every input column plus
    filter_reason), each in input order. A filter_reason already in the input is replaced on
    rejected rows and left as it is on kept ones."""
    mask = reasons.is_null()
    kept = frame.filter(mask)
    rejected = frame.filter(~mask).with_columns(reasons.filter(~mask).alias("filter_reason"))
    return kept, rejected


def filter_rows(frame: pl.DataFrame, method: str = "prof", **options) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Pure core: rows in, (kept, rejected) out, with kept + rejected = the input rows.
    `options` are FilterConfig' fields, e.g. `filter_rows(rows, remove=4, mode="correct")`."""
    settings = FilterConfig(method=method, **options)
    return split_rows(frame, decide(row_features(frame, settings), settings))


def summarize(features: pl.DataFrame, reasons: pl.Series, options: FilterConfig) -> dict:
    """The run's figures: groups, kept and removed rows by reason, and the positive/negative
    balance before and after (when there is a `correct` column)."""
    rows = features.with_columns(reasons)
    kept = rows.filter(pl.col("filter_reason").is_null())
    counts = dict(rows.group_by("filter_reason").len().drop_nulls().iter_rows())
    removed = {reason: counts[reason] for reason in REASONS if reason in counts}
    groups = rows["problem_id"].n_unique()
    groups_kept = kept["problem_id"].n_unique()
    summary: dict = {
        "method": options.method,
        "rows_in": rows.height,
        "kept": kept.height,
        "removed": sum(removed.values()),
        "removed_by_reason": removed,
        "groups": groups,
        "groups_kept": groups_kept,
        "groups_emptied": groups - groups_kept,
    }
    if "_correct" in rows.columns:
        summary["balance"] = {"before": _balance(rows), "after": _balance(kept)}
    if options.method == "prof":
        before_ranking = ("where", "no_outcome", "too_few_steps", "too_many_steps", "group_too_small")
        ranked = ~pl.col("filter_reason").is_in(before_ranking).fill_null(False)
        summary["values_missing"] = rows.filter(ranked & pl.col("_value").is_null()).height
    elif options.method == "consensus":
        summary["values_missing"] = removed.get("no_value", 0)
    return summary


def _balance(rows: pl.DataFrame) -> dict:
    correct = rows["_correct"]
    balance = {"positive": int(correct.sum()), "negative": int((~correct).sum())}
    if correct.null_count():
        balance["unknown"] = correct.null_count()
    return balance


# --- the command ----------------------------------------------------------------------------


EXAMPLES = """\b
Examples:
  prmtool filter work/scored -o work/prof --rejects work/prof_rejects
  prmtool filter work/scored -o work/prof --rejects work/rej --keep 4 --mode correct --value step_values
  prmtool filter work/labeled -o work/agree --rejects work/rej --method consensus --value step_mc --threshold 0.5
  prmtool filter work/verified -o work/band --rejects work/rej --method accuracy-band --band 0.2,0.8 --report band.json
  prmtool filter work/verified -o work/ok --rejects work/rej --method none --where "verify_status = 'ok'"
"""


@dataclass(kw_only=True)
class FilterSettings:
    rejects: Annotated[
        Path,
        typer.Option(
            "--rejects",
            help="Directory for the removed rows, with a filter_reason column: nothing is lost.",
            show_default=False,
        ),
    ]
    method: Annotated[
        str,
        typer.Option(
            help=(
                "prof (PROF consistency filter), consensus (MC and PRM agree on the first error), accuracy-band or "
                "none (only --where)."
            )
        ),
    ] = "prof"
    remove: Annotated[
        int | None, typer.Option(help="prof: responses to remove per problem (default 4).", min=0, show_default=False)
    ] = None
    keep: Annotated[
        int | None,
        typer.Option(help="prof: responses to keep per problem, instead of --remove.", min=0, show_default=False),
    ] = None
    mode: Annotated[
        str | None,
        typer.Option(
            help="prof: both (default), correct (remove only correct ones) or incorrect (only wrong ones).",
            show_default=False,
        ),
    ] = None
    value: Annotated[
        str | None,
        typer.Option(
            help=(
                "prof, consensus: step_rewards (default), step_values, step_mc or prm_score (prof only); lists are "
                "averaged over steps."
            ),
            show_default=False,
        ),
    ] = None
    min_steps: Annotated[
        int | None, typer.Option(help="prof: fewer steps are removed first (default 2).", min=0, show_default=False)
    ] = None
    max_steps: Annotated[
        int | None, typer.Option(help="prof: more steps are removed first (default 30).", min=1, show_default=False)
    ] = None
    threshold: Annotated[
        float | None,
        typer.Option(
            help="consensus: a step below this is the PRM's error (default 0.5 for step_mc, else 0).",
            callback=finite,
            show_default=False,
        ),
    ] = None
    band: Annotated[
        str | None, typer.Option(help="accuracy-band: LOW,HIGH, inclusive (default 0.2,0.8).", show_default=False)
    ] = None
    where: Annotated[
        str | None,
        typer.Option(
            help="Also keep only rows where this SQL expression holds (applied first), e.g. \"verify_status = 'ok'\"."
        ),
    ] = None
    report: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Also write the summary as JSON to this file. With --shard-index, the partition's summary, to "
                "FILE's name with the partition in it (prof.00001-of-00004.json)."
            )
        ),
    ] = None


def run(
    inputs: list[str], output: Path, settings: FilterSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Keep the responses whose process and outcome agree (PROF by default); the removed
    rows go to --rejects with a filter_reason. Groups are problems, over all input shards;
    with --num-shards, partitions are sets of whole problems."""
    stats = RunStats("filter", quiet=quiet)
    options = _options(
        settings.method,
        settings.remove,
        settings.keep,
        settings.mode,
        settings.value,
        settings.min_steps,
        settings.max_steps,
        settings.threshold,
        settings.band,
        settings.where,
    )
    condition = where_filter(settings.where)
    found = shards.open_inputs(inputs)
    for shard in found:
        if options.value in options.required and options.value not in shard.schema:
            raise InputError(
                f"{shard.path}: missing value column '{options.value}' (--value {options.value}); "
                f"`prmtool score` writes step_rewards, step_values and prm_score, `prmtool label` step_mc"
            )
        check_columns(shard.schema, str(shard.path), options.required)
        if condition is not None:
            check_where(condition, settings.where, shard)  # an unknown column or a non-boolean result
    report_file = (
        settings.report
        if settings.report is None or partition.whole
        else settings.report.with_name(partition.shard_name(settings.report.name))
    )
    shards.check_output_dir(output, found, inputs, {"--rejects": settings.rejects}, files={"--report": report_file})
    shards.check_distinct_names(found)

    arguments = options.arguments()
    described = [s.describe() for s in found]
    parts = {"kept": output, "rejected": settings.rejects}
    done = f"{output} and {settings.rejects} are already complete for these inputs and options"
    if not partition.whole:
        done = f"partition {partition.index} of {partition.count}: {done}"
    # Without --overwrite: is there anything to do? (A directory holding another run is refused
    # here.) With it, the old outputs are cleared only after the ids have been checked, below.
    key = outputs.run_key("filter", arguments, described, partition.count)
    with outputs.output_lock([output, settings.rejects], key):
        return _filter(found, options, arguments, described, parts, partition, overwrite, report_file, done, stats)


def _filter(found, options, arguments, described, parts, partition, overwrite, report, done, stats) -> Summary:
    """Decide every group, then write the kept and rejected rows and the report."""
    complete = not overwrite and all(
        [
            shards.prepare_whole_output(d, "filter", {**arguments, "part": part}, described, False, partition)
            for part, d in parts.items()
        ]
    )
    if complete and report is None:
        stats.log(f"{done}; --overwrite recomputes them")
        return stats.summary()

    features = pl.concat([_read_features(shard, options) for shard in found], how="diagonal_relaxed")
    if features["problem_id"].null_count():  # groups are problems: a row without one has no group
        row = int(features["problem_id"].is_null().arg_true()[0])
        raise InputError(
            f"{found[bisect.bisect_right(list(itertools.accumulate(s.rows for s in found)), row)].path}: "
            "column 'problem_id' has null values"
        )
    if options.method == "prof":
        _check_unique_response_ids(features, found)  # ties are broken by it
    # Every partition reads every shard's features but decides only its own problems' groups:
    # whole groups, so their decisions are the whole run's.
    owned = None if partition.whole else partition.owns_problems(features["problem_id"])
    if owned is not None:
        features = features.filter(owned)
        stats.log(f"partition {partition.index} of {partition.count}: {features.height} of {owned.len()} rows")
    reasons = decide(features, options)
    summary = summarize(features, reasons, options)
    if complete:
        stats.log(f"{done}; writing only the report")
    else:
        if overwrite:
            for part, directory in parts.items():
                shards.prepare_whole_output(
                    directory, "filter", {**arguments, "part": part}, described, True, partition
                )
        _write(found, owned, reasons, parts, arguments, partition, stats)
    stats.rows_in, stats.rows_out = summary["rows_in"], summary["kept"]
    stats.problem_ids.update(features.filter(reasons.is_null())["problem_id"].unique().to_list())
    stats.counts.update(_summary_counts(summary))
    _warn(summary, options, stats)
    if report is not None:
        shards.write_json_atomic({"stage": "filter", "arguments": arguments, **summary}, report)
    return stats.finish()


def _options(method, remove, keep, mode, value, min_steps, max_steps, threshold, band, where) -> FilterConfig:
    given = {"--remove": remove, "--keep": keep, "--mode": mode, "--min-steps": min_steps, "--max-steps": max_steps,
             "--value": value, "--threshold": threshold, "--band": band}  # fmt: skip
    if method in METHODS:
        for flag, setting in given.items():
            if setting is not None and method not in APPLIES[flag]:
                raise InputError(f"{flag} applies to --method {' and '.join(APPLIES[flag])}, not {method}")
    chosen = {"remove": remove, "keep": keep, "mode": mode, "value": value, "min_steps": min_steps,
              "max_steps": max_steps, "threshold": threshold, "band": parse_band(band) if band else None}  # fmt: skip
    return FilterConfig(method=method, where=where, **{k: v for k, v in chosen.items() if v is not None})


def _read_features(shard: shards.InputShard, options: FilterConfig) -> pl.DataFrame:
    """Only the columns the decision reads, and list columns reduced to a count or a mean as
    they are read (a lazy scan), so the whole set's decision fits in memory as a few narrow
    columns."""
    names = set(options.required) | ({"correct"} & set(shard.schema))
    if options.where:
        names |= set(where_filter(options.where).meta.root_names()) & set(shard.schema)
    try:
        return (
            pl.scan_parquet(shard.path)
            .select(feature_expressions([c for c in shard.schema if c in names], options))
            .collect()
        )
    except (pl.exceptions.PolarsError, OSError) as exc:  # a --where that fails on the data, a damaged file
        raise InputError(f"{shard.path}: {shards._one_line(exc)}") from None


def _check_unique_response_ids(features: pl.DataFrame, found: list[shards.InputShard]) -> None:
    """shards.check_unique_ids' rule and messages, on the ids the features already hold: the
    column is not read a second time."""
    ids = features["response_id"]
    starts = list(itertools.accumulate(shard.rows for shard in found))

    def file_of(row: int) -> str:
        return str(found[bisect.bisect_right(starts, row)].path)

    duplicated = ids.is_duplicated()
    if duplicated.any():
        rows = duplicated.arg_true().head(2).to_list()
        files = sorted({file_of(row) for row in rows})
        raise InputError(f"{', '.join(files)}: duplicate response_id {ids[rows[0]]!r}")
    if ids.null_count():
        raise InputError(f"{file_of(int(ids.is_null().arg_true()[0]))}: column 'response_id' has null values")


def _write(
    found: list[shards.InputShard],
    owned: pl.Series | None,
    reasons: pl.Series,
    parts: dict[str, Path],
    arguments: dict,
    partition: Partition,
    stats: RunStats,
) -> None:
    """One kept and one rejected shard per input shard (empty ones too), named after it
    (with a partition: `partition.shard_name`, and only its problems' rows), then the
    manifests: rejects first, the kept output's last.

    Two threads write, so that one shard's Parquet encoding and fsync (single-threaded, and
    waiting on the disk) overlap the next shard's read and split."""
    written: dict[str, dict[str, int]] = {part: {} for part in parts}
    input_offset = decided_offset = 0
    in_flight: list[Future] = []
    with (
        ThreadPoolExecutor(max_workers=2) as writers,
        stats.progress("filter", total=sum(s.rows for s in found)) as tracker,
    ):
        for shard in found:
            frame = shards.read_shard(shard)
            if owned is not None:
                frame = frame.filter(owned.slice(input_offset, shard.rows))
            input_offset += shard.rows
            kept, rejected = split_rows(frame, reasons.slice(decided_offset, frame.height))
            decided_offset += frame.height
            for future in in_flight:  # the previous shard's pieces: at most two shards in memory
                future.result()
            in_flight = []
            name = partition.shard_name(shard.name)
            for part, rows in (("rejected", rejected), ("kept", kept)):
                record = shards.provenance("filter", {**arguments, "part": part}, shard)
                in_flight.append(writers.submit(shards.write_shard, rows, parts[part] / name, record))
                written[part][name] = rows.height
                stats.shards_written += 1
            tracker.advance(shard.rows)
        for future in in_flight:
            future.result()
    described = [s.describe() for s in found]
    for part in ("rejected", "kept"):
        shards.write_manifest(parts[part], "filter", {**arguments, "part": part}, described, written[part], partition)


def _summary_counts(summary: dict) -> dict[str, int]:
    counts = {"groups": summary["groups"], "groups_emptied": summary["groups_emptied"]}
    counts.update({f"removed_{reason}": n for reason, n in summary["removed_by_reason"].items()})
    if "balance" in summary:
        for when in ("before", "after"):
            counts[f"positives_{when}"] = summary["balance"][when]["positive"]
            counts[f"negatives_{when}"] = summary["balance"][when]["negative"]
    if summary.get("values_missing"):
        counts["values_missing"] = summary["values_missing"]
    return counts


def _warn(summary: dict, options: FilterConfig, stats: RunStats) -> None:
    removed = summary["removed_by_reason"]
    if removed.get("group_too_small"):
        stats.warn(
            f"{removed['group_too_small']} responses are in groups of at most --remove {options.k} and were all "
            f"removed; --keep M keeps M per group instead"
        )
    if removed.get("no_outcome"):
        stats.warn(f"{removed['no_outcome']} responses have no `correct` value and were removed (no_outcome)")
    if summary.get("values_missing"):
        fate = "ranked as the worst of their side" if options.method == "prof" else "removed (no_value)"
        stats.warn(f"{summary['values_missing']} responses have no {options.value} value (null, empty or NaN): {fate}")
    if summary["rows_in"] and not summary["kept"]:
        stats.warn("every row was removed")


STAGE = Stage("filter", FilterSettings, run, EXAMPLES, required=("problem_id", "response_id"))

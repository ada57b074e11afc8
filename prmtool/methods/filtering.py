"""PROF and the other group filters of `prmtool filter`, as pure functions over frames.

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

from dataclasses import dataclass

import polars as pl

from prmtool.core.errors import InputError
from prmtool.core.where import where_filter

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
    "--steps": ("prof", "consensus"),
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
    steps: str = "all"  # reasoning traces: the per-step values of the thinking, of the solution, or all

    def __post_init__(self) -> None:
        for flag, given, allowed in [
            ("--method", self.method, METHODS),
            ("--mode", self.mode, MODES),
            ("--value", self.value, VALUES),
            ("--steps", self.steps, ("all", "thinking", "solution")),
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
        if self.steps != "all" and self.value not in LIST_VALUES:
            raise InputError(
                f"--steps {self.steps} --value {self.value}: needs per-step values, one of {', '.join(LIST_VALUES)}"
            )
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
        thinking = ("thinking_steps",) if self.steps != "all" else ()
        return {
            "prof": ("problem_id", "response_id", "correct", "steps", self.value, *thinking),
            "consensus": ("problem_id", "correct", "first_error", self.value, *thinking),
            "accuracy-band": ("problem_id", "correct"),
            "none": ("problem_id",),
        }[self.method]

    def arguments(self) -> dict:
        """The options that decide the output (provenance and resume checks)."""
        chosen: dict = {"method": self.method, "where": self.where}
        if self.steps != "all":
            chosen.update(steps=self.steps)
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
            _mean_value(options.value, options.steps).alias("_value"),
        ]
    elif options.method == "consensus":
        below = _window(pl.col(options.value).cast(pl.List(pl.Float64)), options.steps).list.eval(
            (pl.element().fill_nan(None) < options.prm_threshold).fill_null(False)
        )
        offset = pl.col("thinking_steps").fill_null(0).cast(pl.Int64) if options.steps == "solution" else pl.lit(0)
        expressions += [
            pl.col("first_error").cast(pl.Int64).alias("_first_error"),
            pl.when(below.list.any())
            .then(below.list.arg_max().cast(pl.Int64) + offset)
            .otherwise(-1)
            .alias("_prm_first"),
            _mean_value(options.value, options.steps).is_null().alias("_no_value"),
        ]
    if options.where:
        expressions.append(where_filter(options.where).alias("_where"))
    return expressions


def _window(values: pl.Expr, steps: str) -> pl.Expr:
    """`--steps`: a reasoning trace's thinking steps' values, or its solution's (`thinking_steps`)."""
    if steps == "all":
        return values
    thinking = pl.col("thinking_steps").fill_null(0).cast(pl.Int64)
    if steps == "thinking":
        return values.list.head(thinking)
    return values.list.slice(thinking)


def _mean_value(column: str, steps: str = "all") -> pl.Expr:
    """The response's value: the mean of its steps' values, NaN, infinities and null skipped
    (a value no scorer can mean: counted as missing); null when none is left. A scalar column
    (prm_score) is taken as it is, a non-finite one made null. `--steps`: of those steps only."""
    if column in LIST_VALUES:
        values = _window(pl.col(column).cast(pl.List(pl.Float64)), steps)
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

"""The row contract: every column prmtool reads or writes, with its type.

One row is one response to a problem (or one problem, before `generate`). Column names are
part of the public interface; README.md documents them once, from this table.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from prmtool.core.errors import InputError


@dataclass(frozen=True)
class Column:
    name: str
    dtype: pl.DataType
    doc: str
    written_by: str


COLUMNS: dict[str, Column] = {
    c.name: c
    for c in [
        Column("problem_id", pl.String(), "group key: all responses to one problem share it", "import"),
        Column("problem", pl.String(), "the problem text", "import"),
        Column("reference_answer", pl.String(), "the gold final answer", "import"),
        Column("reference_solution", pl.String(), "optional worked gold solution", "import"),
        Column("response_id", pl.String(), "unique id of a response", "import, generate"),
        Column("response", pl.String(), "the model's solution text", "import, generate"),
        Column("steps", pl.List(pl.String()), "the response split into steps, losslessly", "import, generate"),
        Column(
            "thinking_steps",
            pl.Int32(),
            "a reasoning trace (--split think): how many leading steps are thinking; 0 for a response without",
            "import, generate",
        ),
        Column(
            "finished",
            pl.Boolean(),
            "a reasoning trace: its thinking closed and a solution followed; null for a response without thinking",
            "import, generate",
        ),
        Column(
            "human_first_error",
            pl.Int32(),
            "a person's earliest wrong step of the response, -1 none (import --preset processbench, or review)",
            "import, review",
        ),
        Column("pred_answer", pl.String(), "final answer extracted from the response, null if none", "verify"),
        Column(
            "answer_source",
            pl.String(),
            "where pred_answer was found: boxed, phrase, final_math, final_sentence, last_number, math_verify",
            "verify",
        ),
        Column(
            "correct",
            pl.Boolean(),
            "pred_answer is mathematically equal to reference_answer; null without one",
            "verify",
        ),
        Column("verify_status", pl.String(), "ok, no_answer, no_reference, timeout or error", "verify"),
        Column("step_mc", pl.List(pl.Float64()), "Monte Carlo value of each step's prefix", "label"),
        Column("step_mc_low", pl.List(pl.Float64()), "lower end of step_mc's 95% Wilson interval", "label"),
        Column("step_mc_high", pl.List(pl.Float64()), "upper end of step_mc's 95% Wilson interval", "label"),
        Column("step_labels", pl.List(pl.Int8()), "1 good, 0 bad, null unlabeled", "label"),
        Column("first_error", pl.Int32(), "index of the first wrong step, -1 none", "label"),
        Column("judge_first_error", pl.Int32(), "label --method judge: the critic's first error, -1 none", "label"),
        Column("judge_output", pl.List(pl.String()), "label --method judge: each critique, as written", "label"),
        Column("label_reason", pl.String(), "label --method consensus rejects: disagree or judge_unparseable", "label"),
        Column(
            "step_rewards",
            pl.List(pl.Float64()),
            "per-step process reward (implicit PRM: q at the step's end minus q at the previous step's end)",
            "score",
        ),
        Column("step_values", pl.List(pl.Float64()), "cumulative process value q at each step's end", "score"),
        Column("prm_score", pl.Float64(), "response-level process score (--agg over the chosen --reward)", "score"),
        Column("token_rewards", pl.List(pl.Float64()), "per-token implicit reward, with --token-rewards", "score"),
        Column("filter_reason", pl.String(), "why filter removed the row (in --rejects only)", "filter"),
        Column("intervention", pl.String(), "the corrective step that replaces the first error", "intervene"),
        Column("intervention_step", pl.Int32(), "index of the step the intervention replaces", "intervene"),
        Column(
            "intervention_success_rate",
            pl.Float64(),
            "share of verification rollouts from the intervention that reach the reference answer",
            "intervene",
        ),
        Column(
            "guided_response",
            pl.String(),
            "steps before the error plus the intervention (the failed suffix dropped)",
            "intervene",
        ),
        Column("review_note", pl.String(), "the reviewer's note on the response, null where not reviewed", "review"),
        Column(
            "reviewed_at",
            pl.String(),
            "when a person set human_first_error (ISO 8601), null where not reviewed",
            "review",
        ),
    ]
}


def _compatible(actual: pl.DataType, expected: pl.DataType) -> bool:
    """Accept the natural relatives of a contract type (any float width, any int width)."""
    if actual == expected:
        return True
    if isinstance(expected, pl.List):
        return isinstance(actual, pl.List) and _compatible(actual.inner, expected.inner)
    if expected.is_float():
        return actual.is_float()
    if expected.is_integer():
        return actual.is_integer()
    return False


def check_columns(schema: pl.Schema | dict, source: str, required: tuple[str, ...] | list[str] = ()) -> None:
    """Raise InputError naming `source` and the column if a required column is missing or a
    contract column has the wrong type. Columns outside the contract pass through untouched."""
    for name in required:
        if name not in schema:
            raise InputError(f"{source}: missing required column '{name}' (has: {', '.join(schema)})")
    for name, dtype in schema.items():
        column = COLUMNS.get(name)
        if column is not None and dtype != pl.Null and not _compatible(dtype, column.dtype):
            raise InputError(f"{source}: column '{name}' has type {dtype}, expected {column.dtype}")


def check_steps(shard) -> None:
    """A shard's `steps` (an `InputShard`), checked before any model loads: each row's a list,
    none of them null (a model stage would otherwise fail on it after the load)."""
    steps = pl.read_parquet(shard.path, columns=["steps"])["steps"]
    for bad, what in [
        (steps.is_null(), "is null"),
        (steps.list.eval(pl.element().is_null()).list.any(), "holds a null step"),
    ]:
        bad = bad.fill_null(False)
        if bad.any():
            raise InputError(f"{shard.path}: row {int(bad.arg_true()[0])}: column 'steps' {what}")


def cast_to_contract(frame: pl.DataFrame) -> pl.DataFrame:
    """Cast contract columns to their exact types (e.g. all-null columns read from JSON)."""
    casts = [
        pl.col(n).cast(COLUMNS[n].dtype) for n in frame.columns if n in COLUMNS and frame.schema[n] != COLUMNS[n].dtype
    ]
    return frame.with_columns(casts) if casts else frame


def markdown_table() -> str:
    """The contract as a Markdown table, for README.md (tests keep the two in sync)."""
    lines = ["| column | type | written by | meaning |", "| --- | --- | --- | --- |"]
    for c in COLUMNS.values():
        lines.append(f"| `{c.name}` | {c.dtype} | {c.written_by} | {c.doc} |")
    return "\n".join(lines)

"""`prmtool intervene`: corrective steps for wrong responses, kept when rollouts from them reach
the reference answer (InT; docs/algorithms.md, "Interventions").

For each wrong response: its first critical error (from `first_error`, or asked of the model),
`--candidates` proposals of one replacement step written in the solver's voice, and
`--verify-rollouts` continuations of `steps[:error] + intervention` checked by the project's
verifier. A candidate is kept when at least `--min-success` of them are right.

All rows advance together: one engine call locates the errors the labels do not give, one
proposes every candidate of every row, one samples every verification rollout.

Output: one row per kept intervention (all input columns, plus the intervention columns), so
the row count differs from the input's. Nothing is lost silently: every input row is either
the source of a kept row or, with `--rejects DIR`, in the rejects with the reason; every count
is in the summary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import polars as pl
import typer

from prmtool.core.partition import Partition
from prmtool.core.report import Summary
from prmtool.core.stage import Stage
from prmtool.core import shards
from prmtool.methods import interventions as iv
from prmtool.core.errors import InputError, StageError
from prmtool.engines.loading import EngineOnDemand
from prmtool.cli.options import ModelSettings, WorkerSettings
from prmtool.cli.options import (
    template,
    finite,
    Split,
    default_workers,
)
from prmtool.core.report import RunStats, Tracker
from prmtool.methods.rollouts import Probe, Rollouts, RolloutSettings
from prmtool.core.runner import MapStage, run_map_stage
from prmtool.core.schema import cast_to_contract
from prmtool.methods.steps import make_splitter, rollout_prefix

if TYPE_CHECKING:
    from prmtool.engines import Engine

REQUIRED = ("problem_id", "problem", "reference_answer", "response_id", "steps", "correct")
FIRST_ERROR_MODES = ("auto", "from-labels", "model")

# Columns the stage adds. Kept rows have the first seven; rejects have all of them, null where
# they do not apply (a skipped row has no candidate).
KEPT_COLUMNS = {
    "intervention": pl.String,
    "intervention_step": pl.Int32,
    "intervention_success_rate": pl.Float64,
    "guided_response": pl.String,
    "intervene_candidate": pl.Int32,  # which of the row's --candidates proposals (0-based)
    "intervene_first_error": pl.Int32,  # the 0-based first error the proposer was shown
    "intervene_first_error_source": pl.String,  # labels or model
}
REJECT_COLUMNS = {
    **KEPT_COLUMNS,
    # see prmtool.methods.interventions: unparseable, leaks_answer, not_verified, not_wrong, ...
    "intervene_reason": pl.String,
    "intervene_detail": pl.String,  # the reason in words
    "intervene_output": pl.String,  # the model's raw answer (proposal, or first-error answer)
}


@dataclass
class InterventionConfig:
    candidates: int = 4
    verify_rollouts: int = 32
    min_success: int = 1
    first_error: str = "auto"  # auto: the label's first_error where it names a step, else the model
    temperature: float = 0.7
    proposer_max_tokens: int = 1024
    prefill_tag: bool = False  # start the model's answer inside the tag (small models keep the format)
    rollouts: RolloutSettings = field(default_factory=RolloutSettings)


@dataclass
class Outcome:
    """What became of one candidate (or of a row that got none)."""

    row: int
    candidate: int | None = None
    first_error: int | None = None
    source: str | None = None
    content: str | None = None
    step: int | None = None
    success_rate: float | None = None
    guided: str | None = None
    reason: str | None = None  # None: kept
    detail: str | None = None
    output: str | None = None


def _seed(seed: int, *parts: object) -> int:
    key = "\x1f".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def _reference_solutions(frame: pl.DataFrame) -> list[str | None]:
    if "reference_solution" in frame.columns:
        return frame["reference_solution"].cast(pl.String).to_list()
    return [None] * frame.height


def _answer_text(prefill: str, completion, stop: str) -> str:
    """The model's whole answer: the prefilled start, the sampled text, and the closing tag the
    stop string cut off (an answer that ended at EOS instead simply will not parse)."""
    if not prefill:
        return completion.text
    return prefill + completion.text + (stop if completion.finish_reason == "stop" else "")


def intervene_rows(
    frame: pl.DataFrame,
    engine: "Engine",
    settings: InterventionConfig | None = None,
    separator: str = "\n\n",
    tracker: Tracker | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Pure core: responses in; (one row per kept intervention, one row per rejected candidate or
    skipped response) out. Every input row is the source of at least one row of the two."""
    from prmtool.engines import SamplingRequest

    settings = settings or InterventionConfig()
    if settings.first_error not in FIRST_ERROR_MODES:
        raise InputError(f"--first-error {settings.first_error!r}: expected one of {', '.join(FIRST_ERROR_MODES)}")
    if settings.first_error == "from-labels" and "first_error" not in frame.columns:
        raise InputError("--first-error from-labels needs a 'first_error' column; run prmtool label first")
    steps = [list(s or []) for s in frame["steps"].to_list()]
    problems = frame["problem"].to_list()
    references = frame["reference_answer"].cast(pl.String).to_list()
    response_ids = frame["response_id"].to_list()
    solutions = _reference_solutions(frame)
    labels = (
        frame["first_error"].to_list()
        if "first_error" in frame.columns and settings.first_error != "model"
        else [None] * frame.height
    )
    sampling = settings.rollouts

    outcomes: list[Outcome] = []
    first_errors: dict[int, tuple[int, str]] = {}  # row -> (0-based first error, source)
    to_locate: list[int] = []
    for row, correct in enumerate(frame["correct"].to_list()):
        label = labels[row]
        if correct:
            outcomes.append(Outcome(row, reason=iv.NOT_WRONG, detail="the response is correct"))
        elif not steps[row]:
            outcomes.append(Outcome(row, reason=iv.NO_STEPS, detail="the response has no steps"))
        elif label is not None and 0 <= label < len(steps[row]):
            first_errors[row] = (label, "labels")
        elif settings.first_error == "from-labels":
            detail = "first_error is null" if label is None else f"first_error is {label}, not a step of the response"
            outcomes.append(Outcome(row, first_error=label, source="labels", reason=iv.NO_FIRST_ERROR, detail=detail))
        else:
            to_locate.append(row)

    def advance(rows: int, completions) -> None:
        if tracker is not None:
            tracker.advance(rows, sum(c.num_tokens for samples in completions for c in samples))

    advance(len(outcomes), [])
    chat_ids: dict[str, list[int]] = {}

    def request(message: str, prefill: str, stop: str, seed: int, temperature: float, max_tokens: int):
        if message not in chat_ids:
            chat_ids[message] = engine.chat_prompt_ids(message)
        ids = engine.continuation_ids(chat_ids[message], prefill) if prefill else chat_ids[message]
        return SamplingRequest(
            prompt_ids=ids,
            n=1,
            temperature=temperature,
            max_tokens=max_tokens,
            stop=(stop,) if prefill else (),
            seed=seed,
        )

    # Round 1: the first errors the labels do not give, greedy, one call for all rows.
    if to_locate:
        prefill = iv.FIRST_ERROR_PREFILL if settings.prefill_tag else ""
        prompts = [iv.locator_prompt(problems[r], steps[r], references[r], solutions[r]) for r in to_locate]
        completions = engine.sample(
            [
                request(
                    p,
                    prefill,
                    iv.FIRST_ERROR_STOP,
                    _seed(sampling.seed, "locate", response_ids[r]),
                    0.0,
                    settings.proposer_max_tokens,
                )
                for p, r in zip(prompts, to_locate)
            ]
        )
        for row, samples in zip(to_locate, completions):
            text = _answer_text(prefill, samples[0], iv.FIRST_ERROR_STOP)
            located = iv.parse_first_error(text, len(steps[row]))
            if isinstance(located, iv.Rejection):
                outcomes.append(Outcome(row, source="model", reason=located.reason, detail=located.detail, output=text))
            elif located < 0:
                outcomes.append(
                    Outcome(
                        row,
                        first_error=-1,
                        source="model",
                        reason=iv.NO_FIRST_ERROR,
                        detail="the model found no error",
                        output=text,
                    )
                )
            else:
                first_errors[row] = (located, "model")
        advance(sum(1 for r in to_locate if r not in first_errors), completions)

    # Round 2: every candidate of every row in one call; candidate c of a row has its own seed.
    rows = sorted(first_errors)
    prefill = iv.INTERVENTION_PREFILL if settings.prefill_tag else ""
    asks = [(row, c) for row in rows for c in range(settings.candidates)]
    prompts = {
        row: iv.proposer_prompt(problems[row], steps[row], first_errors[row][0], references[row], solutions[row])
        for row in rows
    }
    completions = (
        engine.sample(
            [
                request(
                    prompts[row],
                    prefill,
                    iv.INTERVENTION_STOP,
                    _seed(sampling.seed, "propose", response_ids[row], c),
                    settings.temperature,
                    settings.proposer_max_tokens,
                )
                for row, c in asks
            ]
        )
        if asks
        else []
    )
    advance(0, completions)
    candidates: list[Outcome] = []
    seen: set[tuple[int, int, str]] = set()
    for (row, c), samples in zip(asks, completions):
        text = _answer_text(prefill, samples[0], iv.INTERVENTION_STOP)
        first_error, source = first_errors[row]
        outcome = Outcome(row, c, first_error, source, output=text)
        parsed = iv.parse_intervention(
            text, len(steps[row]), references[row], problem=problems[row], latest=first_error
        )
        if isinstance(parsed, iv.Rejection):
            outcome.reason, outcome.detail = parsed.reason, parsed.detail
            if parsed.reason != iv.UNPARSEABLE:  # the tag was read: keep what it said
                outcome.content, outcome.step = _said(text)
        else:
            outcome.content, outcome.step = parsed.content, parsed.step
            outcome.guided = separator.join(steps[row][: parsed.step] + [parsed.content])
            if (row, parsed.step, parsed.content) in seen:
                outcome.reason, outcome.detail = iv.DUPLICATE, "the same step and content as an earlier candidate"
            seen.add((row, parsed.step, parsed.content))
        candidates.append(outcome)

    # Round 3: verification rollouts from `steps[:step] + intervention`, one call for all candidates.
    to_verify = [o for o in candidates if o.reason is None]
    if to_verify:
        rollouts = Rollouts(engine, problems, steps, references, response_ids, separator, sampling)
        probes = [
            Probe(
                o.row,
                o.step,
                settings.verify_rollouts,
                prefix=rollout_prefix(steps[o.row][: o.step] + [o.content], separator),
            )
            for o in to_verify
        ]
        results = rollouts.run(probes)
        if tracker is not None:
            tracker.advance(0, sum(r.tokens for r in results))
        for outcome, result in zip(to_verify, results):
            outcome.success_rate = result.mc
            if result.correct < settings.min_success:
                outcome.reason = iv.NOT_VERIFIED
                outcome.detail = (
                    f"{result.correct} of {settings.verify_rollouts} rollouts reached the answer; "
                    f"--min-success is {settings.min_success}"
                )
    advance(len(rows), [])
    outcomes.extend(candidates)

    kept = [o for o in outcomes if o.reason is None]
    rejected = [o for o in outcomes if o.reason is not None]
    accounted = {o.row for o in outcomes}
    if len(accounted) != frame.height:
        raise StageError(f"internal error: {frame.height - len(accounted)} input rows neither kept nor rejected")
    return _rows(frame, kept, KEPT_COLUMNS), _rows(frame, rejected, REJECT_COLUMNS)


def _said(text: str) -> tuple[str | None, int | None]:
    """Content and 0-based step of a tag that was read but rejected, for the rejects."""
    try:
        value = iv.read_literal(iv.last_tag(text, "intervention") or "")
    except ValueError:
        return None, None
    if not isinstance(value, dict):
        return None, None
    content = value.get("content") if isinstance(value.get("content"), str) else None
    location = iv.location_number(value.get("location"))
    return content, None if location is None else location - 1


def _rows(frame: pl.DataFrame, outcomes: list[Outcome], columns: dict[str, pl.DataType]) -> pl.DataFrame:
    outcomes = sorted(outcomes, key=lambda o: (o.row, -1 if o.candidate is None else o.candidate))
    values = {
        "intervention": [o.content for o in outcomes],
        "intervention_step": [o.step for o in outcomes],
        "intervention_success_rate": [o.success_rate for o in outcomes],
        "guided_response": [o.guided for o in outcomes],
        "intervene_candidate": [o.candidate for o in outcomes],
        "intervene_first_error": [o.first_error for o in outcomes],
        "intervene_first_error_source": [o.source for o in outcomes],
        "intervene_reason": [o.reason for o in outcomes],
        "intervene_detail": [o.detail for o in outcomes],
        "intervene_output": [o.output for o in outcomes],
    }
    added = pl.DataFrame({name: values[name] for name in columns}, schema=columns)
    source = frame[[o.row for o in outcomes]] if outcomes else frame.clear()
    return pl.concat([source, added], how="horizontal")


def _no_interventions_yet(shard) -> None:
    present = [c for c in REJECT_COLUMNS if c in shard.schema]
    if present:
        raise InputError(
            f"{shard.path}: already has column '{present[0]}'; intervene takes responses, not its own output"
        )


def _verified(shard) -> None:
    if pl.read_parquet(shard.path, columns=["correct"])["correct"].null_count():
        raise InputError(f"{shard.path}: column 'correct' has nulls; run prmtool verify first")


EXAMPLES = """\b
Examples:
  prmtool intervene work/labeled -o work/interventions --rejects work/intervention_rejects
  prmtool intervene work/verified -o work/interventions --first-error model --candidates 8 --verify-rollouts 32
  prmtool intervene work/labeled -o work/interventions --model ./Qwen3-8B --engine vllm --min-success 2
  prmtool export work/interventions -o work/int_sft --format sft-messages --open-turn
"""


@dataclass(kw_only=True)
class InterveneSettings(ModelSettings, WorkerSettings):
    candidates: Annotated[int, typer.Option(help="Proposals per wrong response.", min=1)] = 4
    verify_rollouts: Annotated[
        int,
        typer.Option(
            help="Rollouts from each proposal; the share that reaches the reference answer is its success rate.", min=1
        ),
    ] = 32
    min_success: Annotated[
        int,
        typer.Option(help="Keep a proposal when at least this many of its rollouts reach the reference answer.", min=1),
    ] = 1
    first_error: Annotated[
        str,
        typer.Option(
            help=(
                "auto: the label stage's first_error where it names a step, else the model; from-labels: only "
                "first_error (other wrong rows are skipped); model: always ask the model."
            )
        ),
    ] = "auto"
    rejects: Annotated[
        Path | None,
        typer.Option(
            help=(
                "Directory for every rejected proposal and skipped response, with intervene_reason, one shard per "
                "input shard."
            )
        ),
    ] = None
    temperature: Annotated[
        float,
        typer.Option(
            help="Sampling temperature of proposals and rollouts (the first-error answer is greedy).",
            min=0,
            callback=finite,
        ),
    ] = 0.7
    max_tokens: Annotated[int, typer.Option(help="Most tokens per verification rollout.", min=1)] = 1024
    proposer_max_tokens: Annotated[
        int, typer.Option(help="Most tokens per proposal (and first-error answer).", min=1)
    ] = 1024
    prefill_tag: Annotated[
        bool,
        typer.Option(
            "--prefill-tag",
            help=(
                "Start the model's answers inside the tag and stop at its end: small models keep the format, but "
                "write no analysis first."
            ),
        ),
    ] = False
    seed: Annotated[int, typer.Option(help="Same seed and inputs give the same proposals and rollouts.", min=0)] = 0
    system_prompt: Annotated[str | None, typer.Option(help="The system message generate used (rollouts).")] = None
    prompt_template: Annotated[
        str | None,
        typer.Option(
            help="The user message generate used ({problem}), for the rollouts; default: generate's default.",
            callback=template,
        ),
    ] = None
    split: Split = "blank-line"


def run(
    inputs: list[str], output: Path, settings: InterveneSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Propose a corrective step at the first error of every wrong response and keep those from
    which rollouts reach the reference answer. One output row per kept intervention, with
    intervention, intervention_step, intervention_success_rate and guided_response."""
    from prmtool.methods.prompts import DEFAULT_PROMPT_TEMPLATE

    if settings.first_error not in FIRST_ERROR_MODES:
        raise InputError(f"--first-error {settings.first_error!r}: expected one of {', '.join(FIRST_ERROR_MODES)}")
    if settings.min_success > settings.verify_rollouts:
        raise InputError(
            f"--min-success {settings.min_success} is more than --verify-rollouts {settings.verify_rollouts}: "
            "nothing could be kept"
        )
    separator = make_splitter(settings.split).separator
    stats = RunStats("intervene", quiet=quiet)
    rollouts = RolloutSettings(
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        seed=settings.seed,
        system_prompt=settings.system_prompt,
        prompt_template=settings.prompt_template or DEFAULT_PROMPT_TEMPLATE,
        workers=settings.workers or default_workers(),
    )
    config = InterventionConfig(
        candidates=settings.candidates,
        verify_rollouts=settings.verify_rollouts,
        min_success=settings.min_success,
        first_error=settings.first_error,
        temperature=settings.temperature,
        proposer_max_tokens=settings.proposer_max_tokens,
        prefill_tag=settings.prefill_tag,
        rollouts=rollouts,
    )
    arguments = {
        "candidates": settings.candidates,
        "verify_rollouts": settings.verify_rollouts,
        "min_success": settings.min_success,
        "first_error": settings.first_error,
        "rejects": None if settings.rejects is None else str(settings.rejects),
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "proposer_max_tokens": settings.proposer_max_tokens,
        "prefill_tag": settings.prefill_tag,
        "seed": settings.seed,
        "system_prompt": settings.system_prompt,
        "prompt_template": rollouts.prompt_template,
        "split": settings.split,
        "model": settings.model,
        "engine": settings.engine,
    }
    engines = EngineOnDemand(settings.engine, settings.model, settings.device, settings.trust_remote_code, stats)
    checks = [_verified, _no_interventions_yet]
    if settings.first_error == "from-labels":
        checks.append(_has_first_error)
    pending: dict[str, pl.DataFrame] = {}  # the rejects of the shard just transformed, for write_rejects

    def transform(frame: pl.DataFrame, tracker: Tracker) -> pl.DataFrame:
        tokens_before = tracker.tokens
        kept, rejected = intervene_rows(frame, engines.get(), config, separator, tracker)
        _count(stats, frame, kept, rejected)
        stats.counts["tokens_generated"] += tracker.tokens - tokens_before
        pending["rejects"] = rejected
        return kept

    def write_rejects(shard: shards.InputShard, frame: pl.DataFrame, tracker: Tracker) -> None:
        rejected = pending.pop("rejects")
        if settings.rejects is not None:
            shards.write_shard(
                cast_to_contract(rejected),
                settings.rejects / shard.name,
                shards.provenance("intervene-rejects", arguments, shard),
            )

    # rows_per_input=None: one row per kept intervention; every other input row goes to the rejects.
    stage = MapStage(
        "intervene",
        transform,
        arguments,
        REQUIRED,
        rows_per_input=None,
        extra_checks=checks,
        side_output=write_rejects,
        side_directories={"--rejects": settings.rejects},
    )
    with engines:
        run_map_stage(stage, inputs, output, overwrite, stats, partition)
    return stats.finish()


def _count(stats: RunStats, frame: pl.DataFrame, kept: pl.DataFrame, rejected: pl.DataFrame) -> None:
    """The funnel: wrong responses, where their first errors came from, and candidates proposed,
    parsed, verified and kept, with every rejection and skip by reason."""
    counts = stats.counts
    counts["wrong_responses"] += int((~frame["correct"]).sum())
    proposals = rejected.filter(pl.col("intervene_candidate").is_not_null())
    reasons = proposals["intervene_reason"]
    counts["candidates_proposed"] += kept.height + proposals.height
    counts["candidates_parsed"] += kept.height + int((reasons != iv.UNPARSEABLE).sum())
    counts["candidates_verified"] += kept.height + int((reasons == iv.NOT_VERIFIED).sum())
    counts["candidates_kept"] += kept.height
    counts.update(f"rejected_{reason}" for reason in reasons)
    counts.update(
        f"skipped_{reason}" for reason in rejected.filter(pl.col("intervene_candidate").is_null())["intervene_reason"]
    )
    sources = pl.concat(
        [
            kept.select("response_id", "intervene_first_error_source"),
            proposals.select("response_id", "intervene_first_error_source"),
        ]
    ).unique()
    counts.update(f"first_error_from_{source}" for source in sources["intervene_first_error_source"])


def _has_first_error(shard) -> None:
    if "first_error" not in shard.schema:
        raise InputError(
            f"{shard.path}: missing column 'first_error' for --first-error from-labels; run prmtool label first, or "
            f"use --first-error model"
        )


STAGE = Stage("intervene", InterveneSettings, run, EXAMPLES, REQUIRED)

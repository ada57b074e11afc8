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

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import polars as pl
import typer

from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.core.options import (
    STEP_CHOICES,
    ModelSettings,
    Split,
    Steps,
    ThinkTags,
    WorkerSettings,
    finite,
    template,
    worker_count,
)
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary, Tracker
from prmtool.core.runner import MapStage, run_map_stage
from prmtool.core.schema import cast_to_contract, check_steps
from prmtool.core.stage import Stage
from prmtool.engines import choice
from prmtool.engines.loading import EngineOnDemand
from prmtool.methods import interventions as iv
from prmtool.methods.intervention_rounds import (
    FIRST_ERROR_MODES,
    REJECT_COLUMNS,
    InterventionConfig,
    intervene_rows,
)
from prmtool.methods.rollouts import RolloutSettings
from prmtool.methods.steps import make_splitter
from prmtool.methods.thinking import parse_think_tags
from prmtool.methods.verification import start_workers

if TYPE_CHECKING:
    from prmtool.engines import Engine

REQUIRED = ("problem_id", "problem", "reference_answer", "response_id", "steps", "correct")


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
  prmtool intervene work/verified -o work/located --first-error model --candidates 8 --verify-rollouts 32
  prmtool intervene work/labeled -o work/interventions-8b --model ./Qwen3-8B --engine vllm --min-success 2
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
    steps: Steps = "all"
    think_tags: ThinkTags = None


def intervention_config(settings: InterveneSettings) -> InterventionConfig:
    """The rounds' parameters, from the stage's settings."""
    return InterventionConfig(
        candidates=settings.candidates,
        verify_rollouts=settings.verify_rollouts,
        min_success=settings.min_success,
        first_error=settings.first_error,
        temperature=settings.temperature,
        proposer_max_tokens=settings.proposer_max_tokens,
        prefill_tag=settings.prefill_tag,
        rollouts=RolloutSettings.of(settings, worker_count(settings.workers)),
        steps=settings.steps,
        tags=parse_think_tags(settings.think_tags),
    )


def intervene_frame(
    frame: pl.DataFrame, engine: Engine, settings: InterveneSettings | None = None, *, tracker: Tracker | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The per-frame core: labeled responses in; (kept, rejected) out. `kept` has one row per
    kept intervention (every input column, plus intervention, intervention_step,
    intervention_success_rate, guided_response, ...); `rejected` one row per rejected candidate
    or skipped response, with intervene_reason. Every input row is in one of the two."""
    settings = settings or InterveneSettings()
    separator = make_splitter(settings.split).separator
    return intervene_rows(frame, engine, intervention_config(settings), separator, tracker)


def run(
    inputs: list[str], output: Path, settings: InterveneSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Propose a corrective step at the first error of every wrong response and keep those from
    which rollouts reach the reference answer. One output row per kept intervention, with
    intervention, intervention_step, intervention_success_rate and guided_response."""
    if settings.first_error not in FIRST_ERROR_MODES:
        raise InputError(f"--first-error {settings.first_error!r}: expected one of {', '.join(FIRST_ERROR_MODES)}")
    if settings.min_success > settings.verify_rollouts:
        raise InputError(
            f"--min-success {settings.min_success} is more than --verify-rollouts {settings.verify_rollouts}: "
            "nothing could be kept"
        )
    make_splitter(settings.split)  # a bad --split fails before the model loads
    if settings.steps not in STEP_CHOICES:
        raise InputError(f"--steps {settings.steps!r}: expected one of {', '.join(STEP_CHOICES)}")
    stats = RunStats("intervene", quiet=quiet)
    worker_count(settings.workers, stats.warn)  # says so when --workers is capped
    prompt_tokens = choice.stage_prompt_tokens("intervene", settings)
    picked = choice.resolve(settings.engine, settings.model, settings.device, prompt_tokens, "intervene")
    settings = replace(settings, engine=picked.engine)
    rollouts = intervention_config(settings).rollouts
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
        **({"steps": settings.steps, "think_tags": settings.think_tags} if settings.steps != "all" else {}),
        "model": settings.model,
        "engine": settings.engine,
    }
    engines = EngineOnDemand(
        settings.engine, settings.model, settings.device, settings.trust_remote_code, stats, why=picked.line()
    )
    checks = [_verified, check_steps, _no_interventions_yet]
    if settings.first_error == "from-labels":
        checks.append(_has_first_error)
    pending: dict[str, pl.DataFrame] = {}  # the rejects of the shard just transformed, for write_rejects

    def transform(frame: pl.DataFrame, tracker: Tracker) -> pl.DataFrame:
        tokens_before = tracker.tokens
        start_workers(worker_count(settings.workers))  # before a model load starts threads here
        kept, rejected = intervene_frame(frame, engines.get(), settings, tracker=tracker)
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
        REQUIRED + (("thinking_steps",) if settings.steps != "all" else ()),
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

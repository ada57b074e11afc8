"""`prmtool score`: a process reward for every step of every response.

The scorers (an implicit PRM from two models' log-probabilities, or a PRM trained by TRL's
PRMTrainer) and the step-boundary maths are in `prmtool.methods.step_rewards`, whose
docstring defines them; this module holds the stage's settings and its run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import polars as pl
import typer

from prmtool.core.errors import InputError
from prmtool.core.options import (
    STEP_CHOICES,
    Device,
    EngineName,
    Steps,
    TrustRemoteCode,
    positive,
    template,
)
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary, Tracker
from prmtool.core.runner import MapStage, run_map_stage
from prmtool.core.schema import check_steps
from prmtool.core.stage import Stage
from prmtool.engines import choice
from prmtool.engines.loading import EngineOnDemand

if TYPE_CHECKING:
    from prmtool.engines import Engine

from prmtool.methods.step_rewards import (
    AGGREGATIONS,
    REWARDS,
    SCORERS,
    ScoringConfig,
    aggregate,
    check_same_tokenizer,
    score_implicit,
    score_with_classifier,
    step_char_ends,
)
from prmtool.methods.thinking import check_steps_column, step_window

REQUIRED = ("problem_id", "problem", "response_id", "response", "steps")


def _check_text(shard) -> None:
    """Before any model loads: no missing text, and steps that are the response's pieces."""
    check_steps(shard)
    frame = pl.read_parquet(shard.path, columns=["problem", "response", "steps"])
    for column in frame.columns:
        nulls = frame[column].is_null()
        if nulls.any():
            raise InputError(f"{shard.path}: row {int(nulls.arg_max())}: column '{column}' is null")
    for row, (response, steps) in enumerate(zip(frame["response"], frame["steps"])):
        try:
            step_char_ends(response, steps.to_list())
        except ValueError as error:
            raise InputError(f"{shard.path}: row {row}: {error}") from None


EXAMPLES = """\b
Examples:
  prmtool score work/labeled -o work/scored --policy ./EurusPRM-Stage2 --ref ./Qwen2.5-Math-7B-Instruct
  prmtool score work/labeled -o work/scored-no-ref --no-ref --agg mean
  prmtool score work/labeled -o work/last --policy ./prm --ref ./sft --reward cumulative --agg last --token-rewards
  prmtool score work/labeled -o work/scored-trl-prm --scorer token-classification --prm ./my-trl-prm
"""


@dataclass(kw_only=True)
class ScoreSettings:
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy",
            "--model",
            "-m",
            help=(
                "implicit: the PRM / policy model, a local folder or .gguf (default: the embedded "
                "SmolLM2-135M-Instruct); --model and -m say the same."
            ),
            show_default=False,
        ),
    ] = None
    ref: Annotated[
        str | None,
        typer.Option(
            "--ref", help="implicit: the reference model; must share the policy's tokenizer.", show_default=False
        ),
    ] = None
    no_ref: Annotated[
        bool, typer.Option("--no-ref", help="implicit: no reference model; rewards are beta * log pi.")
    ] = False
    beta: Annotated[
        float,
        typer.Option(help="implicit: reward scale (0.001 at inference, as the reference code).", callback=positive),
    ] = 0.001
    reward: Annotated[
        str,
        typer.Option(help="Which step list prm_score aggregates: single (step_rewards) or cumulative (step_values)."),
    ] = "single"
    agg: Annotated[str, typer.Option(help="prm_score over steps: min, sum, mean or last.")] = "min"
    token_rewards: Annotated[
        bool, typer.Option("--token-rewards", help="implicit: also write token_rewards, one per response token.")
    ] = False
    scorer: Annotated[
        str,
        typer.Option(
            help=(
                "implicit (log-likelihood ratio of two models) or token-classification (a PRM trained by TRL's "
                "PRMTrainer, TRL 1.13 and earlier, see --prm)."
            )
        ),
    ] = "implicit"
    prm: Annotated[
        str | None, typer.Option("--prm", help="token-classification: the trained PRM folder.", show_default=False)
    ] = None
    step_separator: Annotated[
        str,
        typer.Option(
            help="token-classification: the step_separator the PRM was trained with.", show_default="\\n (a newline)"
        ),
    ] = "\n"
    steps: Steps = "all"
    system_prompt: Annotated[str | None, typer.Option(help="implicit: the system message generate used.")] = None
    prompt_template: Annotated[
        str | None,
        typer.Option(
            help="implicit: the user message generate used ({problem}); default: generate's default.", callback=template
        ),
    ] = None
    max_batch_tokens: Annotated[
        int | None,
        typer.Option(
            help="Padded tokens per forward pass (default 16384 on CUDA, 4096 on CPU).", min=1, show_default=False
        ),
    ] = None
    engine: EngineName = "auto"
    device: Device = None
    trust_remote_code: TrustRemoteCode = False


def check_choices(settings: ScoreSettings) -> None:
    """The options whose values are words, and the ones that go together: before any model loads."""
    if settings.scorer not in SCORERS:
        raise InputError(f"--scorer {settings.scorer!r}: expected one of {', '.join(SCORERS)}")
    if settings.reward not in REWARDS:
        raise InputError(f"--reward {settings.reward!r}: expected one of {', '.join(REWARDS)}")
    if settings.steps not in STEP_CHOICES:
        raise InputError(f"--steps {settings.steps!r}: expected one of {', '.join(STEP_CHOICES)}")
    if settings.agg not in AGGREGATIONS:
        raise InputError(f"--agg {settings.agg!r}: expected one of {', '.join(AGGREGATIONS)}")
    if settings.scorer == "implicit":
        if settings.prm is not None:
            raise InputError("--prm is for --scorer token-classification; the implicit scorer takes --policy and --ref")
        if settings.ref is None and not settings.no_ref:
            raise InputError("--ref MODEL is required (or --no-ref to score with the policy's log-probabilities alone)")
        if settings.ref is not None and settings.no_ref:
            raise InputError("--ref and --no-ref exclude each other")
    else:
        if settings.prm is None:
            raise InputError("--scorer token-classification needs --prm MODEL (a PRM trained by TRL's PRMTrainer)")
        if settings.policy is not None or settings.ref is not None or settings.no_ref or settings.token_rewards:
            raise InputError("--policy, --ref, --no-ref and --token-rewards are for --scorer implicit")
        if settings.engine not in ("hf", "auto"):
            raise InputError("--scorer token-classification runs on the hf engine only")


def scoring_config(settings: ScoreSettings) -> ScoringConfig:
    from prmtool.methods.prompts import DEFAULT_PROMPT_TEMPLATE

    return ScoringConfig(
        beta=settings.beta,
        reward=settings.reward,
        agg=settings.agg,
        token_rewards=settings.token_rewards,
        system_prompt=settings.system_prompt,
        prompt_template=settings.prompt_template or DEFAULT_PROMPT_TEMPLATE,
        step_separator=settings.step_separator,
        max_batch_tokens=settings.max_batch_tokens,
    )


def score_frame(
    frame: pl.DataFrame,
    model,
    settings: ScoreSettings | None = None,
    *,
    ref: Engine | None = None,
    tracker: Tracker | None = None,
) -> pl.DataFrame:
    """The per-frame core: responses in, the same rows with step_rewards, step_values and
    prm_score out. `model` is the policy engine and `ref` the reference one (None: --no-ref)
    for `--scorer implicit`, or a `StepClassifier` for `--scorer token-classification`."""
    settings = settings or ScoreSettings(no_ref=ref is None)
    config = scoring_config(settings)
    if settings.scorer == "token-classification":
        return within_steps(score_with_classifier(frame, model, config, tracker), settings)
    if ref is not None:  # checked on every call: cheap next to a frame's forward passes
        check_same_tokenizer(model.tokenizer, ref.tokenizer)
    return within_steps(score_implicit(frame, model, ref, config, tracker), settings)


def within_steps(scored: pl.DataFrame, settings: ScoreSettings) -> pl.DataFrame:
    """`--steps thinking|solution`: a reasoning trace is scored whole (each step's reward
    depends on all before it), then the other part's rewards and values are set to null and
    prm_score aggregates the chosen steps alone."""
    if settings.steps == "all":
        return scored
    check_steps_column(settings.steps, scored.columns)
    rewards, values = scored["step_rewards"].to_list(), scored["step_values"].to_list()
    windows = [step_window(settings.steps, len(r or []), t) for r, t in zip(rewards, scored["thinking_steps"])]

    def keep(lists):
        return [
            None if row is None else [v if first <= i < last else None for i, v in enumerate(row)]
            for row, (first, last) in zip(lists, windows)
        ]

    rewards, values = keep(rewards), keep(values)
    chosen = rewards if settings.reward == "single" else values
    scores = [aggregate([v for v in row or [] if v is not None], settings.agg) for row in chosen]
    return scored.with_columns(
        pl.Series("step_rewards", rewards, dtype=pl.List(pl.Float64)),
        pl.Series("step_values", values, dtype=pl.List(pl.Float64)),
        pl.Series("prm_score", scores, dtype=pl.Float64),
    )


def run(
    inputs: list[str], output: Path, settings: ScoreSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Score every step of every response with an implicit PRM (policy vs reference
    log-likelihood ratio) or a trained token-classification PRM. Writes step_rewards,
    step_values and prm_score (and token_rewards with --token-rewards)."""
    check_choices(settings)
    config = scoring_config(settings)
    arguments = {"scorer": settings.scorer, "reward": settings.reward, "agg": settings.agg}
    if settings.steps != "all":
        arguments["steps"] = settings.steps
    if settings.scorer == "implicit":
        arguments |= {
            "policy": settings.policy,
            "ref": settings.ref,
            "beta": settings.beta,
            "token_rewards": settings.token_rewards,
            "system_prompt": settings.system_prompt,
            "prompt_template": config.prompt_template,
        }
    else:
        arguments |= {"prm": settings.prm, "step_separator": settings.step_separator}
    stats = RunStats("score", quiet=quiet)
    why = ""
    if settings.scorer == "implicit":  # forward passes only: no prompt length decides (engines/choice.py)
        picked = choice.resolve(settings.engine, settings.policy, settings.device, None)
        settings, why = replace(settings, engine=picked.engine), picked.line()
    options = {"max_batch_tokens": settings.max_batch_tokens} if settings.max_batch_tokens else {}
    if settings.engine == "vllm":
        # vLLM batches by itself; two instances (policy and ref) must share the GPU.
        options = {"gpu_memory_utilization": 0.45} if settings.ref is not None else {}
    if settings.scorer == "implicit":
        models = [
            EngineOnDemand(
                settings.engine, settings.policy, settings.device, settings.trust_remote_code, stats, why=why, **options
            )
        ]
        if settings.ref is not None:
            models.append(
                EngineOnDemand(
                    settings.engine, settings.ref, settings.device, settings.trust_remote_code, stats, **options
                )
            )
    else:
        models = [
            EngineOnDemand(
                "token-classification", settings.prm, settings.device, settings.trust_remote_code, stats, **options
            )
        ]

    def transform(frame: pl.DataFrame, tracker: Tracker) -> pl.DataFrame:
        model, *ref = (m.get() for m in models)
        result = score_frame(frame, model, settings, ref=ref[0] if ref else None, tracker=tracker)
        stats.counts["responses_scored"] += result.height
        stats.counts["steps_scored"] += int(result["step_rewards"].list.len().sum())
        return result

    required = REQUIRED + (("thinking_steps",) if settings.steps != "all" else ())
    stage = MapStage("score", transform, arguments, required, extra_checks=[_check_text])
    with contextlib.ExitStack() as stack:
        for model in models:
            stack.enter_context(model)
        run_map_stage(stage, inputs, output, overwrite, stats, partition)
    return stats.finish()


STAGE = Stage("score", ScoreSettings, run, EXAMPLES, REQUIRED)

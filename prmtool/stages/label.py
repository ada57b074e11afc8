"""`prmtool label`: step labels from Monte Carlo rollouts of a policy model.

Methods (docs/algorithms.md, "Step labeling by Monte Carlo rollouts"):
- `mc`: Math-Shepherd. k rollouts after every step; step i's value is MC(steps[:i+1]).
- `binary`: OmegaPRM's first-error binary search on wrong responses: about k * log2(n)
  rollouts instead of k * n. Steps before the first error are good, the first error is bad,
  later steps are unlabeled.
- `omegaprm`: OmegaPRM's tree search per question (`prmtool.methods.omegaprm`), written to
  `--tree-output` as one row per searched state (prefix, MC). The main output's rows get the
  same columns as `binary` (its first-error search on the wrong input responses).

The searches themselves live in `prmtool.methods.labeling` (rows) and
`prmtool.methods.omegaprm` (questions); this module holds the stage's settings and its run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import polars as pl
import typer

from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.core.options import (
    ModelSettings,
    Split,
    WorkerSettings,
    default_workers,
    finite,
    positive,
    template,
)
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary, Tracker
from prmtool.core.runner import MapStage, run_map_stage
from prmtool.core.stage import Stage
from prmtool.engines.loading import EngineOnDemand
from prmtool.methods import labeling
from prmtool.methods.judging import judge_rows
from prmtool.methods.labeling import label_rows
from prmtool.methods.omegaprm import SearchConfig, grow_trees, tree_frame
from prmtool.methods.rollouts import RolloutSettings
from prmtool.methods.steps import make_splitter

if TYPE_CHECKING:
    from prmtool.engines import Engine

METHODS = (*labeling.METHODS, "judge")
REQUIRED = ("problem_id", "problem", "reference_answer", "response_id", "steps", "correct")


def _verified(shard) -> None:
    if pl.read_parquet(shard.path, columns=["correct"])["correct"].null_count():
        raise InputError(f"{shard.path}: column 'correct' has nulls; run prmtool verify first")


EXAMPLES = """\b
Examples:
  prmtool label work/verified -o work/labeled --method binary --k 8
  prmtool label work/verified -o work/labeled --method mc --k 8 --label soft
  prmtool label work/verified -o work/labeled --model ./Qwen2.5-Math-7B-Instruct --engine vllm --bad-below 0.5
  prmtool label work/verified -o work/labeled --method omegaprm --tree-output work/tree --search-budget 100
  prmtool label work/verified -o work/judged --method judge --judge-model ./critic --judge-samples 3
"""


@dataclass(kw_only=True)
class LabelSettings(ModelSettings, WorkerSettings):
    method: Annotated[
        str,
        typer.Option(
            help=(
                "binary (first-error search), mc (k rollouts after every step), omegaprm (binary labels plus a "
                "tree search per question, see --tree-output) or judge (an LLM critic names the first error)."
            )
        ),
    ] = "binary"
    k: Annotated[int, typer.Option("--k", help="Rollouts per MC estimate.", min=1)] = 8
    temperature: Annotated[float, typer.Option(help="Rollout sampling temperature.", min=0, callback=finite)] = 0.7
    max_tokens: Annotated[int, typer.Option(help="Most tokens per rollout.", min=1)] = 1024
    seed: Annotated[int, typer.Option(help="Same seed and inputs give the same labels.", min=0)] = 0
    label: Annotated[
        str,
        typer.Option("--label", help="hard: thresholded labels; soft: also a measured step_mc for every labeled step."),
    ] = "hard"
    bad_below: Annotated[
        float | None,
        typer.Option(help="A step is bad when its MC is below this (default: bad only when MC = 0).", min=0, max=1),
    ] = None
    correct_responses: Annotated[
        str, typer.Option(help="trust: a verified-correct response's steps are all good; estimate: run MC on them too.")
    ] = "trust"
    system_prompt: Annotated[str | None, typer.Option(help="The system message generate used.")] = None
    prompt_template: Annotated[
        str | None,
        typer.Option(
            help="The user message generate used ({problem}); default: generate's default.", callback=template
        ),
    ] = None
    tree_output: Annotated[
        Path | None,
        typer.Option(
            help="omegaprm: directory for the search tree, one row per (prefix, MC) state, one shard per input shard."
        ),
    ] = None
    search_budget: Annotated[
        int, typer.Option(help="omegaprm: MC-estimation rollouts per question after screening.", min=0)
    ] = 100
    screen_rollouts: Annotated[
        int,
        typer.Option(
            help=(
                "omegaprm: rollouts from the empty prefix; a question is searched only if some are right and some "
                "wrong."
            ),
            min=1,
        ),
    ] = 32
    alpha: Annotated[
        float, typer.Option(help="omegaprm: Q = alpha^(1-MC) * beta^(len/L), in (0, 1].", max=1, callback=positive)
    ] = 0.5
    beta: Annotated[
        float, typer.Option(help="omegaprm: length discount of Q, in (0, 1].", max=1, callback=positive)
    ] = 0.9
    length_scale: Annotated[float, typer.Option(help="omegaprm: L, in rollout tokens.", min=1, callback=finite)] = 500.0
    c_puct: Annotated[float, typer.Option(help="omegaprm: exploration weight of U.", min=0, callback=finite)] = 0.125
    judge_samples: Annotated[
        int, typer.Option(help="judge: critiques per response; the most frequent verdict wins.", min=1)
    ] = 1
    judge_model: Annotated[
        str | None,
        typer.Option(help="judge: the critic model, if not --model (a folder or .gguf).", show_default=False),
    ] = None
    split: Split = "blank-line"


def check_choices(settings: LabelSettings) -> None:
    """The options whose values are words: checked before any model loads."""
    if settings.judge_model is not None and settings.method != "judge":
        raise InputError("--judge-model is for --method judge")
    if settings.method not in METHODS:
        raise InputError(f"--method {settings.method!r}: expected one of {', '.join(METHODS)}")
    if settings.label not in ("hard", "soft"):
        raise InputError(f"--label {settings.label!r}: expected hard or soft")
    if settings.correct_responses not in ("trust", "estimate"):
        raise InputError(f"--correct-responses {settings.correct_responses!r}: expected trust or estimate")


def label_frame(
    frame: pl.DataFrame, engine: Engine, settings: LabelSettings | None = None, *, tracker: Tracker | None = None
) -> pl.DataFrame:
    """The per-frame core: verified responses in, the same rows with step_mc, step_labels,
    first_error, label_rollouts and label_tokens out. (`--method omegaprm` labels rows as
    `binary` does; its tree comes from `prmtool.methods.omegaprm.grow_trees`.)"""
    settings = settings or LabelSettings()
    check_choices(settings)
    if settings.method == "judge":
        return judge_rows(
            frame,
            engine,
            samples=settings.judge_samples,
            temperature=0.0 if settings.judge_samples == 1 else settings.temperature,  # one sample: greedy
            max_tokens=settings.max_tokens,
            seed=settings.seed,
            trust_correct=settings.correct_responses == "trust",
            tracker=tracker,
        )
    return label_rows(
        frame,
        engine,
        settings.method,
        settings.k,
        RolloutSettings.of(settings, settings.workers or default_workers()),
        make_splitter(settings.split).separator,
        settings.label == "soft",
        settings.bad_below,
        settings.correct_responses,
        tracker,
    )


def provenance_arguments(settings: LabelSettings, prompt_template: str) -> dict:
    """The options that decide the labels: written into each shard, compared on resume."""
    arguments = {
        "method": settings.method,
        "k": settings.k,
        "temperature": settings.temperature,
        "max_tokens": settings.max_tokens,
        "seed": settings.seed,
        "label": settings.label,
        "bad_below": settings.bad_below,
        "correct_responses": settings.correct_responses,
        "system_prompt": settings.system_prompt,
        "prompt_template": prompt_template,
        "split": settings.split,
        "model": settings.model,
        "engine": settings.engine,
    }
    if settings.method == "judge":
        arguments.update(judge_samples=settings.judge_samples, judge_model=settings.judge_model)
    if settings.method == "omegaprm":
        arguments.update(
            tree_output=str(settings.tree_output),
            search_budget=settings.search_budget,
            screen_rollouts=settings.screen_rollouts,
            alpha=settings.alpha,
            beta=settings.beta,
            length_scale=settings.length_scale,
            c_puct=settings.c_puct,
        )
    return arguments


def tree_search_config(settings: LabelSettings) -> SearchConfig:
    """OmegaPRM's search parameters, from the stage's settings."""
    return SearchConfig(
        k=settings.k,
        budget=settings.search_budget,
        screen_rollouts=settings.screen_rollouts,
        alpha=settings.alpha,
        beta=settings.beta,
        length_scale=settings.length_scale,
        c_puct=settings.c_puct,
    )


def run(
    inputs: list[str], output: Path, settings: LabelSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Label every step of every response by Monte Carlo rollouts from its prefixes. Writes
    step_mc, step_labels, first_error, label_rollouts and label_tokens."""
    check_choices(settings)
    if settings.method == "omegaprm" and settings.tree_output is None:
        raise InputError("--method omegaprm needs --tree-output DIR")
    if settings.method != "omegaprm" and settings.tree_output is not None:
        raise InputError("--tree-output is only for --method omegaprm")
    separator = make_splitter(settings.split).separator
    stats = RunStats("label", quiet=quiet)
    rollout_settings = RolloutSettings.of(settings, settings.workers or default_workers())
    arguments = provenance_arguments(settings, rollout_settings.prompt_template)
    search_config = tree_search_config(settings)
    model = settings.judge_model if settings.method == "judge" and settings.judge_model else settings.model
    engines = EngineOnDemand(settings.engine, model, settings.device, settings.trust_remote_code, stats)

    def transform(frame: pl.DataFrame, tracker: Tracker) -> pl.DataFrame:
        result = label_frame(frame, engines.get(), settings, tracker=tracker)
        stats.counts["rollouts"] += int(result["label_rollouts"].sum())
        stats.counts["tokens_generated"] += int(result["label_tokens"].sum())
        stats.counts["wrong_responses_with_first_error"] += int((result["first_error"] >= 0).sum())
        if settings.method == "judge":  # asked, but the reply named no step: left null, not guessed
            asked = result["judge_output"].is_not_null()
            stats.counts["judge_unparseable"] += int((asked & result["judge_first_error"].is_null()).sum())
        return result

    def write_tree(shard: shards.InputShard, frame: pl.DataFrame, tracker: Tracker) -> None:
        searches = grow_trees(
            frame, engines.get(), search_config, rollout_settings, make_splitter(settings.split), tracker
        )
        tree = tree_frame(frame, searches, separator)
        stats.counts["tree_rollouts"] += sum(
            settings.screen_rollouts + question.search_rollouts for question in searches.values()
        )
        stats.counts["tree_questions_kept"] += sum(question.kept for question in searches.values())
        stats.counts["tree_states"] += tree.height
        shards.write_shard(tree, settings.tree_output / shard.name, shards.provenance("label-tree", arguments, shard))

    stage = MapStage(
        "label",
        transform,
        arguments,
        REQUIRED,
        extra_checks=[_verified],
        side_output=write_tree if settings.method == "omegaprm" else None,
        side_directories={"--tree-output": settings.tree_output},
    )
    with engines:
        run_map_stage(stage, inputs, output, overwrite, stats, partition)
    return stats.finish()


STAGE = Stage("label", LabelSettings, run, EXAMPLES, REQUIRED)

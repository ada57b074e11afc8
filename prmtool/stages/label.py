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

import contextlib
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
    positive,
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
from prmtool.methods import labeling
from prmtool.methods.judging import judge_rows
from prmtool.methods.labeling import label_rows
from prmtool.methods.omegaprm import SearchConfig, grow_trees, tree_frame
from prmtool.methods.rollouts import RolloutSettings
from prmtool.methods.steps import make_splitter
from prmtool.methods.thinking import parse_think_tags
from prmtool.methods.verification import start_workers

if TYPE_CHECKING:
    from collections.abc import MutableMapping

    from prmtool.engines import Engine

METHODS = (*labeling.METHODS, "judge", "consensus")
REQUIRED = ("problem_id", "problem", "reference_answer", "response_id", "steps", "correct")


def _verified(shard) -> None:
    if pl.read_parquet(shard.path, columns=["correct"])["correct"].null_count():
        raise InputError(f"{shard.path}: column 'correct' has nulls; run prmtool verify first")


EXAMPLES = """\b
Examples:
  prmtool label work/verified -o work/labeled --method binary --k 8
  prmtool label work/verified -o work/labeled-mc --method mc --k 8 --label soft
  prmtool label work/verified -o work/labeled-7b --model ./Qwen2.5-Math-7B-Instruct --engine vllm --bad-below 0.5
  prmtool label work/verified -o work/labeled-omegaprm --method omegaprm --tree-output work/tree --search-budget 100
  prmtool label work/verified -o work/labeled-drop --rule drop --confidence 0.99 --max-k 64
  prmtool label work/verified -o work/labeled-any --rule any-success
  prmtool label work/verified -o work/judged --method judge --judge-model ./critic --judge-samples 3
  prmtool label work/verified -o work/agreed --method consensus --rejects work/disagreed --judge-model ./critic
  prmtool label work/traces-verified -o work/traces-labeled --split think --steps thinking --max-tokens 8192
"""


@dataclass(kw_only=True)
class LabelSettings(ModelSettings, WorkerSettings):
    method: Annotated[
        str,
        typer.Option(
            help=(
                "binary (first-error search), mc (k rollouts after every step), omegaprm (binary labels plus a "
                "tree search per question, see --tree-output), judge (an LLM critic names the first error) or "
                "consensus (binary and judge; rows where they disagree go to --rejects)."
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
    rule: Annotated[
        str | None,
        typer.Option(
            help=(
                "When a step is the first error. drop: where the prefixes' success rate drops, found with a stated "
                "error rate (see --confidence, --max-k); any-success: no rollout of k from its prefix is right "
                "(MC = 0); bad-below: MC below --bad-below. Default: bad-below with --bad-below, else drop."
            ),
            show_default=False,
        ),
    ] = None
    bad_below: Annotated[
        float | None,
        typer.Option(help="A step is bad when its MC is below this (--rule bad-below).", min=0, max=1),
    ] = None
    confidence: Annotated[
        float,
        typer.Option(
            help="drop: a search stops when the first error it found has this posterior chance of being the one "
            "(1 - its error rate; 0.95 costs about 1.3x the rollouts of 0.9).",
            min=0.5,
            max=0.9999,
        ),
    ] = 0.9
    max_k: Annotated[
        int | None,
        typer.Option(
            "--max-k",
            help="drop: most rollouts drawn from one prefix, in stages of k/8, and a search's budget per level of "
            "a binary search (default 4 x --k).",
            min=1,
            show_default=False,
        ),
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
        float,
        typer.Option(help="omegaprm: Q = alpha^(1-MC) * length_discount^(len/L), in (0, 1].", max=1, callback=positive),
    ] = 0.5
    length_discount: Annotated[
        float,
        typer.Option(
            "--length-discount",
            "--beta",
            help="omegaprm: length discount of Q (the paper's beta), in (0, 1]. (--beta: the old spelling.)",
            max=1,
            callback=positive,
        ),
    ] = 0.9
    length_scale: Annotated[float, typer.Option(help="omegaprm: L, in rollout tokens.", min=1, callback=finite)] = 500.0
    c_puct: Annotated[float, typer.Option(help="omegaprm: exploration weight of U.", min=0, callback=finite)] = 0.125
    rejects: Annotated[
        Path | None,
        typer.Option(
            help="consensus: directory for the rows whose two first errors disagree, with label_reason.",
            show_default=False,
        ),
    ] = None
    judge_samples: Annotated[
        int, typer.Option(help="judge: critiques per response; the most frequent verdict wins.", min=1)
    ] = 1
    judge_model: Annotated[
        str | None,
        typer.Option(help="judge: the critic model, if not --model (a folder or .gguf).", show_default=False),
    ] = None
    split: Split = "blank-line"
    steps: Steps = "all"
    think_tags: ThinkTags = None
    rounds: Annotated[
        str,
        typer.Option(
            help=(
                "lockstep: the probes of every search in one engine call per round; continuous: a search's next probe "
                "starts as soon as its own rollouts are verified, while the others still sample (under any-success, "
                "a probe's first right rollout settles it and stops the rest). The same labels."
            )
        ),
    ] = "lockstep"
    speculate: Annotated[
        bool | None,
        typer.Option(
            "--speculate/--no-speculate",
            help=(
                "binary: sample the probes a search may ask next into engine slots that would otherwise idle, so it "
                "moves on without waiting; those it never asks for are dropped. The same labels. Default: on where "
                "the engine decodes on a GPU (an idle slot costs little there), off on a CPU (every sampled token "
                "costs its share: about 8x slower on the embedded model)."
            ),
            show_default=False,
        ),
    ] = None


def check_choices(settings: LabelSettings) -> None:
    """The options whose values are words: checked before any model loads."""
    if settings.judge_model is not None and settings.method not in ("judge", "consensus"):
        raise InputError("--judge-model is for --method judge or consensus")
    if settings.method not in METHODS:
        raise InputError(f"--method {settings.method!r}: expected one of {', '.join(METHODS)}")
    if settings.label not in ("hard", "soft"):
        raise InputError(f"--label {settings.label!r}: expected hard or soft")
    if settings.correct_responses not in ("trust", "estimate"):
        raise InputError(f"--correct-responses {settings.correct_responses!r}: expected trust or estimate")
    if settings.rounds not in ("lockstep", "continuous"):
        raise InputError(f"--rounds {settings.rounds!r}: expected lockstep or continuous")
    if settings.steps not in STEP_CHOICES:
        raise InputError(f"--steps {settings.steps!r}: expected one of {', '.join(STEP_CHOICES)}")
    parse_think_tags(settings.think_tags)
    labeling.check_rule(settings.rule, settings.bad_below)
    if settings.max_k is not None and settings.max_k < settings.k:
        raise InputError(f"--max-k {settings.max_k}: expected at least --k ({settings.k})")


def label_frame(
    frame: pl.DataFrame,
    engine: Engine,
    settings: LabelSettings | None = None,
    *,
    judge_engine: Engine | None = None,
    tracker: Tracker | None = None,
    counts: MutableMapping[str, int] | None = None,
) -> pl.DataFrame:
    """The per-frame core: verified responses in, the same rows with step_mc, step_labels,
    first_error, label_rollouts, label_right_rollouts and label_tokens out. (`--method omegaprm` labels rows as
    `binary` does; its tree comes from `prmtool.methods.omegaprm.grow_trees`.) `judge` and
    `consensus` add judge_first_error and judge_output; `consensus` also label_reason, null
    where the binary search and the judge agree (`judge_engine`: the critic, if not `engine`).
    `counts` gains what speculation cost (see `label_rows`)."""
    settings = settings or LabelSettings()
    check_choices(settings)
    judged = None
    if settings.method in ("judge", "consensus"):
        judged = judge_rows(
            frame,
            judge_engine or engine,
            samples=settings.judge_samples,
            temperature=0.0 if settings.judge_samples == 1 else settings.temperature,  # one sample: greedy
            max_tokens=settings.max_tokens,
            seed=settings.seed,
            trust_correct=settings.correct_responses == "trust",
            tracker=None if settings.method == "consensus" else tracker,
        )
        if settings.method == "judge":
            return judged
    labeled = label_rows(
        frame,
        engine,
        "binary" if settings.method == "consensus" else settings.method,
        settings.k,
        RolloutSettings.of(settings, worker_count(settings.workers)),
        make_splitter(settings.split).separator,
        settings.label == "soft",
        settings.bad_below,
        settings.correct_responses,
        tracker,
        continuous=settings.rounds == "continuous",
        speculate=settings.speculate if settings.speculate is not None else engine.spare_slots_are_cheap(),
        counts=counts,
        which_steps=settings.steps,
        tags=parse_think_tags(settings.think_tags),
        rule=settings.rule,
        confidence=settings.confidence,
        max_k=settings.max_k,
    )
    if judged is None:
        return labeled
    return consensus(labeled, judged, trusted=settings.correct_responses == "trust")


def consensus(labeled: pl.DataFrame, judged: pl.DataFrame, trusted: bool) -> pl.DataFrame:
    """Qwen's consensus filtering: a row's MC labels stand where the judge names the same first
    error; `label_reason` says why the others do not (disagree, judge_unparseable)."""
    mc, critic = labeled["first_error"].to_list(), judged["judge_first_error"].to_list()
    correct = labeled["correct"].to_list()
    reasons = []
    for row, (mc_first, judge_first) in enumerate(zip(mc, critic)):
        if trusted and correct[row]:
            reasons.append(None)  # neither was asked: a verified-correct response is all good
        elif judge_first is None:
            reasons.append("judge_unparseable")
        else:
            reasons.append(None if mc_first == judge_first else "disagree")
    return labeled.with_columns(
        judged["judge_first_error"],
        judged["judge_output"],
        pl.Series("label_reason", reasons, dtype=pl.String),
        label_tokens=labeled["label_tokens"] + judged["label_tokens"],
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
        "rule": labeling.check_rule(settings.rule, settings.bad_below),
        "bad_below": settings.bad_below,
        "confidence": settings.confidence,
        "max_k": settings.max_k,
        "correct_responses": settings.correct_responses,
        "system_prompt": settings.system_prompt,
        "prompt_template": prompt_template,
        "split": settings.split,
        "model": settings.model,
        "engine": settings.engine,
    }
    if settings.steps != "all" or settings.think_tags is not None:
        arguments.update(steps=settings.steps, think_tags=settings.think_tags)
    if settings.method in ("judge", "consensus"):
        arguments.update(judge_samples=settings.judge_samples, judge_model=settings.judge_model)
    if settings.method == "consensus":
        arguments.update(rejects=str(settings.rejects))
    if settings.method == "omegaprm":
        arguments.update(
            tree_output=str(settings.tree_output),
            search_budget=settings.search_budget,
            screen_rollouts=settings.screen_rollouts,
            alpha=settings.alpha,
            beta=settings.length_discount,
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
        beta=settings.length_discount,
        length_scale=settings.length_scale,
        c_puct=settings.c_puct,
    )


def run(
    inputs: list[str], output: Path, settings: LabelSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Label every step of every response by Monte Carlo rollouts from its prefixes. Writes
    step_mc (with step_mc_low and step_mc_high), step_labels, first_error, label_rollouts,
    label_right_rollouts and label_tokens."""
    check_choices(settings)
    if settings.method == "omegaprm" and settings.tree_output is None:
        raise InputError("--method omegaprm needs --tree-output DIR")
    if settings.method != "omegaprm" and settings.tree_output is not None:
        raise InputError("--tree-output is only for --method omegaprm")
    if settings.method == "consensus" and settings.rejects is None:
        raise InputError("--method consensus needs --rejects DIR, for the rows whose first errors disagree")
    if settings.method != "consensus" and settings.rejects is not None:
        raise InputError("--rejects is only for --method consensus")
    separator = make_splitter(settings.split).separator
    stats = RunStats("label", quiet=quiet)
    prompt_tokens = choice.stage_prompt_tokens("label", settings)
    picked = choice.resolve(settings.engine, settings.model, settings.device, prompt_tokens, "label")
    settings = replace(settings, engine=picked.engine)
    rollout_settings = RolloutSettings.of(settings, worker_count(settings.workers, stats.warn))
    arguments = provenance_arguments(settings, rollout_settings.prompt_template)
    search_config = tree_search_config(settings)
    policy = EngineOnDemand(
        settings.engine, settings.model, settings.device, settings.trust_remote_code, stats, why=picked.line()
    )
    critic = policy
    if settings.judge_model is not None:
        critic = EngineOnDemand(
            settings.engine, settings.judge_model, settings.device, settings.trust_remote_code, stats
        )
    pending: dict[str, pl.DataFrame] = {}  # consensus: the rejects of the shard just labeled

    def transform(frame: pl.DataFrame, tracker: Tracker) -> pl.DataFrame:
        if settings.method != "judge":
            start_workers(rollout_settings.workers)  # before a model load starts threads here
        if settings.method == "judge":
            result = label_frame(frame, critic.get(), settings, tracker=tracker)
        else:
            judge = critic.get() if settings.method == "consensus" else None
            result = label_frame(
                frame, policy.get(), settings, judge_engine=judge, tracker=tracker, counts=stats.counts
            )
        stats.counts["rollouts"] += int(result["label_rollouts"].sum())
        stats.counts["tokens_generated"] += int(result["label_tokens"].sum())
        stats.counts["wrong_responses_with_first_error"] += int((result["first_error"] >= 0).sum())
        if settings.method == "judge":  # asked, but the reply named no step: left null, not guessed
            asked = result["judge_output"].is_not_null()
            stats.counts["judge_unparseable"] += int((asked & result["judge_first_error"].is_null()).sum())
        if settings.method == "consensus":
            for reason, count in result["label_reason"].drop_nulls().value_counts().iter_rows():
                stats.counts[f"rejected_{reason}"] += count
            kept = result["label_reason"].is_null()
            pending["rejects"] = result.filter(~kept)
            stats.counts["consensus_kept"] += int(kept.sum())
            return result.filter(kept).drop("label_reason")
        return result

    def write_rejects(shard: shards.InputShard, frame: pl.DataFrame, tracker: Tracker) -> None:
        shards.write_shard(
            cast_to_contract(pending.pop("rejects")),
            settings.rejects / shard.name,
            shards.provenance("label-rejects", arguments, shard),
        )

    def write_tree(shard: shards.InputShard, frame: pl.DataFrame, tracker: Tracker) -> None:
        searches = grow_trees(
            frame, policy.get(), search_config, rollout_settings, make_splitter(settings.split), tracker
        )
        tree = tree_frame(frame, searches, separator)
        stats.counts["tree_rollouts"] += sum(
            settings.screen_rollouts + question.search_rollouts for question in searches.values()
        )
        stats.counts["tree_questions_kept"] += sum(question.kept for question in searches.values())
        stats.counts["tree_states"] += tree.height
        shards.write_shard(tree, settings.tree_output / shard.name, shards.provenance("label-tree", arguments, shard))

    side_output = {"omegaprm": write_tree, "consensus": write_rejects}.get(settings.method)
    stage = MapStage(
        "label",
        transform,
        arguments,
        REQUIRED + (("thinking_steps",) if settings.steps != "all" else ()),
        # consensus: the rows it keeps; every other input row is in --rejects
        rows_per_input=None if settings.method == "consensus" else 1,
        extra_checks=[_verified, check_steps],
        side_output=side_output,
        side_directories={"--tree-output": settings.tree_output, "--rejects": settings.rejects},
    )
    with contextlib.ExitStack() as models:
        for model in {id(policy): policy, id(critic): critic}.values():
            models.enter_context(model)
        run_map_stage(stage, inputs, output, overwrite, stats, partition)
    return stats.finish()


STAGE = Stage("label", LabelSettings, run, EXAMPLES, REQUIRED, check=check_choices)

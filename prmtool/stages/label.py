"""`prmtool label`: step labels from Monte Carlo rollouts of a policy model.

Methods (docs/algorithms.md, "Step labeling by Monte Carlo rollouts"):
- `mc`: Math-Shepherd. k rollouts after every step; step i's value is MC(steps[:i+1]).
- `binary`: OmegaPRM's first-error binary search on wrong responses: about k * log2(n)
  rollouts instead of k * n. Steps before the first error are good, the first error is bad,
  later steps are unlabeled.
- `omegaprm`: OmegaPRM's tree search per question (`prmtool.methods.omegaprm`), written to
  `--tree-output` as one row per searched state (prefix, MC). The main output's rows get the
  same columns as `binary` (its first-error search on the wrong input responses).

Every row's search is a small state machine that proposes probes and reads their results;
the driver gathers the probes of all active searches into one engine call per round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import polars as pl
import typer

from prmtool.core.partition import Partition
from prmtool.core.report import Summary
from prmtool.core.stage import Stage
from prmtool.core import shards
from prmtool.core.errors import InputError
from prmtool.engines.loading import EngineOnDemand
from prmtool.methods.omegaprm import SearchConfig, grow_trees, tree_frame
from prmtool.cli.options import ModelSettings, WorkerSettings
from prmtool.cli.options import (
    template,
    finite,
    positive,
    Split,
    default_workers,
)
from prmtool.core.report import RunStats, Tracker
from prmtool.methods.rollouts import Probe, ProbeResult, Rollouts, RolloutSettings
from prmtool.core.runner import MapStage, run_map_stage
from prmtool.methods.steps import make_splitter

if TYPE_CHECKING:
    from prmtool.engines import Engine

METHODS = ("binary", "mc", "omegaprm")
REQUIRED = ("problem_id", "problem", "reference_answer", "response_id", "steps", "correct")


@dataclass
class Threshold:
    """When is a prefix bad? Default: MC = 0 (Qwen's finding); `--bad-below t`: MC < t."""

    bad_below: float | None = None

    def is_good(self, mc: float) -> bool:
        return mc > 0 if self.bad_below is None else mc >= self.bad_below

    @property
    def one_success_proves_good(self) -> bool:
        # A single correct rollout from a prefix proves MC > 0, which settles only the default rule.
        return self.bad_below is None


@dataclass
class RowLabels:
    step_mc: list[float | None]
    step_labels: list[int | None]
    first_error: int
    rollouts: int = 0
    tokens: int = 0


@dataclass
class PerStepMC:
    """Math-Shepherd: estimate MC after every step, all in one round.

    The response's own outcome is MC of its full prefix (a correct response is a correct
    rollout from every one of its prefixes), so with hard labels and the default threshold a
    correct response needs no rollouts at all: its outcome already proves every prefix good."""

    row: int
    n_steps: int
    correct: bool
    k: int
    threshold: Threshold
    soft: bool
    step_mc: list[float | None] = field(init=False)
    spent: list[int] = field(default_factory=lambda: [0, 0])
    asked: bool = False

    def __post_init__(self) -> None:
        self.step_mc = [None] * self.n_steps
        if self.n_steps:
            self.step_mc[-1] = 1.0 if self.correct else 0.0  # the outcome, no rollout needed

    def probes(self) -> list[Probe]:
        if self.asked:
            return []
        self.asked = True
        if self.correct and not self.soft and self.threshold.one_success_proves_good:
            return []
        return [Probe(self.row, prefix, self.k) for prefix in range(1, self.n_steps)]

    def observe(self, result: ProbeResult) -> None:
        self.step_mc[result.probe.prefix_steps - 1] = result.mc
        self.spent[0] += result.probe.k
        self.spent[1] += result.tokens

    def outcome(self) -> RowLabels:
        known = [self.threshold.is_good(v) if v is not None else True for v in self.step_mc]
        labels = [int(good) for good in known]
        first_error = labels.index(0) if 0 in labels else -1
        return RowLabels(self.step_mc, labels, first_error, *self.spent)


@dataclass
class FirstErrorBinarySearch:
    """OmegaPRM's binary search for the first step whose prefix has MC = 0.

    Invariant: MC(steps[:good]) is good (the empty prefix is assumed so) and MC(steps[:bad])
    is bad (the full response is wrong). Each level probes the middle prefix.

    Staged sampling (hard labels, default threshold): one correct rollout proves MC > 0, so a
    probe first draws k/4 rollouts and draws the other 3k/4 only if none of those was right.
    "Some of k rollouts is right" has the same probability either way, so labels are
    distributed exactly as with k rollouts at once, for far fewer rollouts on good prefixes."""

    row: int
    n_steps: int
    k: int
    threshold: Threshold
    staged: bool = False
    step_mc: list[float | None] = field(init=False)
    good: int = 0
    bad: int = field(init=False)
    spent: list[int] = field(default_factory=lambda: [0, 0])
    middle_counts: list[int] = field(default_factory=lambda: [0, 0])  # correct, sampled at the middle

    def __post_init__(self) -> None:
        self.step_mc = [None] * self.n_steps
        self.bad = self.n_steps

    def probes(self) -> list[Probe]:
        if self.bad - self.good <= 1:
            return []
        sampled = self.middle_counts[1]
        first_stage = max(1, self.k // 4) if self.staged else self.k
        return [Probe(self.row, (self.good + self.bad) // 2, first_stage if sampled == 0 else self.k - sampled)]

    def observe(self, result: ProbeResult) -> None:
        middle = result.probe.prefix_steps
        self.spent[0] += result.probe.k
        self.spent[1] += result.tokens
        self.middle_counts[0] += result.correct
        self.middle_counts[1] += result.probe.k
        correct, sampled = self.middle_counts
        if sampled < self.k and correct == 0:
            return  # nothing proven yet: the next round draws the rest of the k rollouts
        self.step_mc[middle - 1] = correct / sampled
        if self.threshold.is_good(correct / sampled):
            self.good = middle
        else:
            self.bad = middle
        self.middle_counts = [0, 0]

    def outcome(self) -> RowLabels:
        if self.n_steps == 0:
            return RowLabels([], [], -1, *self.spent)
        first_error = self.bad - 1  # the step that turns the last good prefix into a bad one
        labels = [1] * first_error + [0] + [None] * (self.n_steps - first_error - 1)
        return RowLabels(self.step_mc, labels, first_error, *self.spent)


def trusted_correct(n_steps: int) -> RowLabels:
    """`--correct-responses trust`: a verified-correct response's steps are all good."""
    return RowLabels([None] * n_steps, [1] * n_steps, -1)


def label_rows(
    frame: pl.DataFrame,
    engine: "Engine",
    method: str = "binary",
    k: int = 8,
    settings: RolloutSettings | None = None,
    separator: str = "\n\n",
    soft: bool = False,
    bad_below: float | None = None,
    correct_responses: str = "trust",
    tracker: Tracker | None = None,
) -> pl.DataFrame:
    """Pure core: verified responses in, the same rows with step labels out."""
    if method not in METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    settings = settings or RolloutSettings()
    threshold = Threshold(bad_below)
    steps = frame["steps"].to_list()
    rollouts = Rollouts(
        engine,
        frame["problem"].to_list(),
        steps,
        frame["reference_answer"].cast(pl.String).to_list(),
        frame["response_id"].to_list(),
        separator,
        settings,
    )
    results: list[RowLabels | None] = [None] * frame.height
    if method == "omegaprm":
        method = "binary"  # the input rows' labels; the tree itself comes from prmtool.methods.omegaprm
    searches = {}
    for row, (row_steps, correct) in enumerate(zip(steps, frame["correct"].to_list())):
        n_steps = len(row_steps or [])
        if correct and correct_responses == "trust":
            results[row] = trusted_correct(n_steps)
        elif method == "mc":
            searches[row] = PerStepMC(row, n_steps, bool(correct), k, threshold, soft)
        elif correct:  # binary search, estimate mode: the response itself proves MC > 0 everywhere
            searches[row] = PerStepMC(row, n_steps, True, k, threshold, soft)
        else:
            staged = not soft and threshold.one_success_proves_good
            searches[row] = FirstErrorBinarySearch(row, n_steps, k, threshold, staged)
    if tracker is not None:
        tracker.advance(frame.height - len(searches))

    while searches:
        round_probes = {row: search.probes() for row, search in searches.items()}
        for row in [row for row, probes in round_probes.items() if not probes]:
            results[row] = searches.pop(row).outcome()
            if tracker is not None:
                tracker.advance(1)
        probes = [p for row in searches for p in round_probes[row]]
        round_results = rollouts.run(probes)
        for result in round_results:
            searches[result.probe.row].observe(result)
        if tracker is not None and round_results:
            tracker.advance(0, sum(r.tokens for r in round_results))

    return frame.with_columns(
        pl.Series("step_mc", [r.step_mc for r in results], dtype=pl.List(pl.Float64)),
        pl.Series("step_labels", [r.step_labels for r in results], dtype=pl.List(pl.Int8)),
        pl.Series("first_error", [r.first_error for r in results], dtype=pl.Int32),
        pl.Series("label_rollouts", [r.rollouts for r in results], dtype=pl.Int32),
        pl.Series("label_tokens", [r.tokens for r in results], dtype=pl.Int64),
    )


def _verified(shard) -> None:
    if pl.read_parquet(shard.path, columns=["correct"])["correct"].null_count():
        raise InputError(f"{shard.path}: column 'correct' has nulls; run prmtool verify first")


EXAMPLES = """\b
Examples:
  prmtool label work/verified -o work/labeled --method binary --k 8
  prmtool label work/verified -o work/labeled --method mc --k 8 --label soft
  prmtool label work/verified -o work/labeled --model ./Qwen2.5-Math-7B-Instruct --engine vllm --bad-below 0.5
  prmtool label work/verified -o work/labeled --method omegaprm --tree-output work/tree --search-budget 100
"""


@dataclass(kw_only=True)
class LabelSettings(ModelSettings, WorkerSettings):
    method: Annotated[
        str,
        typer.Option(
            help=(
                "binary (first-error search), mc (k rollouts after every step) or omegaprm (binary labels plus a "
                "tree search per question, see --tree-output)."
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
    split: Split = "blank-line"


def run(
    inputs: list[str], output: Path, settings: LabelSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Label every step of every response by Monte Carlo rollouts from its prefixes. Writes
    step_mc, step_labels, first_error, label_rollouts and label_tokens."""
    from prmtool.methods.prompts import DEFAULT_PROMPT_TEMPLATE

    if settings.method not in METHODS:
        raise InputError(f"--method {settings.method!r}: expected one of {', '.join(METHODS)}")
    if settings.label not in ("hard", "soft"):
        raise InputError(f"--label {settings.label!r}: expected hard or soft")
    if settings.correct_responses not in ("trust", "estimate"):
        raise InputError(f"--correct-responses {settings.correct_responses!r}: expected trust or estimate")
    if settings.method == "omegaprm" and settings.tree_output is None:
        raise InputError("--method omegaprm needs --tree-output DIR")
    if settings.method != "omegaprm" and settings.tree_output is not None:
        raise InputError("--tree-output is only for --method omegaprm")
    separator = make_splitter(settings.split).separator
    stats = RunStats("label", quiet=quiet)
    rollout_settings = RolloutSettings(
        temperature=settings.temperature,
        max_tokens=settings.max_tokens,
        seed=settings.seed,
        system_prompt=settings.system_prompt,
        prompt_template=settings.prompt_template or DEFAULT_PROMPT_TEMPLATE,
        workers=settings.workers or default_workers(),
    )
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
        "prompt_template": rollout_settings.prompt_template,
        "split": settings.split,
        "model": settings.model,
        "engine": settings.engine,
    }
    search_config = SearchConfig(
        k=settings.k,
        budget=settings.search_budget,
        screen_rollouts=settings.screen_rollouts,
        alpha=settings.alpha,
        beta=settings.beta,
        length_scale=settings.length_scale,
        c_puct=settings.c_puct,
    )
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
    engines = EngineOnDemand(settings.engine, settings.model, settings.device, settings.trust_remote_code, stats)

    def transform(frame: pl.DataFrame, tracker: Tracker) -> pl.DataFrame:
        result = label_rows(
            frame,
            engines.get(),
            settings.method,
            settings.k,
            rollout_settings,
            separator,
            settings.label == "soft",
            settings.bad_below,
            settings.correct_responses,
            tracker,
        )
        stats.counts["rollouts"] += int(result["label_rollouts"].sum())
        stats.counts["tokens_generated"] += int(result["label_tokens"].sum())
        stats.counts["wrong_responses_with_first_error"] += int((result["first_error"] >= 0).sum())
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

"""The row searches of `prmtool label` (docs/algorithms.md, "Step labeling by Monte Carlo rollouts").

- `PerStepMC`: Math-Shepherd. k rollouts after every step; step i's value is MC(steps[:i+1]).
- `FirstErrorBinarySearch`: OmegaPRM's first-error binary search on a wrong response: about
  k * log2(n) rollouts instead of k * n. Steps before the first error are good, the first error
  is bad, later steps are unlabeled.

Each row's search is a small state machine that proposes probes and reads their results;
`prmtool.methods.rollouts.run_searches` gathers the probes of all active searches into one
engine call per round, as it does for OmegaPRM's question searches.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from prmtool.core.errors import InputError
from prmtool.methods.rollouts import Probe, ProbeResult, Rollouts, RolloutSettings, run_searches

if TYPE_CHECKING:
    from prmtool.core.report import Tracker
    from prmtool.engines import Engine

METHODS = ("binary", "mc", "omegaprm")


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
    step_labels: list[int | None] | None
    first_error: int | None
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

    def most_rollouts(self) -> int:
        """The rollouts this search takes at most (for progress)."""
        if self.correct and not self.soft and self.threshold.one_success_proves_good:
            return 0
        return max(0, self.n_steps - 1) * self.k

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

    @property
    def first_stage(self) -> int:
        return max(1, self.k // 4) if self.staged else self.k

    @property
    def second_stage(self) -> int:
        return self.k - self.first_stage  # 0 unless staged

    def probes(self) -> list[Probe]:
        if self.bad - self.good <= 1:
            return []
        middle, sampled = (self.good + self.bad) // 2, self.middle_counts[1]
        if sampled == 0:
            return [Probe(self.row, middle, self.first_stage)]
        return [Probe(self.row, middle, self.k - sampled, first_sample=sampled)]  # the rest of the k

    def probes_left(self) -> int:
        """At most how many probes this search still asks, the one asked now included: the
        length of its chain of dependent probes, which continuous rounds serve longest first."""
        levels = (self.bad - self.good - 1).bit_length()
        if not self.second_stage:
            return levels
        return 2 * levels - (1 if self.middle_counts[1] else 0)  # two stages a level; one done

    def most_rollouts(self) -> int:
        """The rollouts this search takes at most (for progress): k at every level."""
        return max(0, self.n_steps - 1).bit_length() * self.k

    def speculative_probes(self) -> list[Probe]:
        """What this search may ask next, whatever the probe it just asked shows, most likely
        first: the rest of a staged probe (needed unless a first-stage rollout is right), then the
        first stage of the next level's middle if this one is good, and if it is bad, then the
        rests of those two. Seeds depend on the prefix alone, so a probe sampled early gives what
        it would have given when asked."""
        if self.bad - self.good <= 1:
            return []
        middle, sampled = (self.good + self.bad) // 2, self.middle_counts[1]
        rest = self.second_stage
        ahead = []
        if sampled == 0 and rest:
            ahead.append(Probe(self.row, middle, rest, first_sample=self.first_stage))
        next_middles = [(good + bad) // 2 for good, bad in ((middle, self.bad), (self.good, middle)) if bad - good > 1]
        ahead += [Probe(self.row, next_middle, self.first_stage) for next_middle in next_middles]
        if rest:
            ahead += [Probe(self.row, next_middle, rest, first_sample=self.first_stage) for next_middle in next_middles]
        return ahead

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
        return RowLabels(self.step_mc, labels_from_first_error(first_error, self.n_steps), first_error, *self.spent)


def labels_from_first_error(first_error: int | None, n_steps: int) -> list[int | None] | None:
    """Good before the first error, bad at it, unlabeled after; all good for -1; None for None."""
    if first_error is None:
        return None
    if first_error < 0:
        return [1] * n_steps
    return [1] * first_error + [0] + [None] * (n_steps - first_error - 1)


def trusted_correct(n_steps: int) -> RowLabels:
    """`--correct-responses trust`: a verified-correct response's steps are all good."""
    return RowLabels([None] * n_steps, labels_from_first_error(-1, n_steps), -1)


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
    continuous: bool = False,
    speculate: bool = True,
    counts: MutableMapping[str, int] | None = None,
) -> pl.DataFrame:
    """Pure core: verified responses in, the same rows with step labels out. `continuous`:
    continuous rounds instead of lockstep ones; `speculate`: sample probes a search may ask
    next into idle engine slots (`run_searches`); the same labels either way. `counts`, when
    given, gains what speculation cost (speculative_rollouts, speculative_rollouts_unused,
    speculative_tokens_unused); label_rollouts and label_tokens count only rollouts used."""
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
        if correct is None:  # no reference answer (verify_status no_reference): no rollout can be judged
            results[row] = RowLabels([None] * n_steps, None, None)
        elif correct and correct_responses == "trust":
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
        # a row finishes only when its whole search does: progress counts its rollouts
        tracker.expect_work(len(searches), sum(search.most_rollouts() for search in searches.values()), "rollouts")

    def finished(row: int, search) -> None:
        results[row] = search.outcome()
        if tracker is not None:
            tracker.advance(1)

    spent = run_searches(
        searches, rollouts, on_done=finished, tracker=tracker, continuous=continuous, speculate=speculate
    )
    if counts is not None and spent.speculative_rollouts:
        for name, count in (
            ("speculative_rollouts", spent.speculative_rollouts),
            ("speculative_rollouts_unused", spent.unused_rollouts),
            ("speculative_tokens_unused", spent.unused_tokens),
        ):
            counts[name] = counts.get(name, 0) + count

    return frame.with_columns(
        pl.Series("step_mc", [r.step_mc for r in results], dtype=pl.List(pl.Float64)),
        pl.Series("step_labels", [r.step_labels for r in results], dtype=pl.List(pl.Int8)),
        pl.Series("first_error", [r.first_error for r in results], dtype=pl.Int32),
        pl.Series("label_rollouts", [r.rollouts for r in results], dtype=pl.Int32),
        pl.Series("label_tokens", [r.tokens for r in results], dtype=pl.Int64),
    )

"""The row searches of `prmtool label` (docs/algorithms.md, "Step labeling by Monte Carlo rollouts").

- `PerStepMC`: Math-Shepherd. k rollouts after every step; step i's value is MC(steps[:i+1]).
- `FirstErrorBinarySearch`: OmegaPRM's first-error binary search on a wrong response: about
  k * log2(n) rollouts instead of k * n. Steps before the first error are good, the first error
  is bad, later steps are unlabeled.
- `DropSearch`: both under `--rule drop` (the default): the first error is where the prefixes'
  success rate drops (`prmtool.methods.progress`), rollouts drawn one stage (k/8) at a time
  where they tell the most about where, until one place is likely enough.

Each row's search is a small state machine that proposes probes and reads their results;
`prmtool.methods.rollouts.run_searches` gathers the probes of all active searches into one
engine call per round, as it does for OmegaPRM's question searches.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from prmtool.core.errors import InputError
from prmtool.methods.progress import Counts, first_bad_posterior, learned_prior, most_informative, wilson_interval
from prmtool.methods.rollouts import (
    Probe,
    ProbeResult,
    Rollouts,
    RolloutSettings,
    rests_on_no_right_rollout,
    run_searches,
)
from prmtool.methods.thinking import KNOWN_TAGS, ThinkTags, check_steps_column, known_traces, step_window

if TYPE_CHECKING:
    from prmtool.core.report import Tracker
    from prmtool.engines import Engine

METHODS = ("binary", "mc", "omegaprm")
# drop: a significant fall of the success rate (the default); any-success: bad only when no
# rollout of k is right (MC = 0); bad-below: MC below --bad-below.
RULES = ("drop", "any-success", "bad-below")


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
    # (correct, sampled) behind each step_mc, for its confidence interval; None where unmeasured.
    step_counts: list[Counts | None] | None = None


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
    window: tuple[int, int] | None = None  # --steps: only steps [first, last) are probed
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
        first, last = self.window or (0, self.n_steps)
        return [Probe(self.row, prefix, self.k) for prefix in range(max(1, first + 1), min(last, self.n_steps - 1) + 1)]

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
        counts = [None if mc is None else (round(mc * self.k), self.k) for mc in self.step_mc]
        if self.n_steps:
            counts[-1] = (int(self.correct), 1)  # the response itself: one rollout from its full prefix
        return RowLabels(self.step_mc, labels, first_error, *self.spent, step_counts=counts)


@dataclass
class FirstErrorBinarySearch:
    """OmegaPRM's binary search for the first step whose prefix has MC = 0.

    Invariant: MC(steps[:good]) is good (the empty prefix is assumed so) and MC(steps[:bad])
    is bad (the full response is wrong). Each level probes the middle prefix.

    Staged sampling (hard labels, default threshold): one correct rollout proves MC > 0, so a
    probe first draws k/4 rollouts and draws the other 3k/4 only if none of those was right.
    "Some of k rollouts is right" has the same probability either way, so labels are
    distributed exactly as with k rollouts at once, for far fewer rollouts on good prefixes.
    `until_right` (continuous rounds) goes further: all k rollouts start at once and the first
    right one settles the probe, the rest stopped (`run_searches`): the same labels, and a good
    prefix costs the wait for its quickest right rollout, not for the slowest of a stage."""

    row: int
    n_steps: int
    k: int
    threshold: Threshold
    staged: bool = False
    # --steps: the first error is searched among steps [first, last) only; the prefix of the
    # first `first` steps is taken as good (the thinking, when only the solution is labelled)
    window: tuple[int, int] | None = None
    until_right: bool = False  # probes stop at their first right rollout (instead of staged)
    step_mc: list[float | None] = field(init=False)
    good: int = 0
    bad: int = field(init=False)
    last: int = field(init=False)  # the window's end: no prefix longer than this is probed
    spent: list[int] = field(default_factory=lambda: [0, 0])
    middle_counts: list[int] = field(default_factory=lambda: [0, 0])  # correct, sampled at the middle

    def __post_init__(self) -> None:
        self.step_mc = [None] * self.n_steps
        self.step_counts: list[Counts | None] = [None] * self.n_steps
        self.bad = self.n_steps
        self.good, self.last = self.window or (0, self.n_steps)

    def _middle(self) -> int:
        return min((self.good + self.bad) // 2, self.last)  # never past the window

    @property
    def first_stage(self) -> int:
        return max(1, self.k // 4) if self.staged else self.k

    @property
    def second_stage(self) -> int:
        return self.k - self.first_stage  # 0 unless staged

    def probes(self) -> list[Probe]:
        if self.bad - self.good <= 1 or self.good >= self.last:
            return []
        middle, sampled = self._middle(), self.middle_counts[1]
        if sampled == 0:
            return [Probe(self.row, middle, self.first_stage, until_right=self.until_right)]
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
        if self.bad - self.good <= 1 or self.good >= self.last:
            return []
        middle, sampled = self._middle(), self.middle_counts[1]
        rest = self.second_stage
        ahead = []
        if sampled == 0 and rest:
            ahead.append(Probe(self.row, middle, rest, first_sample=self.first_stage))
        next_middles = [(good + bad) // 2 for good, bad in ((middle, self.bad), (self.good, middle)) if bad - good > 1]
        next_middles = [next_middle for next_middle in next_middles if next_middle <= self.last]
        ahead += [Probe(self.row, m, self.first_stage, until_right=self.until_right) for m in next_middles]
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
        self.step_counts[middle - 1] = (correct, sampled)
        if self.threshold.is_good(correct / sampled):
            self.good = middle
        else:
            self.bad = middle
        self.middle_counts = [0, 0]

    def outcome(self) -> RowLabels:
        if self.n_steps == 0:
            return RowLabels([], [], -1, *self.spent)
        if self.bad > self.last:  # no error among the window's steps: it lies after them
            return RowLabels(self.step_mc, [1] * self.n_steps, None, *self.spent, step_counts=self.step_counts)
        first_error = self.bad - 1  # the step that turns the last good prefix into a bad one
        labels = labels_from_first_error(first_error, self.n_steps)
        return RowLabels(self.step_mc, labels, first_error, *self.spent, step_counts=self.step_counts)


@dataclass
class DropSearch:
    """The first error under `--rule drop`: the first prefix where the success rate drops
    (`prmtool.methods.progress`), for the binary search and, with `every_step`, per-step MC.

    Each round draws one stage (k/8 rollouts, one at k = 8; a full k for soft labels) from the
    prefix whose rollouts are expected to say the most about where the drop is: at first the
    middle of the places still likely, as a binary search would, then the two prefixes either
    side of the likeliest place, and the start or the window's last prefix when the rates are
    in doubt. Small stages let each rollout be placed with what the ones before it showed (a
    stage of k/4 cost a fifth more rollouts for the same exactness on the fidelity bench).
    Every prefix's stages continue one seeded stream. The search stops when one place holds
    `confidence` of the posterior and its first bad prefix has k rollouts, or when the start
    has no right rollout in 2k (a problem the policy does not solve has nowhere to drop: no step
    is shown to be the error, and the last one is taken), or at its budget: max_k rollouts a
    level of a binary search over the same places, then the likeliest place is reported.
    Per-step MC (`every_step`) first draws k from every prefix, as Math-Shepherd does.

    Wrong responses: the full response is a bad prefix (its own outcome), so some place in
    the window is the first bad prefix, or the one after the window (the error lies after it).
    It is not sampled: its rollouts restate its wrong answer and recover far less often than
    those of the steps after the error, so its rate is not theirs. Correct responses (estimate
    mode): the place after the window's last prefix means no step is an error."""

    row: int
    n_steps: int
    correct: bool
    k: int
    confidence: float
    max_k: int
    every_step: bool = False  # per-step MC: k rollouts from every prefix first, labels on every step
    soft: bool = False  # soft labels: every probed step_mc from k rollouts at least, as under the other rules
    window: tuple[int, int] | None = None  # --steps: the first error is searched among steps [first, last)
    # over the (good, bad) rates (progress.learned_prior); None: the analytic prior of log_evidence
    prior: np.ndarray | None = None
    spent: list[int] = field(default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        self.base, self.last = self.window or (0, self.n_steps)  # the prefix of `base` steps is good
        self.counts: list[Counts] = [(0, 0)] * (self.n_steps + 1)  # of prefixes 0 .. n_steps
        # Prefixes probed: the window's. Not the full response: it holds the error, but it also
        # states the wrong answer, so rollouts from it rarely recover even where rollouts from the
        # steps after the error often do; pooled with those, its rate would push the drop late.
        self.probed = list(range(self.base, min(self.last, self.n_steps - 1) + 1))
        # Where the first bad prefix may be; the last place: after the window (no error in it).
        top = min(self.last + 1, self.n_steps) if not self.correct else min(self.last, self.n_steps - 1) + 1
        self.places = list(range(self.base + 1, top + 1))
        self.stage = self.k if self.soft else max(1, self.k // 8)
        self.found: int | None = None  # the first bad prefix, once the search stops
        self.plan: list[tuple[int, int]] | None = None  # this round's (prefix, rollouts), once chosen
        self.posterior: np.ndarray | None = None  # over the places, for the counts so far

    def _posterior(self) -> np.ndarray:
        if self.posterior is None:  # once per round: the counts change only when results come
            self.posterior = first_bad_posterior(self.counts, self.places, self.prior)
        return self.posterior

    def _likeliest(self) -> tuple[int, float]:
        posterior = self._posterior()
        best = int(posterior.argmax())
        return self.places[best], float(posterior[best])

    def _hopeless(self) -> bool:
        correct, sampled = self.counts[self.base]
        return correct == 0 and sampled >= min(2 * self.k, self.max_k)

    def _next(self) -> list[tuple[int, int]]:
        """The (prefix, rollouts) this round draws: none once the search stops."""
        if self.plan is None:
            self.plan = self._choose()
        return self.plan

    def _choose(self) -> list[tuple[int, int]]:
        if self.found is not None or self.n_steps == 0:
            return []
        if len(self.places) == 1:
            self.found = self.places[0]
            return []
        if self.every_step and any(self.counts[p][1] < self.k for p in self.probed):
            return [(p, self.k - self.counts[p][1]) for p in self.probed if self.counts[p][1] < self.k]
        place, chance = self._likeliest()
        nothing_right = self.right_rollouts() == 0
        if chance >= self.confidence:
            # A step is called the error only on k rollouts from its prefix at least, as under
            # any-success: a few wrong ones from a good prefix are too likely to stand for a drop.
            if place in self.probed and self.counts[place][1] < self.k and self._stage(place) > 0:
                return [(place, self._stage(place))]
            self.found = place
            return []
        if self.spent[0] >= self.most_rollouts():  # the budget: the likeliest place, no drop if none was right
            self.found = self.places[-1] if nothing_right else place
            return []
        if self._hopeless():
            self.found = self.places[-1]
            return []
        if nothing_right and self.spent[0] >= self.k:
            return [(self.base, self._stage(self.base))]  # nothing right yet: is the problem solvable?
        choices = [(prefix, self._stage(prefix)) for prefix in self._candidates(place)]
        choices = [choice for choice in choices if choice[1] > 0]
        if not choices:  # every prefix worth probing is at max_k
            self.found = place
            return []
        return most_informative(self.counts, self.places, choices, self.prior)[:1]

    def _stage(self, prefix: int) -> int:
        return self._stage_after(self.counts[prefix][1])

    def _stage_after(self, sampled: int) -> int:
        """The rollouts of a prefix's next stage once it holds `sampled`."""
        return min(self.stage if sampled >= self.k or not self.soft else self.k - sampled, self.max_k - sampled)

    def _candidates(self, place: int) -> list[int]:
        """Prefixes worth a stage: either side of the likeliest place, the place that splits the
        posterior in half (a binary search's middle), and the start and the window's last prefix,
        which the rates rest on."""
        posterior = self._posterior()
        chance_bad = dict(zip(self.places, np.cumsum(posterior)))  # prefix p is bad when the place <= p
        middle = min(self.places[:-1] or self.places, key=lambda p: (abs(chance_bad[p] - 0.5), p))
        wanted = {place - 1, place, middle, self.base, self.probed[-1]}
        return sorted(prefix for prefix in wanted if prefix in self.probed)

    def probes(self) -> list[Probe]:
        return [
            Probe(self.row, prefix, rollouts, first_sample=self.counts[prefix][1]) for prefix, rollouts in self._next()
        ]

    def probes_left(self) -> int:
        """About how many dependent probes this search still asks: a few stages a level."""
        return 0 if self.found is not None else 4 * len(self.places).bit_length()

    def most_rollouts(self) -> int:
        """The rollouts this search takes at most (for progress, and its budget): max_k at every
        level of a binary search over its places; per-step MC, max_k at every prefix."""
        if self.every_step:
            return len(self.probed) * self.max_k
        return drop_levels(len(self.places)) * self.max_k

    def speculative_probes(self, depth: int = 10) -> list[Probe]:
        """What this search may draw next, most likely first: the next stage of the prefix just
        asked and of the other prefixes worth probing, then the stages after those, `depth`
        stages a prefix (a search re-checking a place draws several stages in a row from it).
        Seeds depend on the prefix alone: sampled early, a probe gives what it would have given
        when asked."""
        if self.found is not None or len(self.places) <= 1:
            return []
        asked = self._next()
        if len(asked) != 1:
            return []
        (prefix, rollouts) = asked[0]
        sampled = {other: self.counts[other][1] for other in self._candidates(self._likeliest()[0])}
        sampled[prefix] = self.counts[prefix][1] + rollouts
        order = [prefix] + [other for other in sampled if other != prefix]
        ahead = []
        for _ in range(depth):
            for other in order:
                stage = self._stage_after(sampled[other])
                if stage > 0:
                    ahead.append(Probe(self.row, other, stage, first_sample=sampled[other]))
                    sampled[other] += stage
        return ahead

    def observe(self, result: ProbeResult) -> None:
        self.spent[0] += result.probe.k
        self.spent[1] += result.tokens
        self.plan = self.posterior = None
        correct, sampled = self.counts[result.probe.prefix_steps]
        self.counts[result.probe.prefix_steps] = (correct + result.correct, sampled + result.probe.k)

    def right_rollouts(self) -> int:
        """Right rollouts drawn so far, from every prefix probed (the start included)."""
        return sum(correct for correct, _ in self.counts)

    def split(self) -> tuple[list[Counts], int]:
        """The counts and the first bad prefix found: what this search shows about the two rates."""
        return self.counts, self.found if self.found is not None else self._likeliest()[0]

    def outcome(self) -> RowLabels:
        if self.n_steps == 0:
            return RowLabels([], [], -1, *self.spent, step_counts=[])
        found = self.found if self.found is not None else self._likeliest()[0]
        step_counts: list[Counts | None] = [
            self.counts[prefix] if self.counts[prefix][1] else None for prefix in range(1, self.n_steps + 1)
        ]
        if self.every_step:
            step_counts[-1] = (int(self.correct), 1)  # the response itself: one rollout from its full prefix
            labels = [int(prefix < found) for prefix in range(1, self.n_steps)] + [int(self.correct)]
            first_error = labels.index(0) if 0 in labels else -1
        else:
            step_counts[-1] = None
            if found > self.last:  # no error among the window's steps: it lies after them
                first_error, labels = None, [1] * self.n_steps
            elif self.correct and found >= self.n_steps:
                first_error, labels = -1, [1] * self.n_steps
            else:
                first_error = found - 1  # the step that turns the last good prefix into a bad one
                labels = labels_from_first_error(first_error, self.n_steps)
        step_mc = [None if counts is None else counts[0] / counts[1] for counts in step_counts]
        return RowLabels(step_mc, labels, first_error, *self.spent, step_counts=step_counts)


def right_rollouts(search, result: RowLabels) -> int:
    """The right rollouts a finished search drew, from every prefix it probed: the drop rule's
    own count (its start holds some, which no step's counts do), else its steps' counts."""
    if isinstance(search, DropSearch):
        return search.right_rollouts()
    return sum(correct for correct, _ in filter(None, result.step_counts or []))


def labels_from_first_error(first_error: int | None, n_steps: int) -> list[int | None] | None:
    """Good before the first error, bad at it, unlabeled after; all good for -1; None for None."""
    if first_error is None:
        return None
    if first_error < 0:
        return [1] * n_steps
    return [1] * first_error + [0] + [None] * (n_steps - first_error - 1)


# --max-k's default, in multiples of --k: the most a drop search draws from one prefix, and a
# level's share of its budget, so it draws at most 4x what any-success's binary search can.
MAX_K_PER_K = 4


def drop_levels(places: int) -> int:
    """The levels of a binary search over `places` candidate places of the first error,
    ceil(log2(places)): the drop rule's budget is --max-k rollouts for each."""
    return max(1, (places - 1).bit_length())


# The drop rule's first wave: this many searches (or an eighth of them, if more), spread over the
# rows, run with the analytic prior over the two rates; the rest run with a prior learned from
# them (progress.learned_prior). Fewer drop searches than two waves' worth run in one, as before.
FIRST_WAVE = 16


def drop_waves(searches: dict) -> Iterator[dict]:
    """The searches in the waves they run in, each wave a `run_searches` call: all at once, or
    under the drop rule the first wave, then the rest with the prior over the two rates that the
    first wave's searches showed (each search of a wave sees the same prior, so the labels are
    the same whatever the rounds or speculation). Yields each wave after its searches' priors
    are set, and learns from it once it has run."""
    drops = [row for row, search in searches.items() if isinstance(search, DropSearch)]
    if len(drops) < 2 * FIRST_WAVE:
        yield searches
        return
    stride = len(drops) / max(FIRST_WAVE, len(drops) // 8)
    first = {drops[int(index * stride)] for index in range(max(FIRST_WAVE, len(drops) // 8))}
    yield {row: searches[row] for row in searches if row in first or row not in drops}
    splits = [searches[row].split() for row in sorted(first) if searches[row].spent[0]]
    prior = learned_prior(splits)
    for row in drops:
        searches[row].prior = prior
    yield {row: searches[row] for row in drops if row not in first}


def check_rule(rule: str | None, bad_below: float | None) -> str:
    """The labeling rule asked for: bad-below exactly when --bad-below is given."""
    if rule is None:
        return "drop" if bad_below is None else "bad-below"
    if rule not in RULES:
        raise InputError(f"--rule {rule!r}: expected one of {', '.join(RULES)}")
    if (rule == "bad-below") != (bad_below is not None):
        raise InputError("--rule bad-below goes with --bad-below T, and --bad-below only with it")
    return rule


def step_intervals(step_counts: list[Counts | None] | None) -> tuple[list | None, list | None]:
    """Each measured step's 95% Wilson interval (step_mc_low, step_mc_high); None where unmeasured."""
    if step_counts is None:
        return None, None
    bounds = [None if counts is None else wilson_interval(*counts) for counts in step_counts]
    return [None if b is None else b[0] for b in bounds], [None if b is None else b[1] for b in bounds]


def trusted_correct(n_steps: int) -> RowLabels:
    """`--correct-responses trust`: a verified-correct response's steps are all good."""
    return RowLabels([None] * n_steps, labels_from_first_error(-1, n_steps), -1, step_counts=[None] * n_steps)


def _within(result: RowLabels, window: tuple[int, int]) -> RowLabels:
    """`--steps`: labels and values of the window's steps only; a first error outside it is none."""
    first, last = window

    def keep(values):
        return None if values is None else [v if first <= i < last else None for i, v in enumerate(values)]

    first_error = result.first_error
    if first_error is not None and first_error >= 0 and not first <= first_error < last:
        first_error = None
    if first_error == -1 and first == last:
        first_error = None  # nothing was labelled
    return RowLabels(
        keep(result.step_mc),
        keep(result.step_labels),
        first_error,
        result.rollouts,
        result.tokens,
        step_counts=keep(result.step_counts),
    )


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
    which_steps: str = "all",
    tags: tuple[ThinkTags, ...] = KNOWN_TAGS,
    rule: str | None = None,
    confidence: float = 0.9,
    max_k: int | None = None,
) -> pl.DataFrame:
    """Pure core: verified responses in, the same rows with step labels out. `rule`: drop,
    any-success or bad-below (default: bad-below when `bad_below` is given, else drop);
    `confidence`: the drop test's (1 - its error rate); `max_k`: the
    most rollouts a probe draws under the drop rule, and its search's budget a level (default
    4k). `continuous`: continuous rounds instead of lockstep ones; `speculate`: sample probes a search may ask
    next into idle engine slots (`run_searches`); the same labels either way. `counts`, when
    given, gains what speculation cost (speculative_rollouts, speculative_rollouts_unused,
    speculative_tokens_unused); label_rollouts, label_right_rollouts (null where none was drawn)
    and label_tokens count only rollouts used.
    `which_steps` (`--steps`: thinking, solution or all) picks the steps of reasoning traces
    that are probed and labelled (by `thinking_steps`); the others' labels stay null."""
    if method not in METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    check_steps_column(which_steps, frame.columns)
    rule = check_rule(rule, bad_below)
    if not 0 < confidence < 1:
        raise InputError(f"--confidence {confidence}: expected a number between 0 and 1")
    max_k = MAX_K_PER_K * k if max_k is None else max_k
    if max_k < k:
        raise InputError(f"--max-k {max_k}: expected at least --k ({k})")
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
        known_traces(frame),
        tags,
    )
    thinking = frame["thinking_steps"].to_list() if "thinking_steps" in frame.columns else [None] * frame.height
    windows = [step_window(which_steps, len(s or []), t) for s, t in zip(steps, thinking)]
    results: list[RowLabels | None] = [None] * frame.height
    if method == "omegaprm":
        method = "binary"  # the input rows' labels; the tree itself comes from prmtool.methods.omegaprm
    searches = {}
    outcomes = frame["correct"].to_list()
    for row, (row_steps, correct) in enumerate(zip(steps, outcomes)):
        n_steps = len(row_steps or [])
        if correct is None:  # no reference answer (verify_status no_reference): no rollout can be judged
            results[row] = RowLabels([None] * n_steps, None, None, step_counts=[None] * n_steps)
        elif correct and correct_responses == "trust":
            results[row] = trusted_correct(n_steps)
        elif rule == "drop":  # correct, estimate mode: every prefix, as under the other rules
            every_step = method == "mc" or bool(correct)
            search = DropSearch(row, n_steps, bool(correct), k, confidence, max_k, every_step, soft, windows[row])
            searches[row] = search
        elif method == "mc":
            searches[row] = PerStepMC(row, n_steps, bool(correct), k, threshold, soft, windows[row])
        elif correct:  # binary search, estimate mode: the response itself proves MC > 0 everywhere
            searches[row] = PerStepMC(row, n_steps, True, k, threshold, soft, windows[row])
        else:
            # One right rollout settles a probe: in lockstep rounds a probe draws k/4 first; in
            # continuous ones all k start and the first right one stops the rest.
            one_right_settles = not soft and threshold.one_success_proves_good
            searches[row] = FirstErrorBinarySearch(
                row, n_steps, k, threshold, one_right_settles and not continuous, windows[row],
                until_right=one_right_settles and continuous,
            )  # fmt: skip
    if tracker is not None:
        tracker.skip(frame.height - len(searches))  # their outcome proves their steps: no rollouts
        # a row finishes only when its whole search does: progress counts its rollouts
        tracker.expect_work(len(searches), sum(search.most_rollouts() for search in searches.values()), "rollouts")

    def finished(row: int, search) -> None:
        results[row] = search.outcome()
        if tracker is not None:
            tracker.advance(1)

    for wave in drop_waves(searches):
        spent = run_searches(
            wave, rollouts, on_done=finished, tracker=tracker, continuous=continuous, speculate=speculate
        )
        if counts is not None and spent.speculative_rollouts:
            for name, count in (
                ("speculative_rollouts", spent.speculative_rollouts),
                ("speculative_rollouts_unused", spent.unused_rollouts),
                ("speculative_tokens_unused", spent.unused_tokens),
            ):
                counts[name] = counts.get(name, 0) + count

    # Right rollouts per row, from every prefix probed: a wrong response with none rests its labels
    # on no right rollout at all (the policy never solved the problem from any prefix), so they say
    # nothing about which step went wrong; train skips such rows. Null where no rollout was drawn.
    right = [None] * frame.height
    for row, search in searches.items():
        if results[row].rollouts:
            right[row] = right_rollouts(search, results[row])
    if counts is not None:  # the summary says how many, since "first error found" reads better than it is
        unsolved = sum(rests_on_no_right_rollout(outcomes[row], right[row]) for row in searches)
        counts["wrong_responses_no_rollout_right"] = counts.get("wrong_responses_no_rollout_right", 0) + unsolved
    if which_steps != "all":
        results = [_within(result, window) for result, window in zip(results, windows)]
    intervals = [step_intervals(r.step_counts) for r in results]
    return frame.with_columns(
        pl.Series("step_mc", [r.step_mc for r in results], dtype=pl.List(pl.Float64)),
        pl.Series("step_mc_low", [low for low, _ in intervals], dtype=pl.List(pl.Float64)),
        pl.Series("step_mc_high", [high for _, high in intervals], dtype=pl.List(pl.Float64)),
        pl.Series("step_labels", [r.step_labels for r in results], dtype=pl.List(pl.Int8)),
        pl.Series("first_error", [r.first_error for r in results], dtype=pl.Int32),
        pl.Series("label_rollouts", [r.rollouts for r in results], dtype=pl.Int32),
        pl.Series("label_right_rollouts", right, dtype=pl.Int32),
        pl.Series("label_tokens", [r.tokens for r in results], dtype=pl.Int64),
    )

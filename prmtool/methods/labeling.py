"""The row searches of `prmtool label` (docs/algorithms.md, "Step labeling by Monte Carlo rollouts").

- `PerStepMC`: Math-Shepherd. k rollouts after every step; step i's value is MC(steps[:i+1]).
- `FirstErrorBinarySearch`: OmegaPRM's first-error binary search on a wrong response: about
  k * log2(n) rollouts instead of k * n. Steps before the first error are good, the first error
  is bad, later steps are unlabeled.
- `DropBinarySearch`, `DropPerStepMC`: the same two under `--rule drop` (the default): a step
  is bad when its prefix's success rate falls significantly below the rate before it
  (`prmtool.methods.progress`), each probe sampled in stages until the test decides.

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
from prmtool.methods.progress import Counts, DropTest, stage_marks, wilson_interval
from prmtool.methods.rollouts import Probe, ProbeResult, Rollouts, RolloutSettings, run_searches
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
    distributed exactly as with k rollouts at once, for far fewer rollouts on good prefixes."""

    row: int
    n_steps: int
    k: int
    threshold: Threshold
    staged: bool = False
    # --steps: the first error is searched among steps [first, last) only; the prefix of the
    # first `first` steps is taken as good (the thinking, when only the solution is labelled)
    window: tuple[int, int] | None = None
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
        if self.bad - self.good <= 1 or self.good >= self.last:
            return []
        middle, sampled = self._middle(), self.middle_counts[1]
        rest = self.second_stage
        ahead = []
        if sampled == 0 and rest:
            ahead.append(Probe(self.row, middle, rest, first_sample=self.first_stage))
        next_middles = [(good + bad) // 2 for good, bad in ((middle, self.bad), (self.good, middle)) if bad - good > 1]
        next_middles = [next_middle for next_middle in next_middles if next_middle <= self.last]
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
class DropBinarySearch:
    """The first-error binary search under `--rule drop`.

    Invariant: steps[:good] shows no drop (the empty prefix by definition) and steps[:bad]
    does (the full response is wrong). Each level probes the middle prefix in stages
    (`stage_marks`) until `DropTest` decides it against the good side, the response's start
    pooled with the prefixes judged good (the "prefix before it" of the search), and the bad
    side, the full response pooled with the prefixes judged bad. The start and the full response
    are sampled beside the middle whenever their side holds fewer rollouts than the middle will:
    the two rates the test weighs the middle between are learned as the search goes."""

    row: int
    n_steps: int
    k: int
    test: DropTest
    max_k: int
    soft: bool = False  # soft labels: every probed step_mc from k rollouts at least, as under the other rules
    # --steps: the first error is searched among steps [first, last) only (as FirstErrorBinarySearch)
    window: tuple[int, int] | None = None
    good: int = 0
    bad: int = field(init=False)
    last: int = field(init=False)
    spent: list[int] = field(default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        self.bad = self.n_steps
        self.good, self.last = self.window or (0, self.n_steps)
        self.base = self.good  # the prefix the good side starts from: the start, or the window's
        self.step_mc: list[float | None] = [None] * self.n_steps
        self.step_counts: list[Counts | None] = [None] * self.n_steps
        self.marks = stage_marks(self.k, self.max_k)
        self.start = [0, 0]  # (correct, sampled) from the base prefix
        self.end = [0, 0]  # from the full response
        self.middle = [0, 0]
        self.good_pool = [0, 0]  # prefixes judged good, the start apart
        self.bad_pool = [0, 0]

    def good_side(self) -> Counts:
        return self.start[0] + self.good_pool[0], self.start[1] + self.good_pool[1]

    def bad_side(self) -> Counts:
        return self.end[0] + self.bad_pool[0], self.end[1] + self.bad_pool[1]

    def _middle(self) -> int:
        return min((self.good + self.bad) // 2, self.last)  # never past the window

    def _done(self) -> bool:
        return self.bad - self.good <= 1 or self.good >= self.last

    def _settle(self) -> None:
        """Decide the middle if its stages so far suffice (all of a round's results are in)."""
        if self._done() or self.middle[1] < (self.k if self.soft else 1):
            return
        verdict = self.test.decide(tuple(self.middle), self.good_side(), self.bad_side(), self.max_k)
        if verdict is None:
            return
        middle = self._middle()
        self.step_counts[middle - 1] = tuple(self.middle)
        self.step_mc[middle - 1] = self.middle[0] / self.middle[1]
        pool = self.good_pool if verdict else self.bad_pool
        pool[0] += self.middle[0]
        pool[1] += self.middle[1]
        if verdict:
            self.good = middle
        else:
            self.bad = middle
        self.middle = [0, 0]

    def _next_mark(self, sampled: int) -> int:
        return next(mark for mark in self.marks if mark > sampled)

    def probes(self) -> list[Probe]:
        self._settle()
        if self._done():
            return []
        sampled = self.middle[1]
        mark = self._next_mark(sampled)
        asked = [Probe(self.row, self._middle(), mark - sampled, first_sample=sampled)]
        for prefix, own, side in ((self.base, self.start, self.good_side()), (self.n_steps, self.end, self.bad_side())):
            wanted = min(self.max_k, own[1] + max(0, mark - side[1]))
            if wanted > own[1]:
                asked.append(Probe(self.row, prefix, wanted - own[1], first_sample=own[1]))
        return asked

    def probes_left(self) -> int:
        """About how many dependent probes this search still asks: two stages a level."""
        return 2 * (self.bad - self.good - 1).bit_length()

    def most_rollouts(self) -> int:
        """The rollouts this search takes at most (for progress): max_k at every level, and at
        the base prefix and the full response."""
        return ((self.bad - self.good - 1).bit_length() + 2) * self.max_k

    def speculative_probes(self) -> list[Probe]:
        """The middle's next stage (needed unless this one decides), then the first stage of
        either next middle. Seeds depend on the prefix alone: sampled early, a probe gives what
        it would have given when asked."""
        if self._done():
            return []
        middle, asked_to = self._middle(), self._next_mark(self.middle[1])
        ahead = []
        if asked_to < self.max_k:
            ahead.append(Probe(self.row, middle, self._next_mark(asked_to) - asked_to, first_sample=asked_to))
        next_middles = [(good + bad) // 2 for good, bad in ((middle, self.bad), (self.good, middle)) if bad - good > 1]
        next_middles = [next_middle for next_middle in next_middles if next_middle <= self.last]
        return ahead + [Probe(self.row, next_middle, self.marks[0]) for next_middle in next_middles]

    def observe(self, result: ProbeResult) -> None:
        self.spent[0] += result.probe.k
        self.spent[1] += result.tokens
        ends = {self.base: self.start, self.n_steps: self.end}
        counts = ends.get(result.probe.prefix_steps, self.middle)
        counts[0] += result.correct
        counts[1] += result.probe.k

    def outcome(self) -> RowLabels:
        if self.n_steps == 0:
            return RowLabels([], [], -1, *self.spent, step_counts=[])
        if self.bad > self.last:  # no error among the window's steps: it lies after them
            return RowLabels(self.step_mc, [1] * self.n_steps, None, *self.spent, step_counts=self.step_counts)
        first_error = self.bad - 1
        labels = labels_from_first_error(first_error, self.n_steps)
        return RowLabels(self.step_mc, labels, first_error, *self.spent, step_counts=self.step_counts)


@dataclass
class DropPerStepMC:
    """Per-step MC under `--rule drop`: the start, every step's prefix and, for a wrong
    response, the full response are sampled in stages (k, then as `stage_marks` goes on, up to
    max_k) until each prefix is decided against the good side before it (the start pooled with
    the earlier prefixes judged good) and the bad side (the full response pooled with the
    prefixes judged bad). Step i is bad when its prefix dropped; the last step is labeled by the
    response's own outcome, as under the other rules."""

    row: int
    n_steps: int
    correct: bool
    k: int
    test: DropTest
    max_k: int
    window: tuple[int, int] | None = None  # --steps: only steps [first, last) are probed
    spent: list[int] = field(default_factory=lambda: [0, 0])

    def __post_init__(self) -> None:
        self.marks = [mark for mark in stage_marks(self.k, self.max_k) if mark >= self.k]
        # (correct, sampled) of prefixes 0 (the start) .. n_steps (the full response)
        self.counts = [[0, 0] for _ in range(self.n_steps + 1)]
        self.verdicts: list[bool | None] = [None] * (self.n_steps + 1)  # of prefixes 1 .. n_steps - 1
        self.base, self.last = self.window or (0, self.n_steps)  # the good side starts from prefix base
        for prefix in range(1, self.n_steps):  # outside the window: not probed (its labels are dropped)
            if not self.base < prefix <= self.last:
                self.verdicts[prefix] = True

    def _settle(self) -> None:
        good_pool = list(self.counts[self.base])
        bad_pool = [0, 0] if self.correct else list(self.counts[self.n_steps])
        for prefix in range(self.base + 1, min(self.last, self.n_steps - 1) + 1):  # the window's prefixes
            if self.verdicts[prefix] is None:
                self.verdicts[prefix] = self.test.decide(
                    tuple(self.counts[prefix]), tuple(good_pool), tuple(bad_pool), self.max_k
                )
            pool = {True: good_pool, False: bad_pool}.get(self.verdicts[prefix])
            if pool is not None:
                pool[0] += self.counts[prefix][0]
                pool[1] += self.counts[prefix][1]

    def probes(self) -> list[Probe]:
        if self.n_steps <= 1:
            return []
        if self.counts[self.base][1]:
            self._settle()
        undecided = [prefix for prefix in range(1, self.n_steps) if self.verdicts[prefix] is None]
        if not undecided:
            return []
        sampled = self.counts[undecided[0]][1]  # undecided prefixes move together, mark by mark
        mark = next(mark for mark in self.marks if mark > sampled)
        ends = [self.base] if self.correct else [self.base, self.n_steps]
        return [
            Probe(self.row, prefix, mark - self.counts[prefix][1], first_sample=self.counts[prefix][1])
            for prefix in ends + undecided
            if self.counts[prefix][1] < mark
        ]

    def most_rollouts(self) -> int:
        """The rollouts this search takes at most (for progress): max_k at each window prefix,
        the base and the full response."""
        return (min(self.last, self.n_steps - 1) - self.base + 2) * self.max_k if self.n_steps > 1 else 0

    def observe(self, result: ProbeResult) -> None:
        self.spent[0] += result.probe.k
        self.spent[1] += result.tokens
        counts = self.counts[result.probe.prefix_steps]
        counts[0] += result.correct
        counts[1] += result.probe.k

    def outcome(self) -> RowLabels:
        if self.n_steps == 0:
            return RowLabels([], [], -1, *self.spent, step_counts=[])
        step_counts: list[Counts | None] = [tuple(counts) for counts in self.counts[1 : self.n_steps]]
        step_counts.append((int(self.correct), 1))  # the response itself: one rollout from its full prefix
        labels = [int(bool(verdict)) for verdict in self.verdicts[1 : self.n_steps]] + [int(self.correct)]
        step_counts = [None if counts[1] == 0 else counts for counts in step_counts]  # not probed: --steps
        step_mc = [None if counts is None else counts[0] / counts[1] for counts in step_counts]
        first_error = labels.index(0) if 0 in labels else -1
        return RowLabels(step_mc, labels, first_error, *self.spent, step_counts=step_counts)


def labels_from_first_error(first_error: int | None, n_steps: int) -> list[int | None] | None:
    """Good before the first error, bad at it, unlabeled after; all good for -1; None for None."""
    if first_error is None:
        return None
    if first_error < 0:
        return [1] * n_steps
    return [1] * first_error + [0] + [None] * (n_steps - first_error - 1)


def check_rule(rule: str | None, bad_below: float | None) -> str:
    """The labeling rule asked for: bad-below exactly when --bad-below is given."""
    if rule is None:
        return "drop" if bad_below is None else "bad-below"
    if rule not in RULES:
        raise InputError(f"--rule {rule!r}: expected one of {', '.join(RULES)}")
    if (rule == "bad-below") != (bad_below is not None):
        raise InputError("--rule bad-below goes with --bad-below T, and --bad-below only with it")
    return rule


def step_intervals(step_counts: list[Counts | None] | None, confidence: float) -> tuple[list | None, list | None]:
    """Each measured step's Wilson interval (step_mc_low, step_mc_high); None where unmeasured."""
    if step_counts is None:
        return None, None
    bounds = [None if counts is None else wilson_interval(*counts, confidence) for counts in step_counts]
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
    confidence: float = 0.95,
    max_k: int | None = None,
) -> pl.DataFrame:
    """Pure core: verified responses in, the same rows with step labels out. `rule`: drop,
    any-success or bad-below (default: bad-below when `bad_below` is given, else drop);
    `confidence`: the drop test's (1 - its error rate) and the intervals' level; `max_k`: the
    most rollouts a probe draws under the drop rule (default 6k). `continuous`:
    continuous rounds instead of lockstep ones; `speculate`: sample probes a search may ask
    next into idle engine slots (`run_searches`); the same labels either way. `counts`, when
    given, gains what speculation cost (speculative_rollouts, speculative_rollouts_unused,
    speculative_tokens_unused); label_rollouts and label_tokens count only rollouts used.
    `which_steps` (`--steps`: thinking, solution or all) picks the steps of reasoning traces
    that are probed and labelled (by `thinking_steps`); the others' labels stay null."""
    if method not in METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    check_steps_column(which_steps, frame.columns)
    rule = check_rule(rule, bad_below)
    if not 0 < confidence < 1:
        raise InputError(f"--confidence {confidence}: expected a number between 0 and 1")
    max_k = 6 * k if max_k is None else max_k
    if max_k < k:
        raise InputError(f"--max-k {max_k}: expected at least --k ({k})")
    settings = settings or RolloutSettings()
    threshold = Threshold(bad_below)
    test = DropTest(confidence, k)
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
    for row, (row_steps, correct) in enumerate(zip(steps, frame["correct"].to_list())):
        n_steps = len(row_steps or [])
        if correct is None:  # no reference answer (verify_status no_reference): no rollout can be judged
            results[row] = RowLabels([None] * n_steps, None, None, step_counts=[None] * n_steps)
        elif correct and correct_responses == "trust":
            results[row] = trusted_correct(n_steps)
        elif rule == "drop" and (method == "mc" or correct):  # correct, estimate mode: every prefix
            searches[row] = DropPerStepMC(row, n_steps, bool(correct), k, test, max_k, windows[row])
        elif rule == "drop":
            searches[row] = DropBinarySearch(row, n_steps, k, test, max_k, soft, windows[row])
        elif method == "mc":
            searches[row] = PerStepMC(row, n_steps, bool(correct), k, threshold, soft, windows[row])
        elif correct:  # binary search, estimate mode: the response itself proves MC > 0 everywhere
            searches[row] = PerStepMC(row, n_steps, True, k, threshold, soft, windows[row])
        else:
            staged = not soft and threshold.one_success_proves_good
            searches[row] = FirstErrorBinarySearch(row, n_steps, k, threshold, staged, windows[row])
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

    if which_steps != "all":
        results = [_within(result, window) for result, window in zip(results, windows)]
    intervals = [step_intervals(r.step_counts, confidence) for r in results]
    return frame.with_columns(
        pl.Series("step_mc", [r.step_mc for r in results], dtype=pl.List(pl.Float64)),
        pl.Series("step_mc_low", [low for low, _ in intervals], dtype=pl.List(pl.Float64)),
        pl.Series("step_mc_high", [high for _, high in intervals], dtype=pl.List(pl.Float64)),
        pl.Series("step_labels", [r.step_labels for r in results], dtype=pl.List(pl.Int8)),
        pl.Series("first_error", [r.first_error for r in results], dtype=pl.Int32),
        pl.Series("label_rollouts", [r.rollouts for r in results], dtype=pl.Int32),
        pl.Series("label_tokens", [r.tokens for r in results], dtype=pl.Int64),
    )

"""OmegaPRM tree search (Luo et al. 2024; docs/algorithms.md, "Step labeling by Monte Carlo rollouts").

Per question (problem_id group):
1. Screen: `screen_rollouts` rollouts from the empty prefix. The question is kept only if both
   right and wrong answers appear (0 < MC(root) < 1); otherwise it teaches the PRM nothing.
2. Pool: every WRONG rollout from a state with 0 < MC < 1 is a candidate (state, rollout).
   Right rollouts hold no error to locate, so they never enter the pool.
3. Pick argmax Q + U, with Q(s, r) = alpha^(1 - MC(s)) * beta^(len(r) / L) (len in tokens) and
   U(s) = c_puct * sqrt(sum_i N(s_i)) / (1 + N(s)). The picked pair leaves the pool for good
   (openr PR #98 re-picked the same pair forever) and N(s) grows by one.
4. Binary-search the picked rollout for its first error: state + rollout steps is a wrong
   path, the state itself has MC > 0. Each probed prefix is estimated with k rollouts and
   becomes a new state (a tree row); its wrong rollouts join the pool when 0 < MC < 1.

Budget: the number of MC-estimation rollouts the search itself spends per question (the
screen is not counted; it is a fixed `screen_rollouts` per question). A probe is issued only
if its k rollouts fit in what is left, so search rollouts <= budget exactly, and a question
costs at most screen_rollouts + budget rollouts. The search ends when the budget cannot pay
for another probe or the pool is empty.

Each question's search is a state machine (`probes()` / `observe()`), like the row searches of
`prmtool.methods.labeling`; `run_searches` gathers every question's probes into one engine call per
round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import polars as pl

from prmtool.methods.progress import wilson_interval
from prmtool.methods.rollouts import Probe, ProbeResult, Rollouts, RolloutSettings, run_searches
from prmtool.methods.steps import Splitter, make_splitter, rollout_prefix, split_steps

if TYPE_CHECKING:
    from prmtool.core.report import Tracker
    from prmtool.engines import Engine

TREE_SCHEMA = {
    "problem_id": pl.String,
    "problem": pl.String,
    "reference_answer": pl.String,
    "prefix": pl.String,
    "prefix_steps": pl.List(pl.String),
    "mc": pl.Float64,
    "mc_low": pl.Float64,  # mc's 95% Wilson interval
    "mc_high": pl.Float64,
    "rollouts": pl.Int32,
}


@dataclass(frozen=True)
class SearchConfig:
    k: int = 8
    budget: int = 100  # MC-estimation rollouts per question, screen excluded
    screen_rollouts: int = 32
    alpha: float = 0.5
    beta: float = 0.9
    length_scale: float = 500.0  # L, in tokens
    c_puct: float = 0.125


@dataclass
class TreeState:
    steps: list[str]
    mc: float
    rollouts: int
    visits: int = 0  # N(s): how many candidates of this state were picked


@dataclass(frozen=True)
class Candidate:
    id: int
    state: int  # index into QuestionSearch.states
    steps: tuple[str, ...]  # the wrong rollout, split into steps
    tokens: int


@dataclass
class FirstErrorWalk:
    """Binary search along path = state steps + rollout steps for the first prefix with MC = 0.
    Invariant: path[:good] has MC > 0 (the state it started from), path[:bad] has MC = 0 (the
    rollout is wrong)."""

    path: list[str]
    good: int
    bad: int

    def middle(self) -> int | None:
        return (self.good + self.bad) // 2 if self.bad - self.good > 1 else None

    def record(self, middle: int, mc: float) -> None:
        if mc > 0:
            self.good = middle
        else:
            self.bad = middle


@dataclass
class QuestionSearch:
    row: int  # a row of the question: its problem and reference answer
    config: SearchConfig
    splitter: Splitter  # the stage's --split: rollouts are cut into steps like responses
    states: list[TreeState] = field(default_factory=list)
    pool: list[Candidate] = field(default_factory=list)
    picked: list[int] = field(default_factory=list)  # candidate ids, in pick order
    search_rollouts: int = 0
    tokens: int = 0
    screened: bool = False
    kept: bool = False
    walk: FirstErrorWalk | None = None
    _next_candidate_id: int = 0

    def probes(self) -> list[Probe]:
        if not self.screened:
            return [Probe(self.row, 0, self.config.screen_rollouts, prefix="")]
        if not self.kept:
            return []
        while self.search_rollouts + self.config.k <= self.config.budget:
            if self.walk is None:
                if not self.pool:
                    return []
                self.walk = self._start_walk(self._pick())
            middle = self.walk.middle()
            if middle is None:
                self.walk = None  # first error located; pick the next candidate
                continue
            steps = self.walk.path[:middle]
            return [Probe(self.row, middle, self.config.k, prefix=rollout_prefix(steps, self.splitter.separator))]
        return []

    def observe(self, result: ProbeResult) -> None:
        self.tokens += result.tokens
        if not self.screened:
            self.screened = True
            self._add_state([], result)
            self.kept = 0 < result.mc < 1
            return
        self.search_rollouts += result.probe.k
        middle = result.probe.prefix_steps
        self._add_state(self.walk.path[:middle], result)
        self.walk.record(middle, result.mc)

    def _add_state(self, steps: list[str], result: ProbeResult) -> None:
        state = len(self.states)
        self.states.append(TreeState(list(steps), result.mc, result.probe.k))
        if not 0 < result.mc < 1:
            return  # settled states (all right or all wrong) have nothing left to find
        for text, correct, tokens in result.texts:
            rollout_steps = split_steps(text, self.splitter)
            if not correct and rollout_steps:
                self.pool.append(Candidate(self._next_candidate_id, state, tuple(rollout_steps), tokens))
                self._next_candidate_id += 1

    def _score(self, candidate: Candidate, total_visits: int) -> float:
        config, state = self.config, self.states[candidate.state]
        quality = config.alpha ** (1 - state.mc) * config.beta ** (candidate.tokens / config.length_scale)
        exploration = config.c_puct * math.sqrt(total_visits) / (1 + state.visits)
        return quality + exploration

    def _pick(self) -> Candidate:
        total_visits = sum(state.visits for state in self.states)
        best = max(range(len(self.pool)), key=lambda i: self._score(self.pool[i], total_visits))
        candidate = self.pool.pop(best)  # a picked pair leaves the pool (openr PR #98)
        self.states[candidate.state].visits += 1
        self.picked.append(candidate.id)
        return candidate

    def _start_walk(self, candidate: Candidate) -> FirstErrorWalk:
        start = self.states[candidate.state].steps
        path = start + list(candidate.steps)
        return FirstErrorWalk(path, good=len(start), bad=len(path))


def grow_trees(
    frame: pl.DataFrame,
    engine: "Engine",
    config: SearchConfig | None = None,
    settings: RolloutSettings | None = None,
    splitter: Splitter | None = None,
    tracker: "Tracker | None" = None,
) -> dict[str, QuestionSearch]:
    """One search per problem_id (on its first row), all advancing in lockstep rounds."""
    config = config or SearchConfig()
    settings = settings or RolloutSettings()
    splitter = splitter or make_splitter("blank-line")
    separator = splitter.separator
    rollouts = Rollouts(
        engine,
        frame["problem"].to_list(),
        frame["steps"].to_list(),
        frame["reference_answer"].cast(pl.String).to_list(),
        frame["response_id"].to_list(),
        separator,
        settings,
    )
    searches: dict[str, QuestionSearch] = {}
    for row, problem_id in enumerate(frame["problem_id"].to_list()):
        if problem_id not in searches:
            searches[problem_id] = QuestionSearch(row, config, splitter)
    run_searches(searches, rollouts, tracker=tracker)
    return searches


def tree_frame(frame: pl.DataFrame, searches: dict[str, QuestionSearch], separator: str) -> pl.DataFrame:
    """One row per state of every kept question; screened-out questions give no rows. Each
    state's MC comes with its 95% Wilson interval (mc_low, mc_high)."""
    rows = []
    for problem_id, search in searches.items():
        if not search.kept:
            continue
        problem, reference = frame["problem"][search.row], frame["reference_answer"].cast(pl.String)[search.row]
        for state in search.states:
            low, high = wilson_interval(round(state.mc * state.rollouts), state.rollouts)
            rows.append(
                {
                    "problem_id": problem_id,
                    "problem": problem,
                    "reference_answer": reference,
                    "prefix": rollout_prefix(state.steps, separator),
                    "prefix_steps": state.steps,
                    "mc": state.mc,
                    "mc_low": low,
                    "mc_high": high,
                    "rollouts": state.rollouts,
                }
            )
    return pl.DataFrame(rows, schema=TREE_SCHEMA)

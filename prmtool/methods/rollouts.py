"""Monte Carlo rollouts from step prefixes: the one place that turns "estimate MC(prefix)"
into engine requests and verified results.

A probe asks for k rollouts continuing a response after its first `prefix_steps` steps, or,
with an explicit `prefix` text, continuing any text (OmegaPRM's states are prefixes of earlier
rollouts, not only of the input responses). All
probes of one round go to the engine in a single call, whatever method asked for them; the
rollouts' final answers are checked by the project's verifier (mathematical equivalence).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Protocol

from prmtool.methods.steps import rollout_prefix
from prmtool.methods.verification import verify_responses

if TYPE_CHECKING:
    from prmtool.core.report import Tracker
    from prmtool.engines import Engine


@dataclass(frozen=True)
class Probe:
    row: int  # which response (index into the frame being labeled)
    prefix_steps: int  # the rollout continues after steps[:prefix_steps]
    k: int
    # When set, the rollout continues this text instead (the row then only names the problem
    # and its reference answer); prefix_steps is then just the number of steps it holds.
    prefix: str | None = None


@dataclass
class ProbeResult:
    probe: Probe
    correct: int  # rollouts whose final answer is right
    tokens: int  # generated tokens spent
    # Every rollout as (continuation text, verified correct, generated tokens), in sample order.
    texts: list[tuple[str, bool, int]] = field(default_factory=list)

    @property
    def mc(self) -> float:
        return self.correct / self.probe.k


@dataclass
class RolloutSettings:
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0
    system_prompt: str | None = None
    prompt_template: str | None = None
    verify_timeout: float = 5.0
    workers: int = 2

    @classmethod
    def of(cls, settings, workers: int) -> RolloutSettings:
        """From a stage's settings (label's, intervene's), which name these options alike;
        no prompt template means the default one, as generate's."""
        from prmtool.methods.prompts import DEFAULT_PROMPT_TEMPLATE

        return cls(
            temperature=settings.temperature,
            max_tokens=settings.max_tokens,
            seed=settings.seed,
            system_prompt=settings.system_prompt,
            prompt_template=settings.prompt_template or DEFAULT_PROMPT_TEMPLATE,
            workers=workers,
        )


class Rollouts:
    """Runs rounds of probes for a frame of responses (problem, steps, reference_answer)."""

    def __init__(
        self,
        engine: "Engine",
        problems: list[str],
        steps: list[list[str]],
        references: list[str],
        response_ids: list[str],
        separator: str,
        settings: RolloutSettings,
    ) -> None:
        self.engine, self.settings, self.separator = engine, settings, separator
        self.problems, self.steps, self.references, self.response_ids = problems, steps, references, response_ids
        self._chat_ids: dict[str, list[int]] = {}
        self.rounds = 0

    def prefix_text(self, row: int, prefix_steps: int) -> str:
        """`join(steps[:i]) + sep`, as docs/algorithms.md says a rollout from step i continues."""
        return rollout_prefix(self.steps[row][:prefix_steps], self.separator)

    def probe_prefix(self, probe: Probe) -> str:
        return probe.prefix if probe.prefix is not None else self.prefix_text(probe.row, probe.prefix_steps)

    def _prompt_ids(self, probe: Probe) -> list[int]:
        problem = self.problems[probe.row]
        if problem not in self._chat_ids:
            self._chat_ids[problem] = self.engine.chat_prompt_ids(
                problem, self.settings.system_prompt, self.settings.prompt_template
            )
        return self.engine.continuation_ids(self._chat_ids[problem], self.probe_prefix(probe))

    def _seed(self, probe: Probe) -> int:
        # Fixed by the response, the prefix and the round: reruns give the same labels.
        key = f"{self.settings.seed}\x1f{self.response_ids[probe.row]}\x1f{probe.prefix_steps}\x1f{self.rounds}"
        if probe.prefix is not None:
            key += f"\x1f{probe.prefix}"  # explicit prefixes only: step-indexed seeds stay as they were
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")

    def run(self, probes: list[Probe]) -> list[ProbeResult]:
        """One engine call for every probe of the round, then one verification pass."""
        from prmtool.engines import SamplingRequest

        if not probes:
            return []
        self.rounds += 1
        # Probes of one problem are adjacent, so shared prefixes reach the engine together
        # (its prefix cache, where it has one, serves them).
        order = sorted(
            range(len(probes)),
            key=lambda i: (self.problems[probes[i].row], probes[i].row, probes[i].prefix_steps, probes[i].prefix or ""),
        )
        requests = [
            SamplingRequest(
                prompt_ids=self._prompt_ids(probes[i]),
                n=probes[i].k,
                temperature=self.settings.temperature,
                top_p=self.settings.top_p,
                max_tokens=self.settings.max_tokens,
                seed=self._seed(probes[i]),
            )
            for i in order
        ]
        completions = self.engine.sample(requests)
        pairs, owners = [], []
        for position, samples in zip(order, completions):
            probe = probes[position]
            prefix = self.probe_prefix(probe)
            for sample in samples:
                # The answer may sit in the prefix when the prefix already holds the last step.
                pairs.append((self.references[probe.row], prefix + sample.text))
                owners.append(position)
        _, verdicts = verify_responses(
            [text for _, text in pairs],
            [reference for reference, _ in pairs],
            timeout=self.settings.verify_timeout,
            workers=self.settings.workers,
        )
        results = [ProbeResult(p, 0, 0) for p in probes]
        for position, samples in zip(order, completions):
            results[position].tokens = sum(s.num_tokens for s in samples)
        for position, verdict in zip(owners, verdicts):
            results[position].correct += int(verdict.correct)
        verdict_iter = iter(verdicts)
        for position, samples in zip(order, completions):
            # owners list the samples in this same order, so the verdicts line up.
            results[position].texts = [(s.text, bool(next(verdict_iter).correct), s.num_tokens) for s in samples]
        return results


class Search(Protocol):
    """What `run_searches` drives: a label row search or an OmegaPRM question search."""

    row: int  # the frame row its probes name

    def probes(self) -> list[Probe]: ...  # this round's; none when the search is done

    def observe(self, result: ProbeResult) -> None: ...


def run_searches(
    searches: dict[Hashable, Search],
    rollouts: Rollouts,
    *,
    on_done: Callable[[Hashable, Search], None] | None = None,
    tracker: Tracker | None = None,
) -> None:
    """Advance every search in lockstep rounds until none asks for more: each round gathers
    the probes of every active search into one engine call (`Rollouts.run`) and hands each
    result back to the search whose row it names. `on_done(key, search)` sees each search
    as it finishes; `tracker` counts the generated tokens."""
    by_row = {search.row: search for search in searches.values()}
    active = dict(searches)
    while active:
        round_probes = {key: search.probes() for key, search in active.items()}
        for key in [key for key, probes in round_probes.items() if not probes]:
            search = active.pop(key)
            if on_done is not None:
                on_done(key, search)
        results = rollouts.run([probe for key in active for probe in round_probes[key]])
        for result in results:
            by_row[result.probe.row].observe(result)
        if tracker is not None and results:
            tracker.advance(0, sum(result.tokens for result in results))

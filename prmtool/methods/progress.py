"""Labeling by progress: the statistics of `label --rule drop` (docs/algorithms.md, "The drop rule").

A step is the first error when its prefix's success rate falls significantly below the rate
before it. "Before it" is the search's good side: the response's start (the problem alone)
pooled with every prefix already judged good; the bad side pools the prefixes judged bad. A
probe is sampled in stages (`stage_marks`) until `DropTest.decide` settles it:

- bad (a drop): its successes are significantly below the good side's by Fisher's exact test
  (one-sided, error rate 1 - confidence), and its successes are likelier under the bad side's
  rate than under the good side's by a factor of confidence / (1 - confidence) (a Bayes factor
  of the two sides' Beta posteriors: Wald's sequential test with the rates it learns);
- good: likelier under the good side's rate than under the bad side's by the same factor. While
  no prefix has been judged bad, the bad side's rate is unknown (Jeffreys' prior): where every
  bad prefix so far failed, a prefix with successes is good after a stage or two;
- good as well when even failing every rollout left to the cap could not make the exact test
  significant, once the good side's rate is measured (a start rarely right cannot drop far);
- at the cap (`--max-k` rollouts) the exact test alone decides: bad only if significant.

Counts are (correct, sampled) pairs throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

Counts = tuple[int, int]  # (correct rollouts, rollouts sampled)


def wilson_interval(correct: int, sampled: int, confidence: float) -> tuple[float, float]:
    """Wilson's score interval for a success rate measured as correct / sampled."""
    if sampled == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    rate = correct / sampled
    centre = (rate + z * z / (2 * sampled)) / (1 + z * z / sampled)
    half = z * math.sqrt(rate * (1 - rate) / sampled + z * z / (4 * sampled * sampled)) / (1 + z * z / sampled)
    return max(0.0, centre - half), min(1.0, centre + half)


def drop_p_value(probe: Counts, reference: Counts) -> float:
    """Fisher's exact test, one-sided: the chance of a probe this poor or poorer if its rate
    were the reference's (the hypergeometric lower tail of its successes, both counts pooled)."""
    correct, sampled = probe
    reference_correct, reference_sampled = reference
    total_correct, total = correct + reference_correct, sampled + reference_sampled
    if sampled == 0 or reference_sampled == 0 or total_correct in (0, total):
        return 1.0
    tail = sum(
        math.comb(sampled, x) * math.comb(reference_sampled, total_correct - x)
        for x in range(max(0, total_correct - reference_sampled), min(correct, total_correct) + 1)
    )
    return tail / math.comb(total, total_correct)


def stage_marks(k: int, max_k: int) -> list[int]:
    """Rollouts a probe holds after each of its stages: k/4 (as the staged any-success search),
    k/2, 3k/4, k, then k/2 more a stage up to 3k and k more a stage up to max_k. Each stage
    continues the seeded stream of the ones before (`Probe.first_sample`), so a probe's rollouts
    are those of one long stream, however many stages drew them."""
    marks = {max(1, k * quarters // 4) for quarters in range(1, 5)}
    marks |= {k + max(1, k // 2) * half for half in range(1, 5)}
    marks |= set(range(3 * k + k, max_k, k))
    return sorted(mark for mark in marks if mark < max_k) + [max_k]


@dataclass(frozen=True)
class DropTest:
    """Decides whether a prefix's rate dropped below the good side's (see the module's docstring)."""

    confidence: float = 0.95
    k: int = 8  # a good side with no right rollout in 2k has nowhere to fall (hard problems end early)

    @property
    def error_rate(self) -> float:
        return 1 - self.confidence

    def decide(self, probe: Counts, good: Counts, bad: Counts, max_k: int) -> bool | None:
        """True: no drop (good); False: a drop (bad); None: sample the next stage (the probe
        holds fewer than max_k rollouts)."""
        significant = drop_p_value(probe, good) <= self.error_rate
        if probe[1] >= max_k:
            return not significant
        # Futile: failing every rollout left to the cap could not make it a drop, the good side
        # keeping its rate; judged once that rate is measured (half the cap, or 2k if none was right).
        measured = good[1] >= (2 * self.k if good[0] == 0 else max_k // 2)
        if measured and drop_p_value((probe[0], max_k), scaled(good, max_k)) > self.error_rate:
            return True
        evidence = log_predictive(probe, good) - log_predictive(probe, bad)
        bound = math.log(self.confidence / self.error_rate)
        if evidence >= bound:
            return True
        if evidence <= -bound and significant:
            return False
        return None


def scaled(counts: Counts, sampled: int) -> Counts:
    """The same rate over at least `sampled` rollouts: what a side growing beside a probe holds."""
    correct, total = counts
    size = max(total, sampled)
    return round(correct * size / total), size


def log_predictive(probe: Counts, side: Counts) -> float:
    """log P(the probe's successes | its rate is the side's), the side's rate known only through
    its counts (a Beta posterior from Jeffreys' prior; the binomial coefficient, the same for
    every side, left out). Against an empty side: the prior's own prediction."""
    correct, sampled = probe
    side_correct, side_sampled = side
    alpha, beta = side_correct + 0.5, side_sampled - side_correct + 0.5
    return log_beta(alpha + correct, beta + sampled - correct) - log_beta(alpha, beta)


def log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

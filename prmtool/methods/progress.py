"""Labeling by progress: the statistics of `label --rule drop` (docs/algorithms.md, "The drop rule").

A step is the first error when its prefix's success rate falls significantly below the rate
before it. "Before it" is the search's good side: the response's start (the problem alone)
pooled with every prefix already judged good; the bad side pools the prefixes judged bad. A
probe is sampled in stages (`stage_marks`) until `DropTest.decide` settles it:

- bad (a drop): its successes are significantly below the good side's by Fisher's exact test
  (one-sided, error rate 1 - confidence), and a sequential likelihood-ratio test (Wald's SPRT)
  between "the good side's rate" and "a dropped rate" favours the drop;
- good: the same likelihood ratio favours the good side's rate at the same error rate. The
  dropped rate is the bad side's, or 0.4 of the good side's while the bad side holds no rollout
  (and never more: a drop worth labeling). A prefix with a success where every bad
  prefix had none is thus good at once, as under `any-success`;
- good as well when even failing every rollout left to the cap could not make the exact test
  significant (a start that is rarely right cannot drop far);
- at the cap (`--max-k` rollouts) the exact test alone decides: bad only if significant.

Counts are (correct, sampled) pairs throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Counts = tuple[int, int]  # (correct rollouts, rollouts sampled)


def wilson_interval(correct: int, sampled: int, confidence: float) -> tuple[float, float]:
    """Wilson's score interval for a success rate measured as correct / sampled."""
    if sampled == 0:
        return 0.0, 1.0
    z = normal_quantile(1 - (1 - confidence) / 2)
    rate = correct / sampled
    centre = (rate + z * z / (2 * sampled)) / (1 + z * z / sampled)
    half = z * math.sqrt(rate * (1 - rate) / sampled + z * z / (4 * sampled * sampled)) / (1 + z * z / sampled)
    return max(0.0, centre - half), min(1.0, centre + half)


def normal_quantile(p: float) -> float:
    """The standard normal's p-quantile, by bisection on erf (exact enough for intervals)."""
    low, high = -10.0, 10.0
    for _ in range(80):
        middle = (low + high) / 2
        if 0.5 * (1 + math.erf(middle / math.sqrt(2))) < p:
            low = middle
        else:
            high = middle
    return (low + high) / 2


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
    k/2, k, then k more a stage up to max_k. Each stage continues the seeded stream of the ones
    before (`Probe.first_sample`), so a probe's rollouts are those of one long stream."""
    marks = sorted({mark for mark in (max(1, k // 4), max(1, k // 2), k) if mark < max_k})
    mark = 2 * k
    while mark < max_k:
        marks.append(mark)
        mark += k
    return [*marks, max_k]


@dataclass(frozen=True)
class DropTest:
    """Decides whether a prefix's rate dropped below the good side's (see the module's docstring)."""

    confidence: float = 0.98
    max_drop: float = 0.4  # the dropped rate the SPRT weighs is at most this share of the good side's

    @property
    def error_rate(self) -> float:
        return 1 - self.confidence

    def decide(self, probe: Counts, good: Counts, bad: Counts, max_k: int) -> bool | None:
        """True: no drop (good); False: a drop (bad); None: sample the next stage (the probe
        holds fewer than max_k rollouts)."""
        at_cap = probe[1] >= max_k
        significant = drop_p_value(probe, good) <= self.error_rate
        if at_cap:
            return not significant
        # Futile: even failing every rollout left to the cap could not make it a drop, against a
        # good side of at least as many rollouts at its present rate (it grows beside the probe).
        reference = max(good[1], max_k)
        if drop_p_value((probe[0], max_k), (round(smoothed(good) * reference), reference)) > self.error_rate:
            return True
        good_rate = smoothed(good)
        dropped = self.max_drop * good_rate
        if bad[1]:
            dropped = min(dropped, smoothed(bad))
        evidence = log_likelihood_ratio(probe, good_rate, dropped)
        bound = math.log(self.confidence / self.error_rate)
        if evidence >= bound:
            return True
        if evidence <= -bound and significant:
            return False
        return None


def smoothed(counts: Counts) -> float:
    """A rate estimate that is never exactly 0 or 1 (Jeffreys: half a success, half a failure)."""
    correct, sampled = counts
    return (correct + 0.5) / (sampled + 1)


def log_likelihood_ratio(probe: Counts, good_rate: float, dropped_rate: float) -> float:
    """log P(probe | good_rate) / P(probe | dropped_rate): above 0 favours no drop."""
    correct, sampled = probe
    return correct * math.log(good_rate / dropped_rate) + (sampled - correct) * math.log(
        (1 - good_rate) / (1 - dropped_rate)
    )

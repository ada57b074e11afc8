"""Labeling by progress: the statistics of `label --rule drop` (docs/algorithms.md, "The drop rule").

A response's prefixes 0 (the problem alone) .. n (the whole response) each have a chance that a
rollout from them reaches the right answer. The drop rule's model: that chance is one rate,
`good`, up to the first error, and a lower one, `bad`, from the first prefix that holds it on
(the first bad prefix). Both rates are unknown (integrated out, bad below good), so every
rollout drawn anywhere in a response tells about them as well as about where the drop is.

`first_bad_posterior` weighs every place the drop may be against the (correct, sampled) counts
of the prefixes probed so far: the chance that each is the first bad prefix. A search stops
when one place holds `--confidence` of it (so the first error it reports is wrong with chance
1 - confidence, given what it saw), and until then `most_informative` picks where the next
rollouts tell the most about it.

`learned_prior` fits a prior over the two rates to the searches a run has finished (empirical
Bayes), which `labeling.drop_waves` gives the run's later searches in place of the analytic one.

Counts are (correct, sampled) pairs throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

import numpy as np

Counts = tuple[int, int]  # (correct rollouts, rollouts sampled)

# The rates are integrated on a grid of midpoints: fine enough that a few hundred rollouts at
# one prefix still see a smooth likelihood, coarse enough for numpy to weigh every place at once.
RATES = (np.arange(256) + 0.5) / 256
LOG_RATE, LOG_MISS = np.log(RATES), np.log1p(-RATES)


# The level of the intervals every measured MC estimate carries (step_mc_low / step_mc_high,
# OmegaPRM's mc_low / mc_high): fixed, so they read the same whatever the drop rule's --confidence.
INTERVAL_LEVEL = 0.95


def wilson_interval(correct: int, sampled: int, confidence: float = INTERVAL_LEVEL) -> tuple[float, float]:
    """Wilson's score interval for a success rate measured as correct / sampled."""
    if sampled == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    rate = correct / sampled
    centre = (rate + z * z / (2 * sampled)) / (1 + z * z / sampled)
    half = z * math.sqrt(rate * (1 - rate) / sampled + z * z / (4 * sampled * sampled)) / (1 + z * z / sampled)
    return max(0.0, min(rate, centre - half)), min(1.0, max(rate, centre + half))  # rounding never excludes the rate


def split_likelihoods(counts: Sequence[Counts], first_bad: Sequence[int]) -> tuple[np.ndarray, ...]:
    """The likelihood of each rate on the grid, of the good side and of the bad side, for each
    distinct split of the counts among `first_bad` (scaled to at most 1, with the logs of their
    scales), and which split each place makes."""
    correct = np.array([0] + [c for c, _ in counts], dtype=float).cumsum()
    sampled = np.array([0] + [m for _, m in counts], dtype=float).cumsum()
    # Places with no rollout between them split the counts alike: each split is weighed once.
    splits, place_split = np.unique(np.stack([correct[first_bad], sampled[first_bad]]), axis=1, return_inverse=True)
    good_correct, good_sampled = splits
    bad_correct, bad_sampled = correct[-1] - good_correct, sampled[-1] - good_sampled
    good = good_correct[:, None] * LOG_RATE + (good_sampled - good_correct)[:, None] * LOG_MISS
    bad = bad_correct[:, None] * LOG_RATE + (bad_sampled - bad_correct)[:, None] * LOG_MISS
    good_top, bad_top = good.max(axis=1), bad.max(axis=1)  # likelihoods scaled to at most 1
    good, bad = np.exp(good - good_top[:, None]), np.exp(bad - bad_top[:, None])
    return good, bad, good_top + bad_top, place_split.reshape(-1)


def log_evidence(counts: Sequence[Counts], first_bad: Sequence[int], prior: np.ndarray | None = None) -> np.ndarray:
    """log P(counts | the first bad prefix is f), for each f of `first_bad`: prefixes before f
    share the good rate g, f and after share the bad one b < g, both integrated out (`counts[i]`
    are prefix i's; f = len(counts) puts every prefix on the good side). Beforehand g is uniform
    and the drop g - b, given g, more likely large than small: density 2 (g - b) / g^2 on
    0 <= b < g. A drop of almost nothing then has almost no weight, so "no drop before this
    step" can be shown without learning the bad rate to the last decimal. `prior`, when given,
    replaces that one: weights over the grid's (g, b) pairs, as `learned_prior` makes them."""
    good, bad, scale, place_split = split_likelihoods(counts, first_bad)
    if prior is not None:
        total = ((good @ prior) * bad).sum(axis=1)
    else:
        # sum over b < g of (g - b) L(b) = g * sum L(b) - sum b L(b): running sums, shifted by one
        below = np.cumsum(bad, axis=1) - bad
        below_rate = np.cumsum(bad * RATES, axis=1) - bad * RATES
        weighed = np.maximum(RATES * below - below_rate, 0) * 2 / RATES**2
        total = (good * weighed).sum(axis=1)
    return (np.log(np.maximum(total, np.finfo(float).tiny)) + scale)[place_split]


def first_bad_posterior(
    counts: Sequence[Counts], first_bad: Sequence[int], prior: np.ndarray | None = None
) -> np.ndarray:
    """The chance that each of `first_bad` is the first bad prefix, given the counts (every
    place equally likely beforehand; the rates weighed by `prior`, see log_evidence)."""
    evidence = log_evidence(counts, first_bad, prior)
    weights = np.exp(evidence - evidence.max())
    return weights / weights.sum()


# The analytic prior of log_evidence as weights over the grid: what a learned prior starts from.
GOOD, BAD = RATES[:, None], RATES[None, :]
DEFAULT_PRIOR = np.where(BAD < GOOD, 2 * (GOOD - BAD) / GOOD**2, 0)
DEFAULT_PRIOR /= DEFAULT_PRIOR.sum()
# How many responses' worth the analytic prior counts for against the learned one, and the
# rounds of expectation-maximisation that fit the learned one.
PRIOR_WEIGHT = 2
PRIOR_ITERATIONS = 20


def learned_prior(
    finished: Sequence[tuple[Sequence[Counts], int]], weight: float = PRIOR_WEIGHT, iterations: int = PRIOR_ITERATIONS
) -> np.ndarray:
    """An empirical-Bayes prior over the (good, bad) rates: the mixture of rate pairs that best
    explains the finished searches' counts, each split at the first bad prefix it found
    (`finished`: (counts, first bad prefix) pairs). A policy recovers from an error about as
    often on one problem as on the next, so what the other responses showed about the two rates
    tells a search what one response's few rollouts cannot. Fitted by expectation-maximisation
    (each round: the average of the responses' posteriors over (g, b) under the last round's
    prior), held towards the analytic prior by `weight` responses' worth of it."""
    if not finished:
        return DEFAULT_PRIOR
    pairs = [split_likelihoods(counts, [first_bad]) for counts, first_bad in finished]
    good = np.concatenate([pair[0] for pair in pairs])  # responses x grid
    bad = np.concatenate([pair[1] for pair in pairs])
    prior = DEFAULT_PRIOR
    for _ in range(iterations):
        each = np.maximum(((good @ prior) * bad).sum(axis=1), np.finfo(float).tiny)
        prior = (weight * DEFAULT_PRIOR + prior * ((good / each[:, None]).T @ bad)) / (weight + len(finished))
    return prior


def entropy(posterior: np.ndarray) -> float:
    positive = posterior[posterior > 0]
    return float(-(positive * np.log(positive)).sum())


def expected_entropy(
    counts: Sequence[Counts], first_bad: Sequence[int], prefix: int, rollouts: int, prior: np.ndarray | None = None
) -> float:
    """The uncertainty left about the first bad prefix, on average, after `rollouts` more
    rollouts from `prefix`: every number of them that may be right, weighed by its chance."""
    before = list(counts)
    correct, sampled = before[prefix]
    outcomes = []
    for right in range(rollouts + 1):
        before[prefix] = (correct + right, sampled + rollouts)
        outcomes.append(log_evidence(before, first_bad, prior) + math.log(math.comb(rollouts, right)))
    joint = np.array(outcomes)  # log P(right, b), up to one constant
    per_outcome = np.logaddexp.reduce(joint, axis=1)
    chances = np.exp(per_outcome - np.logaddexp.reduce(per_outcome))
    posteriors = np.exp(joint - per_outcome[:, None])
    return float(sum(chance * entropy(posterior) for chance, posterior in zip(chances, posteriors)))


def most_informative(
    counts: Sequence[Counts],
    first_bad: Sequence[int],
    choices: Sequence[tuple[int, int]],
    prior: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """`choices` of (prefix, rollouts), most informative first: by how much they are expected
    to narrow down the first bad prefix, per rollout (ties: the shorter prefix first)."""
    now = entropy(first_bad_posterior(counts, first_bad, prior))

    def gain(choice: tuple[int, int]) -> float:
        prefix, rollouts = choice
        return (now - expected_entropy(counts, first_bad, prefix, rollouts, prior)) / rollouts

    gains = {choice: gain(choice) for choice in choices}
    return sorted(choices, key=lambda choice: (-gains[choice], choice[0]))

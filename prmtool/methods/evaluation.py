"""Metrics of step labels and step scores against human labels (docs/algorithms.md,
"Evaluation against human labels").

ProcessBench's first-error detection: on the rows whose true first error is a step (>= 0),
the share whose predicted first error is that step exactly (`error_accuracy`); on the rows
with no error (-1), the share predicted error-free (`correct_accuracy`); F1 is their harmonic
mean. A prediction past the last step, or null, counts as "no error found". Where the error
rows' predictions miss, they miss one of three ways: a step too early (`error_too_early`, a
good step called the first error), a step too late (`error_too_late`, the error passed over),
or no error found at all (`error_missed`); with the exact share these sum to 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class FirstErrorScores:
    rows: int
    error_rows: int  # truth >= 0
    correct_rows: int  # truth == -1
    error_accuracy: float | None  # None without error rows
    correct_accuracy: float | None  # None without error-free rows
    f1: float | None  # None unless both sides exist
    error_too_early: float | None = None  # of the error rows; None without error rows
    error_too_late: float | None = None
    error_missed: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def normalized(prediction: int | None, n_steps: int | None) -> int:
    """-1 for "no error found": a null prediction, a negative one, or one past the last step."""
    if prediction is None or prediction < 0 or (n_steps is not None and prediction >= n_steps):
        return -1
    return int(prediction)


def first_error_scores(
    truth: list[int], predicted: list[int | None], n_steps: list[int | None] | None = None
) -> FirstErrorScores:
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} true first errors for {len(predicted)} predictions")
    steps = n_steps or [None] * len(truth)
    pairs = [(t, normalized(p, n)) for t, p, n in zip(truth, predicted, steps) if t is not None]
    errors = [(t, p) for t, p in pairs if t >= 0]
    clean = [(t, p) for t, p in pairs if t < 0]
    error_accuracy = sum(t == p for t, p in errors) / len(errors) if errors else None
    correct_accuracy = sum(p == -1 for _, p in clean) / len(clean) if clean else None
    f1 = None
    if error_accuracy is not None and correct_accuracy is not None:
        total = error_accuracy + correct_accuracy
        f1 = 2 * error_accuracy * correct_accuracy / total if total else 0.0
    misses = [None] * 3
    if errors:
        misses = [
            sum(0 <= p < t for t, p in errors) / len(errors),
            sum(p > t for t, p in errors) / len(errors),
            sum(p == -1 for _, p in errors) / len(errors),
        ]
    return FirstErrorScores(len(pairs), len(errors), len(clean), error_accuracy, correct_accuracy, f1, *misses)


def first_below(scores: list[float | None] | None, threshold: float) -> int:
    """A PRM's predicted first error: the first step whose score is below `threshold`; -1 if
    none is (a null score is skipped, not taken as an error)."""
    for index, score in enumerate(scores or []):
        if score is not None and score == score and score < threshold:  # score == score: not NaN
            return index
    return -1


def best_threshold(truth: list[int], scores: list[list[float | None] | None]) -> tuple[float, FirstErrorScores]:
    """The threshold with the highest F1, among every distinct score (a step is flagged when its
    score is below the threshold, so each candidate is a score value, plus one above them all)."""
    values = sorted({s for row in scores for s in (row or []) if s is not None and s == s})
    candidates = values + [values[-1] + 1.0] if values else [0.0]
    n_steps = [len(row or []) for row in scores]
    best = None
    for threshold in candidates:
        result = first_error_scores(truth, [first_below(row, threshold) for row in scores], n_steps)
        if best is None or (result.f1 or 0.0) > (best[1].f1 or 0.0):
            best = (threshold, result)
    return best


# ------------------------------------------------------------------ step-level AUROC


def step_labels_from_first_error(first_error: int | None, n_steps: int) -> list[int | None]:
    """Human step labels implied by a first error: good (1) before it, bad (0) at it, unknown
    after it; every step good for -1; nothing known for null."""
    if first_error is None:
        return [None] * n_steps
    if first_error < 0:
        return [1] * n_steps
    return [1] * min(first_error, n_steps) + [0] * (first_error < n_steps) + [None] * max(0, n_steps - first_error - 1)


def auroc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve of `scores` ranking good (1) above bad (0): the chance that a
    random good step outscores a random bad one, ties counting half. None without both kinds."""
    pairs = sorted(zip(scores, labels))
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return None
    # Mann-Whitney U from ranks, with tied scores sharing their mean rank.
    rank_sum, index = 0.0, 0
    while index < len(pairs):
        end = index
        while end < len(pairs) and pairs[end][0] == pairs[index][0]:
            end += 1
        mean_rank = (index + 1 + end) / 2
        rank_sum += mean_rank * sum(label for _, label in pairs[index:end])
        index = end
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def step_auroc(truth: list[int | None], scores: list[list[float | None] | None]) -> float | None:
    """AUROC of step scores against the step labels each row's true first error implies (the
    steps after a first error are unknown and left out, as are null and NaN scores)."""
    flat_scores, flat_labels = [], []
    for first_error, row in zip(truth, scores):
        row = row or []
        for score, label in zip(row, step_labels_from_first_error(first_error, len(row))):
            if label is not None and score is not None and score == score:
                flat_scores.append(float(score))
                flat_labels.append(label)
    return auroc(flat_scores, flat_labels)


# ------------------------------------------------------------------ agreement of two label sets


def agreement(first: list[int | None], second: list[int | None], n_steps: list[int | None]) -> dict[str, int]:
    """How two first-error columns (e.g. MC's and a judge's) relate, row by row: the same step,
    both error-free, an error at different steps, or only one of them finding an error. Rows
    where either is null are counted apart."""
    counts = dict.fromkeys(
        ("rows", "same_step", "both_error_free", "different_steps", "only_first_finds_error",
         "only_second_finds_error", "missing"),
        0,
    )  # fmt: skip
    for a, b, n in zip(first, second, n_steps):
        counts["rows"] += 1
        if a is None or b is None:
            counts["missing"] += 1
            continue
        a, b = normalized(a, n), normalized(b, n)
        if a == b:
            counts["both_error_free" if a == -1 else "same_step"] += 1
        elif a >= 0 and b >= 0:
            counts["different_steps"] += 1
        else:
            counts["only_first_finds_error" if a >= 0 else "only_second_finds_error"] += 1
    return counts


# ------------------------------------------------------------------ response level: Best-of-N


def best_of_n(groups: list[list[tuple[float | None, str | None, bool]]], n: int) -> dict[str, float | int | None]:
    """Accuracy over problem groups of (score, answer, correct) responses, each group cut to its
    first `n` responses: choosing the highest score (Best-of-N; ties to the earlier response),
    the most common answer (majority vote; ties to the answer seen first, no answer never wins),
    and any correct response (the oracle, the ceiling of both). Groups with fewer than `n`
    responses are left out, so every figure is over the same problems."""
    used = [group[:n] for group in groups if len(group) >= n]
    if not used:
        return {"n": n, "problems": 0, "best_of_n": None, "majority": None, "oracle": None}
    chosen, voted, oracle = 0, 0, 0
    for group in used:
        # max() keeps the first of equal keys: ties go to the earlier response, the answer seen first.
        scored = [(score, correct) for score, _, correct in group if score is not None and score == score]
        if scored:
            chosen += max(scored, key=lambda pair: pair[0])[1]
        votes: dict[str, int] = {}  # in order of first appearance
        for _, answer, _ in group:
            if answer is not None:
                votes[answer] = votes.get(answer, 0) + 1
        if votes:
            winner = max(votes, key=votes.get)
            voted += any(correct for _, answer, correct in group if answer == winner)
        oracle += any(correct for _, _, correct in group)
    count = len(used)
    return {"n": n, "problems": count, "best_of_n": chosen / count, "majority": voted / count, "oracle": oracle / count}

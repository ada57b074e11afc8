"""Metrics of step labels and step scores against human labels (docs/algorithms.md,
"Evaluation against human labels").

ProcessBench's first-error detection: on the rows whose true first error is a step (>= 0),
the share whose predicted first error is that step exactly (`error_accuracy`); on the rows
with no error (-1), the share predicted error-free (`correct_accuracy`); F1 is their harmonic
mean. A prediction past the last step, or null, counts as "no error found".
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
    return FirstErrorScores(len(pairs), len(errors), len(clean), error_accuracy, correct_accuracy, f1)


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

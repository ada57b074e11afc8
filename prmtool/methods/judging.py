"""Step labels from an LLM judge, for `prmtool label --method judge`
(docs/algorithms.md, "Step labeling by an LLM judge").

The judge reads the problem and the numbered steps and names the earliest wrong step, or -1
for none, in a final `\\boxed{}`. With several samples the most frequent answer wins; a tie
goes to the earliest step (an error found is kept over "no error"). An answer that names no
step of the response is unparseable: counted, and left null, never guessed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import TYPE_CHECKING

import polars as pl

from prmtool.methods.answers import last_boxed
from prmtool.methods.labeling import labels_from_first_error

if TYPE_CHECKING:
    from prmtool.core.report import Tracker
    from prmtool.engines import Engine


def judge_prompt(problem: str, steps: list[str]) -> str:
    """The critique request: each step in its own numbered tag, the answer an index in a box."""
    numbered = "\n\n".join(f"<step_{i}>\n{step}\n</step_{i}>" for i, step in enumerate(steps))
    return (
        "Below is a math problem and a proposed solution, split into steps numbered from 0.\n\n"
        f"Problem:\n{problem}\n\nSolution:\n{numbered}\n\n"
        "Check the steps in order. If a step contains an error (a wrong calculation, a wrong "
        "fact, or reasoning that does not follow), give the number of the earliest such step; "
        "if every step is correct, give -1. End your reply with the number in \\boxed{}, for "
        "example \\boxed{2} or \\boxed{-1}."
    )


def parse_verdict(text: str | None, n_steps: int) -> int | None:
    """The step index in the reply's last box: -1 or 0..n_steps-1; None for anything else."""
    boxed = last_boxed(text or "")
    if boxed is None:
        return None
    match = re.fullmatch(r"\s*(?:\\text\{\s*)?(-?\d+)(?:\s*\})?\s*", boxed)
    if match is None:
        return None
    index = int(match.group(1))
    return index if index == -1 or 0 <= index < n_steps else None


def majority(verdicts: list[int | None]) -> int | None:
    """The most frequent parsed verdict; ties go to the earliest step, -1 last."""
    counts = Counter(v for v in verdicts if v is not None)
    if not counts:
        return None
    top = max(counts.values())
    tied = [v for v, c in counts.items() if c == top]
    return min(tied, key=lambda v: (v == -1, v))


def judge_rows(
    frame: pl.DataFrame,
    engine: Engine,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    max_tokens: int = 1024,
    seed: int = 0,
    trust_correct: bool = True,
    tracker: Tracker | None = None,
) -> pl.DataFrame:
    """Adds judge_first_error, judge_output (each sample's reply), first_error, step_labels,
    step_mc (null), label_rollouts (0), label_right_rollouts (null) and label_tokens. One engine call for every row."""
    from prmtool.engines import SamplingRequest

    steps = [list(s or []) for s in frame["steps"].to_list()]
    correct = frame["correct"].to_list() if "correct" in frame.columns else [None] * frame.height
    asked = [row for row in range(frame.height) if steps[row] and not (trust_correct and correct[row])]
    requests = [
        SamplingRequest(
            prompt_ids=engine.chat_prompt_ids(judge_prompt(frame["problem"][row], steps[row])),
            n=samples,
            temperature=temperature,
            max_tokens=max_tokens,
            seed=int.from_bytes(
                hashlib.sha256(f"{seed}\x1fjudge\x1f{frame['response_id'][row]}".encode()).digest()[:4]
            ),
        )
        for row in asked
    ]
    completions = engine.sample(requests) if requests else []
    judged: list[int | None] = [-1 if (trust_correct and c) else None for c in correct]
    outputs: list[list[str] | None] = [None] * frame.height
    tokens = [0] * frame.height
    for row, replies in zip(asked, completions):
        outputs[row] = [reply.text for reply in replies]
        tokens[row] = sum(reply.num_tokens for reply in replies)
        judged[row] = majority([parse_verdict(reply.text, len(steps[row])) for reply in replies])
    if tracker is not None:
        tracker.advance(frame.height, sum(tokens))
    was_asked = set(asked)
    return frame.with_columns(
        pl.Series("judge_first_error", [judged[r] if r in was_asked else None for r in range(frame.height)], pl.Int32),
        pl.Series("judge_output", outputs, dtype=pl.List(pl.String)),
        pl.Series("step_mc", [None] * frame.height, dtype=pl.List(pl.Float64)),
        pl.Series(
            "step_labels",
            [labels_from_first_error(judged[r], len(steps[r])) for r in range(frame.height)],
            pl.List(pl.Int8),
        ),
        pl.Series("first_error", judged, dtype=pl.Int32),
        pl.Series("label_rollouts", [0] * frame.height, dtype=pl.Int32),
        pl.Series("label_right_rollouts", [None] * frame.height, dtype=pl.Int32),  # no rollout ran
        pl.Series("label_tokens", tokens, dtype=pl.Int64),
    )

"""Verifications per second on GSM8K-style answers (target: >= 500/s on 2 cores).

    python bench/bench_verify.py [--rows 20000] [--workers 2]

Responses are built from GSM8K train answers (../shared/data/gsm8k/train.jsonl) in the forms
models write: `The answer is X`, `\\boxed{X}`, `#### X`, with thousands separators, trailing
`.0`, dollar signs, and wrong answers. Two figures are printed: the whole mix through
`verify_rows` (extraction included), and the subset whose answer text differs from the gold,
which always goes through Math-Verify in the worker processes (no identical-text shortcut).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import polars as pl

from prmtool.stages.verify import verify_rows

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "train.jsonl"


def responses(rows: int, seed: int = 0) -> pl.DataFrame:
    rng = random.Random(seed)
    golds = [
        json.loads(line)["answer"].split("####")[1].strip().replace(",", "") for line in GSM8K.read_text().splitlines()
    ]
    forms = [
        lambda a: f"Adding up the parts.\n\nThe answer is {a}",
        lambda a: f"So the total is computed.\n\nThe answer is $\\boxed{{{a}}}$.",
        lambda a: f"Step by step.\n#### {a}",
        lambda a: f"The final answer is ${int(a):,}." if a.lstrip("-").isdigit() else f"The answer is {a}",
        lambda a: f"Thus \\boxed{{{a}.0}}",
        lambda a: (
            f"The answer is {int(a) + rng.choice([-2, -1, 1, 10])}." if a.lstrip("-").isdigit() else "The answer is 0"
        ),
        lambda a: f"\\boxed{{\\frac{{{2 * int(a)}}}{{2}}}}" if a.lstrip("-").isdigit() else f"\\boxed{{{a}}}",
    ]
    gold_column, response_column = [], []
    for index in range(rows):
        gold = golds[index % len(golds)]
        gold_column.append(gold)
        response_column.append(rng.choice(forms)(gold))
    return pl.DataFrame(
        {
            "problem_id": [f"p{i % len(golds)}" for i in range(rows)],
            "response_id": [f"r{i}" for i in range(rows)],
            "response": response_column,
            "reference_answer": gold_column,
        }
    )


def measure(frame: pl.DataFrame, workers: int) -> tuple[float, pl.DataFrame]:
    started = time.perf_counter()
    result = verify_rows(frame, timeout=5, workers=workers)
    return frame.height / (time.perf_counter() - started), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    frame = responses(args.rows)
    mix_rate, result = measure(frame, args.workers)
    differs = result.filter(pl.col("pred_answer") != pl.col("reference_answer")).select(frame.columns)
    hard_rate, hard = measure(differs, args.workers)
    statuses = dict(result.group_by("verify_status").len().iter_rows())
    print(
        f"rows: {frame.height}, workers: {args.workers}, statuses: {statuses}, accuracy: {result['correct'].mean():.3f}"
    )
    print(f"verifications/s, GSM8K-style mix (extraction included): {mix_rate:,.0f}")
    print(
        f"verifications/s, answers differing from gold as text (all through Math-Verify, {hard.height} rows): "
        f"{hard_rate:,.0f}"
    )
    print(f"target >= 500/s: {'met' if min(mix_rate, hard_rate) >= 500 else 'NOT met'}")


if __name__ == "__main__":
    main()

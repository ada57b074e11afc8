"""Verifications per second on GSM8K-style answers (target: >= 500/s on 2 cores), and
agreement with human labels on a labelled set of real solutions.

    python bench/bench_verify.py [--rows 20000] [--workers 2]
    python bench/bench_verify.py --data data_samples/processbench-gsm8k/gsm8k.jsonl [--show 30]
    python bench/bench_verify.py --traces data_samples/long-cot/sky-t1-amc23.jsonl

Responses are built from GSM8K answers (`--gsm8k FILE`, any GSM8K JSONL such as the train
split; by default the 40 problems of data_samples/gsm8k/test_sample.jsonl) in the forms
models write: `The answer is X`, `\\boxed{X}`, `#### X`, with thousands separators, trailing
`.0`, dollar signs, wrong answers, and sentences that state the answer without a marker. Two
figures are printed: the whole mix through `verify_rows` (extraction included), and the subset
whose answer text differs from the gold, which always goes through Math-Verify in the worker
processes (no identical-text shortcut).

With `--data FILE` (JSONL or Parquet: `response`, or `steps` joined by blank lines;
`reference_answer`; a boolean label column, `final_answer_correct` by default; and `generator`
or `source` to group by), it prints the share of rows on which each grader agrees with the
label, per source and overall, side by side: prmtool (the cascade), prmtool --extract strict,
Math-Verify alone (its own extraction over the whole response, gold first) and plain string
equality of the extracted answer with the reference; then the rows where prmtool disagrees.

With `--traces FILE` (reasoning traces: `response`, `reference_answer`, a boolean `finished`
and the grade to compare with, `grader_correct` by default, as data_samples/long-cot has them),
it imports them with `--split think` and verifies them as `prmtool verify` does (the solution
only; an unfinished trace has no answer), and prints, for the finished and the unfinished
traces apart, how often each grader agrees with the grade and how many it marks correct:
prmtool, Math-Verify over the solution part, Math-Verify over the whole response, and
prmtool's cascade over the whole response (how verify read traces before).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import polars as pl

from prmtool.stages.verify import verify_rows

GSM8K = Path(__file__).resolve().parents[1] / "data_samples" / "gsm8k" / "test_sample.jsonl"


def responses(rows: int, seed: int = 0, gsm8k: Path = GSM8K) -> pl.DataFrame:
    rng = random.Random(seed)
    golds = [
        json.loads(line)["answer"].split("####")[1].strip().replace(",", "") for line in gsm8k.read_text().splitlines()
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
        # free-form endings, read by the later steps of the cascade
        lambda a: f"She has 3 + 4 = 7 of them.\n\nTherefore, she makes ${a} every day at the market.",
        lambda a: f"Adding both parts: \\(20 + 5 = 25\\).\n\nThus, the total is \\({a}\\) for the day.",
        lambda a: f"So, after all his transactions, he has **{a} dollars** left.",
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


def read_labelled(path: Path, label: str) -> pl.DataFrame:
    frame = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_ndjson(path, infer_schema_length=None)
    if "response" not in frame.columns:
        frame = frame.with_columns(response=pl.col("steps").list.join("\n\n"))
    reference = frame["reference_answer"]
    if reference.dtype != pl.String:  # a list of answers (OlympiadBench's final_answer): as prmtool reads it
        frame = frame.with_columns(
            reference_answer=pl.Series(
                [repr([str(a) for a in r]) if isinstance(r, list) else str(r) for r in reference]
            )
        )
    source = next((c for c in ("source", "generator") if c in frame.columns), None)
    frame = frame.with_columns(_source=pl.col(source).cast(pl.String) if source else pl.lit("all"))
    return frame.with_columns(_label=pl.col(label).cast(pl.Boolean))


def math_verify_alone(pair: tuple[str, str]) -> bool:
    """Math-Verify as its README uses it: gold parsed, the whole response parsed."""
    from math_verify import parse, verify

    gold, response = pair
    try:
        return bool(verify(parse(f"${gold}$"), parse(response)))
    except Exception:
        return False


def agreement(data: Path, label: str, workers: int, show: int) -> None:
    import multiprocessing

    from prmtool.methods.verification import verify_responses

    frame = read_labelled(data, label)
    responses, references = frame["response"].to_list(), frame["reference_answer"].to_list()
    graders: dict[str, list[bool]] = {}
    started = time.perf_counter()
    answers, verdicts = verify_responses(responses, references, workers=workers)
    seconds = time.perf_counter() - started
    graders["prmtool"] = [v.correct for v in verdicts]
    graders["prmtool --extract strict"] = [
        v.correct for v in verify_responses(responses, references, workers=workers, extract="strict")[1]
    ]
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        graders["Math-Verify alone"] = pool.map(math_verify_alone, list(zip(references, responses)), chunksize=16)
    graders["string equality"] = [
        a.text is not None and a.text.strip().strip("$").strip() == str(r).strip() for a, r in zip(answers, references)
    ]
    labels = frame["_label"].to_list()
    sources = frame["_source"].to_list()
    print(f"{data}: {frame.height} rows, label column {label!r}; prmtool read and graded them in {seconds:.1f} s")
    names = list(graders)
    print(f"{'source':<28} {'rows':>5}  " + "  ".join(f"{n:>24}" for n in names))
    for group in sorted(set(sources)) + ["all"]:
        rows = [i for i, s in enumerate(sources) if group in ("all", s)]
        cells = [sum(graders[n][i] == labels[i] for i in rows) / len(rows) for n in names]
        print(f"{group:<28} {len(rows):>5}  " + "  ".join(f"{c:>24.4f}" for c in cells))
    found = {}
    for answer in answers:
        found[answer.source] = found.get(answer.source, 0) + 1
    print("answer_source:", ", ".join(f"{k}: {v}" for k, v in sorted(found.items(), key=lambda kv: -kv[1])))
    ids = frame["id"].to_list() if "id" in frame.columns else list(range(frame.height))
    wrong = [i for i in range(frame.height) if graders["prmtool"][i] != labels[i]]
    print(f"\nrows where prmtool disagrees with the label: {len(wrong)} (first {min(show, len(wrong))})")
    print(f"{'id':<14} {'label':>5} {'mv':>5} {'reference':<14} {'source':<15} prmtool's answer")
    for i in wrong[:show]:
        print(
            f"{str(ids[i]):<14} {str(labels[i]):>5} {str(graders['Math-Verify alone'][i]):>5} "
            f"{str(references[i])[:14]:<14} {str(answers[i].source):<15} {str(answers[i].text)[:60]}"
        )


def traces(data: Path, label: str, workers: int) -> None:
    from prmtool.methods.thinking import solution_text
    from prmtool.methods.verification import verify_responses
    from prmtool.stages.import_ import to_contract
    from prmtool.stages.verify import VerifySettings, verify_frame

    source = pl.read_ndjson(data, infer_schema_length=None)
    frame = verify_frame(to_contract(source, str(data), "think"), VerifySettings(workers=workers))
    golds, texts = frame["reference_answer"].to_list(), frame["response"].to_list()
    solutions = [solution_text(text) or "" for text in texts]
    whole = verify_responses(texts, golds, workers=workers)[1]
    graders = {
        "prmtool verify (solution only)": frame["correct"].to_list(),
        "Math-Verify, solution part": [bool(s) and math_verify_alone((g, s)) for g, s in zip(golds, solutions)],
        "Math-Verify, whole response": [math_verify_alone(pair) for pair in zip(golds, texts)],
        "cascade, whole response": [v.correct for v in whole],
    }
    labels, finished = frame[label].to_list(), frame["finished"].to_list()
    print(f"{data}: {frame.height} traces, {sum(finished)} finished; agreement with {label!r}, and rows marked correct")
    print(f"{'grader':<32} {'finished: agree':>16} {'marked':>7} {'unfinished: agree':>18} {'marked':>7}")
    for name, grades in graders.items():
        cells = []
        for part in (True, False):
            rows = [i for i, done in enumerate(finished) if done == part]
            cells += [
                f"{sum(grades[i] == labels[i] for i in rows)}/{len(rows)}",
                str(sum(bool(grades[i]) for i in rows)),
            ]
        print(f"{name:<32} {cells[0]:>16} {cells[1]:>7} {cells[2]:>18} {cells[3]:>7}")
    statuses = frame.filter(~pl.col("finished"))["verify_status"].value_counts().rows()
    print(f"verify_status of the unfinished traces: {dict(statuses)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--gsm8k", type=Path, default=GSM8K, help="GSM8K JSONL whose answers the responses use")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, help="a labelled set of solutions: prints agreement with its labels")
    parser.add_argument("--label", default="final_answer_correct", help="the boolean label column of --data")
    parser.add_argument("--show", type=int, default=30, help="how many disagreements to list")
    parser.add_argument("--traces", type=Path, help="reasoning traces with a finished flag and a grade (see above)")
    parser.add_argument("--grade", default="grader_correct", help="the boolean grade column of --traces")
    args = parser.parse_args()
    if args.traces is not None:
        traces(args.traces, args.grade, args.workers)
        return
    if args.data is not None:
        agreement(args.data, args.label, args.workers, args.show)
        return

    frame = responses(args.rows, gsm8k=args.gsm8k)
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

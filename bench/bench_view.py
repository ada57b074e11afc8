"""`prmtool view` on 10,000 responses: the report's size, the time to write it, and in headless
Chromium the time to first paint, to the first page of responses, and to apply a filter;
beside the same page for 100 responses, so the ratios say what the 100-fold rows cost.

    python bench/bench_view.py [--responses 10000] [--repeat 3] [--keep work/bench_view]

The responses are ProcessBench's 400 GSM8K solutions (data_samples/processbench-gsm8k, real
steps and human first errors), repeated under new ids with made-up per-step MC values, step
labels and a second label set (`first_error`) that disagrees with the human one on about a
third of the rows. Chromium is Debian's package (`apt-get install chromium`), driven over the
DevTools protocol by tests/browser.py; the page is opened from disk, as a user opens it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests/browser.py

from tests.browser import Browser, file_url  # noqa: E402

PROCESSBENCH = ROOT / "data_samples" / "processbench-gsm8k" / "gsm8k.jsonl"


def responses(count: int, seed: int = 0) -> pl.DataFrame:
    rng = random.Random(seed)
    source = [json.loads(line) for line in PROCESSBENCH.read_text().splitlines()]
    rows = []
    for number in range(count):
        row = source[number % len(source)]
        steps, human = row["steps"], row["label"]
        # MC high before the human first error and low from it on, with noise
        mc = [
            round(min(1.0, max(0.0, (0.85 if human < 0 or s < human else 0.1) + rng.gauss(0, 0.15))), 3)
            for s in range(len(steps))
        ]
        found = human if rng.random() < 0.65 else rng.randrange(-1, len(steps))
        rows.append(
            {
                "problem_id": row["id"],
                "problem": row["problem"],
                "reference_answer": row["reference_answer"],
                "response_id": f"{row['id']}-{number}",
                "generator": row["generator"],
                "steps": steps,
                "correct": row["final_answer_correct"],
                "step_mc": mc,
                "step_labels": [1 if found < 0 or s < found else 0 if s == found else None for s in range(len(steps))],
                "first_error": found,
                "human_first_error": human,
            }
        )
    return pl.DataFrame(rows).with_columns(pl.col("first_error", "human_first_error").cast(pl.Int32))


def measure(frame: pl.DataFrame, folder: Path, repeat: int) -> dict:
    shards = folder / f"rows-{frame.height}"
    shards.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(shards / "part-00000.parquet")
    page = folder / f"view-{frame.height}.html"
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "prmtool", "view", str(shards), "-o", str(page), "-q",
         "--compare", "first_error,human_first_error"],
        check=True, cwd=ROOT,
    )  # fmt: skip
    written = time.perf_counter() - started
    runs = []
    for _ in range(repeat):  # a fresh browser each time; the median, since the CPU is shared
        with Browser() as browser:
            browser.goto("about:blank")
            started = time.perf_counter()
            browser.goto(file_url(page))
            loaded = time.perf_counter() - started
            browser.wait_until("performance.getEntriesByName('first-contentful-paint').length > 0")  # may follow load
            # first contentful paint is the page's frame (header, filters), parsed before the rows'
            # JSON has arrived; the largest contentful paint is the first page of responses
            timings = browser.evaluate(
                "new Promise(done => { const seen = [];"
                " new PerformanceObserver(list => seen.push(...list.getEntries()))"
                ".observe({type: 'largest-contentful-paint', buffered: true});"
                " setTimeout(() => done({largest: seen.at(-1).startTime,"
                " paint: performance.getEntriesByName('first-contentful-paint')[0].startTime,"
                " rendered: performance.getEntriesByName('prmtool-rendered')[0].startTime}), 500); })"
            )
            filtering = browser.evaluate(
                "(() => { const t = performance.now(); const s = document.getElementById('filter-disagree');"
                " s.checked = true; s.dispatchEvent(new Event('change')); return performance.now() - t; })()"
            )
            shown = browser.evaluate("Number(document.getElementById('count').dataset.count)")
            assert not browser.console_errors, browser.console_errors
        runs.append({**timings, "loaded": loaded, "filtering": filtering})
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {
        "responses": frame.height,
        "megabytes": page.stat().st_size / 1e6,
        "write_s": written,
        "first_paint_ms": median["paint"],
        "rendered_ms": median["rendered"],
        "largest_paint_ms": median["largest"],
        "load_event_s": median["loaded"],
        "filter_ms": median["filtering"],
        "disagreeing": shown,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="Page loads per report (the median is printed).")
    parser.add_argument("--keep", type=Path, help="Keep the shards and pages in this folder.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        small = measure(responses(100), folder, args.repeat)
        large = measure(responses(args.responses), folder, args.repeat)
    print(f"{'':32}{small['responses']:>12,}{large['responses']:>12,}{'ratio':>10}")
    for key, label in [
        ("megabytes", "report size (MB)"),
        ("write_s", "prmtool view, wall (s)"),
        ("first_paint_ms", "first contentful paint (ms)"),
        ("rendered_ms", "first page of rows built (ms)"),
        ("largest_paint_ms", "largest contentful paint (ms)"),
        ("load_event_s", "navigation to load event (s)"),
        ("filter_ms", "disagreement filter (ms)"),
    ]:
        print(f"{label:32}{small[key]:>12.2f}{large[key]:>12.2f}{large[key] / small[key]:>10.1f}")
    print(f"disagreeing rows shown: {small['disagreeing']:,} and {large['disagreeing']:,}")


if __name__ == "__main__":
    main()

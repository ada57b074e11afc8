"""`prmtool filter --method prof` on 1,000,000 responses (target: <= 10 s and <= 4 GiB on 2 cores).

    python bench/bench_filter.py [--rows 1000000] [--group 8] [--shards 10] [--keep-data DIR]

The data: problems of `--group` responses, about half correct, each response with 8 to 12
steps of about 40 characters (`steps`) and one implicit-PRM reward per step (`step_rewards`);
1% have 1 step and 1% have 31, so the length penalty has work too. The shards are written to a
temporary directory, then `python -m prmtool filter DATA -o KEPT --rejects REJECTED` runs as
a subprocess: its wall time (start-up included) and its peak resident memory
(`getrusage(RUSAGE_CHILDREN).ru_maxrss`, the data generation in this process not counted)
are printed, with its CPU time and the kept/removed counts from its --report.

Measured 2026-11-22 on the 2-core CPU machine, idle, default arguments (222 MiB of Parquet):
wall time 6.65 s, CPU time 9.47 s, peak RSS 0.84 GiB; kept 500,000 of 1,000,000.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 10.0
TARGET_BYTES = 4 * 2**30


def responses(first: int, rows: int, group: int, rng: np.random.Generator) -> pa.Table:
    """Responses `first` .. `first + rows - 1` (response i answers problem i // group)."""
    counts = rng.integers(8, 13, size=rows)
    odd = rng.random(rows)
    counts[odd < 0.01] = 1
    counts[odd > 0.99] = 31
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))
    total = int(counts.sum())
    a, b = rng.integers(10, 1000, size=total), rng.integers(10, 1000, size=total)
    texts = pl.select(
        pl.format("We add {} and {} to get {}, which is the total.", pl.lit(a), pl.lit(b), pl.lit(a + b))
    ).to_series()
    index = np.arange(first, first + rows)
    return pa.table(
        {
            "problem_id": pa.array([f"problem-{i:07d}" for i in index // group]),
            "response_id": pa.array([f"response-{i:08d}" for i in index]),
            "correct": pa.array(rng.random(rows) < 0.5),
            "steps": pa.ListArray.from_arrays(offsets, texts.to_arrow().cast(pa.string())),
            "step_rewards": pa.ListArray.from_arrays(offsets, pa.array(rng.normal(0.0, 0.05, size=total))),
        }
    )


def write_shards(directory: Path, rows: int, group: int, shards: int, seed: int = 0) -> None:
    """Shard by shard, so that this process stays small: a child's peak RSS starts from its
    parent's at the fork."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    size = -(-rows // shards)
    for index in range(shards):
        first = index * size
        pq.write_table(responses(first, min(size, rows - first), group, rng), directory / f"part-{index:05d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument(
        "--keep-data", type=Path, default=None, help="Write the data here instead of a temporary directory."
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        root = args.keep_data or Path(temporary)
        data = root / "scored"
        write_shards(data, args.rows, args.group, args.shards)
        size = sum(f.stat().st_size for f in data.glob("*.parquet"))
        print(
            f"data: {args.rows:,} responses in groups of {args.group}, {args.shards} shards, {size / 2**20:,.0f} MiB "
            f"of Parquet"
        )

        command = [sys.executable, "-m", "prmtool", "filter", str(data), "-o", str(root / "kept"),
                   "--rejects", str(root / "rejected"), "--method", "prof",
                   "--report", str(root / "report.json"), "--quiet"]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        child = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak = child.ru_maxrss * 1024  # Linux reports KiB
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        report = json.loads((root / "report.json").read_text())

    print("command: python -m prmtool filter DATA -o KEPT --rejects REJECTED --method prof --report REPORT --quiet")
    print(f"kept {report['kept']:,}, removed {report['removed']:,} {report['removed_by_reason']}")
    print(f"balance before {report['balance']['before']}, after {report['balance']['after']}")
    print(
        f"wall time: {seconds:.2f} s (target <= {TARGET_SECONDS:.0f} s): "
        f"{'met' if seconds <= TARGET_SECONDS else 'NOT met'}"
    )
    print(
        f"CPU time: {child.ru_utime + child.ru_stime:.2f} s (user + system, both cores; for reading a wall time "
        f"taken on a busy machine)"
    )
    print(f"peak RSS: {peak / 2**30:.2f} GiB (target <= 4 GiB): {'met' if peak <= TARGET_BYTES else 'NOT met'}")
    if peak <= own:
        print(f"(this process peaked at {own / 2**30:.2f} GiB: the figure above may be its own, not the command's)")


if __name__ == "__main__":
    main()

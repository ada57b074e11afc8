"""`prmtool verify`: is each response's final answer mathematically equal to the reference?"""

from __future__ import annotations

from typing import Annotated

import polars as pl
import typer

from prmtool.executors import partition_to_run
from prmtool.cli.options import (
    positive,
    Inputs,
    Output,
    Overwrite,
    Quiet,
    Workers,
    default_workers,
    CpusPerTask,
    Executor,
    GpusPerTask,
    NumShards,
    ShardIndex,
)
from prmtool.core.report import RunStats
from prmtool.core.runner import MapStage, run_map_stage
from prmtool.methods.verification import verify_rows

REQUIRED = ("problem_id", "response_id", "response", "reference_answer")


EXAMPLES = """\b
Examples:
  prmtool verify data_samples/gsm8k/responses -o work/verified
  prmtool verify 'shards/*.parquet' -o work/verified --timeout 2 --workers 8
"""


def command(
    inputs: Inputs,
    output: Output,
    timeout: Annotated[
        float, typer.Option(help="Seconds allowed for one comparison; then verify_status = timeout.", callback=positive)
    ] = 5.0,
    workers: Workers = 0,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    shard_index: ShardIndex = None,
    num_shards: NumShards = None,
    executor: Executor = "local",
    gpus_per_task: GpusPerTask = 0.0,
    cpus_per_task: CpusPerTask = 1.0,
) -> None:
    """Check each response's final answer against `reference_answer` by mathematical
    equivalence (Math-Verify), writing `pred_answer`, `correct` and `verify_status`."""
    partition = partition_to_run(shard_index, num_shards, executor, gpus_per_task, cpus_per_task)
    if partition is None:  # --executor ray ran every partition
        return
    stats = RunStats("verify", quiet=quiet)
    workers = workers or default_workers()

    def transform(frame: pl.DataFrame, tracker) -> pl.DataFrame:
        result = verify_rows(frame, timeout=timeout, workers=workers, on_progress=tracker.advance)
        stats.counts.update(f"status_{s}" for s in result["verify_status"])
        stats.counts["correct"] += int(result["correct"].sum())
        return result

    stage = MapStage("verify", transform, {"timeout": timeout}, REQUIRED)
    run_map_stage(stage, inputs, output, overwrite, stats, partition)
    stats.print_summary()

"""Executors: where a stage's partitions run. The stages know nothing of them: a stage runs
one partition (`--shard-index i --num-shards n`, or the whole input), and an executor decides
how many partitions run and where.

- local (default): this process runs the partition the command line names.
- ray: this process starts one Ray task per partition, each calling the same stage with the
  same settings on its partition, and waits for them (executors/ray.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prmtool.core.errors import InputError
from prmtool.core.partition import Partition

if TYPE_CHECKING:
    from prmtool.core.report import Summary
    from prmtool.core.stage import Stage

EXECUTORS = ("local", "ray")


def partition_to_run(
    shard_index: int | None,
    num_shards: int | None,
    executor: str = "local",
    gpus_per_task: float = 0.0,
    cpus_per_task: float = 1.0,
) -> Partition | None:
    """The partition this process runs, or None when the Ray executor is to run them all;
    every clash between the scale-out options is an InputError here."""
    if executor not in EXECUTORS:
        raise InputError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if executor == "local":
        if gpus_per_task or cpus_per_task != 1.0:
            raise InputError("--gpus-per-task and --cpus-per-task apply to --executor ray")
        return Partition.of(shard_index, num_shards)
    if shard_index is not None:
        raise InputError("--shard-index is chosen by --executor ray for each task; give only --num-shards")
    return None


def run_stage(
    stage: Stage,
    inputs: list,
    output,
    settings,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    allow_incomplete: bool = False,
    shard_index: int | None = None,
    num_shards: int | None = None,
    executor: str = "local",
    gpus_per_task: float = 0.0,
    cpus_per_task: float = 1.0,
) -> Summary | None:
    """Run `stage` as the scale-out options say: its summary, or None after Ray ran every
    partition (each task prints nothing; the driver reports progress)."""
    stage.check_output(output)
    stage.check_partitioned(shard_index is not None or num_shards is not None or executor != "local")
    partition = partition_to_run(shard_index, num_shards, executor, gpus_per_task, cpus_per_task)
    if partition is not None:
        return stage.run(
            inputs,
            output,
            settings,
            overwrite=overwrite,
            quiet=quiet,
            partition=partition,
            allow_incomplete=allow_incomplete,
        )
    from prmtool.executors.ray import run_partitions_on_ray

    run_partitions_on_ray(
        stage,
        inputs,
        output,
        settings,
        overwrite,
        num_shards,
        gpus_per_task=gpus_per_task,
        cpus_per_task=cpus_per_task,
        allow_incomplete=allow_incomplete,
    )
    return None

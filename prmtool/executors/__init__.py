"""Executors: where a stage's partitions run. The stages know nothing of them: a stage runs
one partition (`--shard-index i --num-shards n`, or the whole input), and an executor decides
how many partitions run and where.

- local (default): this process runs the partition the command line names.
- ray: this process starts one Ray task per partition, each running the same command line
  with `--shard-index i --num-shards n` added, and waits for them (executors/ray.py).
"""

from __future__ import annotations

from contextvars import ContextVar

from prmtool.core.errors import InputError
from prmtool.core.partition import Partition

EXECUTORS = ("local", "ray")

# The command line being run (without the program name), set by prmtool.cli.main: the ray
# executor hands it to its tasks.
current_argv: ContextVar[list[str] | None] = ContextVar("current_argv", default=None)


def partition_to_run(
    shard_index: int | None,
    num_shards: int | None,
    executor: str = "local",
    gpus_per_task: float = 0.0,
    cpus_per_task: float = 1.0,
) -> Partition | None:
    """The partition this process should run, or None when an executor ran them all already."""
    if executor not in EXECUTORS:
        raise InputError(f"--executor {executor!r}: expected one of {', '.join(EXECUTORS)}")
    if executor == "local":
        if gpus_per_task or cpus_per_task != 1.0:
            raise InputError("--gpus-per-task and --cpus-per-task apply to --executor ray")
        return Partition.of(shard_index, num_shards)
    if shard_index is not None:
        raise InputError("--shard-index is chosen by --executor ray for each task; give only --num-shards")
    argv = current_argv.get()
    if argv is None:
        raise InputError("--executor ray runs from the prmtool command line (prmtool.cli.main)")
    from prmtool.executors.ray import run_partitions_on_ray

    run_partitions_on_ray(argv, num_shards, gpus_per_task=gpus_per_task, cpus_per_task=cpus_per_task)
    return None

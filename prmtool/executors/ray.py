"""The Ray executor: a stage's partitions as Ray tasks (`--executor ray`).

Each task calls the stage the user ran, with the same inputs, output and settings, on its
partition (as `--shard-index i --num-shards n` would), in the driver's working directory.
Tasks share nothing but the file system, exactly like a Slurm array: every input and output
path must be on storage all nodes see (NFS, Lustre, a mounted bucket). The partition that
finishes last writes the output's `_SUCCESS` (prmtool/core/partition.py), so the driver only
waits and reports.

Cluster: `RAY_ADDRESS` or a cluster started with `ray start` on this machine, else a local one.
"""

from __future__ import annotations

import os
import time

from rich.console import Console

from prmtool.core.errors import InputError, StageError, exit_code_of
from prmtool.core.partition import Partition


def run_partition(
    stage_name: str,
    inputs: list,
    output,
    settings,
    overwrite: bool,
    index: int,
    count: int,
    working_directory: str,
    allow_incomplete: bool = False,
) -> tuple[int, str]:
    """Body of one Ray task: run partition `index` of `count` in-process, quietly (the driver
    reports for all tasks); returns the exit code the command line would give, and its message."""
    from prmtool.stages import stage

    os.chdir(working_directory)
    try:
        summary = stage(stage_name).run(
            inputs,
            output,
            settings,
            overwrite=overwrite,
            quiet=True,
            partition=Partition(index, count),
            allow_incomplete=allow_incomplete,
        )
    except BaseException as error:
        known = exit_code_of(error)
        return known if known is not None else (1, f"{type(error).__name__}: {error}")
    return 0, "", summary.rows_in, summary.rows_out


def default_task_count(gpus_per_task: float, cpus_per_task: float) -> int:
    import ray

    resources = ray.cluster_resources()
    if gpus_per_task:
        count = int(resources.get("GPU", 0) // gpus_per_task)
        if count < 1:
            raise InputError(f"--gpus-per-task {gpus_per_task}: the Ray cluster has {resources.get('GPU', 0):g} GPUs")
        return count
    return max(1, int(resources.get("CPU", 1) // cpus_per_task))


def connect():
    """The `ray` module, connected to its cluster; without Ray installed, an InputError."""
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'prmtool[ray]'") from None
    if not ray.is_initialized():
        # Without an address Ray joins RAY_ADDRESS's cluster, or one `ray start` began on this
        # machine, and otherwise starts a local one.
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or None,
            log_to_driver=False,
            logging_level="ERROR",
            include_dashboard=False,
        )
    return ray


def run_partitions_on_ray(
    stage,
    inputs: list,
    output,
    settings,
    overwrite: bool,
    num_shards: int | None,
    *,
    gpus_per_task: float = 0.0,
    cpus_per_task: float = 1.0,
    allow_incomplete: bool = False,
) -> None:
    """Run every partition of `stage` as a Ray task and wait for all of them."""
    ray = connect()  # first: without Ray installed, a one-line error
    count = num_shards or default_task_count(gpus_per_task, cpus_per_task)
    if count < 1:
        raise InputError(f"--num-shards {count}: must be at least 1")
    stderr = Console(stderr=True, highlight=False)
    remote = ray.remote(num_gpus=gpus_per_task, num_cpus=cpus_per_task, max_retries=0)(run_partition)
    start = time.perf_counter()
    allowed = {"allow_incomplete": True} if allow_incomplete else {}  # --allow-incomplete, when given
    pending = {
        remote.remote(stage.name, inputs, str(output), settings, overwrite, index, count, os.getcwd(), **allowed): index
        for index in range(count)
    }
    stderr.print(
        f"ray: {count} tasks ({gpus_per_task:g} GPU, {cpus_per_task:g} CPU each) on "
        f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs"
    )
    failures: list[str] = []
    codes: set[int] = set()
    rows = [0, 0]  # in, out, over the partitions that finished
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        try:
            code, message, *counts = ray.get(done[0])
        except ray.exceptions.RayError as error:  # its worker or node died: the partition is not done
            reason = " ".join(str(error).split())[:200]
            code, message, counts = 1, f"its Ray task died ({type(error).__name__}: {reason})", []
        if counts:
            rows = [total + count for total, count in zip(rows, counts)]
        if code == 0:
            stderr.print(f"ray: partition {index} of {count} done ({time.perf_counter() - start:.1f} s)")
        else:
            codes.add(code)
            failures.append(
                f"partition {index} of {count} exited {code}: {message.splitlines()[-1] if message else 'no message'}"
            )
    if failures and codes == {InputError.exit_code} and len(failures) == count:
        # Bad input or usage: every partition validates the whole input, so all say the same.
        raise InputError(failures[0].split(": ", 1)[1].removeprefix("error: "))
    if failures:
        # The partitions that finished stay finished: a rerun of the same command redoes only the rest.
        raise StageError("; ".join(failures) + "; rerun the same command to redo only the failed partitions")
    stderr.print(
        f"ray: all {count} partitions done in {time.perf_counter() - start:.1f} s; rows in {rows[0]:,}, "
        f"rows out {rows[1]:,}"
    )

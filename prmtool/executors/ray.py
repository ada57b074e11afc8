"""The Ray executor: a stage's partitions as Ray tasks (`--executor ray`).

Each task runs the very command line the user typed, with `--shard-index i --num-shards n`
in place of `--executor ray`, in the driver's working directory. Tasks share nothing but the
file system, exactly like a Slurm array: every input and output path must be on storage all
nodes see (NFS, Lustre, a mounted bucket). The partition that finishes last writes the
output's `_SUCCESS` (prmtool/core/partition.py), so the driver only waits and reports.

Cluster: `RAY_ADDRESS` or a cluster started with `ray start` on this machine, else a local one.
"""

from __future__ import annotations

import os
import time

from rich.console import Console

from prmtool.core.errors import InputError, StageError

# Options that only the driver reads: a task runs one partition locally.
DRIVER_ONLY = {
    "--executor": True,
    "--gpus-per-task": True,
    "--cpus-per-task": True,
    "--num-shards": True,
    "--shard-index": True,
}


def task_argv(argv: list[str], index: int, count: int) -> list[str]:
    """The command line of partition `index`: the user's, less the driver's options, plus the
    partition and --quiet (the driver reports for all tasks)."""
    kept: list[str] = []
    skip_value = False
    for token in argv:
        if skip_value:
            skip_value = False
            continue
        name, has_value, _ = token.partition("=")
        if name in DRIVER_ONLY:
            skip_value = not has_value
            continue
        kept.append(token)
    extra = ["--shard-index", str(index), "--num-shards", str(count)]
    if "--quiet" not in kept and "-q" not in kept:
        extra.append("--quiet")
    return kept + extra


def _run_partition(argv: list[str], working_directory: str) -> tuple[int, str]:
    """Body of one Ray task: run prmtool in-process and return its exit code and error text."""
    import contextlib
    import io

    from prmtool.cli import main

    os.chdir(working_directory)
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors):
        try:
            code = main(argv)
        except SystemExit as exc:  # pragma: no cover - main returns codes; belt and braces
            code = int(exc.code or 0)
        except BaseException as exc:  # an unexpected crash: report it instead of losing it
            code, errors = 1, io.StringIO(f"{type(exc).__name__}: {exc}")
    return code, errors.getvalue().strip()


def default_task_count(gpus_per_task: float, cpus_per_task: float) -> int:
    import ray

    resources = ray.cluster_resources()
    if gpus_per_task:
        count = int(resources.get("GPU", 0) // gpus_per_task)
        if count < 1:
            raise InputError(f"--gpus-per-task {gpus_per_task}: the Ray cluster has {resources.get('GPU', 0):g} GPUs")
        return count
    return max(1, int(resources.get("CPU", 1) // cpus_per_task))


def connect() -> None:
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


def run_partitions_on_ray(
    argv: list[str], num_shards: int | None, *, gpus_per_task: float = 0.0, cpus_per_task: float = 1.0
) -> None:
    """Run every partition of `argv`'s stage as a Ray task and wait for all of them."""
    import ray

    connect()
    count = num_shards or default_task_count(gpus_per_task, cpus_per_task)
    if count < 1:
        raise InputError(f"--num-shards {count}: must be at least 1")
    stderr = Console(stderr=True, highlight=False)
    remote = ray.remote(num_gpus=gpus_per_task, num_cpus=cpus_per_task, max_retries=0)(_run_partition)
    start = time.perf_counter()
    pending = {remote.remote(task_argv(argv, index, count), os.getcwd()): index for index in range(count)}
    stderr.print(
        f"ray: {count} tasks ({gpus_per_task:g} GPU, {cpus_per_task:g} CPU each) on "
        f"{ray.cluster_resources().get('CPU', 0):g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs"
    )
    failures: list[str] = []
    codes: set[int] = set()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        index = pending.pop(done[0])
        code, message = ray.get(done[0])
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
    stderr.print(f"ray: all {count} partitions done in {time.perf_counter() - start:.1f} s")

"""The settings every stage shares, declared once: each is an `Annotated` type whose
`typer.Option` carries the option's name, help and range, so a stage's settings dataclass
(prmtool/core/stage.py) gives both its Python fields and its command-line options."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable

import typer


def finite(value: float | None) -> float | None:
    """A float option's callback: NaN and infinity are not settings (click's ranges let NaN
    through where an option has no bound)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter("must be a finite number")
    return value


def positive(value: float | None) -> float | None:
    """A float option that must be finite and above 0 (a timeout, a scale)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter("must be a finite number above 0")
    return value


def template(value: str | None) -> str | None:
    """A --prompt-template must place the problem somewhere."""
    if value is not None and "{problem}" not in value:
        raise typer.BadParameter("must contain {problem}, where the problem text goes")
    return value


Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Parquet files, directories of them, or globs; - reads JSON lines of rows from standard input.",
        show_default=False,
    ),
]
Output = Annotated[Path, typer.Option("--output", "-o", help="Output directory: one shard per input shard, same name.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Recompute shards that are already complete.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, logs or summary on stderr.")]
AllowIncomplete = Annotated[
    bool,
    typer.Option(
        "--allow-incomplete",
        help=(
            "Read an input folder that a prmtool run wrote but did not complete (no _SUCCESS: killed, still "
            "running, or partitions missing), its shards as they are."
        ),
    ),
]
Workers = Annotated[
    int,
    typer.Option("--workers", help="Worker processes (default and most: the CPU count).", min=0, show_default=False),
]
Split = Annotated[
    str,
    typer.Option(
        "--split",
        help=(
            "How responses are cut into steps: blank-line, line, step-k, think (reasoning traces: thinking "
            "paragraphs merged into steps of --min-step-tokens) or regex:PATTERN."
        ),
    ),
]
ThinkTags = Annotated[
    str | None,
    typer.Option(
        "--think-tags",
        help=(
            "OPEN,CLOSE: the tags around a reasoning model's thinking (default: <think>,</think> and "
            "<|begin_of_thought|>,<|end_of_thought|> with <|begin_of_solution|>...<|end_of_solution|>)."
        ),
        show_default=False,
    ),
]
Steps = Annotated[
    str,
    typer.Option(
        "--steps",
        help="Which steps of a reasoning trace (see thinking_steps) this stage works on: thinking, solution or all.",
    ),
]
STEP_CHOICES = ("all", "thinking", "solution")


@dataclass(kw_only=True)
class TraceSettings:
    """How `--split think` cuts a reasoning trace (prmtool/methods/thinking.py)."""

    think_tags: ThinkTags = None
    min_step_tokens: Annotated[
        int,
        typer.Option(
            help="--split think: the fewest tokens (words and symbols) in a thinking step; paragraphs merge up to it.",
            min=1,
        ),
    ] = 200
    max_steps: Annotated[
        int,
        typer.Option(
            help=(
                "--split think: the most steps of a trace (at least 2 where a solution follows the thinking); the "
                "shortest neighbouring steps merge, the thinking's first."
            ),
            min=1,
        ),
    ] = 40
    thinking_opened: Annotated[
        bool,
        typer.Option(
            "--thinking-opened",
            help="--split think: responses start inside the thinking (its opening tag was in the prompt).",
        ),
    ] = False


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_count(requested: int, warn: Callable[[str], None] | None = None) -> int:
    """--workers as run: the CPU count for 0 (the default), and never more than the CPUs. The
    work is CPU-bound: a worker more only waits for a CPU, its comparisons run past their
    timeouts, and a thousand of them take minutes to start (each loads Math-Verify)."""
    cpus = default_workers()
    if not requested:
        return cpus
    if requested > cpus:
        if warn is not None:
            warn(f"--workers {requested}: capped at {cpus}, the CPUs this process may use")
        return cpus
    return requested


# Model options, shared by every stage that runs a model.
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="A local transformers model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct).",
        show_default=False,
    ),
]
EngineName = Annotated[
    str,
    typer.Option(
        "--engine",
        help=(
            "Model backend: hf (transformers), vllm, or auto: hf on CPU; on CUDA the faster of the two for the "
            "model's size and the prompts' length, as measured (prmtool/engines/choice.py), or vllm where only it "
            "runs the model. The choice and its reason are printed."
        ),
    ),
]
Device = Annotated[
    str | None, typer.Option("--device", help="cpu, cuda or cuda:N (default: cuda when available).", show_default=False)
]
TrustRemoteCode = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow a model folder's own Python code to run.")
]

# Scale-out options, shared by every pipeline stage (see prmtool/core/partition.py and executors/).
ShardIndex = Annotated[
    int | None,
    typer.Option(
        "--shard-index",
        help="Run only partition I of --num-shards (0-based): a Slurm array task, an xargs -P job.",
        min=0,
        show_default=False,
        rich_help_panel="Scale-out",
    ),
]
NumShards = Annotated[
    int | None,
    typer.Option(
        "--num-shards",
        help=(
            "Number of partitions of the input; with --executor ray, the number of Ray tasks (default: one per GPU, "
            "or per CPU, of the cluster)."
        ),
        min=1,
        show_default=False,
        rich_help_panel="Scale-out",
    ),
]
Executor = Annotated[
    str,
    typer.Option(
        "--executor",
        help="local (this process) or ray (one Ray task per partition, on RAY_ADDRESS's cluster or a local one).",
        rich_help_panel="Scale-out",
    ),
]
GpusPerTask = Annotated[
    float,
    typer.Option(
        "--gpus-per-task",
        help="With --executor ray: GPUs each task reserves.",
        min=0,
        callback=finite,
        rich_help_panel="Scale-out",
    ),
]
CpusPerTask = Annotated[
    float,
    typer.Option(
        "--cpus-per-task",
        help="With --executor ray: CPUs each task reserves.",
        callback=positive,
        rich_help_panel="Scale-out",
    ),
]


@dataclass(kw_only=True)
class ScaleOut:
    """The options that say where a stage's partitions run; every pipeline command ends with them."""

    shard_index: ShardIndex = None
    num_shards: NumShards = None
    executor: Executor = "local"
    gpus_per_task: GpusPerTask = 0.0
    cpus_per_task: CpusPerTask = 1.0


@dataclass(kw_only=True)
class ModelSettings:
    """The model a stage runs and where: shared by generate, label and intervene."""

    model: Model = None
    engine: EngineName = "auto"
    device: Device = None
    trust_remote_code: TrustRemoteCode = False


@dataclass(kw_only=True)
class WorkerSettings:
    """CPU worker processes (answer checking, step splitting)."""

    workers: Workers = 0

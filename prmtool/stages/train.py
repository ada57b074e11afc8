"""`prmtool train`: a process reward model trained on labelled rows, saved as the folder
`prmtool score --scorer token-classification --prm MODEL_DIR` reads.

What it trains on (the sequences, targets and packing) is `prmtool.methods.training`; the model
and the loop are `prmtool.engines.hf.training`. This module holds the settings, the checks,
and the output folder's life: resume from its checkpoint, the `_SUCCESS` manifest last.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from prmtool.core import outputs, shards
from prmtool.core.errors import InputError
from prmtool.core.options import Device, TrustRemoteCode, positive
from prmtool.core.partition import Partition
from prmtool.core.report import RunStats, Summary
from prmtool.core.schema import check_columns
from prmtool.core.stage import Stage
from prmtool.methods.training import STEP_SCOPES, TARGET_COLUMNS, TARGETS, TrainingConfig, build_examples

REQUIRED = ("problem", "steps")
RUN_RECORD = "_TRAINING.json"  # the run a checkpoint belongs to: a rerun resumes only that run
# Files in the model folder that others write and train leaves alone: the output lock, and the
# record `prmtool run` keeps of the stage's command.
NOT_OURS = {outputs.LOCK, "_RECIPE.json"}

EXAMPLES = """\b
Examples:
  prmtool train work/labeled -o work/prm --base ./Qwen2.5-Math-1.5B-Instruct --epochs 2
  prmtool train work/labeled -o work/prm-mc --target mc --lora-rank 16 --max-steps 500
  prmtool train work/labeled -o work/prm-outcome --target outcome     # baseline: outcome labels only
  prmtool train work/traces -o work/prm-solution --steps solution --max-length 8192
  accelerate launch -m prmtool train work/labeled -o work/prm --base ./Qwen2.5-1.5B   # every GPU here
  prmtool score data/processbench -o work/pb-scored --scorer token-classification --prm work/prm
"""

ModelDir = Annotated[
    Path, typer.Option("--output", "-o", help="The model folder to write (score --prm reads it).", show_default=False)
]


@dataclass(kw_only=True)
class TrainSettings:
    base: Annotated[
        str | None,
        typer.Option(
            "--base",
            "--model",
            "-m",
            help=(
                "The base model to fine-tune, a local transformers folder or .gguf file (default: the embedded "
                "SmolLM2-135M-Instruct); a fresh two-label head goes on top."
            ),
            show_default=False,
        ),
    ] = None
    target: Annotated[
        str,
        typer.Option(
            help=(
                "What a step is trained towards: label (step_labels, hard), mc (step_mc as the probability of a "
                "good step, soft) or outcome (the response's correct for every step: a baseline)."
            )
        ),
    ] = "label"
    steps: Annotated[
        str,
        typer.Option(
            "--steps",
            help=(
                "Which steps are trained on: all, thinking (the first thinking_steps of a reasoning trace) or "
                "solution (the others; all steps where there is no thinking_steps column)."
            ),
        ),
    ] = "all"
    skip_unsolved: Annotated[
        bool,
        typer.Option(
            "--skip-unsolved/--keep-unsolved",
            help=(
                "Leave out wrong responses whose labels rest on no right rollout (label_right_rollouts 0: the "
                "policy never solved the problem from any prefix, so no step is shown to be the error); "
                "--target outcome keeps them."
            ),
        ),
    ] = True
    step_separator: Annotated[
        str,
        typer.Option(
            help="The text after each step, whose last token is read (score's --step-separator).",
            show_default="\\n (a newline)",
        ),
    ] = "\n"
    max_length: Annotated[
        int,
        typer.Option(
            help="Tokens of a response kept; steps past it are not trained on (counted in the summary).", min=8
        ),
    ] = 2048
    epochs: Annotated[float, typer.Option(help="Passes over the data.", callback=positive)] = 1.0
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps to take, whatever --epochs says (0: save the base with its untrained head).",
            min=0,
            show_default=False,
        ),
    ] = None
    learning_rate: Annotated[
        float, typer.Option(help="Peak learning rate (AdamW, linear decay).", callback=positive)
    ] = 2e-5
    warmup_ratio: Annotated[
        float, typer.Option(help="Share of the steps the learning rate warms up over.", min=0, max=1)
    ] = 0.05
    batch_tokens: Annotated[
        int | None,
        typer.Option(
            help="Tokens per optimizer step and GPU, packed without padding (default 16384 on CUDA, 4096 on CPU).",
            min=8,
            show_default=False,
        ),
    ] = None
    pack_tokens: Annotated[
        int | None,
        typer.Option(
            help="Tokens per pack: sequences are packed into packs of at most this many tokens and a step takes "
            "--batch-tokens / --pack-tokens of them, in one forward pass (default: --max-length or --batch-tokens, "
            "the smaller).",
            min=8,
            show_default=False,
        ),
    ] = None
    lora_rank: Annotated[
        int, typer.Option(help="LoRA rank (peft) on every linear layer; 0 trains every weight.", min=0)
    ] = 0
    lora_alpha: Annotated[
        float | None, typer.Option(help="LoRA alpha (default: twice the rank).", callback=positive, show_default=False)
    ] = None
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute activations in the backward pass: less memory, about a third slower.")
    ] = True
    save_steps: Annotated[
        int, typer.Option(help="A resumable checkpoint every N optimizer steps (0: none).", min=0)
    ] = 200
    seed: Annotated[int, typer.Option(help="Seed of the head's initial weights and the data order.")] = 0
    device: Device = None
    trust_remote_code: TrustRemoteCode = False


def check_choices(settings: TrainSettings) -> None:
    if settings.target not in TARGETS:
        raise InputError(f"--target {settings.target!r}: expected one of {', '.join(TARGETS)}")
    if settings.steps not in STEP_SCOPES:
        raise InputError(f"--steps {settings.steps!r}: expected one of {', '.join(STEP_SCOPES)}")
    if settings.pack_tokens is not None and settings.pack_tokens < settings.max_length:
        raise InputError(f"--pack-tokens {settings.pack_tokens}: must be at least --max-length ({settings.max_length})")
    if settings.lora_alpha is not None and not settings.lora_rank:
        raise InputError("--lora-alpha needs --lora-rank")


def training_config(settings: TrainSettings) -> TrainingConfig:
    cuda = settings.device != "cpu" and _cuda_available(settings.device)
    batch_tokens = settings.batch_tokens or (16384 if cuda else 4096)
    pack_tokens = settings.pack_tokens or min(max(settings.max_length, 8), batch_tokens)
    return TrainingConfig(
        base=settings.base,
        learning_rate=settings.learning_rate,
        epochs=settings.epochs,
        max_steps=settings.max_steps,
        batch_tokens=max(batch_tokens, pack_tokens),
        pack_tokens=pack_tokens,
        warmup_ratio=settings.warmup_ratio,
        lora_rank=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        gradient_checkpointing=settings.gradient_checkpointing,
        seed=settings.seed,
        save_steps=settings.save_steps,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
    )


def _cuda_available(device: str | None) -> bool:
    if device is not None and device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.is_available()


def _check_shard(shard: shards.InputShard, settings: TrainSettings) -> None:
    needed = REQUIRED + (TARGET_COLUMNS[settings.target],)
    check_columns(shard.schema, str(shard.path), needed)
    if settings.steps == "thinking" and "thinking_steps" not in shard.schema:
        raise InputError(f"{shard.path}: --steps thinking needs a thinking_steps column (import writes it for traces)")


def run(
    inputs: list[str], output: Path, settings: TrainSettings, *, overwrite: bool, quiet: bool, partition: Partition
) -> Summary:
    """Fine-tune a process reward model on labelled rows: a token-classification head read at
    the last token of each step, as `score --scorer token-classification` reads it. Writes a
    model folder; reruns resume from its last checkpoint."""
    from prmtool.engines.hf import training as engine

    check_choices(settings)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun/accelerate, rank 0 writes
    stats = RunStats("train", quiet=quiet or not main_process)
    found = shards.open_inputs(inputs)
    for shard in found:
        _check_shard(shard, settings)
    shards.check_output_dir(output, found, inputs)
    config = training_config(settings)
    arguments = {
        name: getattr(config, name) for name in TrainingConfig.__dataclass_fields__ if name not in ("device",)
    } | {
        "target": settings.target,
        "steps": settings.steps,
        "step_separator": settings.step_separator,
        "skip_unsolved": settings.skip_unsolved,
    }
    arguments["max_length"] = settings.max_length
    sources = [s.describe() for s in found]
    identity = {"stage": "train", "arguments": arguments, "inputs": sources}

    with outputs.output_lock([output], outputs.run_key("train", arguments, sources)):
        manifest = shards.read_manifest(output)
        if manifest and not overwrite and {k: manifest.get(k) for k in identity} == identity:
            stats.log(f"{output} already holds this model (same inputs and options); --overwrite trains it again")
            return stats.finish()
        resume = not overwrite and engine.has_checkpoint(output) and _record(output) == identity
        if not resume:
            _check_replaceable(output, overwrite)

        tokenizer = engine.load_tokenizer(settings.base, settings.trust_remote_code)
        examples = []
        for shard in found:
            frame = shards.read_shard(shard)
            stats.rows_in += frame.height
            stats.problem_ids.update(frame["problem_id"].to_list() if "problem_id" in frame.columns else [])
            built, counts = build_examples(
                frame,
                tokenizer,
                target=settings.target,
                scope=settings.steps,
                separator=settings.step_separator,
                max_length=settings.max_length,
                source=str(shard.path),
                skip_unsolved=settings.skip_unsolved,
            )
            examples += built
            stats.counts.update(counts)
        where = ", ".join(inputs)
        if not examples and settings.max_steps != 0 and stats.counts["responses_unsolved_skipped"]:
            raise InputError(
                f"{where}: every response with a {settings.target} target is a wrong one whose labels rest on no "
                "right rollout: nothing to train on (--keep-unsolved trains on them anyway)"
            )
        if not examples and settings.max_steps != 0:
            raise InputError(
                f"{where}: no step has a {settings.target} target in --steps {settings.steps}: nothing to train on"
            )
        if stats.counts["responses_unsolved_skipped"]:
            stats.log(
                f"left out {stats.counts['responses_unsolved_skipped']:,} wrong responses whose labels rest on no "
                "right rollout (--keep-unsolved trains on them)"
            )
        if stats.counts["steps_truncated"]:
            stats.warn(
                f"{stats.counts['steps_truncated']:,} steps of {stats.counts['responses_truncated']:,} responses lie "
                f"past --max-length {settings.max_length} and are not trained on"
            )
        stats.rows_out = stats.counts["responses_trained"]

        found_before: set[str] = set()  # files here that this run did not write (a user's notes)

        def prepare_output() -> None:  # the main process, once the processes are up
            if not resume:
                _clear(output, engine.remove_checkpoint)
            output.mkdir(parents=True, exist_ok=True)
            found_before.update(_files(output))
            shards.write_json_atomic(identity, output / RUN_RECORD)

        stats.log(
            f"training on {len(examples):,} responses ({stats.counts['steps_trained']:,} steps)"
            + (" from the last checkpoint" if resume else "")
        )
        with stats.progress("train", None, unit="steps") as tracker:

            def on_step(report: engine.StepReport) -> None:
                tracker.set_total(report.total)
                tracker.describe(f"train (loss {report.loss:.4f})")
                tracker.advance(1, report.tokens)

            result = engine.train(examples, config, output, resume=resume, prepare=prepare_output, on_step=on_step)
        if main_process:
            engine.remove_checkpoint(output)
            (output / RUN_RECORD).unlink(missing_ok=True)
            # the model's files, each with its size and hash: all a later --overwrite removes
            written = [shards.file_entry(output, name) for name in sorted(_files(output) - found_before)]
            shards.write_json_atomic(
                {**identity, "training": result, "outputs": [], "also": written, "finished": _now()},
                output / shards.MANIFEST,
            )
    stats.counts["optimizer_steps"] = result["steps"]
    stats.counts["tokens_trained"] = result["tokens"]
    if result["seconds"] and result["tokens"]:
        stats.counts["tokens_per_second"] = round(result["tokens"] / result["seconds"])
    for key in ("first_loss", "last_loss"):
        if result[key] is not None:
            stats.counts[key] = round(result[key], 4)
    return stats.finish()


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _record(output: Path) -> dict | None:
    return shards.read_manifest(output, RUN_RECORD)


def _written_by_train(output: Path) -> bool:
    manifest = shards.read_manifest(output) or _record(output) or {}
    return manifest.get("stage") == "train"


def _check_replaceable(output: Path, overwrite: bool) -> None:
    """An output folder that holds anything but a lock is replaced only with --overwrite, and
    only if an earlier `prmtool train` wrote it."""
    if not output.exists() or not [p for p in output.iterdir() if p.name not in NOT_OURS]:
        return
    if not _written_by_train(output):
        raise InputError(f"{output}: holds files prmtool train did not write; choose another -o")
    if not overwrite:
        raise InputError(f"{output}: holds a model of a different run; pass --overwrite to replace it")


def _files(output: Path) -> set[str]:
    """The regular files under `output` (relative paths), less its lock files and records."""
    records = NOT_OURS | {RUN_RECORD, shards.MANIFEST}
    return {
        str(path.relative_to(output))
        for path in output.rglob("*")
        if path.is_file() and not path.is_symlink() and path.name not in records and not outputs.is_lock(path.name)
    }


def _clear(output: Path, remove_checkpoint) -> None:
    """Remove what an earlier train run here wrote (_check_replaceable made sure one did): the
    files its manifest lists, still as written, its checkpoint and its records. Anything else
    (a user's notes, another run's output, a link) stays; a model file of a run that was
    stopped before its manifest is written over by this run's."""
    if not output.exists():
        return
    for entry in shards.listed(shards.read_manifest(output) or {}):
        if shards.still_as_written(output / entry["file"], entry):
            (output / entry["file"]).unlink()
    remove_checkpoint(output)
    for name in (RUN_RECORD, shards.MANIFEST):
        (output / name).unlink(missing_ok=True)


STAGE = Stage(
    "train",
    TrainSettings,
    run,
    EXAMPLES,
    REQUIRED,
    output_option=ModelDir,
    check=check_choices,
    partitions=False,
    one_run_hint="for several GPUs: accelerate launch -m prmtool train ... or torchrun",
)

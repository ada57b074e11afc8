"""Training a token-classification PRM: the model `score --scorer token-classification` reads
(two labels, bad and good, softmax; TRL's PRMTrainer trained the same head).

A plain loop over packed rows, on `accelerate`: one process, or one per GPU under
`accelerate launch` / `torchrun` (accelerate's DistributedDataParallel and its data loader
sharding; nothing of the kind is written here). An optimizer step is one forward pass over
--batch-tokens tokens: its sequences back to back in one row, no padding, each sequence's
position ids from 0 and its bounds passed to the attention (varlen.py: torch's variable-length
flash kernel on CUDA, flash-attn's where it is installed), so no token sees another sequence
and each sequence's attention costs its own length squared. The loss is the
cross-entropy against each step's target probability (hard labels are 0 or 1), averaged over
the step's labelled tokens.

Measured on CPU (bench/bench_train.py --quick --trainer): this loop and transformers' Trainer
fed the very same packed rows run at the same speed within noise (1.08x and 0.93x in two runs);
README.md, "prmtool train", gives the numbers.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import AutoModelForTokenClassification, AutoTokenizer

from prmtool.engines.base import EngineError
from prmtool.engines.hf import varlen
from prmtool.engines.hf.gguf_cache import loadable
from prmtool.engines.hf.transfer import on_device
from prmtool.engines.model_files import locate_model
from prmtool.methods.training import Example, TrainingConfig, epoch_batches

LABELS = {0: "bad", 1: "good"}
CHECKPOINT = "checkpoint"  # inside the output folder, until the run finishes


def load_tokenizer(base: str | None, trust_remote_code: bool = False):
    location = locate_model(base)
    transformers.utils.logging.disable_progress_bar()
    try:
        files = loadable(location, torch.float32)  # a GGUF file's converted folder (see gguf_cache)
        kwargs = files.from_pretrained_kwargs(trust_remote_code)
        with contextlib.redirect_stderr(io.StringIO()):
            return AutoTokenizer.from_pretrained(files.folder, **kwargs)
    except (OSError, ValueError) as error:
        raise EngineError(f"cannot load the tokenizer of {location.path}: {_first_line(error)}") from error


def load_for_training(config: TrainingConfig):
    """The base model with a fresh two-label token-classification head, in float32 (bf16 runs
    under autocast, the weights and optimizer stay float32), LoRA-wrapped with --lora-rank."""
    location = locate_model(config.base)
    torch.manual_seed(config.seed)  # the head's initial weights
    attention = "flash_attention_2" if _flash_attention(config) else varlen.register()
    attention = os.environ.get("PRMTOOL_TRAIN_ATTENTION", attention)  # e.g. sdpa, to compare (bench_train)
    try:
        files = loadable(location, torch.float32)  # a GGUF file's converted folder (see gguf_cache)
        kwargs = files.from_pretrained_kwargs(config.trust_remote_code)
        with contextlib.redirect_stderr(io.StringIO()), _quiet_transformers():
            model = AutoModelForTokenClassification.from_pretrained(
                files.folder,
                num_labels=2,
                id2label=LABELS,
                label2id={v: k for k, v in LABELS.items()},
                dtype=torch.float32,
                attn_implementation=attention,
                **kwargs,
            )
    except (OSError, ValueError) as error:
        raise EngineError(
            f"cannot load {location.path} as a token-classification model: {_first_line(error)}"
        ) from error
    if files.gguf_file:  # dequantized on load: a plain float model, which save_pretrained writes
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    model.config.use_cache = False
    if config.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.2x's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora_rank:
        model = _with_lora(model, config)
    return model


@contextlib.contextmanager
def _quiet_transformers():
    """No load report: the fresh head and the dropped LM head are what training expects."""
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


def _with_lora(model, config: TrainingConfig):
    try:
        from peft import LoraConfig, TaskType, get_peft_model
    except ImportError:
        raise EngineError("--lora-rank needs peft: pip install 'prmtool[lora]' (or pip install peft)") from None
    heads = {"score", "classifier"}  # the head trains whole (peft's modules_to_save for TOKEN_CLS)
    linear = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    lora = LoraConfig(
        task_type=TaskType.TOKEN_CLS,
        r=config.lora_rank,
        lora_alpha=config.lora_alpha or 2 * config.lora_rank,
        target_modules=sorted(linear - heads),
        lora_dropout=0.0,
    )
    return get_peft_model(model, lora)


def _flash_attention(config: TrainingConfig) -> bool:
    if config.device == "cpu" or not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- batches


def collate(examples: list[Example], rows: list[list[int]]) -> dict:
    """A step's packed rows as one row of sequences back to back, no padding: input ids and
    position ids of shape (1, tokens), each sequence's bounds (`cu_seq_lens`, which the
    attention reads instead of a mask) and the (position, target) of every labelled token."""
    input_ids, position_ids, where, targets, bounds = [], [], [], [], [0]
    for index in (index for row in rows for index in row):
        example = examples[index]
        where += [len(input_ids) + p for p in example.positions]
        targets += example.targets
        input_ids += example.input_ids
        position_ids += range(len(example.input_ids))
        bounds.append(len(input_ids))
    return {
        "input_ids": torch.tensor([input_ids]),
        "position_ids": torch.tensor([position_ids]),
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
        "longest": max(b - a for a, b in zip(bounds, bounds[1:])),
        "where": torch.tensor(where),
        "targets": torch.tensor(targets, dtype=torch.float32),
        "tokens": len(input_ids),
    }


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of two-label logits against P(good) targets (0/1 for hard labels)."""
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return -(targets * log_probs[:, 1] + (1 - targets) * log_probs[:, 0]).sum()


def plan_steps(examples: list[Example], config: TrainingConfig) -> tuple[int, int]:
    """(optimizer steps of the run, rows per step): --max-steps, or --epochs of the first
    epoch's packing (later epochs pack within a row or two of it)."""
    rows_per_step = max(1, config.batch_tokens // config.pack_tokens)
    if config.max_steps is not None:
        return config.max_steps, rows_per_step
    rows = len(epoch_batches([len(e.input_ids) for e in examples], config.pack_tokens, config.seed, 0))
    return math.ceil(config.epochs * rows / rows_per_step / _world_size()), rows_per_step


def _world_size() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


# ---------------------------------------------------------------- the loop


@dataclass
class StepReport:
    step: int
    total: int
    loss: float
    tokens: int


def train(
    examples: list[Example],
    config: TrainingConfig,
    output: Path,
    *,
    resume: bool,
    prepare: Callable[[], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
) -> dict:
    """Train on `examples` and save the model (LoRA merged) and tokenizer to `output`. With
    `resume`, start from `output/checkpoint`. `prepare` runs in the main process once every
    process is up, before anything is written. Returns the run's numbers: steps, tokens,
    seconds, losses."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if config.device and config.device.startswith("cuda:"):
        torch.cuda.set_device(int(config.device.split(":")[1]))
    bf16 = config.bf16 if config.bf16 is not None else (config.device != "cpu" and torch.cuda.is_available())
    total_steps, rows_per_step = plan_steps(examples, config)
    _forget_earlier_accelerator_state()
    accelerator = Accelerator(
        cpu=config.device == "cpu",
        mixed_precision="bf16" if bf16 else "no",
        step_scheduler_with_optimizer=False,
    )
    if prepare is not None and accelerator.is_main_process:
        prepare()
    accelerator.wait_for_everyone()
    set_seed(config.seed)
    model = load_for_training(config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # fused on CUDA: one kernel for all parameters (transformers' Trainer's default optimizer too)
    fused = accelerator.device.type == "cuda"
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay, fused=fused)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    checkpoint = output / CHECKPOINT
    step = 0
    if resume:
        accelerator.load_state(str(checkpoint))
        step = json.loads((checkpoint / "progress.json").read_text())["step"]
    lengths = [len(e.input_ids) for e in examples]
    losses: list[float] = []
    tokens_done, started = 0, time.perf_counter()
    model.train()
    epoch, skipped = 0, 0
    unread = None  # (step, loss, tokens) of the last step, its loss still on the device
    while step < total_steps:
        rows = epoch_batches(lengths, config.pack_tokens, config.seed, epoch)
        # Its own generator: starting the loader's iterator would otherwise draw from the global
        # one, and a resumed run's dropout masks would differ from an uninterrupted run's.
        rows_generator = torch.Generator().manual_seed(config.seed + epoch)
        loader = accelerator.prepare_data_loader(
            torch.utils.data.DataLoader(rows, batch_size=1, collate_fn=lambda batch: batch[0], generator=rows_generator)
        )
        steps_in_epoch = math.ceil(len(loader) / rows_per_step)
        if skipped + steps_in_epoch <= step:  # a resumed run: this epoch was done before
            skipped += steps_in_epoch
            epoch += 1
            continue
        done_here = step - skipped
        if done_here:
            loader = accelerator.skip_first_batches(loader, done_here * rows_per_step)
        rows_left = iter(loader)
        while step < total_steps and (step_rows := list(itertools.islice(rows_left, rows_per_step))):
            loss, tokens = _optimizer_step(model, optimizer, scheduler, accelerator, examples, step_rows)
            step += 1
            tokens_done += tokens
            # A step's loss is read (a wait for the device) once the next step is queued.
            _report(unread, total_steps, losses, on_step, accelerator)
            unread = (step, loss, tokens)
            if config.save_steps and step % config.save_steps == 0 and step < total_steps:
                _save_checkpoint(accelerator, checkpoint, step)
        skipped += steps_in_epoch
        epoch += 1
        if not len(loader):
            break  # no examples at all: nothing to train on
    _report(unread, total_steps, losses, on_step, accelerator)
    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_model(accelerator.unwrap_model(model), output, config)
    return {
        "steps": step,
        "epochs_started": epoch,
        "tokens": tokens_done,
        "seconds": seconds,
        "first_loss": losses[0] if losses else None,
        "last_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }


def _report(unread: tuple[int, torch.Tensor, int] | None, total: int, losses: list[float], on_step, accelerator):
    if unread is None:
        return
    step, loss, tokens = unread
    losses.append(loss.item())
    if on_step is not None and accelerator.is_main_process:
        on_step(StepReport(step, total, losses[-1], tokens))


def packed_loss(model, batch: dict, device: torch.device) -> torch.Tensor:
    """The mean loss over the labelled tokens of a `collate`d batch, in one forward pass (its
    tensors reach the GPU through pinned memory: the host builds the next step meanwhile)."""
    bounds = on_device(batch["cu_seq_lens"], device)
    logits = model(
        input_ids=on_device(batch["input_ids"], device),
        position_ids=on_device(batch["position_ids"], device),
        # each sequence's bounds, read by the attention (varlen.py; flash-attn's names)
        cu_seq_lens_q=bounds,
        cu_seq_lens_k=bounds,
        max_length_q=batch["longest"],
        max_length_k=batch["longest"],
        use_cache=False,
    ).logits
    targets = on_device(batch["targets"], device)
    return soft_cross_entropy(logits[0, on_device(batch["where"], device)], targets) / len(targets)


def _optimizer_step(model, optimizer, scheduler, accelerator, examples, rows) -> tuple[torch.Tensor, int]:
    """One optimizer step over `rows` (lists of example indices), one forward pass; the loss
    is the mean over the step's labelled tokens. Returns it (on the device) and the tokens trained on."""
    batch = collate(examples, rows)
    loss = packed_loss(model, batch, accelerator.device)
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss.detach(), batch["tokens"]


def _save_checkpoint(accelerator, checkpoint: Path, step: int) -> None:
    """The model, optimizer, scheduler and random states, written beside the previous
    checkpoint and swapped in when whole: an interrupted save leaves the previous one."""
    partial = checkpoint.with_name(CHECKPOINT + ".partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / "progress.json").write_text(json.dumps({"step": step}))
        if checkpoint.exists():
            shutil.rmtree(checkpoint)
        partial.rename(checkpoint)
    accelerator.wait_for_everyone()


def _save_model(model, output: Path, config: TrainingConfig) -> None:
    """The folder `score --prm` loads: LoRA merged into the weights, and the base's tokenizer."""
    if config.lora_rank:
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(output)
    load_tokenizer(config.base, config.trust_remote_code).save_pretrained(output)


def has_checkpoint(output: Path) -> bool:
    return (output / CHECKPOINT / "progress.json").is_file()


def remove_checkpoint(output: Path) -> None:
    shutil.rmtree(output / CHECKPOINT, ignore_errors=True)


def _forget_earlier_accelerator_state() -> None:
    """accelerate keeps one state per process: an earlier Trainer in this process (another
    library's, or a train with other settings) would make Accelerator refuse this run's
    precision. A single process starts afresh; a launched group (torchrun) is left as it is."""

    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and AcceleratorState._shared_state:
        AcceleratorState._reset_state(reset_partial_state=True)

"""What `prmtool train` trains on: each labelled response as one token sequence, the steps'
targets at the tokens a token-classification PRM is read at, and those sequences packed into
batches without padding.

The sequence is `score --scorer token-classification`'s own (`classifier_inputs`: [BOS] +
problem + each step followed by the step separator, as TRL's PRMTrainer built it), so a model
is trained exactly where it is later read. A step's target is the probability that it is good:
- `label`: `step_labels` (1 good, 0 bad; null, a step after a first error that binary search
  left unlabelled, is not trained on),
- `mc`: `step_mc`, the share of rollouts from the step's prefix that reached the answer (a soft
  label; Math-Shepherd's hard label is `step_mc > 0`),
- `outcome`: the response's `correct` for every step (a baseline: outcome supervision only).
`--steps thinking|solution|all` keeps the targets of the thinking steps (the first
`thinking_steps` of a reasoning trace), of the others, or of all; without a `thinking_steps`
column every step is a solution step. The sequence ends at the last step that has a target:
later tokens cannot change what a causal model reads before them.

Unsolved rows: a wrong response whose `label_right_rollouts` is 0 drew no right rollout from any
prefix (the policy never solved the problem), so its step labels and MC say nothing about which
step went wrong (the drop rule reads them as "no drop": every step good but the last).
`skip_unsolved` (the default for `label` and `mc`) leaves them out, as OmegaPRM screens out
questions its policy never solves; `outcome` targets do not rest on rollouts and keep them.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import polars as pl

from prmtool.core.errors import InputError
from prmtool.methods.rollouts import rests_on_no_right_rollout
from prmtool.methods.step_rewards import classifier_inputs

TARGETS = ("label", "mc", "outcome")
STEP_SCOPES = ("all", "thinking", "solution")
TARGET_COLUMNS = {"label": "step_labels", "mc": "step_mc", "outcome": "correct"}


@dataclass(frozen=True)
class Example:
    """One response as the model sees it: its tokens and, at each labelled position, the
    probability that the step ending there is good."""

    input_ids: list[int]
    positions: list[int]
    targets: list[float]


def step_targets(row: dict, target: str) -> list[float | None]:
    """Each step's target probability, None where the step has none."""
    count = len(row["steps"] or [])
    if target == "outcome":
        correct = row.get("correct")
        return [None if correct is None else float(correct)] * count
    values = row[TARGET_COLUMNS[target]]
    if values is None:
        return [None] * count
    if len(values) != count:
        raise ValueError(f"{len(values)} {TARGET_COLUMNS[target]} for {count} steps")
    targets = [None if v is None else float(v) for v in values]
    if any(t is not None and not 0.0 <= t <= 1.0 for t in targets):
        raise ValueError(f"{TARGET_COLUMNS[target]} holds a value outside [0, 1]")
    return targets


def in_scope(targets: list[float | None], thinking_steps: int | None, scope: str) -> list[float | None]:
    """The targets of the steps `--steps` trains on; the others become None."""
    thinking = min(thinking_steps or 0, len(targets))
    if scope == "thinking":
        return [t if i < thinking else None for i, t in enumerate(targets)]
    if scope == "solution":
        return [t if i >= thinking else None for i, t in enumerate(targets)]
    return targets


def unsolved(row: dict) -> bool:
    """A wrong response whose labels rest on no right rollout (see the module's docstring)."""
    return rests_on_no_right_rollout(row.get("correct"), row.get("label_right_rollouts"))


def build_examples(
    frame: pl.DataFrame,
    tokenizer,
    *,
    target: str,
    scope: str,
    separator: str,
    max_length: int,
    source: str = "",
    skip_unsolved: bool = True,
) -> tuple[list[Example], Counter]:
    """The examples of a frame's rows, and counts: responses used and skipped (no target,
    unsolved), steps trained, and steps cut off by --max-length (with the responses that lost some)."""
    counts: Counter = Counter()
    examples = []
    has_thinking = "thinking_steps" in frame.columns
    for index, row in enumerate(frame.iter_rows(named=True)):
        if skip_unsolved and target != "outcome" and unsolved(row):
            counts["responses_unsolved_skipped"] += 1
            continue
        try:
            targets = in_scope(step_targets(row, target), row["thinking_steps"] if has_thinking else None, scope)
        except ValueError as error:
            raise InputError(f"{source}: row {index}: {error}") from None
        last = max((i for i, t in enumerate(targets) if t is not None), default=-1)
        if last < 0:
            counts["responses_without_targets"] += 1
            continue
        # Only the steps up to the last target: the sequence is what score reads for them.
        input_ids, positions = classifier_inputs(tokenizer, row["problem"], row["steps"][: last + 1], separator)
        kept = [(p, t) for p, t in zip(positions, targets) if t is not None]
        fits = [(p, t) for p, t in kept if p < max_length]
        if len(fits) < len(kept):
            counts["steps_truncated"] += len(kept) - len(fits)
            counts["responses_truncated"] += 1
        if not fits:
            continue
        counts["responses_trained"] += 1
        counts["steps_trained"] += len(fits)
        examples.append(
            Example(input_ids[: fits[-1][0] + 1], [p for p, _ in fits], [t for _, t in fits])  # nothing after it
        )
    return examples, counts


def pack(lengths: list[int], max_tokens: int, order: list[int]) -> list[list[int]]:
    """Sequences taken in `order`, packed into batches of at most `max_tokens` tokens, each
    batch one row with no padding. A sequence goes into the first open batch with room for it
    (first fit over the last few batches), so batches stay full without sorting by length,
    which would give every batch sequences of one length and the loss a trend over an epoch."""
    batches: list[list[int]] = []
    room: list[int] = []
    window = 8  # open batches searched: keeps packing linear and the order nearly as given
    for index in order:
        length = min(lengths[index], max_tokens)
        start = max(0, len(batches) - window)
        for b in range(start, len(batches)):
            if room[b] >= length:
                batches[b].append(index)
                room[b] -= length
                break
        else:
            batches.append([index])
            room.append(max_tokens - length)
    return batches


def epoch_batches(lengths: list[int], max_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches: the sequences shuffled by (seed, epoch), then packed. The same
    seed and epoch always give the same batches, so a resumed run skips exactly those done."""
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return pack(lengths, max_tokens, order)


@dataclass(frozen=True)
class TrainingConfig:
    """How the engine trains (`prmtool train`'s options, less what picks the examples)."""

    base: str | None  # the base model: a folder or .gguf; None: the embedded model
    learning_rate: float = 5e-5
    epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_tokens: int = 16384  # tokens per optimizer step and process, packed
    pack_tokens: int = 4096  # tokens per packed row; a step takes batch_tokens // pack_tokens rows
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float | None = None  # default: 2 x rank
    gradient_checkpointing: bool = True
    bf16: bool | None = None  # None: on CUDA
    seed: int = 0
    save_steps: int = 200  # a resumable checkpoint every N optimizer steps (0: never)
    device: str | None = None
    trust_remote_code: bool = False

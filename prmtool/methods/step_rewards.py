"""Process rewards for every step of a response, as `prmtool score` computes them.

Two scorers (docs/algorithms.md, "Implicit PRM scoring"):
- `implicit` (default): an implicit PRM. Token reward r_t = beta * (log pi(y_t | y_<t) -
  log pi_ref(y_t | y_<t)) over the response tokens, q_t = r_1 + ... + r_t. A step's value
  (`step_values`, "cumulative") is q at its last token; its reward (`step_rewards`, "single")
  is that minus the previous step's value, so the rewards of a response sum to its last value.
  With --no-ref, log pi_ref is taken as 0: the reward is beta * log pi alone.
- `token-classification`: a PRM trained by TRL's PRMTrainer. The input is tokenized as the
  trainer does ([BOS] + problem + each step followed by the step separator) and P(good) is read
  at the last token of each step's separator. That probability is both the step's reward and
  its value (it judges the prefix ending at the step).

`prm_score` is --agg (min, sum, mean or last) over --reward (single: step_rewards, cumulative:
step_values); null for a response with no steps.

Step boundaries come from the tokenizer's offset mapping of the whole response, tokenized as
the policy continues the chat-templated problem; prefixes are never re-tokenized. A step owns
the separator after it, and a token that straddles two steps belongs to the step it starts in.
"""

from __future__ import annotations

import bisect
import collections
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from prmtool.core.errors import InputError

if TYPE_CHECKING:
    from prmtool.core.report import Tracker
    from prmtool.engines import Engine
    from prmtool.engines.hf.classifier import StepClassifier


SCORERS = ("implicit", "token-classification")
REWARDS = ("single", "cumulative")
AGGREGATIONS = ("min", "sum", "mean", "last")


@dataclass(frozen=True)
class ScoringConfig:
    beta: float = 0.001
    reward: str = "single"  # which per-step list prm_score aggregates
    agg: str = "min"
    token_rewards: bool = False
    system_prompt: str | None = None
    prompt_template: str | None = None  # the user message generate used; None = the raw problem
    step_separator: str = "\n"  # token-classification: PRMTrainer's step_separator
    # Padded tokens per forward pass; both models see a batch in turn. None: the engine's own.
    max_batch_tokens: int | None = None


# ---------------------------------------------------------------- step boundaries


def step_char_ends(response: str, steps: list[str]) -> list[int]:
    """Where each step's region ends in `response`: the start of the next step (so a step owns
    the separator after it), and the end of the response for the last one. Raises ValueError
    when the steps are not the response's pieces in order."""
    starts, cursor = [], 0
    for step in steps:
        found = response.find(step, cursor)
        if found < 0 or (starts and response[cursor:found].strip()):
            raise ValueError("steps are not pieces of the response in order")
        starts.append(found)
        cursor = found + len(step)
    if response[cursor:].strip() or (starts and response[: starts[0]].strip()):
        raise ValueError("steps do not cover the response")
    return starts[1:] + [len(response)] if steps else []


def step_end_tokens(token_starts: list[int], char_ends: list[int]) -> list[int]:
    """Index of each step's last token: the last token that starts before the step's region ends.
    `token_starts` are offset-mapping starts; byte-level tokenizers give the pieces of one
    character the same start, and the running maximum keeps them ordered."""
    ordered = np.maximum.accumulate(np.asarray(token_starts, dtype=np.int64)) if token_starts else np.empty(0, np.int64)
    return [bisect.bisect_left(ordered, end) - 1 for end in char_ends]


def tokenize_responses(tokenizer, responses: list[str]) -> tuple[list[list[int]], list]:
    """Token ids of each response as the policy would produce them after the prompt (encoded
    alone, no special tokens: `Engine.continuation_ids`), and each response's Rust `Encoding`,
    whose `offsets` give the tokens' start offsets. The offsets are read per row later, while
    the device scores: turning them all into Python lists up front costs more than tokenizing."""
    if not getattr(tokenizer, "is_fast", False):
        raise InputError("score needs a fast (Rust) tokenizer for offset mappings; this model's tokenizer is not one")
    backend = tokenizer.backend_tokenizer
    # What tokenizer(responses) does before encoding: no truncation, no padding.
    backend.no_truncation()
    backend.no_padding()
    encodings = backend.encode_batch(responses, add_special_tokens=False)
    return [encoding.ids for encoding in encodings], encodings


def token_starts(encoding) -> list[int]:
    """Each token's start offset in its response (an offset mapping's starts)."""
    return [start for start, _ in encoding.offsets]


# ---------------------------------------------------------------- rewards


def step_rewards_from_tokens(token_rewards: np.ndarray, step_ends: list[int]) -> tuple[list[float], list[float]]:
    """(single rewards, cumulative values) of the steps ending at `step_ends`."""
    q = np.cumsum(token_rewards, dtype=np.float64)
    values = [float(q[end]) if end >= 0 else 0.0 for end in step_ends]
    rewards = np.diff(np.asarray(values, dtype=np.float64), prepend=0.0).tolist() if values else []
    return rewards, values


def aggregate(values: list[float], agg: str) -> float | None:
    if not values:
        return None
    if agg == "min":
        return min(values)
    if agg == "sum":
        return float(np.sum(values))
    if agg == "mean":
        return float(np.mean(values))
    return values[-1]


def check_same_tokenizer(policy_tokenizer, ref_tokenizer) -> None:
    """Token rewards compare the two models' log-probabilities of the same token ids."""
    policy_vocab, ref_vocab = policy_tokenizer.get_vocab(), ref_tokenizer.get_vocab()
    if policy_vocab != ref_vocab:
        differing = sorted(set(policy_vocab.items()) ^ set(ref_vocab.items()), key=str)[:3]
        raise InputError(
            f"policy and reference tokenizers differ ({len(policy_vocab)} vs {len(ref_vocab)} tokens; e.g. "
            f"{', '.join(repr(t) for t, _ in differing)}): implicit PRM rewards need one shared tokenizer"
        )


def _result_columns(
    frame: pl.DataFrame,
    rewards: list[list[float]],
    values: list[list[float]],
    settings: ScoringConfig,
    tokens: list[list[float]] | None,
) -> pl.DataFrame:
    chosen = rewards if settings.reward == "single" else values
    columns = [
        pl.Series("step_rewards", rewards, dtype=pl.List(pl.Float64)),
        pl.Series("step_values", values, dtype=pl.List(pl.Float64)),
        pl.Series("prm_score", [aggregate(v, settings.agg) for v in chosen], dtype=pl.Float64),
    ]
    if tokens is not None:
        columns.append(pl.Series("token_rewards", tokens, dtype=pl.List(pl.Float64)))
    return frame.with_columns(columns)


def score_implicit(
    frame: pl.DataFrame, policy: Engine, ref: Engine | None, settings: ScoringConfig, tracker: Tracker | None = None
) -> pl.DataFrame:
    """Adds step_rewards, step_values, prm_score (and token_rewards) from an implicit PRM.
    `ref=None` scores with the policy's log-probabilities alone."""
    from prmtool.engines import ScoringRequest
    from prmtool.engines.base import length_batches

    responses, steps = frame["response"].to_list(), frame["steps"].to_list()
    response_ids, encodings = tokenize_responses(policy.tokenizer, responses)
    prompts: dict[str, list[int]] = {}  # one chat-templated prompt per problem
    requests = []
    for problem, ids in zip(frame["problem"].to_list(), response_ids):
        if problem not in prompts:
            prompts[problem] = policy.chat_prompt_ids(problem, settings.system_prompt, settings.prompt_template)
        requests.append(ScoringRequest(prompts[problem], ids))

    lengths = [len(r.prompt_ids) + len(r.continuation_ids) for r in requests]
    budget = settings.max_batch_tokens or getattr(policy, "max_batch_tokens", 16384)
    rewards: list[list[float]] = [[] for _ in requests]
    values: list[list[float]] = [[] for _ in requests]
    tokens: list[list[float]] = [[] for _ in requests]

    def collect(batch: list[int], policy_wait, ref_wait) -> None:
        # Turns a finished batch into its rows' columns while the device runs the next ones.
        ref_results = ref_wait() if ref_wait is not None else [[0.0]] * len(batch)  # --no-ref: log pi_ref = 0
        for row, policy_part, ref_part in zip(batch, policy_wait(), ref_results):
            ends = step_end_tokens(token_starts(encodings[row]), step_char_ends(responses[row], steps[row]))
            token_rewards = settings.beta * (
                np.asarray(policy_part, dtype=np.float64) - np.asarray(ref_part, dtype=np.float64)
            )
            rewards[row], values[row] = step_rewards_from_tokens(token_rewards, ends)
            if settings.token_rewards:
                tokens[row] = token_rewards.tolist()
        if tracker is not None:
            tracker.advance(len(batch), sum(lengths[i] for i in batch))

    # Both models score a batch before the next one is built, so each batch is read once. Two
    # batches stay queued ahead of the one being read back, so the device never waits for the
    # host to launch work.
    in_flight: collections.deque = collections.deque()
    for batch in length_batches(lengths, budget):
        batch_requests = [requests[i] for i in batch]
        in_flight.append(
            (batch, policy.score_async(batch_requests), ref.score_async(batch_requests) if ref is not None else None)
        )
        if len(in_flight) > 2:
            collect(*in_flight.popleft())
    while in_flight:
        collect(*in_flight.popleft())
    return _result_columns(frame, rewards, values, settings, tokens if settings.token_rewards else None)


def classifier_inputs(tokenizer, problem: str, steps: list[str], separator: str) -> tuple[list[int], list[int]]:
    """Token ids as TRL's PRMTrainer builds them, and the position of each step's label: the
    last token of the step followed by the separator."""
    ids = tokenizer.encode(problem, add_special_tokens=False)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    separator_ids = tokenizer.encode(separator, add_special_tokens=False)
    positions = []
    for step in steps:
        ids = ids + tokenizer.encode(step, add_special_tokens=False) + separator_ids
        positions.append(len(ids) - 1)
    return ids, positions


def score_with_classifier(
    frame: pl.DataFrame, classifier: StepClassifier, settings: ScoringConfig, tracker: Tracker | None = None
) -> pl.DataFrame:
    """Adds step_rewards and step_values (both P(good) of each step) and prm_score."""
    inputs = [
        classifier_inputs(classifier.tokenizer, problem, row_steps, settings.step_separator)
        for problem, row_steps in zip(frame["problem"].to_list(), frame["steps"].to_list())
    ]
    probabilities = classifier.step_probabilities([ids for ids, _ in inputs], [positions for _, positions in inputs])
    if tracker is not None:
        tracker.advance(frame.height, sum(len(ids) for ids, _ in inputs))
    return _result_columns(frame, probabilities, probabilities, settings, None)

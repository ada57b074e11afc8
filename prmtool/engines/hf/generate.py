"""Batched sampling for the hf engine: a pool of decode slots over one preallocated KV cache.

How one `HFEngine.sample` call runs:

* Every request is split into sample groups (its n samples, in chunks no larger than the pool).
  Groups are queued longest first (prompt + max_tokens), so prompts prefilled together have
  similar lengths (little padding) and the longest generations start early (short tail).
* Groups are admitted into free slots: a group's prompt is prefilled ONCE, in a right-padded
  batch with the other admitted prompts, and the prompt's keys and values are copied into each
  of the group's slots (the n samples share the prefill). A group with more samples than free
  slots is split: those that fit start now, the rest stay first in line (no slot idles while
  work waits).
* Each decode step runs the model on one token per slot. Slot `s` keeps its keys and values in
  row `s` of a static cache, at positions 0 .. end[s]; the new token is written at end[s] and the
  attention mask admits positions <= end[s]. Slots are independent, so a finished slot (EOS, stop
  string, max_tokens) is refilled with a new sample while the others keep decoding.
* Attention reads only as many cache positions as the longest active sequence needs (rounded
  up to a multiple of 256), not the whole cache row.
* On CUDA the decode step is captured as a CUDA graph (one per attention width) and replayed:
  the static cache and input buffers never move, which removes the per-step Python and
  kernel-launch overhead of the transformers forward.
* The host never waits for the step it just queued: it reads step t-1's tokens (finishing
  samples, refilling slots) while the device computes step t.
* Sampling draws one uniform number per token from a stream seeded by (request seed, sample
  index) and inverts the CDF of the next-token distribution, so a sample depends on its own
  seed only, not on what else shares the batch (up to floating-point differences of batched
  kernels).
"""

from __future__ import annotations

import functools
import inspect
import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from prmtool.engines.base import Completion, ProgressCallback, SamplingRequest, first_stop_index

ATTENTION_WIDTH_STEP = 256


@dataclass
class GenerationStats:
    """What one sample() call did; read by tests and the benchmark."""

    prefill_forwards: int = 0  # forward passes over prompts
    prefilled_prompts: int = 0  # prompts run through those passes (one per admitted group)
    decode_steps: int = 0
    generated_tokens: int = 0
    num_slots: int = 0
    cache_length: int = 0
    cuda_graph: bool = False


class SlotLayer(CacheLayerMixin):
    """One layer's keys and values for all decode slots: [slots, kv_heads, max_len, head_dim].

    `update` writes the single new token of each slot at that slot's own position and returns the
    whole buffer; the 4D attention mask built by the decoder hides positions a slot has not reached.
    """

    is_sliding = False
    is_compileable = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, write_position: torch.Tensor, width: list[int]):
        super().__init__()
        self.keys, self.values = keys, values
        # width[0]: how many cache positions attention reads this step (shared by all layers).
        self.width = width
        slots, heads, _, _ = keys.shape
        # Views of the decoder's position buffer, shaped for scatter_ along the sequence axis.
        self.key_index = write_position.view(slots, 1, 1, 1).expand(slots, heads, 1, keys.shape[-1])
        self.value_index = write_position.view(slots, 1, 1, 1).expand(slots, heads, 1, values.shape[-1])
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the buffers exist from the start

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.scatter_(2, self.key_index, key_states)
        self.values.scatter_(2, self.value_index, value_states)
        width = self.width[0]
        return self.keys[:, :, :width], self.values[:, :, :width]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.width[0], 0

    def get_seq_length(self, *args) -> int:
        return self.keys.shape[2]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


def slot_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of each slot's one new token over that slot's cache row.

    query [slots, heads, 1, head_dim]; key, value [slots, kv_heads, max_len, head_dim]; the mask
    [slots, 1, 1, max_len] admits the positions each slot has filled. With grouped-query
    attention, the query heads that share a KV head become that head's queries, so the cache is
    read once per KV head. (transformers' own sdpa path copies the keys and values once per
    query head in some versions: 7x the memory traffic on Qwen2.5.)
    """
    slots, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.view(slots, kv_heads, heads // kv_heads, head_dim)
    output = torch.nn.functional.scaled_dot_product_attention(
        grouped, key, value, attn_mask=attention_mask, scale=scaling
    )
    return output.reshape(slots, heads, 1, value.shape[-1]).transpose(1, 2), None


SLOT_DECODE_ATTENTION = "prmtool_slot_decode"
AttentionInterface.register(SLOT_DECODE_ATTENTION, slot_decode_attention)


@contextmanager
def attention_implementation(config, name: str):
    """Route the model's attention layers to `name` for the calls made inside the block."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@functools.cache
def _forward_takes_cache(model_class: type) -> bool:
    return "cache" in inspect.signature(model_class.forward).parameters


def cache_keyword(backbone: torch.nn.Module) -> str:
    """The forward's name for the KV cache: transformers 5.25 renamed `past_key_values` to
    `cache` (the old name still works there, with a FutureWarning on every call)."""
    return "cache" if _forward_takes_cache(type(backbone)) else "past_key_values"


def kv_heads_and_dim(config) -> tuple[int, int]:
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return heads, head_dim


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of keys plus values that one token occupies over all layers."""
    heads, head_dim = kv_heads_and_dim(config)
    return 2 * config.num_hidden_layers * heads * head_dim * torch.finfo(dtype).bits // 8


def sample_from_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    any_top_p: bool,
    any_greedy: bool,
) -> torch.Tensor:
    """Next token per row: inverse-CDF sampling with the row's own uniform number in (0, 1].

    Rows with top_p == 1 invert the CDF in vocabulary order; rows with top_p < 1 keep the
    smallest set of most probable tokens whose mass reaches top_p (vLLM's rule) and invert the
    CDF over that set, sorted by probability. Rows with temperature 0 take the argmax.
    `any_top_p` / `any_greedy` are known on the host and skip work no row needs.
    """
    vocab = logits.shape[-1]
    probs = torch.softmax(logits / temperature.clamp_min(1e-5).unsqueeze(1), dim=-1)
    cdf = probs.cumsum(dim=-1)
    # The token is the first whose cumulative probability reaches u * total. Scaling by the total
    # absorbs rounding in the cumulative sum, and u > 0 never lands on a zero-probability token.
    target = uniform.unsqueeze(1) * cdf[:, -1:]
    tokens = torch.searchsorted(cdf, target).squeeze(1).clamp_max(vocab - 1)
    if any_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p.unsqueeze(1), 0.0)
        sorted_cdf = sorted_probs.cumsum(dim=-1)
        position = torch.searchsorted(sorted_cdf, uniform.unsqueeze(1) * sorted_cdf[:, -1:])
        nucleus_tokens = order.gather(1, position.clamp_max(vocab - 1)).squeeze(1)
        tokens = torch.where(top_p < 1.0, nucleus_tokens, tokens)
    if any_greedy:
        tokens = torch.where(temperature <= 0.0, logits.argmax(dim=-1), tokens)
    return tokens


def sample_uniforms(seed: int, sample_index: int, count: int) -> np.ndarray:
    """The uniform numbers in (0, 1] that drive one sample's tokens, a stream per (seed, index)."""
    return 1.0 - np.random.default_rng([seed % 2**64, sample_index]).random(count)


@dataclass
class SampleGroup:
    """Samples of one request that are prefilled together and then decode in their own slots."""

    request_index: int
    sample_indices: list[int]
    seed: int


@dataclass
class SlotState:
    """Host-side record of the sample a slot is decoding."""

    request_index: int
    sample_index: int
    request: SamplingRequest
    token_ids: list[int] = field(default_factory=list)


@dataclass
class LaunchedStep:
    """A decode step queued on the device: who was decoding, and where its tokens will land."""

    states: list[tuple[int, SlotState]]  # (slot, the sample it was decoding)
    host_tokens: torch.Tensor  # pinned on CUDA, so the copy overlaps the next step
    done: torch.cuda.Event | None  # recorded after the copy; None on CPU (already complete)


@dataclass(frozen=True)
class ModelParts:
    """What the decoder needs from the model: the backbone (hidden states) and the logits head."""

    backbone: torch.nn.Module
    logits_from_hidden: Callable[[torch.Tensor], torch.Tensor]
    config: object
    device: torch.device
    dtype: torch.dtype


class SlotDecoder:
    """Static decode buffers for `num_slots` sequences of up to `max_len` tokens, reusable across calls."""

    def __init__(self, parts: ModelParts, num_slots: int, max_len: int, max_tokens: int, use_cuda_graph: bool):
        started = time.perf_counter()
        self.parts = parts
        self.num_slots, self.max_len, self.max_tokens = num_slots, max_len, max_tokens
        device, config = parts.device, parts.config
        kv_heads, head_dim = kv_heads_and_dim(config)
        shape = (num_slots, kv_heads, max_len, head_dim)
        # end[s]: where slot s writes its next token's keys and values = that token's position.
        self.end = torch.zeros(num_slots, dtype=torch.long, device=device)
        # Attention reads only the first `width` positions of each row: the smallest multiple of
        # ATTENTION_WIDTH_STEP that holds every active slot's sequence, so short sequences do
        # not pay for a cache sized for the longest one. One CUDA graph per width.
        self.widths = [*range(ATTENTION_WIDTH_STEP, max_len, ATTENTION_WIDTH_STEP), max_len]
        self.width = [max_len]
        # A transformers Cache of SlotLayers: the model's own forward decodes into it unchanged.
        self.cache = Cache(
            layers=[
                SlotLayer(
                    torch.zeros(shape, dtype=parts.dtype, device=device),
                    torch.zeros(shape, dtype=parts.dtype, device=device),
                    self.end,
                    self.width,
                )
                for _ in range(config.num_hidden_layers)
            ]
        )
        self.input_ids = torch.zeros(num_slots, 1, dtype=torch.long, device=device)
        self.attention_mask = torch.ones(num_slots, 1, 1, max_len, dtype=torch.bool, device=device)
        self.key_positions = torch.arange(max_len, device=device)
        # Per-slot sampling parameters and random streams, filled when a sample is admitted.
        self.temperature = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.uniforms = torch.zeros(num_slots, max_tokens, dtype=torch.float32, device=device)
        self.generated = torch.zeros(num_slots, dtype=torch.long, device=device)
        # Two host buffers for sampled tokens: one being filled while the other is read.
        pinned = device.type == "cuda"
        self.host_tokens = [torch.zeros(num_slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        # width -> (graph, its logits); the graphs share one memory pool (they never run at once).
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        self.setup_seconds = 0.0  # building these buffers and capturing graphs, so far
        if self.use_cuda_graph:
            self._capture_graph(max_len)  # the widest first: the pool is sized once
        self.setup_seconds = time.perf_counter() - started

    def _decode_forward(self) -> torch.Tensor:
        with attention_implementation(self.parts.config, SLOT_DECODE_ATTENTION):
            hidden = self.parts.backbone(
                input_ids=self.input_ids,
                attention_mask=self.attention_mask[..., : self.width[0]],
                position_ids=self.end.view(-1, 1),
                **{cache_keyword(self.parts.backbone): self.cache},
                use_cache=True,
            ).last_hidden_state
        return self.parts.logits_from_hidden(hidden[:, -1])

    def _capture_graph(self, width: int) -> None:
        # Warm-up on a side stream, then capture (the recipe of torch.cuda.graphs). The warm-up
        # runs the decode step for real: it writes each slot's keys and values at `end`, exactly
        # what the step itself writes next, so it is harmless before a step and mid-run alike.
        started = time.perf_counter()
        self.width[0] = width
        try:
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                for _ in range(2):
                    self._decode_forward()
            torch.cuda.current_stream().wait_stream(side_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = self._decode_forward()
        except RuntimeError as error:  # a model whose forward cannot be captured still decodes, eagerly
            warnings.warn(f"decoding without a CUDA graph: capture failed ({error})", stacklevel=2)
            self.use_cuda_graph = False
            return
        self.graph_pool = self.graph_pool or graph.pool()
        self.graphs[width] = (graph, logits)
        torch.cuda.current_stream().synchronize()  # rare: lets setup_seconds count the device's part too
        self.setup_seconds += time.perf_counter() - started

    def decode_logits(self, needed: int | None = None) -> torch.Tensor:
        """Logits of the next token for every slot, after feeding `input_ids` at `end`;
        attention reads `needed` positions of each row (rounded up to a width), all by default."""
        width = next(w for w in self.widths if w >= min(needed or self.max_len, self.max_len))
        torch.le(self.key_positions.view(1, 1, 1, -1), self.end.view(-1, 1, 1, 1), out=self.attention_mask)
        if self.use_cuda_graph and width not in self.graphs:
            self._capture_graph(width)
        self.width[0] = width
        if self.use_cuda_graph:
            graph, logits = self.graphs[width]
            graph.replay()
            return logits
        return self._decode_forward()


class BatchSampler:
    """Runs one sample() call over a SlotDecoder."""

    def __init__(
        self,
        decoder: SlotDecoder,
        tokenizer,
        requests: list[SamplingRequest],
        seeds: list[int],
        eos_token_ids: set[int],
        max_prefill_tokens: int,
        on_progress: ProgressCallback | None,
        follow_up: Callable[[list[int]], list[tuple[SamplingRequest, int]]] | None = None,
    ):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.requests: list[SamplingRequest] = []
        self.eos_token_ids = eos_token_ids
        self.max_prefill_tokens = max_prefill_tokens
        self.on_progress = on_progress
        # follow_up(indices of requests just finished) -> (request, seed) pairs to add: new
        # requests join the queue while the others decode (continuous rounds).
        self.follow_up = follow_up
        self.just_finished: list[int] = []
        self.stats = GenerationStats(
            num_slots=decoder.num_slots, cache_length=decoder.max_len, cuda_graph=decoder.use_cuda_graph
        )
        self.results: list[list[Completion | None]] = []
        self.unfinished_samples: list[int] = []
        self.requests_done = 0
        self.tokens_since_progress = 0
        self.slots: list[SlotState | None] = [None] * decoder.num_slots
        # Longest first (Python's sort is stable, so equal lengths keep request order): prompts
        # prefilled together have similar lengths and the longest generations start early.
        self.queue = deque(sorted(self._add(requests, seeds), key=self._total_length, reverse=True))

    def _add(self, requests: list[SamplingRequest], seeds: list[int]) -> list[SampleGroup]:
        """Take on more requests; returns their sample groups, for the caller to queue."""
        groups = []
        for request, seed in zip(requests, seeds):
            index = len(self.requests)
            self.requests.append(request)
            self.results.append([None] * request.n)
            self.unfinished_samples.append(request.n)
            for start in range(0, request.n, self.decoder.num_slots):
                samples = list(range(start, min(request.n, start + self.decoder.num_slots)))
                groups.append(SampleGroup(index, samples, seed))
        return groups

    def _total_length(self, group: SampleGroup) -> int:
        request = self.requests[group.request_index]
        return len(request.prompt_ids) + request.max_tokens

    def _hand_back(self) -> None:
        """Tell the caller which requests finished and queue the follow-ups it answers with
        ahead of everything else: a search's next probe is on its critical path."""
        finished, self.just_finished = self.just_finished, []
        pairs = self.follow_up(finished)  # [] asks only for follow-ups ready since the last call
        groups = self._add([request for request, _ in pairs], [seed for _, seed in pairs])
        self.queue.extendleft(reversed(groups))

    def cancel(self, request_indices: set[int]) -> None:
        """Stop these requests: their queued samples are dropped and their slots freed (the
        step in flight writes nothing for a freed slot); they are never handed back."""
        self.queue = deque(group for group in self.queue if group.request_index not in request_indices)
        for row, state in enumerate(self.slots):
            if state is not None and state.request_index in request_indices:
                self.slots[row] = None

    def run(self) -> list[list[Completion]]:
        refill_threshold = max(1, self.decoder.num_slots // 8)
        in_flight: LaunchedStep | None = None
        while self.queue or self._active_slots():
            free = self.slots.count(None)
            if self.queue and (free == len(self.slots) or free >= refill_threshold):
                self._admit()
            launched = self._launch_decode_step() if self._active_slots() else None
            # The host reads step t-1's tokens while the device computes step t. A sample that
            # finished at t-1 got one more token at t; _collect drops it.
            if in_flight is not None:
                self._collect(in_flight)
            in_flight = launched
        return self.results  # type: ignore[return-value]  # every entry is filled by now

    def _active_slots(self) -> list[int]:
        return [s for s, state in enumerate(self.slots) if state is not None]

    # ----------------------------------------------------------------- admission and prefill

    def _admit(self) -> None:
        free_slots = [s for s, state in enumerate(self.slots) if state is None]
        admitted: list[tuple[SampleGroup, list[int]]] = []
        while self.queue and free_slots:
            group = self.queue.popleft()
            if len(group.sample_indices) > len(free_slots):
                # The samples that fit start now and the rest stay first in line: waiting for
                # room for the whole group would leave these slots idle for a whole generation
                # (3,072 samples of n=6 on 1,024 slots took 4 waves instead of 3). Each sample
                # draws from its own stream, so the split changes no token; the prompt is
                # prefilled once more for the rest.
                rest = SampleGroup(group.request_index, group.sample_indices[len(free_slots) :], group.seed)
                self.queue.appendleft(rest)
                group = SampleGroup(group.request_index, group.sample_indices[: len(free_slots)], group.seed)
            rows, free_slots = free_slots[: len(group.sample_indices)], free_slots[len(group.sample_indices) :]
            admitted.append((group, rows))
        # Prefill in chunks of at most max_prefill_tokens (padded) tokens.
        chunk: list[tuple[SampleGroup, list[int]]] = []
        for item in admitted:
            longest = max([len(self.requests[g.request_index].prompt_ids) for g, _ in chunk + [item]])
            if chunk and longest * (len(chunk) + 1) > self.max_prefill_tokens:
                self._prefill(chunk)
                chunk = []
            chunk.append(item)
        if chunk:
            self._prefill(chunk)

    def _prefill(self, admitted: list[tuple[SampleGroup, list[int]]]) -> None:
        decoder, parts = self.decoder, self.decoder.parts
        prompts = [self.requests[group.request_index].prompt_ids for group, _ in admitted]
        last_token_logits, layer_kv, lengths = prefill(parts, prompts)
        self.stats.prefill_forwards += 1
        self.stats.prefilled_prompts += len(prompts)

        rows: list[int] = []
        source: list[int] = []  # which prompt of this prefill each slot copies
        temperatures, top_ps, uniforms = [], [], []
        for prompt_number, (group, group_rows) in enumerate(admitted):
            request = self.requests[group.request_index]
            for row, sample_index in zip(group_rows, group.sample_indices):
                rows.append(row)
                source.append(prompt_number)
                temperatures.append(request.temperature)
                top_ps.append(request.top_p)
                stream = np.zeros(decoder.max_tokens, dtype=np.float32)
                stream[: request.max_tokens] = sample_uniforms(
                    group.seed, request.first_sample + sample_index, request.max_tokens
                )
                uniforms.append(stream)
                self.slots[row] = SlotState(group.request_index, sample_index, request)

        device = parts.device
        row_index = torch.tensor(rows, device=device)
        source_index = torch.tensor(source, device=device)
        prompt_width = layer_kv[0][0].shape[2]
        for layer, (keys, values) in zip(decoder.cache.layers, layer_kv):
            layer.keys[row_index, :, :prompt_width] = keys.index_select(0, source_index)
            layer.values[row_index, :, :prompt_width] = values.index_select(0, source_index)
        decoder.end[row_index] = lengths.index_select(0, source_index)
        decoder.temperature[row_index] = torch.tensor(temperatures, dtype=torch.float32, device=device)
        decoder.top_p[row_index] = torch.tensor(top_ps, dtype=torch.float32, device=device)
        decoder.uniforms[row_index] = torch.from_numpy(np.stack(uniforms)).to(device)

        first_tokens = sample_from_logits(
            last_token_logits.index_select(0, source_index),
            decoder.temperature[row_index],
            decoder.top_p[row_index],
            decoder.uniforms[row_index, 0],
            any_top_p=any(p < 1.0 for p in top_ps),
            any_greedy=any(t <= 0.0 for t in temperatures),
        )
        decoder.input_ids[row_index, 0] = first_tokens
        decoder.generated[row_index] = 1
        self._record_tokens(rows, first_tokens.tolist())

    # ----------------------------------------------------------------- decoding

    def _launch_decode_step(self) -> LaunchedStep:
        """Queue one decode step on the device; its tokens reach the host without blocking it."""
        decoder = self.decoder
        states = [(row, state) for row, state in enumerate(self.slots) if state is not None]
        # A slot's next position is at most its prompt plus the tokens the host has seen, plus
        # one for the step still in flight; one more for safety.
        needed = max(len(state.request.prompt_ids) + len(state.token_ids) for _, state in states) + 2
        logits = decoder.decode_logits(needed).float()
        uniform = decoder.uniforms.gather(1, decoder.generated.view(-1, 1)).squeeze(1)
        tokens = sample_from_logits(
            logits,
            decoder.temperature,
            decoder.top_p,
            uniform,
            any_top_p=any(state.request.top_p < 1.0 for _, state in states),
            any_greedy=any(state.request.temperature <= 0.0 for _, state in states),
        )
        decoder.input_ids[:, 0] = tokens
        # Idle slots advance too (they compute garbage nobody reads); clamping keeps them in range.
        decoder.end.add_(1).clamp_(max=decoder.max_len - 1)
        decoder.generated.add_(1).clamp_(max=decoder.max_tokens - 1)
        self.stats.decode_steps += 1
        host_tokens = decoder.host_tokens[self.stats.decode_steps % 2]
        host_tokens.copy_(tokens, non_blocking=True)
        done = None
        if tokens.is_cuda:
            done = torch.cuda.Event()
            done.record()
        return LaunchedStep(states, host_tokens, done)

    def _collect(self, step: LaunchedStep) -> None:
        if step.done is not None:
            step.done.synchronize()
        all_tokens = step.host_tokens.tolist()
        # Keep only slots still decoding the sample they decoded at launch.
        rows = [row for row, state in step.states if self.slots[row] is state]
        self._record_tokens(rows, [all_tokens[row] for row in rows])

    def _record_tokens(self, rows: list[int], tokens: list[int]) -> None:
        """Append one new token to each row's sample, and finish the samples that are done."""
        finished: list[tuple[int, str]] = []
        needs_stop_check: list[int] = []
        for row, token in zip(rows, tokens):
            state = self.slots[row]
            state.token_ids.append(token)
            if token in self.eos_token_ids:
                finished.append((row, "stop"))
            elif state.request.stop:
                needs_stop_check.append(row)
            elif len(state.token_ids) >= state.request.max_tokens:
                finished.append((row, "length"))
        if needs_stop_check:
            finished.extend(self._check_stop_strings(needs_stop_check))
        self.stats.generated_tokens += len(rows)
        self.tokens_since_progress += len(rows)
        for row, reason in finished:
            self._finish(row, reason)
        if self.on_progress is not None:
            self.on_progress(self.requests_done, self.tokens_since_progress)
            self.tokens_since_progress = 0
        if self.follow_up is not None and (self.just_finished or self._has_room()):
            self._hand_back()

    def _has_room(self) -> bool:
        """Whether follow-ups could be admitted now: nothing queued and slots to spare."""
        return not self.queue and self.slots.count(None) >= max(1, self.decoder.num_slots // 8)

    def _check_stop_strings(self, rows: list[int]) -> list[tuple[int, str]]:
        # Decode only the tail that could hold a stop string completed by the newest token: each
        # token adds at least one character, plus slack for bytes of a character split over tokens.
        windows = []
        for row in rows:
            state = self.slots[row]
            width = max(len(s) for s in state.request.stop) + 4
            windows.append(state.token_ids[-width:])
        texts = self.tokenizer.batch_decode(windows, skip_special_tokens=True)
        finished = []
        for row, text in zip(rows, texts):
            state = self.slots[row]
            if first_stop_index(text, state.request.stop) is not None:
                finished.append((row, "stop"))
            elif len(state.token_ids) >= state.request.max_tokens:
                finished.append((row, "length"))
        return finished

    def _finish(self, row: int, reason: str) -> None:
        state = self.slots[row]
        text = self.tokenizer.decode(state.token_ids, skip_special_tokens=True)
        if state.request.stop:
            # vLLM's convention: the text ends before the first stop string; tokens are kept.
            cut = first_stop_index(text, state.request.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
        self.results[state.request_index][state.sample_index] = Completion(
            text=text, token_ids=state.token_ids, num_tokens=len(state.token_ids), finish_reason=reason
        )
        self.slots[row] = None
        self.unfinished_samples[state.request_index] -= 1
        if self.unfinished_samples[state.request_index] == 0:
            self.requests_done += 1
            if self.follow_up is not None:
                self.just_finished.append(state.request_index)


def prefill(parts: ModelParts, prompts: list[list[int]]):
    """Run prompts through the model in one right-padded batch.

    Returns the float32 logits after each prompt's last token [prompts, vocab], each layer's
    (keys, values) [prompts, kv_heads, longest, head_dim] (positions past a prompt's length hold
    padding, which the decoder never attends to), and the prompt lengths.
    """
    device = parts.device
    input_ids, lengths = right_padded(prompts, device)
    longest = input_ids.shape[1]
    # Right padding: real tokens sit at their true positions 0..len-1 and, being causal, never
    # attend to the padding after them; the mask is built from lengths, never from token ids.
    attention_mask = (torch.arange(longest, device=device).unsqueeze(0) < lengths.unsqueeze(1)).long()
    cache = DynamicCache()
    hidden = parts.backbone(
        input_ids=input_ids, attention_mask=attention_mask, **{cache_keyword(parts.backbone): cache}, use_cache=True
    ).last_hidden_state
    last_hidden = hidden[torch.arange(len(prompts), device=device), lengths - 1]
    logits = parts.logits_from_hidden(last_hidden).float()
    layer_kv = [(layer.keys, layer.values) for layer in cache.layers]
    return logits, layer_kv, lengths


def right_padded(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right with 0 (never attended to), and the true lengths."""
    lengths = [len(s) for s in sequences]
    padded = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.tensor(sequence)
    return padded.to(device), torch.tensor(lengths).to(device)


def choose_num_slots(parts: ModelParts, max_len: int, wanted_slots: int, vocab_size: int) -> int:
    """`wanted_slots`, capped on CUDA by what free memory holds.

    Each slot costs its KV cache row plus about five float32 vocab-sized rows of sampling workspace.
    """
    if parts.device.type != "cuda":
        return wanted_slots
    free_bytes, _ = torch.cuda.mem_get_info(parts.device)
    per_slot = max_len * kv_bytes_per_token(parts.config, parts.dtype) + 5 * 4 * vocab_size
    return max(1, min(wanted_slots, int(0.8 * free_bytes) // per_slot))


def round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)

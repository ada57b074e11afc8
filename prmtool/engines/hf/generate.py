"""Batched sampling for the hf engine: decode slots over a paged, prefix-sharing KV cache.

How one `HFEngine.sample` call runs:

* Every request is split into sample groups (its n samples, in chunks no larger than the pool).
  Groups are queued longest first (prompt + max_tokens), so prompts prefilled together have
  similar lengths (little padding) and the longest generations start early (short tail).
* Keys and values live in blocks of kv_cache.BLOCK_SIZE positions (kv_cache.py): a sequence
  takes blocks as it grows, so memory follows the lengths sequences reach, not the longest
  request's. A group is admitted into free slots when the cache has blocks for its prompt.
  Its prompt is prefilled ONCE, in a right-padded batch with the other admitted prompts, and
  its n samples read the prompt's blocks (each copies only the partly filled last one). A
  prompt whose leading blocks are remembered from an earlier prompt (label's probes of one
  response share the problem and the steps before) computes only the rest.
* A group with more samples than free slots is split: those that fit start now, the rest stay
  first in line (no slot idles while work waits).
* Each decode step runs the model on one token per slot: slot `s` writes the new token's keys
  and values at position end[s] of its blocks and attends over positions <= end[s]. On CUDA
  a Triton kernel reads each slot's blocks through its block table (kernels.paged_decode);
  the samples of one prompt form a prefix group (kv_cache.PrefixGroups) whose shared blocks a
  second kernel reads once for all of them (cascade attention), each slot reading only its own
  blocks; elsewhere the blocks are gathered for torch's attention. A finished slot (EOS, stop string,
  max_tokens) frees its blocks and is refilled while the others keep decoding; when blocks
  run out, the samples admitted last are preempted and later recomputed (vLLM's policy).
* On CUDA the decode step is captured as a CUDA graph (one per count of rows it runs, all of
  them when the decoder is built) and replayed: buffers and block tables never move, which
  removes the per-step Python and kernel-launch overhead of the transformers forward.
* The host never waits for the step it just queued: it reads step t-1's tokens (finishing
  samples, refilling slots, giving rows their next block a step early) while the device
  computes step t.
* Sampling draws one uniform number per token from a stream seeded by (request seed, sample
  index) and inverts the CDF of the next-token distribution (sampling.py; with the engine's
  sampling_kernel, one Triton kernel over the logits), so a sample depends on its own seed
  only, not on what else shares the batch (up to floating-point differences of batched kernels).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
import warnings
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from transformers import AttentionInterface

from prmtool.engines.base import Completion, EngineError, ProgressCallback, SamplingRequest, first_stop_index
from prmtool.engines.hf.kv_cache import (
    BLOCK_SIZE,
    SCRATCH_BLOCK,
    BlockPool,
    KVCache,
    PagedBatch,
    PrefixGroups,
    blocks_for,
    decode_kernel_available,
    paged_attention,
)
from prmtool.engines.hf.sampling import sample_from_logits
from prmtool.engines.hf.transfer import on_device

ATTENTION_WIDTH_STEP = 256
PAGED_ATTENTION = "prmtool_paged"
AttentionInterface.register(PAGED_ATTENTION, paged_attention)


@dataclass
class GenerationStats:
    """What one sample() call did; read by tests and the benchmark."""

    prefill_forwards: int = 0  # forward passes over prompts
    prefilled_prompts: int = 0  # prompts run through those passes (one per admitted group)
    twin_requests: int = 0  # requests that sampled from another's prefill of the same prompt
    decode_steps: int = 0
    generated_tokens: int = 0
    num_slots: int = 0
    cache_length: int = 0
    cuda_graph: bool = False
    prefill_tokens: int = 0  # prompt tokens computed by prefills
    prefill_padded_tokens: int = 0  # positions those passes computed, padding included
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values were reused instead
    preemptions: int = 0  # samples whose blocks were taken back mid-decode (recomputed later)
    kv_blocks: int = 0  # blocks of BLOCK_SIZE positions in the KV cache
    peak_blocks_used: int = 0
    decode_rows: int = 0  # rows computed over all decode steps, idle ones included
    compactions: int = 0  # times a draining batch's last rows moved down into idle ones
    peak_samples: int = 0  # the most samples decoding at once
    samples_when_full: int = 0  # samples decoding when the KV cache last ran out (0: it never did)


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


def sample_uniforms(seed: int, sample_index: int, count: int) -> np.ndarray:
    """The uniform numbers in (0, 1] that drive one sample's tokens, a stream per (seed, index)."""
    return 1.0 - np.random.default_rng([seed % 2**64, sample_index]).random(count)


@dataclass
class SampleGroup:
    """Samples of one request that are prefilled together and then decode in their own slots."""

    request_index: int
    sample_indices: list[int]
    seed: int
    # A preempted sample's tokens so far: prefilled after the prompt, and sampling goes on from there.
    resume_tokens: list[int] = field(default_factory=list)


@dataclass
class Admission:
    """A sample group given rows and the blocks of its sequence, waiting for its prefill."""

    group: SampleGroup
    rows: list[int]
    sequence: list[int]  # the prompt, and a preempted sample's tokens
    blocks: list[int]  # its block table: remembered blocks of its prefix, then new ones
    cached: int  # positions whose keys and values the remembered blocks already hold
    # Other requests' samples of the same prompt admitted with it (label sends a probe's
    # rollouts as one request each): they sample from its prefill, as its own samples do.
    twins: list[tuple[SampleGroup, list[int]]] = field(default_factory=list)

    def samples(self) -> list[tuple[SampleGroup, int, int]]:
        """(group, row, sample index) of every sample that starts from this prefill."""
        members = [(self.group, self.rows)] + self.twins
        return [(group, row, index) for group, rows in members for row, index in zip(rows, group.sample_indices)]


@dataclass
class SlotState:
    """Host-side record of the sample a slot is decoding."""

    request_index: int
    sample_index: int
    request: SamplingRequest
    seed: int
    token_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # its block table
    admitted: int = 0  # admission order: the last admitted is preempted first


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


class PagedDecoder:
    """Static decode buffers for `num_slots` sequences of up to `max_len` tokens over a block
    cache of `num_blocks` blocks, reusable across calls (and so is what its cache remembers).

    Row s of the buffers is decode slot s: end[s] is the position of the token it feeds next
    (where that token's keys and values are written), block_tables[s] its blocks. An idle row
    has end 0 and a table of scratch blocks: it computes garbage nobody reads, cheaply.
    """

    def __init__(
        self,
        parts: ModelParts,
        num_slots: int,
        max_len: int,
        max_tokens: int,
        num_blocks: int,
        use_cuda_graph: bool,
        kept: tuple[BlockPool, KVCache] | None = None,
        prefix_cache: bool = True,
        shared_prefix_attention: bool = True,
        compiled_layers=None,
        sampling_kernel: bool = False,
    ):
        started = time.perf_counter()
        self.parts = parts
        self.sampling_kernel = sampling_kernel  # HFEngine's: the Triton sampler (sampling.py)
        # torch.compile'd decoder layers (HFEngine's compile_decode): their norms, rotary
        # embeddings and residual adds run as a few fused kernels; attention stays eager.
        self.compiled_layers = compiled_layers
        self.num_slots, self.max_len, self.max_tokens = num_slots, max_len, max_tokens
        self.prefix_cache = prefix_cache  # remember prompts' full blocks for later prompts to reuse
        device, config = parts.device, parts.config
        kv_heads, head_dim = kv_heads_and_dim(config)
        if kept is not None:  # a previous decoder's cache, and the prefixes it remembers
            self.pool, self.cache = kept
        else:
            self.pool = BlockPool(num_blocks)
            self.cache = KVCache(config.num_hidden_layers, num_blocks, kv_heads, head_dim, device, parts.dtype)
        self.table_width = blocks_for(max_len)
        self.block_tables = torch.full((num_slots, self.table_width), SCRATCH_BLOCK, dtype=torch.int32, device=device)
        self.end = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.active = torch.zeros(num_slots, dtype=torch.long, device=device)  # 1 where a sample decodes
        self.use_kernel = decode_kernel_available(device, head_dim)
        # Samples of one prompt read its blocks once per step (the kernel's cascade attention).
        members = PrefixGroups.members_for(config.num_attention_heads // kv_heads)
        self.prefix_groups = (
            PrefixGroups(num_slots, self.table_width, members, device)
            if shared_prefix_attention and self.use_kernel and members >= 2
            else None
        )
        # Without the kernel, attention gathers only as many blocks as the longest active row
        # needs (a multiple of ATTENTION_WIDTH_STEP positions); the kernel reads each row's own.
        self.widths = (
            [max_len] if self.use_kernel else [*range(ATTENTION_WIDTH_STEP, max_len, ATTENTION_WIDTH_STEP), max_len]
        )
        # A step runs the first `rows` rows only, the smallest of these that holds every active
        # row (admission fills the lowest free rows, and a draining batch's last rows move down):
        # a draining batch stops paying for idle rows. Steps of ROW_COUNT_STEP rows above it: a
        # step's cost follows its rows, and each count is one CUDA graph more.
        self.row_counts = row_counts(num_slots)
        self.input_ids = torch.zeros(num_slots, 1, dtype=torch.long, device=device)
        # Per-slot sampling parameters and random streams, filled when a sample is admitted.
        self.temperature = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(num_slots, dtype=torch.float32, device=device)
        self.uniforms = torch.zeros(num_slots, max_tokens, dtype=torch.float32, device=device)
        self.generated = torch.zeros(num_slots, dtype=torch.long, device=device)
        # Two host buffers for sampled tokens: one being filled while the other is read.
        pinned = device.type == "cuda"
        self.host_tokens = [torch.zeros(num_slots, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        # (rows, width) -> (graph, its logits); the graphs share one memory pool (they never run at once).
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = None
        self.use_cuda_graph = use_cuda_graph and device.type == "cuda"
        self.setup_seconds = 0.0  # building these buffers and capturing graphs, so far
        self.wanted_blocks = num_blocks  # the blocks asked for, before memory capped them (set by the engine)
        if self.use_cuda_graph:
            # Every row count's graph now, the largest first (the graphs' memory pool is sized
            # once), as vLLM captures its batch sizes when it starts: a run never stops decoding
            # to capture one. Without the kernel, attention's width varies too: those graphs
            # are captured as steps first need them.
            for rows in reversed(self.row_counts if self.use_kernel else [num_slots]):
                self._capture_graph(rows, max_len)
        self.setup_seconds = time.perf_counter() - started

    def row_buffers(self) -> tuple[torch.Tensor, ...]:
        """Every device tensor with a row per slot: what moves when a sample changes rows."""
        return (self.block_tables, self.end, self.active, self.input_ids, self.temperature, self.top_p,
                self.uniforms, self.generated)  # fmt: skip

    def _decode_forward(self, rows: int, width: int) -> torch.Tensor:
        tables = self.block_tables[:rows, : blocks_for(width)]
        end = self.end[:rows]
        block = tables.gather(1, (end // BLOCK_SIZE).clamp_max(tables.shape[1] - 1).view(-1, 1)).squeeze(1)
        batch = PagedBatch(
            cache=self.cache,
            slot_mapping=block.long() * BLOCK_SIZE + end % BLOCK_SIZE,
            block_tables=tables,
            query_positions=end.view(-1, 1),
            use_kernel=self.use_kernel,
            prefix_groups=self.prefix_groups,
        )
        layers = self.compiled_layers.swapped_in() if self.compiled_layers is not None else contextlib.nullcontext()
        with layers:
            hidden = run_paged(self.parts, self.input_ids[:rows], end.view(-1, 1), batch)
        return self.parts.logits_from_hidden(hidden[:, -1])

    def _capture_graph(self, rows: int, width: int) -> None:
        # Warm-up on a side stream, then capture (the recipe of torch.cuda.graphs). The warm-up
        # runs the decode step for real: it writes each row's keys and values at `end`, exactly
        # what the step itself writes next, so it is harmless before a step and mid-run alike.
        started = time.perf_counter()
        try:
            side_stream = torch.cuda.Stream()
            side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side_stream):
                for _ in range(2):
                    self._decode_forward(rows, width)
            torch.cuda.current_stream().wait_stream(side_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.graph_pool):
                logits = self._decode_forward(rows, width)
        except RuntimeError as error:  # a model whose forward cannot be captured still decodes, eagerly
            warnings.warn(f"decoding without a CUDA graph: capture failed ({error})", stacklevel=2)
            self.use_cuda_graph = False
            return
        self.graph_pool = self.graph_pool or graph.pool()
        self.graphs[(rows, width)] = (graph, logits)
        torch.cuda.current_stream().synchronize()  # rare: lets setup_seconds count the device's part too
        self.setup_seconds += time.perf_counter() - started

    def step_rows(self, highest_active_row: int) -> int:
        return next(r for r in self.row_counts if r > highest_active_row)

    def decode_logits(self, rows: int, needed: int | None = None) -> torch.Tensor:
        """Logits of the next token for the first `rows` rows, after feeding `input_ids` at
        `end`; without the kernel, attention reads `needed` positions (rounded up to a width)."""
        width = next(w for w in self.widths if w >= min(needed or self.max_len, self.max_len))
        if self.use_cuda_graph and (rows, width) not in self.graphs:
            self._capture_graph(rows, width)
        if self.use_cuda_graph:
            graph, logits = self.graphs[(rows, width)]
            graph.replay()
            return logits
        return self._decode_forward(rows, width)


def run_paged(parts: ModelParts, input_ids: torch.Tensor, position_ids: torch.Tensor, batch: PagedBatch):
    """The backbone's hidden states for `input_ids` at `position_ids`, its attention reading and
    writing the block cache. The PagedBatch reaches the attention function as a keyword argument
    (transformers passes the forward's extra keywords down to it); the 4D attention mask given
    is a placeholder that transformers hands on as it is, building no mask of its own."""
    with attention_implementation(parts.config, PAGED_ATTENTION):
        return parts.backbone(
            input_ids=input_ids,
            attention_mask=MASK_PLACEHOLDER.get(input_ids.device),
            position_ids=position_ids,
            use_cache=False,
            paged_batch=batch,
        ).last_hidden_state


class _Placeholders(dict):
    def get(self, device):  # one tiny tensor per device, made once (never during graph capture)
        if device not in self:
            self[device] = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=device)
        return self[device]


MASK_PLACEHOLDER = _Placeholders()


class BatchSampler:
    """Runs one sample() call over a SlotDecoder."""

    def __init__(
        self,
        decoder: PagedDecoder,
        tokenizer,
        requests: list[SamplingRequest],
        seeds: list[int],
        eos_token_ids: set[int],
        max_prefill_tokens: int,
        on_progress: ProgressCallback | None,
        follow_up: Callable[[list[int]], list[tuple[SamplingRequest, int]]] | None = None,
        compact_rows: bool = True,
    ):
        self.decoder = decoder
        self.compact_rows = compact_rows  # move a draining batch's last rows down (_compact)
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
            num_slots=decoder.num_slots,
            cache_length=decoder.max_len,
            cuda_graph=decoder.use_cuda_graph,
            kv_blocks=decoder.pool.num_blocks,
        )
        self.results: list[list[Completion | None]] = []
        self.unfinished_samples: list[int] = []
        self.requests_done = 0
        self.tokens_since_progress = 0
        self.slots: list[SlotState | None] = [None] * decoder.num_slots
        self.rows_to_reset: list[int] = []  # rows freed since the last step or prefill was queued
        # The last admission stopped for want of blocks, and none has been freed since.
        self.waiting_for_blocks = False
        self.admissions = 0
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
        step in flight writes nothing anyone reads); they are never handed back."""
        self.queue = deque(group for group in self.queue if group.request_index not in request_indices)
        for row, state in enumerate(self.slots):
            if state is not None and state.request_index in request_indices:
                self._free_row(row)

    def run(self) -> list[list[Completion]]:
        if self.decoder.prefix_groups is not None:
            self.decoder.prefix_groups.clear()  # a call that raised may have left groups behind
        refill_threshold = max(1, self.decoder.num_slots // 8)
        in_flight: LaunchedStep | None = None
        while self.queue or self._active_slots():
            free = self.slots.count(None)
            if self.queue and (free == len(self.slots) or free >= refill_threshold) and not self.waiting_for_blocks:
                self._admit()
                self.stats.peak_samples = max(self.stats.peak_samples, len(self.slots) - self.slots.count(None))
            if self._worth_compacting():
                # Rows are about to move: the step in flight is read first (one step unpipelined).
                if in_flight is not None:
                    self._collect(in_flight)
                    in_flight = None
                self._compact()
            launched = self._launch_decode_step() if self._active_slots() else None
            # The host reads step t-1's tokens while the device computes step t. A sample that
            # finished at t-1 got one more token at t; _collect drops it.
            if in_flight is not None:
                self._collect(in_flight)
            in_flight = launched
        return self.results  # type: ignore[return-value]  # every entry is filled by now

    def _active_slots(self) -> list[int]:
        return [s for s, state in enumerate(self.slots) if state is not None]

    # ----------------------------------------------------------------- blocks

    def _free_row(self, row: int) -> None:
        """Give a row's blocks back and make it idle (its device state is reset before the next
        step or prefill is queued: the step in flight still writes into its old last block,
        which is safe, as anything queued later that reuses the block runs after it)."""
        state = self.slots[row]
        self.decoder.pool.release(state.blocks)
        if self.decoder.prefix_groups is not None:
            self.decoder.prefix_groups.remove(row)
        self.slots[row] = None
        self.rows_to_reset.append(row)
        self.waiting_for_blocks = False

    def _reset_rows(self) -> None:
        if self.rows_to_reset:
            decoder = self.decoder
            rows = on_device(self.rows_to_reset, decoder.parts.device)
            decoder.block_tables[rows] = SCRATCH_BLOCK
            decoder.end[rows] = 0
            decoder.active[rows] = 0
            self.rows_to_reset = []
        if self.decoder.prefix_groups is not None:
            self.decoder.prefix_groups.flush()

    def _worth_compacting(self) -> bool:
        """A step computes every row up to the highest active one, and samples finish in any
        order: in a draining batch the last rows hold on while most below them are idle. They
        move down once fewer rows would hold them all and no waiting request will fill the idle
        rows first."""
        if not self.compact_rows or (self.queue and not self.waiting_for_blocks):
            return False
        active = self._active_slots()
        return bool(active) and self.decoder.step_rows(len(active) - 1) < self.decoder.step_rows(active[-1])

    def _compact(self) -> None:
        """Move the active rows above the smallest row count that holds them all into the idle
        rows below it: their block tables, positions and random streams move (the keys and
        values stay in their blocks), so every sample goes on as it would have."""
        decoder = self.decoder
        self._reset_rows()  # rows freed earlier are idle on the device before others move in
        active = self._active_slots()
        limit = decoder.step_rows(len(active) - 1) if active else 0
        movers = [row for row in active if row >= limit]
        if not movers:  # the step just read finished the rows that would have moved
            return
        idle = [row for row in range(limit) if self.slots[row] is None][: len(movers)]
        source, target = on_device(movers, decoder.parts.device), on_device(idle, decoder.parts.device)
        for buffer in decoder.row_buffers():
            buffer[target] = buffer[source]  # the right side is gathered first: no row is read after it is written
        for old, new in zip(movers, idle):
            self.slots[new], self.slots[old] = self.slots[old], None
            if decoder.prefix_groups is not None:
                decoder.prefix_groups.move(old, new)
        self.rows_to_reset += movers
        self._reset_rows()
        self.stats.compactions += 1

    def _preempt(self, row: int) -> None:
        """Free a decoding sample's blocks for others; it starts again later from its prompt and
        the tokens it has (recomputed in one prefill), drawing from the same random stream."""
        state = self.slots[row]
        self._free_row(row)
        resume = SampleGroup(state.request_index, [state.sample_index], state.seed, list(state.token_ids))
        self.queue.appendleft(resume)
        self.stats.preemptions += 1

    def _grow_blocks(self, states: list[tuple[int, SlotState]]) -> None:
        """Give each decoding row the blocks the next step can write to, a step early (the host
        runs a step behind the device); when none is free, the samples admitted last are
        preempted (as vLLM's scheduler does, by recomputation)."""
        pool, changes = self.decoder.pool, []
        for row, state in states:
            # This step writes at most at position prompt + tokens the host has seen.
            needed = blocks_for(len(state.request.prompt_ids) + len(state.token_ids) + 1)
            while self.slots[row] is state and len(state.blocks) < needed:
                if pool.num_free() == 0:
                    active = self._active_slots()
                    self.stats.samples_when_full = len(active)
                    victim = max(active, key=lambda r: self.slots[r].admitted)
                    self._preempt(victim)
                    continue
                state.blocks.append(pool.allocate())
                changes.append((row, len(state.blocks) - 1, state.blocks[-1]))
        changes = [change for change in changes if self.slots[change[0]] is not None]
        if changes:
            rows, columns, blocks = zip(*changes)
            device = self.decoder.parts.device
            self.decoder.block_tables[on_device(rows, device), on_device(columns, device)] = on_device(
                blocks, device, torch.int32
            )

    # ----------------------------------------------------------------- admission and prefill

    def _admit(self) -> None:
        self._reset_rows()
        pool = self.decoder.pool
        free_rows = [s for s, state in enumerate(self.slots) if state is None]  # lowest first
        admitted: list[Admission] = []
        # Blocks kept free for the decoding rows to grow into (1% of the pool, as vLLM keeps).
        watermark = max(1, pool.num_blocks // 100)
        # The copies of partly filled last blocks that admitted groups take at their prefill,
        # after this loop: the free count does not show them yet.
        copies_owed = 0
        by_prompt: dict[tuple[int, ...], Admission] = {}  # admitted this pass, by their prompts
        while self.queue and free_rows:
            group = self.queue[0]
            sequence = self.requests[group.request_index].prompt_ids + group.resume_tokens
            count = min(len(group.sample_indices), len(free_rows))
            # a resumed sample's sequence holds its own tokens: it is nobody's twin
            prompt_key = None if group.resume_tokens else tuple(sequence)
            twin_of = by_prompt.get(prompt_key) if prompt_key is not None else None
            if twin_of is not None:
                # Its prompt is being prefilled already: its samples fork from that prefill, each
                # copying the partly filled last block, each with a block to grow into.
                copies = count * (len(sequence) % BLOCK_SIZE != 0)
                if copies + count + watermark + copies_owed > pool.num_free():
                    self.waiting_for_blocks = True
                    break
                group = self._take_first(group, count)
                rows, free_rows = free_rows[:count], free_rows[count:]
                copies_owed += copies
                twin_of.twins.append((group, rows))
                self.stats.twin_requests += 1
                continue
            # Reuse remembered blocks of the sequence's prefix, but compute its last token
            # at least: its logits give the first sampled token.
            cached = pool.cached_prefix(sequence, (len(sequence) - 1) // BLOCK_SIZE)
            for block in cached:
                pool.share(block)
            new_blocks = blocks_for(len(sequence)) - len(cached)
            partial = len(sequence) % BLOCK_SIZE != 0
            # Each sample but the last copies the partly filled last block; each gets one to grow.
            copies = (count - 1) * partial
            needed = new_blocks + copies + count + watermark
            if needed + copies_owed > pool.num_free():
                pool.release(cached)
                self.waiting_for_blocks = True
                if not admitted and not self._active_slots():
                    raise EngineError(
                        f"a request of {len(sequence)} tokens does not fit the hf engine's KV cache of "
                        f"{(pool.num_blocks - 1) * BLOCK_SIZE} tokens (kv_cache_tokens, or the GPU's free "
                        "memory): shorten the request or give the cache more room"
                    )
                break
            group = self._take_first(group, count)
            blocks = cached + [pool.allocate() for _ in range(new_blocks)]
            if self.decoder.prefix_cache:
                pool.remember(blocks, sequence)
            rows, free_rows = free_rows[:count], free_rows[count:]
            copies_owed += copies
            admitted.append(Admission(group, rows, sequence, blocks, len(cached) * BLOCK_SIZE))
            if prompt_key is not None:
                by_prompt[prompt_key] = admitted[-1]
        # Prefill in chunks of at most max_prefill_tokens (padded) new tokens, and at most 8x as
        # many positions read (prompts whose prefix is remembered compute little but read it all).
        chunk: list[Admission] = []
        for item in admitted:
            candidate = chunk + [item]
            new = max(len(a.sequence) - a.cached for a in candidate) * len(candidate)
            read = max(len(a.sequence) for a in candidate) * len(candidate)
            if chunk and (new > self.max_prefill_tokens or read > 8 * self.max_prefill_tokens):
                self._prefill(chunk)
                chunk = []
            chunk.append(item)
        if chunk:
            self._prefill(chunk)

    def _take_first(self, group: SampleGroup, count: int) -> SampleGroup:
        """Take the first queued group off the queue, or its first `count` samples when not all
        fit: those start now and the rest stay first in line (waiting for room for the whole
        group would leave these slots idle for a whole generation). Each sample draws from its
        own stream, so the split changes no token; the rest find the prompt's blocks remembered."""
        self.queue.popleft()
        if count < len(group.sample_indices):
            self.queue.appendleft(replace(group, sample_indices=group.sample_indices[count:]))
            group = replace(group, sample_indices=group.sample_indices[:count])
        return group

    def _prefill(self, admitted: list[Admission]) -> None:
        decoder, parts = self.decoder, self.decoder.parts
        device = parts.device
        last_token_logits = prefill(decoder, admitted)
        self.stats.prefill_forwards += 1
        self.stats.prefilled_prompts += len(admitted)
        self.stats.prefill_tokens += sum(len(a.sequence) - a.cached for a in admitted)
        self.stats.prefill_padded_tokens += len(admitted) * max(len(a.sequence) - a.cached for a in admitted)
        self.stats.cached_prompt_tokens += sum(a.cached for a in admitted)

        # Fork: every sample reads the full blocks of its prompt; each but the last gets its
        # own copy of the partly filled last block, the last takes the prefilled one.
        pool = decoder.pool
        rows: list[int] = []
        source: list[int] = []  # which prompt of this prefill each row samples from
        tables: list[list[int]] = []
        copies: tuple[list[int], list[int]] = ([], [])
        temperatures, top_ps, uniforms, first_draws, ends = [], [], [], [], []
        for prompt_number, item in enumerate(admitted):
            full = len(item.sequence) // BLOCK_SIZE
            samples = item.samples()
            for position, (group, row, sample_index) in enumerate(samples):
                request = self.requests[group.request_index]
                table = list(item.blocks)
                for block in item.blocks[:full]:
                    pool.share(block)
                if full < len(item.blocks):  # a partly filled last block
                    if position < len(samples) - 1:
                        table[full] = pool.allocate()
                        copies[0].append(item.blocks[full])
                        copies[1].append(table[full])
                    else:
                        pool.share(item.blocks[full])
                rows.append(row)
                source.append(prompt_number)
                tables.append(table + [SCRATCH_BLOCK] * (decoder.table_width - len(table)))
                ends.append(len(item.sequence))
                temperatures.append(request.temperature)
                top_ps.append(request.top_p)
                stream = np.zeros(decoder.max_tokens, dtype=np.float32)
                stream[: request.max_tokens] = sample_uniforms(
                    group.seed, request.first_sample + sample_index, request.max_tokens
                )
                uniforms.append(stream)
                first_draws.append(len(group.resume_tokens))
                self.admissions += 1
                self.slots[row] = SlotState(
                    group.request_index, sample_index, request, group.seed, list(group.resume_tokens), table,
                    self.admissions,
                )  # fmt: skip
            pool.release(item.blocks)  # the prefill's own references
            if decoder.prefix_groups is not None:
                decoder.prefix_groups.add([row for _, row, _ in samples], item.blocks[:full])
        decoder.cache.copy_blocks(*copies)

        row_index = on_device(rows, device)
        source_index = on_device(source, device)
        decoder.block_tables[row_index] = on_device(tables, device, torch.int32)
        decoder.end[row_index] = on_device(ends, device)
        decoder.active[row_index] = 1
        decoder.temperature[row_index] = on_device(temperatures, device, torch.float32)
        decoder.top_p[row_index] = on_device(top_ps, device, torch.float32)
        decoder.uniforms[row_index] = on_device(np.stack(uniforms), device, torch.float32)
        draw = on_device(first_draws, device)

        first_tokens = sample_from_logits(
            last_token_logits.index_select(0, source_index),
            decoder.temperature[row_index],
            decoder.top_p[row_index],
            decoder.uniforms[row_index].gather(1, draw.view(-1, 1)).squeeze(1),
            any_top_p=any(p < 1.0 for p in top_ps),
            any_greedy=any(t <= 0.0 for t in temperatures),
            kernel=decoder.sampling_kernel,
        )
        decoder.input_ids[row_index, 0] = first_tokens
        decoder.generated[row_index] = draw + 1
        self._record_tokens(rows, first_tokens.tolist())

    # ----------------------------------------------------------------- decoding

    def _launch_decode_step(self) -> LaunchedStep:
        """Queue one decode step on the device; its tokens reach the host without blocking it."""
        decoder = self.decoder
        self._grow_blocks([(row, state) for row, state in enumerate(self.slots) if state is not None])
        self._reset_rows()
        states = [(row, state) for row, state in enumerate(self.slots) if state is not None]
        rows = decoder.step_rows(states[-1][0])
        # A slot's next position is at most its prompt plus the tokens the host has seen, plus
        # one for the step still in flight; one more for safety.
        needed = max(len(state.request.prompt_ids) + len(state.token_ids) for _, state in states) + 2
        logits = decoder.decode_logits(rows, needed)  # the model's dtype: the sampler reads it as it needs
        uniform = decoder.uniforms[:rows].gather(1, decoder.generated[:rows].view(-1, 1)).squeeze(1)
        tokens = sample_from_logits(
            logits,
            decoder.temperature[:rows],
            decoder.top_p[:rows],
            uniform,
            any_top_p=any(state.request.top_p < 1.0 for _, state in states),
            any_greedy=any(state.request.temperature <= 0.0 for _, state in states),
            kernel=decoder.sampling_kernel,
        )
        decoder.input_ids[:rows, 0] = tokens
        active = decoder.active[:rows]
        decoder.end[:rows].add_(active).clamp_(max=decoder.max_len - 1)
        decoder.generated[:rows].add_(active).clamp_(max=decoder.max_tokens - 1)
        self.stats.decode_steps += 1
        self.stats.decode_rows += rows
        host_tokens = decoder.host_tokens[self.stats.decode_steps % 2][:rows]
        host_tokens.copy_(tokens, non_blocking=True)
        done = None
        if tokens.is_cuda:
            done = torch.cuda.Event()
            done.record()
        used = decoder.pool.num_blocks - 1 - decoder.pool.num_free()  # block 0 is scratch
        self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, used)
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
        self._free_row(row)
        self.unfinished_samples[state.request_index] -= 1
        if self.unfinished_samples[state.request_index] == 0:
            self.requests_done += 1
            if self.follow_up is not None:
                self.just_finished.append(state.request_index)


def prefill(decoder: PagedDecoder, admitted: list[Admission]) -> torch.Tensor:
    """Run the admitted sequences' uncached tokens through the model in one right-padded batch,
    writing their keys and values into their blocks; each row attends to its cached prefix too.

    Returns the float32 logits after each sequence's last token [sequences, vocab].
    """
    device = decoder.parts.device
    input_ids, lengths = right_padded([a.sequence[a.cached :] for a in admitted], device)
    tokens = input_ids.shape[1]
    starts = on_device([a.cached for a in admitted], device)
    positions = starts.unsqueeze(1) + torch.arange(tokens, device=device)
    width = max(len(a.blocks) for a in admitted)
    tables = on_device([a.blocks + [SCRATCH_BLOCK] * (width - len(a.blocks)) for a in admitted], device)
    # Padding (after a row's last token) writes to the scratch block; being causal, real tokens
    # never attend to it.
    real = torch.arange(tokens, device=device).unsqueeze(0) < lengths.unsqueeze(1)
    in_table = positions.clamp_max(width * BLOCK_SIZE - 1)
    slots = tables.gather(1, in_table // BLOCK_SIZE) * BLOCK_SIZE + in_table % BLOCK_SIZE
    batch = PagedBatch(
        cache=decoder.cache,
        slot_mapping=torch.where(real, slots, SCRATCH_BLOCK * BLOCK_SIZE).view(-1),
        block_tables=tables,
        query_positions=positions,
    )
    hidden = run_paged(decoder.parts, input_ids, positions, batch)
    last_hidden = hidden[torch.arange(len(admitted), device=device), lengths - 1]
    return decoder.parts.logits_from_hidden(last_hidden).float()


def right_padded(sequences: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids padded on the right with 0 (never attended to), and the true lengths."""
    lengths = [len(s) for s in sequences]
    padded = torch.zeros(len(sequences), max(lengths), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        padded[row, : len(sequence)] = torch.tensor(sequence)
    return on_device(padded, device), on_device(lengths, device)


def wanted_blocks(num_slots: int, max_len: int, tokens: int | None) -> int:
    """Blocks of the KV cache before memory has its say: `tokens` worth if given, else as many
    as `num_slots` sequences of `max_len` tokens could fill sharing nothing, with the block each
    takes to grow into at admission and the 1% admission keeps free (one more is scratch)."""
    if tokens is not None:
        return max(2, blocks_for(tokens) + 1)
    filled = num_slots * (blocks_for(max_len) + 1)
    return filled + max(1, filled // 99) + 1


def choose_num_blocks(parts: ModelParts, wanted: int, num_slots: int, vocab_size: int) -> int:
    """`wanted` blocks, capped on CUDA by what 90% of free memory holds after the sampling
    workspace (about five float32 vocab-sized rows a slot) and a margin for prefill's activations."""
    if parts.device.type != "cuda":
        return wanted
    free_bytes, _ = torch.cuda.mem_get_info(parts.device)
    workspace = num_slots * 5 * 4 * vocab_size + 4 * 2**30
    block_bytes = BLOCK_SIZE * kv_bytes_per_token(parts.config, parts.dtype)
    return max(2, min(wanted, int(0.9 * (free_bytes - workspace)) // block_bytes))


# Row counts a decode step may run: powers of two up to this, then its multiples. Multiples of
# 128 because cuBLAS's kernels for a 7B layer's matrix products are slow at some row counts in
# between: on an H100, 416 or 448 rows took 623 us a layer where 512 took 395 (the table in
# bench/bench_kernels.py, --matmul-rows), so a step is cheaper rounded up to a multiple of 128.
ROW_COUNT_STEP = 128


def row_counts(num_slots: int) -> list[int]:
    """The row counts a decoder of `num_slots` slots runs steps at (one CUDA graph each)."""
    powers = [1 << k for k in range(3, ROW_COUNT_STEP.bit_length())]
    counts = powers + list(range(ROW_COUNT_STEP, num_slots, ROW_COUNT_STEP))
    return sorted({min(num_slots, count) for count in counts} | {num_slots})


def round_up(value: int, multiple: int) -> int:
    return multiple * math.ceil(value / multiple)

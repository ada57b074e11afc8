"""The hf engine's KV cache: keys and values in fixed-size blocks that sequences share.

A sequence's keys and values live in blocks of BLOCK_SIZE positions; its block table lists them
in order, so position p sits at row p % BLOCK_SIZE of block table[p // BLOCK_SIZE]. Blocks are
taken as a sequence grows, never reserved for the longest request, and a block of prompt tokens
is stored once however many sequences read it:

* A request's n samples read the blocks of its prompt, prefilled once (each sample owns a copy of
  the prompt's last, partly filled block only, since its own tokens go there next).
* A block filled with prompt tokens is remembered under its contents and those of every block
  before it (a chain of keys), so a later prompt that starts with the same tokens (label's
  probes of one response, a staged probe's second stage) reuses it instead of computing it.
  Such a block stays remembered after its last reader finishes, until its room is needed.

`BlockPool` is the host's bookkeeping (which block is free, who reads it, what it holds);
`KVCache` the device tensors; `paged_attention` the attention of a batch over them: a gather of
each sequence's blocks into plain tensors for torch's attention (CPU, and the reference), or the
Triton kernel of kernels.py for decoding on CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prmtool.engines.hf.transfer import on_device

BLOCK_SIZE = 16
# Block 0 is never handed out: idle decode rows and prompt padding write their keys there.
SCRATCH_BLOCK = 0


class BlockPool:
    """Which blocks are free, how many sequences read each, and which hold known prompt prefixes.

    A block's reference count is the number of sequences (or prefills in progress) whose block
    table lists it; at zero it is free, but a block that holds a remembered prefix keeps its
    contents until it is handed out again, least recently freed first.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is scratch), got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        # Free blocks in the order they were freed; popping from the front reuses the oldest.
        self.free: OrderedDict[int, None] = OrderedDict((block, None) for block in range(1, num_blocks))
        # A remembered block's key is (the chain id of the block before it, its tokens); its chain
        # id names "these tokens after that prefix" for the block after it. Ids are never reused,
        # so a key naming a forgotten block's id can never match again.
        self.remembered: dict[tuple[int, tuple[int, ...]], int] = {}
        self.key_of: list[tuple[int, tuple[int, ...]] | None] = [None] * num_blocks
        self.chain_id = [0] * num_blocks
        self.next_chain_id = 1

    def num_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        """A free block with one reference; raises IndexError when none is free."""
        if not self.free:
            raise IndexError("no free KV block")
        block, _ = self.free.popitem(last=False)
        self._forget(block)
        self.ref_count[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more reader of `block` (taking it off the free list if it was there)."""
        if self.ref_count[block] == 0:
            del self.free[block]
        self.ref_count[block] += 1

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                self.free[block] = None

    def cached_prefix(self, token_ids: list[int], most_blocks: int) -> list[int]:
        """The remembered blocks that hold token_ids' first full blocks, in order, at most
        `most_blocks` of them (not shared yet: the caller shares those it keeps)."""
        blocks: list[int] = []
        parent = 0
        for index in range(min(most_blocks, len(token_ids) // BLOCK_SIZE)):
            tokens = tuple(token_ids[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE])
            block = self.remembered.get((parent, tokens))
            if block is None:
                break
            blocks.append(block)
            parent = self.chain_id[block]
        return blocks

    def remember(self, blocks: list[int], token_ids: list[int]) -> None:
        """Record that `blocks` (a block table) will hold token_ids' keys and values: each full
        block is remembered under its prefix. Where the same prefix is remembered already (two
        prompts alike admitted together), the chain continues through the remembered block."""
        parent = 0
        for index, block in enumerate(blocks[: len(token_ids) // BLOCK_SIZE]):
            key = (parent, tuple(token_ids[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]))
            known = self.remembered.get(key)
            if known is None:
                self._forget(block)
                self.remembered[key] = block
                self.key_of[block] = key
                self.chain_id[block] = known_id = self.next_chain_id
                self.next_chain_id += 1
            else:
                known_id = self.chain_id[known]
            parent = known_id

    def forget_all(self) -> None:
        """Forget every remembered prefix (the blocks keep their references)."""
        self.remembered.clear()
        self.key_of = [None] * self.num_blocks

    def _forget(self, block: int) -> None:
        key = self.key_of[block]
        if key is not None:
            del self.remembered[key]
            self.key_of[block] = None


def blocks_for(positions: int) -> int:
    """Blocks that hold `positions` positions."""
    return -(-positions // BLOCK_SIZE)


class KVCache:
    """Every layer's keys and values, in blocks: [layers, 2 (keys, values), blocks, BLOCK_SIZE,
    kv_heads, head_dim], one tensor, so a block moves in one copy for all layers."""

    def __init__(self, num_layers: int, num_blocks: int, kv_heads: int, head_dim: int, device, dtype):
        self.blocks = torch.zeros(num_layers, 2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, device=device, dtype=dtype)
        self.kv_heads, self.head_dim = kv_heads, head_dim

    def copy_blocks(self, sources: list[int], destinations: list[int]) -> None:
        if sources:
            # Indices through pinned memory: the host does not wait for the work already queued.
            pinned = self.blocks.is_cuda
            indices = torch.tensor([sources, destinations], pin_memory=pinned).to(self.blocks.device, non_blocking=True)
            self.blocks[:, :, indices[1]] = self.blocks[:, :, indices[0]]

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.blocks[index, 0], self.blocks[index, 1]


class PrefixGroups:
    """Decoding rows that read the same leading blocks (the samples of one prompt), so that
    attention reads those blocks once per group instead of once per row (cascade attention:
    kernels.shared_prefix_decode_kernel). At 7B with prompts of 1,500 tokens and 8 samples each,
    the prompt's keys and values are most of what a decode step reads.

    Host bookkeeping, and device tensors of fixed shapes (a CUDA graph replays over them):
      members [groups, members_per_group]: each group's rows, -1 for none;
      lengths [groups]: how many leading positions the group shares (0: the group is unused);
      block_tables [groups, width]: the shared blocks;
      row_starts [rows]: the first position a row reads on its own (its group's length, or 0).
    A group lasts while any member decodes (the members hold the blocks). Changes reach the
    device at `flush`, which the decoder queues before each step.
    """

    def __init__(self, num_rows: int, table_width: int, members_per_group: int, device: torch.device):
        capacity = max(1, num_rows // 2)  # a group has two members at least
        self.members_per_group = members_per_group
        self.members = torch.full((capacity, members_per_group), -1, dtype=torch.int32, device=device)
        self.lengths = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.block_tables = torch.full((capacity, table_width), SCRATCH_BLOCK, dtype=torch.int32, device=device)
        self.row_starts = torch.zeros(num_rows, dtype=torch.int32, device=device)
        self.table_width = table_width
        self.free_groups = list(range(capacity - 1, -1, -1))  # popped from the end: lowest first
        self.group_of_row: dict[int, tuple[int, int]] = {}  # row -> (group, its place in the group)
        self.size = [0] * capacity
        self.length = [0] * capacity  # positions each group shares
        # Device writes not flushed yet, by index (the last write to an index wins).
        self.member_writes: dict[tuple[int, int], int] = {}
        self.length_writes: dict[int, int] = {}
        self.table_writes: dict[int, list[int]] = {}
        self.start_writes: dict[int, int] = {}

    @staticmethod
    def members_for(query_heads_per_kv_head: int) -> int:
        """Rows per group: the kernel attends with one tile of 64 query rows (members x the KV
        head's query heads, padded to a power of two); 1 means grouping cannot help."""
        padded = 1 << (query_heads_per_kv_head - 1).bit_length()
        return max(1, 64 // padded)

    def add(self, rows: list[int], shared_blocks: list[int]) -> None:
        """These rows read `shared_blocks` first (all of them full): group them, in groups of at
        most members_per_group; a row left alone, or with no group free, reads them itself."""
        if not shared_blocks:
            return
        length = len(shared_blocks) * BLOCK_SIZE
        table = shared_blocks + [SCRATCH_BLOCK] * (self.table_width - len(shared_blocks))
        for first in range(0, len(rows), self.members_per_group):
            chunk = rows[first : first + self.members_per_group]
            if len(chunk) < 2 or not self.free_groups:
                return
            group = self.free_groups.pop()
            self.size[group] = len(chunk)
            self.length_writes[group] = length
            self.table_writes[group] = table
            for place in range(self.members_per_group):
                self.member_writes[(group, place)] = chunk[place] if place < len(chunk) else -1
            self.length[group] = length
            for place, row in enumerate(chunk):
                self.group_of_row[row] = (group, place)
                self.start_writes[row] = length

    def remove(self, row: int) -> None:
        """The row stopped decoding (finished, cancelled or preempted)."""
        if row not in self.group_of_row:
            return
        group, place = self.group_of_row.pop(row)
        self.member_writes[(group, place)] = -1
        self.start_writes[row] = 0
        self.size[group] -= 1
        if self.size[group] == 0:
            self.length_writes[group] = 0
            self.free_groups.append(group)

    def move(self, source: int, target: int) -> None:
        """The sample decoding in row `source` goes on in row `target` (an idle row), in its group."""
        if source not in self.group_of_row:
            return
        group, place = self.group_of_row.pop(source)
        self.group_of_row[target] = (group, place)
        self.member_writes[(group, place)] = target
        self.start_writes[source], self.start_writes[target] = 0, self.length[group]

    def clear(self) -> None:
        """No groups (a new sampling call: a call that raised may have left some behind)."""
        self.free_groups = list(range(len(self.size) - 1, -1, -1))
        self.group_of_row.clear()
        self.size = [0] * len(self.size)
        for writes in (self.member_writes, self.length_writes, self.table_writes, self.start_writes):
            writes.clear()
        self.members.fill_(-1)
        self.lengths.zero_()
        self.row_starts.zero_()

    def flush(self) -> None:
        """Queue the pending changes on the device (before the next decode step)."""
        device = self.members.device
        if self.member_writes:
            places, rows = list(self.member_writes), list(self.member_writes.values())
            groups, slots = zip(*places)
            self.members[on_device(groups, device), on_device(slots, device)] = on_device(rows, device, torch.int32)
        for writes, target in ((self.length_writes, self.lengths), (self.start_writes, self.row_starts)):
            if writes:
                target[on_device(list(writes), device)] = on_device(list(writes.values()), device, torch.int32)
        if self.table_writes:
            groups = on_device(list(self.table_writes), device)
            self.block_tables[groups] = on_device(list(self.table_writes.values()), device, torch.int32)
        for writes in (self.member_writes, self.length_writes, self.table_writes, self.start_writes):
            writes.clear()


@dataclass
class PagedBatch:
    """What attention needs besides the new queries, keys and values of a forward pass.

    rows are sequences, each feeding `tokens` new tokens (right-padded):
      slot_mapping [rows * tokens]: the flat cache position (block * BLOCK_SIZE + offset) each
        new token's keys and values are written to (padding writes to the scratch block);
      block_tables [rows, width]: the blocks each row reads (entries past its length: scratch);
      query_positions [rows, tokens]: each new token's position: it attends to positions <= it.
    """

    cache: KVCache
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    query_positions: torch.Tensor
    use_kernel: bool = False  # decode through the Triton kernel (CUDA, one token per row)
    prefix_groups: PrefixGroups | None = None  # rows that share leading blocks (kernel only)


@torch.compiler.disable  # compiled decoder layers (compile_decode) call it eagerly: it writes the cache in place
def paged_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, paged_batch=None, **kwargs):
    """A transformers attention function over the block cache (registered as PAGED_ATTENTION).

    query [rows, heads, tokens, head_dim]; key, value [rows, kv_heads, tokens, head_dim] are the
    new tokens' own: they are written into the cache first, then every row attends over its
    block table. `paged_batch` (a PagedBatch) comes through the model's forward; the attention
    mask is a placeholder, unused.
    """
    batch = paged_batch
    rows, heads, tokens, head_dim = query.shape
    key_blocks, value_blocks = batch.cache.layer(module.layer_idx)
    kv_heads = key_blocks.shape[2]
    flat_keys = key_blocks.view(-1, kv_heads, head_dim)
    flat_values = value_blocks.view(-1, kv_heads, value_blocks.shape[-1])
    flat_keys.index_copy_(0, batch.slot_mapping, key.transpose(1, 2).reshape(-1, kv_heads, head_dim))
    flat_values.index_copy_(0, batch.slot_mapping, value.transpose(1, 2).reshape(-1, kv_heads, value.shape[-1]))
    scale = scaling if scaling is not None else head_dim**-0.5
    if batch.use_kernel:
        from prmtool.engines.hf.kernels import paged_decode

        output = paged_decode(
            query.reshape(rows, heads, head_dim),
            key_blocks,
            value_blocks,
            batch.block_tables,
            batch.query_positions.view(-1) + 1,
            scale,
            shared=batch.prefix_groups,
        )
        return output.view(rows, 1, heads, head_dim), None
    return gathered_attention(query, key_blocks, value_blocks, batch.block_tables, batch.query_positions, scale), None


def gathered_attention(query, key_blocks, value_blocks, block_tables, query_positions, scale):
    """The reference: each row's blocks gathered into plain tensors, then torch's attention.

    With grouped-query attention the query heads that share a KV head become that head's queries
    (the keys and values are read once per KV head, not copied per query head)."""
    rows, heads, tokens, head_dim = query.shape
    kv_heads = key_blocks.shape[2]
    group = heads // kv_heads
    width = block_tables.shape[1] * BLOCK_SIZE
    keys = key_blocks[block_tables].view(rows, width, kv_heads, head_dim).transpose(1, 2)
    values = value_blocks[block_tables].view(rows, width, kv_heads, -1).transpose(1, 2)
    key_positions = torch.arange(width, device=query.device)
    mask = key_positions.view(1, 1, -1) <= query_positions.unsqueeze(-1)  # [rows, tokens, width]
    mask = mask.unsqueeze(1).expand(rows, group, tokens, width).reshape(rows, 1, group * tokens, width)
    grouped = query.reshape(rows, kv_heads, group * tokens, head_dim)
    output = torch.nn.functional.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
    return output.reshape(rows, heads, tokens, -1).transpose(1, 2)


@functools.cache
def decode_kernel_available(device: torch.device, head_dim: int) -> bool:
    """Whether the Triton paged-decode kernel runs here: CUDA, Triton installed, and a head
    size Triton's block shapes can take (a power of two, at least 16)."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0

"""The hf engine's block pool: allocation, sharing, freeing, and prefixes remembered by content."""

from __future__ import annotations

import pytest
import torch

from prmtool.engines.hf.kv_cache import (
    BLOCK_SIZE,
    SCRATCH_BLOCK,
    BlockPool,
    KVCache,
    PrefixGroups,
    blocks_for,
    gathered_attention,
)


def tokens(count: int, start: int = 0) -> list[int]:
    return list(range(start, start + count))


def test_blocks_are_allocated_until_none_is_free_and_come_back_when_released():
    pool = BlockPool(4)  # block 0 is scratch: three to hand out
    blocks = [pool.allocate() for _ in range(3)]
    assert SCRATCH_BLOCK not in blocks and len(set(blocks)) == 3
    assert pool.num_free() == 0
    with pytest.raises(IndexError):
        pool.allocate()
    pool.release(blocks[:1])
    assert pool.num_free() == 1 and pool.allocate() == blocks[0]


def test_a_shared_block_is_free_only_when_its_last_reader_releases_it():
    pool = BlockPool(3)
    block = pool.allocate()
    pool.share(block)  # a second sample reads the prompt's block
    pool.release([block])
    assert pool.num_free() == 1  # still read by one
    pool.release([block])
    assert pool.num_free() == 2


def test_full_prompt_blocks_are_found_again_by_their_tokens_and_their_prefix():
    pool = BlockPool(16)
    prompt = tokens(3 * BLOCK_SIZE + 5)
    blocks = [pool.allocate() for _ in range(blocks_for(len(prompt)))]
    pool.remember(blocks, prompt)
    # A prompt that continues the same prefix finds its three full blocks (not the partial fourth).
    assert pool.cached_prefix(prompt + [7, 8, 9], most_blocks=99) == blocks[:3]
    assert pool.cached_prefix(prompt, most_blocks=2) == blocks[:2]
    # The same tokens after another prefix are other keys and values: no match past the change.
    changed = [999] + prompt[1:]
    assert pool.cached_prefix(changed, most_blocks=99) == []
    diverging = prompt[: 2 * BLOCK_SIZE] + [999] * BLOCK_SIZE
    assert pool.cached_prefix(diverging, most_blocks=99) == blocks[:2]


def test_a_freed_block_keeps_its_prefix_until_its_room_is_handed_out():
    pool = BlockPool(3)
    prompt = tokens(2 * BLOCK_SIZE)
    blocks = [pool.allocate(), pool.allocate()]
    pool.remember(blocks, prompt)
    pool.release(blocks)
    assert pool.cached_prefix(prompt, most_blocks=2) == blocks  # the finished prompt's blocks stay known
    for block in pool.cached_prefix(prompt, most_blocks=2):
        pool.share(block)  # a new reader takes them off the free list
    assert pool.num_free() == 0
    pool.release(blocks)
    pool.allocate()  # the least recently freed is handed out: its prefix is forgotten, and so is the chain after it
    assert pool.cached_prefix(prompt, most_blocks=2) == []


def test_two_prompts_alike_admitted_together_chain_through_the_remembered_block():
    pool = BlockPool(8)
    prompt = tokens(2 * BLOCK_SIZE)
    first = [pool.allocate(), pool.allocate()]
    pool.remember(first, prompt)
    second = [pool.allocate(), pool.allocate()]
    pool.remember(second, prompt)  # same contents: the first blocks stay the remembered ones
    assert pool.cached_prefix(prompt, most_blocks=2) == first


def test_a_row_that_moves_keeps_its_place_in_its_prefix_group():
    """A draining batch moves its last rows down (BatchSampler._compact): the group that reads
    their prompt once per step follows them."""
    groups = PrefixGroups(num_rows=8, table_width=4, members_per_group=4, device=torch.device("cpu"))
    groups.add([4, 5, 6], [7, 8])
    groups.flush()
    groups.move(6, 1)
    groups.flush()
    assert groups.members[0].tolist() == [4, 5, 1, -1]
    assert groups.row_starts.tolist() == [0, 2 * BLOCK_SIZE, 0, 0, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE, 0, 0]
    groups.move(3, 2)  # a row in no group: nothing to follow
    groups.remove(1)  # and the moved row leaves its group as any member does
    groups.flush()
    assert groups.members[0].tolist() == [4, 5, -1, -1] and groups.row_starts[1] == 0


def test_gathered_attention_is_plain_causal_attention_over_the_blocks():
    torch.manual_seed(0)
    heads, kv_heads, head_dim, length = 4, 2, 8, 2 * BLOCK_SIZE + 3
    cache = KVCache(1, 8, kv_heads, head_dim, "cpu", torch.float32)
    keys, values = cache.layer(0)
    table = torch.tensor([[5, 2, 7]])
    keys.normal_()
    values.normal_()
    query = torch.randn(1, heads, length, head_dim)
    got = gathered_attention(query, keys, values, table, torch.arange(length).view(1, -1), head_dim**-0.5)
    # The same attention on the contiguous keys and values, each KV head repeated for its query heads.
    contiguous_keys = keys[table[0]].reshape(-1, kv_heads, head_dim)[:length].transpose(0, 1)
    contiguous_values = values[table[0]].reshape(-1, kv_heads, head_dim)[:length].transpose(0, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query[0],
        contiguous_keys.repeat_interleave(heads // kv_heads, 0),
        contiguous_values.repeat_interleave(heads // kv_heads, 0),
        is_causal=True,
        scale=head_dim**-0.5,
    )
    torch.testing.assert_close(got[0].transpose(0, 1), expected)


def test_the_triton_decode_kernel_reads_the_blocks_as_the_gathered_reference_does():
    """The CUDA decode kernel (kernels.paged_decode) on random blocks; on a machine without a GPU
    it runs in Triton's interpreter, in a process of its own (the interpreter is chosen when
    Triton loads), where Triton is installed at all (CI has none)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = subprocess.run(
        [sys.executable, "-c", KERNEL_CHECK, device],
        env={**os.environ, "TRITON_INTERPRET": "0" if device == "cuda" else "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "same"


KERNEL_CHECK = """
import sys
import torch
from prmtool.engines.hf.kernels import paged_decode
from prmtool.engines.hf.kv_cache import BLOCK_SIZE, gathered_attention

device = sys.argv[1]
torch.manual_seed(0)
heads, kv_heads, head_dim, rows = 14, 2, 16, 3  # seven query heads per KV head, as Qwen2.5's
keys = torch.randn(40, BLOCK_SIZE, kv_heads, head_dim, device=device)
values = torch.randn_like(keys)
tables = torch.randint(1, 40, (rows, 6), dtype=torch.int32, device=device)
lengths = torch.tensor([1, 50, 96], device=device)  # one position, a partial block, every block
query = torch.randn(rows, heads, 1, head_dim, device=device)
expected = gathered_attention(query, keys, values, tables.long(), (lengths - 1).view(-1, 1), 0.25)
for splits in (1, 3, 16):  # one program per sequence and KV head, or several (some past its end)
    got = paged_decode(query.view(rows, heads, head_dim), keys, values, tables, lengths, 0.25, splits=splits)
    torch.testing.assert_close(got, expected.reshape(rows, heads, head_dim), atol=1e-5, rtol=1e-5)
print("same")
"""

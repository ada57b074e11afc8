"""Triton kernels (imported only where Triton is installed; see log_probs.py)."""

import torch
import triton
import triton.language as tl


@triton.jit
def target_log_probs_kernel(logits_ptr, targets_ptr, out_ptr, row_stride, columns, BLOCK: tl.constexpr):
    """One program per row: out[row] = logits[row, target] - logsumexp(logits[row]).

    Each lane keeps a running maximum m and a sum s of exp(x - m) over the columns it sees;
    when m grows, s is rescaled by exp(old m - new m). The lanes are combined at the end."""
    row = tl.program_id(0).to(tl.int64)
    row_start = logits_ptr + row * row_stride
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, columns, BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        x = tl.load(row_start + offsets, mask=offsets < columns, other=float("-inf"))
        new_max = tl.maximum(running_max, x)
        # A lane that has seen only -inf keeps sum 0 (and avoids -inf - -inf = nan).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.exp(x - shift)
        running_max = new_max
    row_max = tl.max(running_max, 0)
    total = tl.sum(running_sum * tl.exp(running_max - row_max), 0)
    target_logit = tl.load(row_start + tl.load(targets_ptr + row))
    tl.store(out_ptr + row, target_logit - row_max - tl.log(total))


@triton.jit
def _scaled_exponentials(row_ptr, start, columns, temperature, row_max, BLOCK: tl.constexpr):
    """One block of a row: its columns, exp(x / temperature - row_max), their running sum
    within the block, and the block's total (the running sum's last entry, so that a scan
    ends exactly at the sum of the totals)."""
    lanes = tl.arange(0, BLOCK)
    offsets = start + lanes
    x = tl.load(row_ptr + offsets, mask=offsets < columns, other=float("-inf")).to(tl.float32)
    weights = tl.exp(x / temperature - row_max)  # 0 past the row's end
    running = tl.cumsum(weights, 0)
    block_total = tl.sum(tl.where(lanes == BLOCK - 1, running, 0.0), 0)
    return offsets, weights, running, block_total


@triton.jit
def inverse_cdf_sample_kernel(
    logits_ptr, temperature_ptr, uniform_ptr, out_ptr, row_stride, columns, BLOCK: tl.constexpr
):
    """One program per row: the first column whose cumulative weight under
    softmax(logits / temperature) reaches u times the row's total (see sampling.py).

    Three passes over the row: its maximum; its total, block by block; and the scan, which
    computes the same block totals in the same order, so its running sum ends exactly at the
    total that u scales. Only columns of positive weight are taken. If rounding inside a block
    leaves the target unreached, the last column of positive weight is (u = 1's answer)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    temperature = tl.maximum(tl.load(temperature_ptr + row), 1e-5)
    lanes = tl.arange(0, BLOCK)
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, columns, BLOCK):
        x = tl.load(row_ptr + start + lanes, mask=start + lanes < columns, other=float("-inf")).to(tl.float32)
        running_max = tl.maximum(running_max, x / temperature)
    row_max = tl.max(running_max, 0)
    total = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    for start in range(0, columns, BLOCK):
        _, _, _, block_total = _scaled_exponentials(row_ptr, start, columns, temperature, row_max, BLOCK)
        total += block_total
    target = tl.load(uniform_ptr + row) * total
    before = tl.sum(tl.zeros([BLOCK], tl.float32), 0)
    first_reached = columns
    last_positive = -1
    for start in range(0, columns, BLOCK):
        offsets, weights, running, block_total = _scaled_exponentials(
            row_ptr, start, columns, temperature, row_max, BLOCK
        )
        positive = weights > 0.0
        reached = positive & (before + running >= target)
        first_reached = tl.minimum(first_reached, tl.min(tl.where(reached, offsets, columns), 0))
        last_positive = tl.maximum(last_positive, tl.max(tl.where(positive, offsets, -1), 0))
        before += block_total
    token = tl.where(first_reached < columns, first_reached, last_positive)
    tl.store(out_ptr + row, token.to(tl.int64))


# ---------------------------------------------------------------------- Hopper (TMA) kernels
# Persistent matmuls over tensor descriptors (the TMA copy engine), one program per
# multiprocessor walking the output tiles in groups of GROUP_M row tiles, so a weight tile is
# read from device memory once per group while the group's input rows stay in L2. Their
# epilogues do what would otherwise be extra passes over a large output. See hopper.py.


@triton.jit
def _tile_coordinates(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_pid_n
    first_m = (tile_id // in_group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile_id % in_group) % size_m, (tile_id % in_group) // size_m


@triton.jit
def swiglu_kernel(
    x_desc,
    gate_desc,
    up_desc,
    out_desc,
    M,
    N,
    K,
    NUM_PROGRAMS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = silu(x @ gate^T) * (x @ up^T), rounded as transformers' bf16 MLP rounds it: the
    two products never reach device memory (two accumulators per tile)."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS):
        pid_m, pid_n = _tile_coordinates(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        gate = tl.zeros((BM, BN), dtype=tl.float32)
        up = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            x = x_desc.load([off_m, k])
            gate = tl.dot(x, gate_desc.load([off_n, k]).T, gate)
            up = tl.dot(x, up_desc.load([off_n, k]).T, up)
        dtype = out_desc.dtype
        gate = gate.to(dtype).to(tl.float32)
        activated = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        out_desc.store([off_m, off_n], (activated * up.to(dtype).to(tl.float32)).to(dtype))


@triton.jit
def head_log_normalizer_kernel(
    x_desc,
    w_desc,
    targets_ptr,
    part_max_ptr,
    part_sum_ptr,
    target_logit_ptr,
    M,
    N,
    K,
    NUM_PROGRAMS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """For each tile of logits = x @ w^T (float32 accumulators, never stored): each row's maximum
    and sum of exp(logit - maximum) over the tile's columns, into part_*[row, column tile], and
    the row's target logit when the target falls in the tile."""
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coordinates(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        logits = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            logits = tl.dot(x_desc.load([off_m, k]), w_desc.load([off_n, k]).T, logits)
        rows = off_m + tl.arange(0, BM)
        columns = off_n + tl.arange(0, BN)
        logits = tl.where(columns[None, :] < N, logits, float("-inf"))
        tile_max = tl.max(logits, 1)
        tile_sum = tl.sum(tl.exp(logits - tile_max[:, None]), 1)
        real_row = rows < M
        part = rows.to(tl.int64) * num_pid_n + pid_n
        tl.store(part_max_ptr + part, tile_max, mask=real_row)
        tl.store(part_sum_ptr + part, tile_sum, mask=real_row)
        targets = tl.load(targets_ptr + rows, mask=real_row, other=-1)
        in_tile = (targets >= off_n) & (targets < off_n + BN)
        target_logit = tl.sum(tl.where(columns[None, :] == targets[:, None], logits, 0.0), 1)
        tl.store(target_logit_ptr + rows, target_logit, mask=real_row & in_tile)


# ---------------------------------------------------------------------- paged decode attention


@triton.jit
def _attend_through_table(
    query,
    table_ptr,
    key_ptr,
    value_ptr,
    first,
    last,
    scale,
    kv_head,
    block_stride,
    position_stride,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Attention of `query` [ROWS, HEAD_DIM] over positions first..last-1 of one KV head, read
    TILE at a time through a block table, with a running maximum and sum (online softmax).
    Returns the normalized output [ROWS, HEAD_DIM] and its log-sum-exp [ROWS] (0 and -inf over
    no positions: weight 0 when parts are combined)."""
    dims = tl.arange(0, HEAD_DIM)
    running_max = tl.full([ROWS], float("-inf"), tl.float32)
    running_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    for start in range(first, last, TILE):
        positions = start + tl.arange(0, TILE)
        valid = positions < last
        blocks = tl.load(table_ptr + positions // BLOCK_SIZE, mask=valid, other=0)
        rows = blocks.to(tl.int64) * block_stride + (positions % BLOCK_SIZE) * position_stride + kv_head * HEAD_DIM
        keys = tl.load(key_ptr + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(query, tl.trans(keys), input_precision="ieee")
        else:
            scores = tl.dot(query, tl.trans(keys))
        scores = tl.where(valid[None, :], scores * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(weights, 1)
        values = tl.load(value_ptr + rows[:, None] + dims[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * correction[:, None] + tl.dot(weights.to(values.dtype), values, input_precision="ieee")
        else:
            acc = acc * correction[:, None] + tl.dot(weights.to(values.dtype), values)
        running_max = new_max
    out = acc / tl.maximum(running_sum, 1e-30)[:, None]
    return out, running_max + tl.log(running_sum)


@triton.jit
def paged_decode_kernel(
    query_ptr,
    key_ptr,
    value_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    starts_ptr,
    out_ptr,
    log_sum_ptr,
    scale,
    query_row_stride,
    block_stride,
    position_stride,
    table_stride,
    out_split_stride,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_STARTS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program per (sequence, KV head, split): the GROUP query heads that share the KV head
    attend over the split's share of the sequence's positions starts[row] (0 without
    HAS_STARTS) to seq_len - 1, read TILE at a time through its block table, with a running
    maximum and sum (online softmax). Queries [rows, heads, HEAD_DIM] contiguous per row; keys
    and values [blocks, BLOCK_SIZE, kv_heads, HEAD_DIM]. With SPLIT, each split writes its
    normalized output to out[split] (float32) and its log-sum-exp to log_sum[split, row, head],
    for `paged_decode` to combine; else the one program writes the output."""
    row = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + row)
    start = 0
    if HAS_STARTS:
        start = tl.load(starts_ptr + row)
    # The split's positions: an equal share of the sequence's, whole tiles.
    share = tl.cdiv(tl.cdiv(seq_len - start, tl.num_programs(2)), TILE) * TILE
    first = start + split * share
    last = tl.minimum(first + share, seq_len)
    group = tl.arange(0, GROUP_PAD)
    in_group = group < GROUP
    heads = kv_head * GROUP + group
    dims = tl.arange(0, HEAD_DIM)
    query_offsets = row * query_row_stride + heads[:, None] * HEAD_DIM + dims[None, :]
    query = tl.load(query_ptr + query_offsets, mask=in_group[:, None], other=0.0)
    out, log_sum = _attend_through_table(
        query, block_tables_ptr + row * table_stride, key_ptr, value_ptr, first, last, scale, kv_head,
        block_stride, position_stride, GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE, IEEE,
    )  # fmt: skip
    # A split past the sequence's end saw nothing: output 0, log-sum-exp -inf (weight 0).
    tl.store(
        out_ptr + split * out_split_stride + query_offsets, out.to(out_ptr.dtype.element_ty), mask=in_group[:, None]
    )
    if SPLIT:
        rows_heads = tl.num_programs(0).to(tl.int64) * GROUP * tl.num_programs(1)
        tl.store(log_sum_ptr + split * rows_heads + row * GROUP * tl.num_programs(1) + heads, log_sum, mask=in_group)


@triton.jit
def shared_prefix_decode_kernel(
    query_ptr,
    key_ptr,
    value_ptr,
    group_tables_ptr,
    group_lengths_ptr,
    members_ptr,
    out_ptr,
    log_sum_ptr,
    scale,
    query_row_stride,
    block_stride,
    position_stride,
    table_stride,
    out_split_stride,
    rows,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    MEMBERS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One program per (prefix group, KV head, split): the query heads of every member row of
    the group (up to MEMBERS rows, -1 for none) attend together over the group's first
    group_lengths[group] positions, whose blocks the members share: each tile of keys and values
    is read once for all of them (cascade attention). Writes each member's normalized output and
    log-sum-exp over these positions to out[split] and log_sum[split], as paged_decode_kernel
    does with SPLIT; `paged_decode` combines them with the row kernel's over the rest."""
    group_index = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(group_lengths_ptr + group_index)
    share = tl.cdiv(tl.cdiv(length, tl.num_programs(2)), TILE) * TILE
    first = split * share
    last = tl.minimum(first + share, length)
    # Query row q is head q % GROUP_PAD (of the KV head's GROUP) of member q // GROUP_PAD.
    lanes = tl.arange(0, MEMBERS * GROUP_PAD)
    member_row = tl.load(members_ptr + group_index * MEMBERS + lanes // GROUP_PAD).to(tl.int64)
    in_group = lanes % GROUP_PAD
    valid_query = (member_row >= 0) & (in_group < GROUP)
    heads = kv_head * GROUP + in_group
    dims = tl.arange(0, HEAD_DIM)
    query_offsets = member_row[:, None] * query_row_stride + heads[:, None] * HEAD_DIM + dims[None, :]
    query = tl.load(query_ptr + query_offsets, mask=valid_query[:, None], other=0.0)
    out, log_sum = _attend_through_table(
        query, group_tables_ptr + group_index * table_stride, key_ptr, value_ptr, first, last, scale, kv_head,
        block_stride, position_stride, MEMBERS * GROUP_PAD, HEAD_DIM, BLOCK_SIZE, TILE, IEEE,
    )  # fmt: skip
    heads_total = GROUP * tl.num_programs(1)
    out_offsets = member_row[:, None] * heads_total * HEAD_DIM + heads[:, None] * HEAD_DIM + dims[None, :]
    stored = valid_query & (member_row < rows)
    tl.store(out_ptr + split * out_split_stride + out_offsets, out, mask=stored[:, None])
    log_sum_offsets = split * rows * heads_total + member_row * heads_total + heads
    tl.store(log_sum_ptr + log_sum_offsets, log_sum, mask=stored)


def decode_splits(rows: int, kv_heads: int, device: torch.device) -> int:
    """How many programs share each (sequence, KV head): enough for about two programs per
    multiprocessor when few sequences decode (the tail of a run, a small round of label's), at
    most 16, one when the sequences alone fill the GPU."""
    programs = rows * kv_heads
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(16, 2 * multiprocessors // max(1, programs)))


def paged_decode(
    query,
    key_blocks,
    value_blocks,
    block_tables,
    seq_lens,
    scale: float,
    tile: int = 64,
    splits: int | None = None,
    shared=None,
):
    """Attention of one new token per row over its first seq_lens[row] cached positions.

    query [rows, heads, head_dim]; key_blocks, value_blocks [blocks, block_size, kv_heads,
    head_dim]; block_tables [rows, width] (int); seq_lens [rows]. Returns [rows, heads, head_dim].
    With few rows each sequence is split between programs (flash-decoding), whose outputs are
    combined by their log-sum-exps.

    `shared` (a kv_cache.PrefixGroups' device tensors: members, lengths, block_tables,
    row_starts) names rows that share their first positions' blocks: those positions are read
    once per group by shared_prefix_decode_kernel, and each row's own kernel starts at
    row_starts[row]; the two parts are combined like splits."""
    query = query.contiguous()
    rows, heads, head_dim = query.shape
    _, block_size, kv_heads, _ = key_blocks.shape
    group = heads // kv_heads
    splits = splits or decode_splits(rows, kv_heads, query.device)
    group_splits = 0
    if shared is not None:
        group_count, members = shared.members.shape
        group_splits = decode_splits(max(1, rows // members), kv_heads, query.device)
    if splits == 1 and shared is None:
        out = torch.empty_like(query)
        log_sum = out  # unused
    else:
        out = torch.empty(splits + group_splits, rows, heads, head_dim, device=query.device, dtype=torch.float32)
        log_sum = torch.empty(splits + group_splits, rows, heads, device=query.device, dtype=torch.float32)
    paged_decode_kernel[(rows, kv_heads, splits)](
        query,
        key_blocks,
        value_blocks,
        block_tables,
        seq_lens,
        shared.row_starts if shared is not None else seq_lens,
        out,
        log_sum,
        scale,
        query.stride(0),
        key_blocks.stride(0),
        key_blocks.stride(1),
        block_tables.stride(0),
        rows * heads * head_dim,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        TILE=tile,
        SPLIT=out.dim() == 4,
        HAS_STARTS=shared is not None,
        IEEE=query.dtype == torch.float32,
        num_warps=4,
        num_stages=2,
    )
    if shared is not None:
        # Rows in no group get weight 0 from the group splits (nothing else writes there).
        out[splits:].zero_()
        log_sum[splits:].fill_(float("-inf"))
        shared_prefix_decode_kernel[(group_count, kv_heads, group_splits)](
            query,
            key_blocks,
            value_blocks,
            shared.block_tables,
            shared.lengths,
            shared.members,
            out[splits:],
            log_sum[splits:],
            scale,
            query.stride(0),
            key_blocks.stride(0),
            key_blocks.stride(1),
            shared.block_tables.stride(0),
            rows * heads * head_dim,
            rows,
            GROUP=group,
            GROUP_PAD=triton.next_power_of_2(group),
            MEMBERS=members,
            HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size,
            TILE=tile,
            IEEE=query.dtype == torch.float32,
            num_warps=4,
            num_stages=2,
        )
    if out.dim() == 3:
        return out
    weights = torch.softmax(log_sum, dim=0)  # each part's share of the normalizer
    return (out * weights.unsqueeze(-1)).sum(0).to(query.dtype)

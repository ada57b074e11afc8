"""Triton kernels (imported only where Triton is installed; see log_probs.py)."""

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

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

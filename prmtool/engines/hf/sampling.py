"""The next token of each decode row: inverse-CDF sampling with the row's own uniform number.

With `kernel` (HFEngine's sampling_kernel, CUDA and Triton), the rows with top_p == 1 (label's
and generate's default) are sampled by one kernel (kernels.inverse_cdf_sample_kernel) that reads
the bf16 logits in place, three passes over a row, where torch writes float32 copies of all of
them (the cast, the division by the temperature, the softmax, the cumulative sum; at 512 rows
of a 152k vocabulary: 0.25 ms against torch's 1.41 on an H100, bench/bench_kernels.py).
Otherwise torch samples, as the reference.
"""

from __future__ import annotations

import torch

# Columns per loop iteration and warps per row of the sampling kernel.
BLOCK_COLUMNS = 4096
NUM_WARPS = 8


def sample_from_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    any_top_p: bool,
    any_greedy: bool,
    kernel: bool = False,
) -> torch.Tensor:
    """Next token per row: inverse-CDF sampling with the row's own uniform number in (0, 1].

    Rows with top_p == 1 invert the CDF in vocabulary order; rows with top_p < 1 keep the
    smallest set of most probable tokens whose mass reaches top_p (vLLM's rule) and invert the
    CDF over that set, sorted by probability. Rows with temperature 0 take the argmax.
    `any_top_p` / `any_greedy` are known on the host and skip work no row needs. `kernel`: the
    Triton kernel for the top_p == 1 rows (CUDA tensors only).
    """
    if kernel:
        tokens = inverse_cdf_tokens(logits, temperature, uniform)
        if not (any_top_p or any_greedy):
            return tokens
    logits = logits.float()
    if not kernel or any_top_p:
        probs = torch.softmax(logits / temperature.clamp_min(1e-5).unsqueeze(1), dim=-1)
    if not kernel:
        tokens = torch_inverse_cdf(probs, uniform)
    if any_top_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p.unsqueeze(1), 0.0)
        nucleus_tokens = order.gather(1, torch_inverse_cdf(sorted_probs, uniform).unsqueeze(1)).squeeze(1)
        tokens = torch.where(top_p < 1.0, nucleus_tokens, tokens)
    if any_greedy:
        tokens = torch.where(temperature <= 0.0, logits.argmax(dim=-1), tokens)
    return tokens


def torch_inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row, the first index whose cumulative probability reaches u times the row's total.
    Scaling by the total absorbs rounding in the cumulative sum, and u > 0 never lands on a
    zero-probability token."""
    cdf = probs.cumsum(dim=-1)
    target = uniform.unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).squeeze(1).clamp_max(probs.shape[-1] - 1)


def inverse_cdf_tokens(logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """`torch_inverse_cdf(softmax(logits / temperature), uniform)` in one Triton kernel, reading
    `logits` (any float dtype, rows contiguous) in place. The same distribution; a token may
    differ from torch's where u lands within rounding of a boundary between two tokens."""
    from prmtool.engines.hf.kernels import inverse_cdf_sample_kernel

    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, columns = logits.shape
    tokens = torch.empty(rows, device=logits.device, dtype=torch.int64)
    if rows:
        inverse_cdf_sample_kernel[(rows,)](
            logits,
            temperature.float().contiguous(),
            uniform.float().contiguous(),
            tokens,
            logits.stride(0),
            columns,
            BLOCK=BLOCK_COLUMNS,
            num_warps=NUM_WARPS,
        )
    return tokens

"""Fused scoring kernels for Hopper GPUs (H100, H200): Triton matmuls over TMA descriptors
whose epilogues do the work of a second pass over a large output.

- `swiglu(x, gate, up)`: a SwiGLU MLP's silu(x @ gate^T) * (x @ up^T) in one kernel. cuBLAS's
  two products plus the elementwise kernel write and re-read two tokens x intermediate tensors;
  here they stay in registers. On an H200, for 16,384 tokens of Qwen2.5-1.5B: 1.30 to 1.43 ms
  against 1.50 to 1.53 ms for cuBLAS plus Inductor's SiLU*mul.
- `head_target_log_probs(hidden, weight, targets)`: log p(target) through the output head,
  never writing the tokens x vocabulary float32 logits: each tile of logits leaves only its
  rows' maximum and sum of exponentials. Same shapes: 11.9 ms against 14.6 ms for cuBLAS's
  float32 logits followed by the one-pass log-normalizer.

The tile sizes are the best of a small sweep on an H200 (bench/bench_score.py has the
end-to-end figures). Used by the hf engine when `available(device)`; elsewhere the plain torch
path runs.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from prmtool.engines.hf.log_probs import target_log_probs

# Tile shapes and pipelining: BM x BN output tiles, BK-wide steps over the shared dimension,
# GROUP_M row tiles walked together (weight tiles are read once per group).
SWIGLU_TILES = dict(BM=128, BN=128, BK=64, GROUP_M=8)
SWIGLU_LAUNCH = dict(num_stages=3, num_warps=8)
HEAD_TILES = dict(BM=128, BN=256, BK=64, GROUP_M=32)
HEAD_LAUNCH = dict(num_stages=3, num_warps=8)


@functools.cache
def available(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with TMA (compute capability 9.0 or later) and this Triton
    has host-side tensor descriptors."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    if torch.cuda.get_device_capability(device)[0] < 9:
        return False
    return importlib.util.find_spec("triton.tools.tensor_descriptor") is not None


def _descriptor(tensor: torch.Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(tensor, block)


def _tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether the copy engine can read these (contiguous) tensors: on CUDA, rows starting at
    16-byte aligned addresses. A model's weights nearly always are; a view into an odd offset
    of a larger buffer may not be, and then the torch computation runs instead."""
    return all(t.is_cuda and t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def _programs(device: torch.device, tiles: int) -> int:
    return max(1, min(torch.cuda.get_device_properties(device).multi_processor_count, tiles))


@torch.library.custom_op("prmtool::swiglu", mutates_args=())
def swiglu(x: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor) -> torch.Tensor:
    """silu(x @ gate_weight^T) * (x @ up_weight^T) for 2-D x (tokens x hidden); a custom op, so
    torch.compile keeps it as one call."""
    x, gate_weight, up_weight = x.contiguous(), gate_weight.contiguous(), up_weight.contiguous()
    if not _tma_ready(x, gate_weight, up_weight):
        linear = torch.nn.functional.linear
        return torch.nn.functional.silu(linear(x, gate_weight)) * linear(x, up_weight)
    from prmtool.engines.hf.kernels import swiglu_kernel

    (m, k), n = x.shape, gate_weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return out
    t = SWIGLU_TILES
    tiles = -(-m // t["BM"]) * -(-n // t["BN"])
    programs = _programs(x.device, tiles)
    swiglu_kernel[(programs,)](
        _descriptor(x, [t["BM"], t["BK"]]),
        _descriptor(gate_weight, [t["BN"], t["BK"]]),
        _descriptor(up_weight, [t["BN"], t["BK"]]),
        _descriptor(out, [t["BM"], t["BN"]]),
        m,
        n,
        k,
        NUM_PROGRAMS=programs,
        **t,
        **SWIGLU_LAUNCH,
    )
    return out


@swiglu.register_fake
def _(x, gate_weight, up_weight):
    return x.new_empty(x.shape[0], gate_weight.shape[0])


def swiglu_fusable(mlp: torch.nn.Module) -> bool:
    """Whether `mlp` computes down(silu(gate(x)) * up(x)) with bias-free linear layers (the MLP
    of Llama, Qwen2/3, Mistral and kin), with shapes TMA can address (rows of 16-byte multiples)."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, torch.nn.Linear) and p.bias is None for p in parts):
        return False
    gate, up, _ = parts
    return (
        type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")
        and gate.weight.shape == up.weight.shape
        and gate.weight.dtype in (torch.bfloat16, torch.float16)
        and all(size * gate.weight.element_size() % 16 == 0 for size in gate.weight.shape)
    )


def fused_mlp_forward(mlp: torch.nn.Module):
    """A forward for `mlp` (see swiglu_fusable) that runs the fused kernel."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        hidden = swiglu(x.reshape(-1, x.shape[-1]), mlp.gate_proj.weight, mlp.up_proj.weight)
        return mlp.down_proj(hidden).reshape(*x.shape[:-1], -1)

    return forward


def head_fusable(head: torch.nn.Module) -> bool:
    weight = getattr(head, "weight", None)
    return (
        isinstance(head, torch.nn.Linear)
        and head.bias is None
        and weight.dtype in (torch.bfloat16, torch.float16)
        and weight.shape[1] * weight.element_size() % 16 == 0
    )


def head_target_log_probs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(hidden @ weight^T)[target] per row, in float32, without the logits tensor."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    if not _tma_ready(hidden, weight):
        weight_t = weight.float().T  # converted once, not per chunk of rows
        return torch.cat(
            [
                target_log_probs(rows.float() @ weight_t, part)
                for rows, part in zip(hidden.split(4096), targets.split(4096))
            ]
        )
    from prmtool.engines.hf.kernels import head_log_normalizer_kernel

    (m, k), n = hidden.shape, weight.shape[0]
    t = HEAD_TILES
    column_tiles = -(-n // t["BN"])
    part_max = torch.empty(m, column_tiles, device=hidden.device, dtype=torch.float32)
    part_sum = torch.empty_like(part_max)
    target_logit = torch.empty(m, device=hidden.device, dtype=torch.float32)
    if m == 0:
        return target_logit
    programs = _programs(hidden.device, -(-m // t["BM"]) * column_tiles)
    head_log_normalizer_kernel[(programs,)](
        _descriptor(hidden, [t["BM"], t["BK"]]),
        _descriptor(weight, [t["BN"], t["BK"]]),
        targets,
        part_max,
        part_sum,
        target_logit,
        m,
        n,
        k,
        NUM_PROGRAMS=programs,
        **t,
        **HEAD_LAUNCH,
    )
    # Combine the tiles' (maximum, sum) pairs: logsumexp = M + log(sum_j s_j * exp(m_j - M)).
    row_max = part_max.amax(1, keepdim=True)
    log_normalizer = row_max.squeeze(1) + torch.log((part_sum * torch.exp(part_max - row_max)).sum(1))
    return target_logit - log_normalizer

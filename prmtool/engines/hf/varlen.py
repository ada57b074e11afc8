"""Attention over packed sequences without a block-diagonal mask, for training.

A packed batch is one row of several sequences back to back. transformers' `sdpa` reads the
packing from the position ids as a (tokens x tokens) block-diagonal mask, and attention then
costs the square of the whole row and runs masked kernels; flash-attn's varlen kernel (its
`flash_attention_2`) is not installed with torch. This attention implementation takes each
sequence's bounds (`cu_seq_lens`, as flash-attn's) and runs:

- on CUDA, torch's own variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`,
  in torch since 2.9), so each sequence costs its own length squared and no mask is built;
- elsewhere (CPU), causal SDPA sequence by sequence: the same arithmetic, no mask either.

Registered with transformers under NAME; `load_for_training` asks for it by that name.
"""

from __future__ import annotations

import functools
import inspect

import torch

NAME = "prmtool_varlen"


def register() -> str:
    """Make NAME an attention implementation transformers models accept; returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, _no_mask)  # the bounds replace the mask
    return NAME


def _no_mask(*args, **kwargs):
    return None


def sequence_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens, longest) of a packed row: a sequence starts wherever the position id is 0.
    cu_seq_lens are the int32 offsets flash kernels take: [0, end of the first, ..., total]."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    ends = torch.cat([starts[1:], torch.tensor([flat.numel()], device=flat.device)])
    bounds = torch.cat([starts[:1], ends]).to(torch.int32)
    return bounds, int((ends - starts).max())


def varlen_attention(
    module,
    query: torch.Tensor,  # (1, heads, tokens, head_dim): one packed row
    key: torch.Tensor,  # (1, kv_heads, tokens, head_dim)
    value: torch.Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    position_ids: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if query.shape[0] != 1:
        raise ValueError(f"{NAME} takes one packed row at a time, not {query.shape[0]}")
    if cu_seq_lens_q is None:
        cu_seq_lens_q, max_length_q = sequence_bounds(position_ids)
    # (tokens, heads, head_dim), as flash kernels take them; grouped-query keys and values stay
    # as they are (the flash kernel and SDPA's enable_gqa read each for its group of heads)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if q.is_cuda and _torch_varlen() is not None:
        # flash kernels take half precision only; float32 training runs them in autocast's dtype
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        half = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else half
        q, k, v = (t.to(half) for t in (q, k, v))
        out = _torch_varlen()(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scaling)
        out = out.to(query.dtype)
    else:
        out = torch.empty_like(q)
        bounds = cu_seq_lens_q.tolist()
        for start, end in zip(bounds, bounds[1:]):
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1), v[start:end].transpose(0, 1),
                is_causal=True, scale=scaling, enable_gqa=k.shape[1] != q.shape[1],
            ).transpose(0, 1)  # fmt: skip
    return out.unsqueeze(0), None  # (1, tokens, heads, head_dim), what transformers reshapes


@functools.cache
def _torch_varlen():
    """torch's varlen flash attention as f(q, k, v, cu_q, cu_k, max_q, max_k, scale), causal,
    or None where this torch has none. Its keywords changed between releases (`is_causal` in
    2.9, `window_size` later), so the call is fitted to the signature found."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in parameters else {"window_size": (-1, 0)}
    scaled = "scale" in parameters

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **causal, **({"scale": scale} if scaled else {}))

    return call

"""Host-to-GPU copies that do not stall the host."""

from __future__ import annotations

import torch


def on_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`values` (a list, array or CPU tensor) as a tensor on `device`, without waiting for the
    device: on CUDA through pinned memory, which torch keeps until the copy has run. (A copy
    from ordinary, pageable memory first waits for all the work already queued, and the host
    would no longer run a step ahead.) `dtype`: by default a tensor's own, torch.long otherwise."""
    if dtype is None:
        dtype = values.dtype if isinstance(values, torch.Tensor) else torch.long
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda" or tensor.is_cuda:  # a tensor on the GPU already (Trainer moves batches itself)
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)

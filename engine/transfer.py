"""Host values onto the device in one copy: on CUDA through pinned memory, non-blocking (no host sync)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D tensor on ``device``. A CUDA copy is queued from pinned memory and returns at once
    (torch's pinned-memory cache keeps the host buffer until the copy has run); a plain ``torch.tensor(list,
    device=cuda)`` would stage through pageable memory and wait for the stream."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)

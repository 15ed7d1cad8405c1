"""Host values onto the device in one copy: on CUDA through pinned memory, non-blocking (no host sync)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Values = Sequence[int] | Sequence[float] | np.ndarray


def host_tensor(values: Values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D host tensor to copy to ``device``: in pinned memory when that is a CUDA device (torch's
    pinned-memory cache keeps the buffer until a non-blocking copy from it has run; a dry run's fake CUDA device
    has no CUDA runtime to pin with). torch will not pin a tensor made from a NumPy array, so the values are copied
    into a pinned one."""
    host = torch.as_tensor(values, dtype=dtype)
    return host.pin_memory() if device.type == "cuda" and torch.cuda.is_available() else host


def to_device(values: Values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D tensor on ``device``. A CUDA copy is queued from pinned memory and returns at once; a plain
    ``torch.tensor(list, device=cuda)`` would stage through pageable memory and wait for the stream."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return host_tensor(values, dtype, device).to(device, non_blocking=True)

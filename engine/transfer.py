"""Values between host and device: onto it in one copy (on CUDA through pinned memory, non-blocking, no host
sync), and the step's results back in one read (one wait for the stream)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from engine.device import on_card

Values = Sequence[int] | Sequence[float] | np.ndarray


def pinned(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` in pinned memory when it is to be copied to a CUDA card (torch's pinned-memory cache keeps the
    buffer until a non-blocking copy from it has run; without a CUDA runtime, as in a dry run, nothing pins)."""
    return host.pin_memory() if on_card(device) and torch.cuda.is_available() else host


def host_tensor(values: Values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D host tensor to copy to ``device`` (``pinned`` for a card). torch will not pin a tensor
    made from a NumPy array, so the values are copied into a pinned one."""
    return pinned(torch.as_tensor(values, dtype=dtype), device)


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor for the host to fill and then copy to ``device`` (``pinned`` for a card)."""
    return pinned(torch.empty(shape, dtype=dtype), device)


def to_device(values: Values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a 1-D tensor on ``device``. A CUDA copy is queued from pinned memory and returns at once; a plain
    ``torch.tensor(list, device=cuda)`` would stage through pageable memory and wait for the stream."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    return host_tensor(values, dtype, device).to(device, non_blocking=True)


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """The step's one read of device results: every tensor's copy queued, then one wait for the stream (on CPU the
    tensors are read as they are)."""
    if all(t.device.type == "cpu" for t in tensors):
        return [t.numpy() for t in tensors]
    copies = [t.to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(tensors[0].device).synchronize()
    return [c.numpy() for c in copies]

"""One token of a Gated DeltaNet layer for a step's rows, on their states in place (``gated_delta_decode`` in
``recurrent.cpp``): the causal conv, SiLU, the normalised query and key and the delta rule's recurrent form in one
call, two passes over each state where torch's ops make six, and no gather or scatter of the states."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.config import ModelConfig
from engine.kernels import native

if TYPE_CHECKING:
    from engine.linear_attention import LayerState


def fits(config: ModelConfig) -> bool:
    return (config.linear_value_dim % 16 == 0 and config.linear_value_dim <= 512 and config.linear_key_dim <= 512
            and config.linear_conv_dim % 16 == 0)


class DeltaRuleDecode:
    """``GatedDeltaNet.decode_rows`` on the build for ``isa`` (fp32 states, contiguous)."""

    def __init__(self, config: ModelConfig, isa: str) -> None:
        self._kernel = native.library(isa).gated_delta_decode
        self._shape = (config.linear_conv_kernel, config.linear_key_heads, config.linear_value_heads,
                       config.linear_key_dim, config.linear_value_dim, int(config.linear_value_tiled))
        self._value_heads, self._value_dim = config.linear_value_heads, config.linear_value_dim
        self._threads = torch.get_num_threads()

    def __call__(self, state: LayerState, slots: torch.Tensor, taps: torch.Tensor, mixed: torch.Tensor,
                 log_decay: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """``mixed`` [R, channels] the rows' conv inputs, ``log_decay``/``beta`` [R, value heads], ``slots`` [R],
        ``taps`` [kernel, channels]: the states advanced in place; the outputs [R, value heads, V] (fp32)."""
        mixed, log_decay, beta = (t.float().contiguous() for t in (mixed, log_decay, beta))
        slots = slots.contiguous()
        rows = mixed.shape[0]
        convolved = torch.empty_like(mixed)
        out = torch.empty((rows, self._value_heads, self._value_dim), dtype=torch.float32)
        self._kernel(state.conv.data_ptr(), state.recurrent.data_ptr(), slots.data_ptr(), taps.data_ptr(),
                     mixed.data_ptr(), log_decay.data_ptr(), beta.data_ptr(), rows, *self._shape,
                     convolved.data_ptr(), out.data_ptr(), self._threads)
        return out

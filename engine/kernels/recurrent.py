"""One token of a Gated DeltaNet layer for a step's rows, from its projections to its out_proj's input, on their
states in place (``gated_delta_decode`` in ``recurrent.cpp``): the gates, the causal conv, SiLU, the normalised query
and key, the delta rule's recurrent form and the gated RMSNorm in one call, two passes over each state where torch's
ops make six, and no gather or scatter of the states."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from engine.config import ModelConfig
from engine.kernels import native

if TYPE_CHECKING:
    from engine.linear_attention import DecodeRound, GatedDeltaNet, LayerState


def fits(config: ModelConfig) -> bool:
    return (config.linear_value_dim % 16 == 0 and config.linear_value_dim <= 512 and config.linear_key_dim <= 512
            and config.linear_conv_dim % 16 == 0)


class DeltaRuleDecode:
    """``GatedDeltaNet.decode_rows`` of ``layer`` on the build for ``isa`` (fp32 states, contiguous; bf16 or fp32
    activations, as the model runs)."""

    def __init__(self, config: ModelConfig, isa: str, layer: GatedDeltaNet) -> None:
        self._kernel = native.library(isa).gated_delta_decode
        self._parameters = tuple(t.float().contiguous() for t in (layer.conv_taps, layer.decay_rate, layer.dt_bias,
                                                                    layer.norm_weight))
        self._eps = layer.eps
        self._shape = (config.linear_conv_kernel, config.linear_key_heads, config.linear_value_heads,
                       config.linear_key_dim, config.linear_value_dim, int(config.linear_value_tiled))
        self._channels = config.linear_conv_dim
        self._threads = torch.get_num_threads()

    def __call__(self, state: LayerState, rows: DecodeRound, projected: torch.Tensor, gates: torch.Tensor,
                 out: torch.Tensor) -> None:
        """Rows ``rows.tokens`` [R] (packed indices) of ``projected`` [N, conv channels + value size] (in_proj's
        output) and ``gates`` [N, 2 value heads] (gate_proj's) advance the states read from ``rows.sources`` into
        ``rows.slots`` (in place where they are the same); the gated norm's output goes to those rows of ``out``
        [N, value size] (all three in the model's dtype, contiguous)."""
        assert projected.is_contiguous() and gates.is_contiguous() and out.is_contiguous()
        assert projected.dtype in (torch.bfloat16, torch.float32)
        tokens, sources, slots = rows.tokens.contiguous(), rows.sources.contiguous(), rows.slots.contiguous()
        count = tokens.shape[0]
        convolved = torch.empty((count, self._channels), dtype=torch.float32)
        taps, decay_rate, dt_bias, norm_weight = (t.data_ptr() for t in self._parameters)
        self._kernel(state.conv.data_ptr(), state.recurrent.data_ptr(), sources.data_ptr(), slots.data_ptr(),
                     tokens.data_ptr(), taps, projected.data_ptr(), gates.data_ptr(), decay_rate, dt_bias,
                     norm_weight, self._eps, count,
                     *self._shape, int(projected.dtype == torch.float32), convolved.data_ptr(), out.data_ptr(),
                     self._threads)

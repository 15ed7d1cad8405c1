"""The native decode step of a Gated DeltaNet layer (``recurrent.cpp``: conv, SiLU, normalised query and key, the
delta rule's recurrent form), for each build this CPU runs, against the layer's torch path on the same fp32 states:
the outputs and both states it leaves in place, for rows whose slots are scattered over the cache, value heads
grouped or tiled over the key heads; the slots no row names are untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import ModelConfig
from engine.kernels import native
from engine.kernels.recurrent import DeltaRuleDecode, fits
from engine.linear_attention import GatedDeltaNet, LayerState

BUILDS = [isa for isa in native.ISAS if native.runs_here(isa)]
BASE = ModelConfig(arch="qwen3_5", vocab_size=8, hidden_size=16, num_layers=1, num_heads=1, num_kv_heads=1,
                   head_dim=16, intermediate_size=16, rms_norm_eps=1e-6, rope_theta=1e4, max_model_len=64,
                   qkv_bias=False, tie_word_embeddings=False, linear_layers=(0,), linear_conv_kernel=4)


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize(("rows", "key_heads", "value_heads", "key_dim", "value_dim", "tiled"),
                         [(1, 16, 16, 128, 128, False), (5, 2, 4, 16, 48, False), (16, 2, 6, 64, 32, True)])
def test_the_native_decode_step_equals_the_torch_path(isa, rows, key_heads, value_heads, key_dim, value_dim, tiled):
    assert native.library(isa) is not None, f"the {isa} build of the native kernels failed to build"
    config = dataclasses.replace(BASE, linear_key_heads=key_heads, linear_value_heads=value_heads,
                                 linear_key_dim=key_dim, linear_value_dim=value_dim, linear_value_tiled=tiled)
    assert fits(config)
    generator = torch.Generator().manual_seed(rows * 100 + value_heads)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    channels = config.linear_conv_dim
    layer = GatedDeltaNet(config, None, None, rand(channels, 4) * 0.5, rand(value_heads).abs(), rand(value_heads),
                          rand(value_dim), None)
    slots = torch.randperm(2 * rows + 3, generator=generator)[:rows]
    state = LayerState(rand(2 * rows + 3, 3, channels), rand(2 * rows + 3, value_heads, key_dim, value_dim))
    expected = LayerState(state.conv.clone(), state.recurrent.clone())
    mixed, log_decay, beta = rand(rows, channels), -rand(rows, value_heads).abs(), rand(rows, value_heads).sigmoid()
    want = layer.decode_rows(expected, slots, layer.conv_taps, mixed, log_decay, beta)
    got = DeltaRuleDecode(config, isa)(state, slots, layer.conv_taps, mixed, log_decay, beta)
    # the same fp32 arithmetic summed in another order (and g S^T k for (g S)^T k): a few ulps of values near 1
    torch.testing.assert_close(got, want, rtol=0, atol=5e-5)
    torch.testing.assert_close(state.recurrent, expected.recurrent, rtol=0, atol=5e-5)
    assert torch.equal(state.conv, expected.conv)  # the window shifted, bit for bit
    untouched = torch.ones(len(state.recurrent), dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(state.recurrent[untouched], expected.recurrent[untouched])

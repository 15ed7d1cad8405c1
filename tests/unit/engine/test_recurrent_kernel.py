"""The native decode step of a Gated DeltaNet layer (``recurrent.cpp``: gates, conv, SiLU, normalised query and key,
the delta rule's recurrent form, the gated RMSNorm), for each build this CPU runs, against the layer's torch path on
the same fp32 states, in an fp32 and a bf16 model: the outputs and both states it leaves in place, for rows whose
slots are scattered over the cache and whose tokens are scattered over the step, value heads grouped or tiled over
the key heads; read from and written to the same slots or (a row verifying drafted tokens) read from others, which
it leaves as they were; the slots and rows it is not given are untouched."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import ModelConfig
from engine.kernels import native
from engine.kernels.recurrent import DeltaRuleDecode, fits
from engine.linear_attention import DecodeRound, GatedDeltaNet, LayerState

BUILDS = [isa for isa in native.ISAS if native.runs_here(isa)]
BASE = ModelConfig(arch="qwen3_5", vocab_size=8, hidden_size=16, num_layers=1, num_heads=1, num_kv_heads=1,
                   head_dim=16, intermediate_size=16, rms_norm_eps=1e-6, rope_theta=1e4, max_model_len=64,
                   qkv_bias=False, tie_word_embeddings=False, linear_layers=(0,), linear_conv_kernel=4)


@pytest.mark.parametrize("isa", BUILDS)
@pytest.mark.parametrize("moved", [False, True], ids=["in-place", "moved"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("rows", "key_heads", "value_heads", "key_dim", "value_dim", "tiled"),
                         [(1, 16, 16, 128, 128, False), (5, 2, 4, 16, 48, False), (16, 2, 6, 64, 32, True)])
def test_the_native_decode_step_equals_the_torch_path(isa, moved, dtype, rows, key_heads, value_heads, key_dim,
                                                      value_dim, tiled):
    assert native.library(isa) is not None, f"the {isa} build of the native kernels failed to build"
    config = dataclasses.replace(BASE, linear_key_heads=key_heads, linear_value_heads=value_heads,
                                 linear_key_dim=key_dim, linear_value_dim=value_dim, linear_value_tiled=tiled)
    assert fits(config)
    generator = torch.Generator().manual_seed(rows * 100 + value_heads)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    channels, value_size = config.linear_conv_dim, value_heads * value_dim
    layer = GatedDeltaNet(config, None, None, rand(channels, 4) * 0.5, rand(value_heads).abs(),
                          rand(value_heads).to(dtype), rand(value_dim).to(dtype), None)
    chosen = torch.randperm(2 * rows + 3, generator=generator)
    slots = chosen[:rows]
    sources = chosen[rows : 2 * rows] if moved else slots
    tokens = torch.randperm(rows + 3, generator=generator)[:rows]  # a step of rows + 3 tokens, some of prompts
    state = LayerState(rand(2 * rows + 3, 3, channels), rand(2 * rows + 3, value_heads, key_dim, value_dim))
    expected = LayerState(state.conv.clone(), state.recurrent.clone())
    initial = LayerState(state.conv.clone(), state.recurrent.clone())
    projected = rand(rows + 3, channels + value_size).to(dtype)
    gates = (rand(rows + 3, 2 * value_heads) * 2).to(dtype)
    want = layer.decode_rows(expected, DecodeRound(tokens, sources, slots), projected[tokens], gates[tokens])
    out = torch.zeros(rows + 3, value_size, dtype=dtype)
    DeltaRuleDecode(config, isa, layer)(state, DecodeRound(tokens, sources, slots), projected, gates, out)
    # the same fp32 arithmetic summed in another order (and g S^T k for (g S)^T k): a few ulps of values near 1
    torch.testing.assert_close(state.recurrent, expected.recurrent, rtol=0, atol=5e-5)
    assert torch.equal(state.conv, expected.conv)  # the window shifted, bit for bit
    got = out[tokens].float()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    else:  # where the fp32 values straddle a rounding boundary of bf16, one step of bf16 apart
        apart = got != want.float()
        assert (got - want.float()).abs()[apart].le(want.float().abs()[apart] * 2**-7).all()
        assert apart.float().mean() <= 0.01
    others = torch.ones(rows + 3, dtype=torch.bool)
    others[tokens] = False
    assert not out[others].any()
    untouched = torch.ones(len(state.recurrent), dtype=torch.bool)
    untouched[slots] = False
    assert torch.equal(state.recurrent[untouched], expected.recurrent[untouched])
    if moved:  # the states read from are as they were
        assert torch.equal(state.recurrent[sources], initial.recurrent[sources])
        assert torch.equal(state.conv[sources], initial.conv[sources])
    else:
        assert not torch.equal(state.recurrent[slots], initial.recurrent[slots])

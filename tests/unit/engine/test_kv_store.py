"""The KV cache's tensors: int8 and fp8 (e4m3) rows with a scale per slot and head, written and read back within
half a step (int8) or half an ulp (fp8) of the scaled value, and the seats an 8-bit cache gives at the same
budget."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.kv_store import KVCache, LayerCache, kv_bytes_per_token, quantize_rows

SMOLLM2 = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                      head_dim=64, intermediate_size=1536, rms_norm_eps=1e-5, rope_theta=1e5, max_model_len=2048,
                      qkv_bias=False, tie_word_embeddings=True)


def test_rows_quantize_symmetrically_to_127_steps():
    x = torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(0)) * torch.rand(50, 3, 1) * 10
    x[0, 0] = 0
    q, scale = quantize_rows(x)
    assert q.dtype == torch.int8 and scale.shape == (50, 3)
    assert torch.equal(scale, x.abs().amax(-1) / 127) and scale[0, 0] == 0 and (q[0, 0] == 0).all()
    assert (q.abs().amax(-1)[scale > 0] == 127).all()  # each row's peak maps to 127
    assert ((q.float() * scale[..., None] - x).abs() <= scale[..., None] / 2 * (1 + 1e-6)).all()


def fp8_error_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Half an ulp of e4m3 (3 mantissa bits: 2^-4 of the value) where normal, half its smallest step (2^-9 of the
    scale, halved) below 2^-6 of the scale where subnormal."""
    return x.abs() * 2**-4 + scale * 2**-10


def test_rows_quantize_to_fp8_with_the_peak_at_448():
    x = torch.randn(50, 3, 64, generator=torch.Generator().manual_seed(1)) * torch.rand(50, 3, 1) * 10
    x[0, 0] = 0
    q, scale = quantize_rows(x, torch.float8_e4m3fn)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (50, 3)
    assert torch.equal(scale, x.abs().amax(-1) / 448) and scale[0, 0] == 0 and (q[0, 0].float() == 0).all()
    assert (q.float().abs().amax(-1)[scale > 0] == 448).all()
    assert ((q.float() * scale[..., None] - x).abs() <= fp8_error_bound(x, scale[..., None]) * (1 + 1e-6)).all()


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
def test_a_layer_reads_back_what_it_wrote(kv_cache_dtype):
    cache = KVCache(SMOLLM2, slots=64, dtype=torch.bfloat16, device=torch.device("cpu"),
                    kv_cache_dtype=kv_cache_dtype)
    layer: LayerCache = cache.layers[7]
    keys, values = (torch.randn(5, 3, 64).to(torch.bfloat16) for _ in range(2))
    slots = torch.tensor([3, 60, 17, 0, 41])
    layer.write(slots, keys, values)
    read_keys, read_values = layer.read(slots, torch.bfloat16)
    assert read_keys.dtype == torch.bfloat16 and read_keys.shape == keys.shape
    if kv_cache_dtype == "auto":
        assert torch.equal(read_keys, keys) and torch.equal(read_values, values)
    elif kv_cache_dtype == "int8":
        assert cache.data.dtype == torch.int8 and layer.quantized and not layer.fp8
        for read, wrote in ((read_keys, keys), (read_values, values)):
            step = wrote.float().abs().amax(-1, keepdim=True) / 127
            assert ((read.float() - wrote.float()).abs() <= step / 2 + wrote.float().abs() * 2**-8).all()
    else:
        assert cache.data.dtype == torch.float8_e4m3fn and layer.quantized and layer.fp8
        for read, wrote in ((read_keys, keys), (read_values, values)):
            scale = wrote.float().abs().amax(-1, keepdim=True) / 448
            bound = fp8_error_bound(wrote.float(), scale) + wrote.float().abs() * 2**-8  # and the bf16 read
            assert ((read.float() - wrote.float()).abs() <= bound).all()
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots] = False
    bits = cache.data.view(torch.uint8)
    assert (bits[7, :, untouched] == 0).all() and (bits[6] == 0).all()


@pytest.mark.parametrize("eight_bit", ["int8", "fp8"])
def test_an_8bit_cache_holds_at_least_1_8_times_the_tokens_of_bf16(eight_bit):
    bf16 = kv_bytes_per_token(SMOLLM2, torch.bfloat16, "auto")
    assert bf16 == 30 * 2 * 3 * 64 * 2
    assert bf16 / kv_bytes_per_token(SMOLLM2, torch.bfloat16, eight_bit) >= 1.8
    assert kv_bytes_per_token(SMOLLM2, torch.float32, "auto") / kv_bytes_per_token(SMOLLM2, torch.float32,
                                                                                    eight_bit) >= 3.6


def test_an_unknown_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVCache(SMOLLM2, slots=16, dtype=torch.float32, device=torch.device("cpu"), kv_cache_dtype="fp4")

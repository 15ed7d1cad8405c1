"""The Triton int4 matmul (under ``TRITON_INTERPRET=1`` where there is no GPU) against fp64 products of the weights
it was given, and GPTQ/AWQ checkpoints running on it against the libraries' fp32 references."""

from __future__ import annotations

import os

import pytest
import torch

from engine.kernels import triton_int4, triton_int4_gemv
from engine.layers import ReorderedInputs, TritonInt4Linear
from engine.weights.int4 import TRITON_INT4, Int4Weight
from engine.weights.loader import load_model
from tests.unit.engine.test_quantized import QUANT, act_order_layer, logit_error

assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"  # tests/conftest.py sets it
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_int4(out_features: int, in_features: int, group_size: int, seed: int) -> Int4Weight:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (out_features, in_features), dtype=torch.uint8, generator=generator)
    scale = torch.rand(out_features, in_features // group_size, generator=generator) * 0.02 + 0.001
    zero = torch.randn(out_features, in_features // group_size, generator=generator) * 0.05
    return Int4Weight(q, scale, zero, group_size)


def test_packing_keeps_every_nibble_in_gptq_order():
    weight = random_int4(128, 256, 64, seed=1)
    qweight, scales, offsets = triton_int4.pack(weight, torch.device("cpu"), torch.float32)
    nibbles = torch.stack([(qweight >> (4 * j)) & 0xF for j in range(8)], dim=1).view(256, 128)
    assert qweight.dtype == torch.int32 and qweight.shape == (32, 128)
    assert torch.equal(nibbles.T.to(torch.uint8), weight.q)
    assert torch.equal(scales, weight.scale.T) and torch.equal(offsets, weight.zero.T)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 7, 17, 40, 70])
@pytest.mark.parametrize("group_size", [64, 128])
def test_matmul_matches_the_fp64_product(dtype, rows, group_size):
    """Relative error against x @ W^T in fp64 (W from the 16-bit scales and offsets the kernel reads) under 1e-2:
    the weights and the output rounded to 16 bits (~2^-9 each); a wrong nibble, group or split gives ~1. Rows from
    one (the input axis split over programs) to 70 (two row tiles, no split)."""
    weight = random_int4(192, 512, group_size, seed=rows * group_size)
    qweight, scales, offsets = triton_int4.pack(weight, DEVICE, dtype)
    x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(dtype)
    groups = weight.q.double().view(192, -1, group_size)
    dense = (groups * scales.cpu().double().T[..., None] + offsets.cpu().double().T[..., None]).view(192, 512)
    expected = x.double() @ dense.T
    out = triton_int4.int4_matmul(x.to(DEVICE), qweight, scales, offsets, group_size)
    assert out.dtype == dtype and out.shape == (rows, 192)
    assert ((out.cpu().double() - expected).norm() / expected.norm()).item() < 1e-2


def test_few_rows_split_the_input_axis_and_many_do_not():
    assert triton_int4.split_k(1, 4096, 4096) > 1
    assert triton_int4.split_k(64, 4096, 44032) == 1
    assert triton_int4.split_k(1, 128, 4096) <= 128 // triton_int4.BLOCK_K


@pytest.mark.parametrize("name,packed", [("gptq-4bit-g128", True), ("awq-4bit-g128-gemm", True),
                                         ("gptq-4bit-g128-actorder", True), ("gptq-8bit-g128", False)])
def test_bf16_checkpoints_run_packed_on_the_triton_kernel(name, packed):
    """4-bit checkpoints keep their weights at 4 bits on the kernel (8-bit ones load dense); logits within the
    bf16 tolerance of the fp32 reference that the other int4 kernels meet (0.3)."""
    loaded = load_model(str(QUANT / name), dtype=torch.bfloat16, device=DEVICE, int4_kernel=TRITON_INT4)
    assert any(isinstance(m, TritonInt4Linear) for m in loaded.model.modules()) == packed
    assert logit_error(loaded, name) < 0.3


GEMV_CONFIGS = [  # each kernel variant: split input axis or not, nibbles through 2^23's mantissa or converted,
    # group scales per weight or per tile sum
    triton_int4_gemv.GemvConfig(block_n=64, block_k=64, split_k=4, magic=True),
    triton_int4_gemv.GemvConfig(block_n=32, block_k=128, split_k=1, magic=False),
    triton_int4_gemv.GemvConfig(block_n=128, block_k=32, split_k=2, magic=False),
    triton_int4_gemv.GemvConfig(block_n=64, block_k=128, split_k=2, magic=True, factored=True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=str)
def test_matrix_vector_kernel_matches_the_fp64_product(dtype, config):
    """The few-row kernel under the same 1e-2 bound as the tile kernel (its error is the output's rounding: it
    accumulates the dequantized weights in fp32), for one to three rows and groups of 128."""
    weight = random_int4(256, 512, 128, seed=7)
    qweight, scales, offsets = triton_int4.pack(weight, DEVICE, dtype)
    dense = weight.q.double().view(256, -1, 128) * scales.cpu().double().T[..., None]
    dense = (dense + offsets.cpu().double().T[..., None]).view(256, 512)
    for rows in (1, 3):
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows)).to(dtype)
        expected = x.double() @ dense.T
        out = triton_int4_gemv.int4_gemv(x.to(DEVICE), qweight, scales, offsets, 128, config)
        assert out.dtype == dtype and out.shape == (rows, 256)
        assert ((out.cpu().double() - expected).norm() / expected.norm()).item() < 1e-2


def test_the_linear_runs_few_rows_on_the_matrix_vector_kernel_and_more_on_the_tile_kernel(monkeypatch):
    """Up to the rows this card's table names (1 where it has none: CPU), then the tile kernel; both give the same
    rows within the kernels' bf16 bound."""
    weight = random_int4(128, 256, 64, seed=2)
    linear = TritonInt4Linear(*triton_int4.pack(weight, DEVICE, torch.bfloat16), 64, None)
    limit = triton_int4_gemv.max_rows(DEVICE)
    assert linear.gemv_rows == limit
    calls = []
    for module, name in ((triton_int4_gemv, "int4_gemv"), (triton_int4, "int4_matmul")):
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, kernel=kernel, name=name: calls.append(name) or kernel(*a))
    x = torch.randn(limit + 1, 256, dtype=torch.bfloat16, device=DEVICE)
    few, more = linear(x[:limit]), linear(x)
    assert calls == ["int4_gemv", "int4_matmul"]
    assert ((few.float() - more[:limit].float()).norm() / more.float().norm()).item() < 1e-2


def test_tuned_configs_are_read_per_card_and_shape_with_a_rule_of_thumb_elsewhere(tmp_path, monkeypatch):
    tuned = triton_int4_gemv.GemvConfig(block_n=256, block_k=64, split_k=8, num_warps=8, num_stages=3, magic=False)
    table = tmp_path / "tuned.json"
    triton_int4_gemv.save_table("NVIDIA H200", {"4096x11008": tuned}, 4, table)
    monkeypatch.setattr(triton_int4_gemv, "TUNED", table)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    triton_int4_gemv.tuned_tables.cache_clear()
    cuda = torch.device("cuda")
    try:
        assert triton_int4_gemv.config_for(cuda, 11008, 4096, 128) == tuned
        assert triton_int4_gemv.max_rows(cuda) == 4
        fallback = triton_int4_gemv.config_for(cuda, 4096, 12288, 128)
        assert fallback == triton_int4_gemv.default_config(4096, 12288, 128)
        assert fallback.fits(4096, 12288, 128) and fallback.split_k > 1
        tile_over_groups = triton_int4_gemv.config_for(cuda, 11008, 4096, 32)  # the tuned tile spans two groups
        assert tile_over_groups == triton_int4_gemv.default_config(11008, 4096, 32) and tile_over_groups.block_k == 32
        assert triton_int4_gemv.max_rows(torch.device("cpu")) == 1
    finally:
        triton_int4_gemv.tuned_tables.cache_clear()


@pytest.mark.parametrize("rows", [1, 5])
def test_an_act_order_weight_on_the_triton_kernels_computes_the_stored_product(rows):
    """Act-order rows sorted by group at load, the inputs gathered in front of the kernel: the product of the
    weight as stored (fp64 from the unsorted rows) within the kernels' bf16 bound, on the matrix-vector kernel (one
    row) and the tile kernel."""
    weight, stored = act_order_layer()
    order = weight.input_order
    assert order is not None
    linear = ReorderedInputs(order.to(DEVICE), TritonInt4Linear(*triton_int4.pack(weight, DEVICE, torch.bfloat16),
                                                                 weight.group_size, None))
    x = torch.randn(rows, len(order), generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
    expected = x.double() @ stored.T
    out = linear(x.to(DEVICE))
    assert ((out.cpu().double() - expected).norm() / expected.norm()).item() < 1e-2

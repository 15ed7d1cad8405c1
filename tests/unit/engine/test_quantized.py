"""GPTQ (4-bit, 8-bit, 4-bit act-order) and AWQ (GEMM 4-bit) checkpoints against the libraries' own references:
dequantized weights exact, fp32 logits of every position within 1e-4, greedy continuations identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.quant import QuantizedSource, QuantScheme
from engine.quant.dequant import as_int4, group_order
from engine.weights.int4 import Int4Weight
from engine.weights.loader import load_model
from engine.weights.sources import SafetensorsSource
from tests.conftest import FIXTURES
from tests.unit.engine.conftest import run_requests

QUANT = FIXTURES / "quant"
CHECKPOINTS = ["gptq-4bit-g128", "gptq-8bit-g128", "gptq-4bit-g128-actorder", "awq-4bit-g128-gemm"]


def reference(name: str) -> dict[str, torch.Tensor]:
    return load_file(QUANT / "reference" / f"{name}.safetensors")


def logit_error(loaded, name: str) -> float:
    """The largest distance of ``loaded``'s logits from the fp32 reference, over the three reference prompts."""
    engine = LLMEngine(loaded, EngineConfig(kv_cache_memory=8 << 20))
    ref = reference(name)
    return max((engine.prompt_logits(ref[f"prompt.{k}"].tolist()).cpu() - ref[f"logits.{k}"]).abs().max().item()
               for k in range(3))


def scheme_of(name: str) -> QuantScheme:
    return QuantScheme.from_config(json.loads((QUANT / name / "config.json").read_text())["quantization_config"])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_dequantized_weights_are_exact(name):
    source = QuantizedSource(SafetensorsSource(QUANT / name), scheme_of(name))
    expected = {k: v for k, v in reference(name).items() if k.endswith(".weight")}
    assert len(expected) == 2
    for key, weight in expected.items():
        assert key in source
        torch.testing.assert_close(source.dense(key), weight, atol=1e-6, rtol=0)


@pytest.fixture(scope="module", params=CHECKPOINTS)
def quantized(request) -> tuple[str, LLMEngine]:
    loaded = load_model(str(QUANT / request.param), dtype=torch.float32, device=torch.device("cpu"))
    return request.param, LLMEngine(loaded, EngineConfig(kv_cache_memory=8 << 20))


def test_logits_match_the_reference_at_every_position(quantized):
    name, engine = quantized
    ref = reference(name)
    for k in range(3):
        logits = engine.prompt_logits(ref[f"prompt.{k}"].tolist())
        torch.testing.assert_close(logits, ref[f"logits.{k}"], atol=1e-4, rtol=0)
        assert (logits - ref[f"base_logits.{k}"]).abs().max() > 0.05  # the quantization is really in effect


def test_greedy_continuations_match(quantized):
    name, engine = quantized
    ref = reference(name)
    tokens = run_requests(engine, [ref[f"prompt.{k}"].tolist() for k in range(3)],
                          SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    for k in range(3):
        assert tokens[k] == ref[f"greedy.{k}"].tolist()


@pytest.mark.parametrize("config,fragment", [
    ({"quant_method": "bitsandbytes"}, "bitsandbytes checkpoints are not supported"),
    ({"quant_method": "awq", "version": "gemv", "bits": 4}, "AWQ gemv"),
    ({"quant_method": "gptq", "bits": 3}, "GPTQ with 3 bits"),
])
def test_unsupported_schemes_are_refused_clearly(tmp_path, config, fragment):
    folder = tmp_path / "model"
    folder.mkdir()
    base = json.loads((QUANT / "gptq-4bit-g128" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**base, "quantization_config": config}))
    with pytest.raises(ValueError, match=fragment):
        load_model(str(folder), dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("name,packed,reordered", [
    ("gptq-4bit-g128", True, False), ("awq-4bit-g128-gemm", True, False),
    ("gptq-4bit-g128-actorder", True, True),  # down_proj's 3 groups are permuted: sorted at load, inputs gathered
    ("gptq-8bit-g128", False, False)])
def test_bf16_cpu_keeps_4bit_weights_packed(name, packed, reordered):
    """4-bit weights stay 4-bit on the int4 CPU kernel, act-order ones with their input rows sorted by group and
    the activations gathered into that order (8-bit: dense); the logits stay within bf16 tolerance of the fp32
    reference (the source README's 0.25, with margin)."""
    from engine.layers import Int4Linear, ReorderedInputs

    loaded = load_model(str(QUANT / name), dtype=torch.bfloat16, device=torch.device("cpu"), int4_kernel="torch")
    assert any(isinstance(m, Int4Linear) for m in loaded.model.modules()) == packed
    for layer in loaded.model.layers:
        down = layer.mlp.down
        assert isinstance(down, ReorderedInputs) == reordered
        assert isinstance(down.linear if reordered else down, Int4Linear) == packed
    assert logit_error(loaded, name) < 0.3


def test_act_order_groups_are_sorted_only_when_each_has_group_size_rows():
    g_idx = torch.tensor([1, 0, 1, 0, 2, 2])
    order = group_order(g_idx, 2)
    assert order is not None and torch.equal(g_idx[order], torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(order, torch.tensor([1, 3, 0, 2, 4, 5]))  # stable within a group
    assert group_order(torch.tensor([0, 0, 0, 1, 1, 2]), 2) is None  # a group of three: read dense


def act_order_layer() -> tuple[Int4Weight, torch.Tensor]:
    """The act-order fixture's down_proj (its 3 groups permuted) as loaded, rows sorted by group, and its weight as
    gptqmodel dequantizes it (the fixture's reference), dense in fp64 [out, in]."""
    name = "gptq-4bit-g128-actorder"
    tensors = load_file(QUANT / name / "model.safetensors")
    parts = {n: tensors[f"model.layers.1.mlp.down_proj.{n}"] for n in ("qweight", "qzeros", "scales", "g_idx")}
    scheme = QuantScheme.from_config(json.loads((QUANT / name / "config.json").read_text())["quantization_config"])
    order = group_order(parts["g_idx"], scheme.group_size)
    assert order is not None and not torch.equal(order, torch.arange(len(order)))
    return as_int4(parts, scheme, order), reference(name)["model.layers.1.mlp.down_proj.weight"].double()


def test_an_act_order_weight_computes_the_stored_product():
    """The reordered weight behind gathered inputs gives x @ W^T of the weight as stored (fp64 reference from the
    unsorted rows); fp32 within the kernel's summation-order rounding."""
    from engine.layers import Int4Linear, ReorderedInputs

    weight, stored = act_order_layer()
    order = weight.input_order
    assert order is not None
    linear = ReorderedInputs(order, Int4Linear(*weight.pack_for_cpu(torch.float32), weight.group_size,
                                               weight.out_features, None))
    x = torch.randn(3, len(order), generator=torch.Generator().manual_seed(0))
    expected = x.double() @ stored.T
    assert ((linear(x).double() - expected).norm() / expected.norm()).item() < 1e-5

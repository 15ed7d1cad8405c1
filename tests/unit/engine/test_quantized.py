"""GPTQ (4-bit, 8-bit, 4-bit act-order) and AWQ (GEMM 4-bit) checkpoints against the libraries' own references:
dequantized weights exact, fp32 logits of every position within 1e-4, greedy continuations identical."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.quant import QuantizedSource, QuantScheme
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
        torch.testing.assert_close(logits, ref[f"logits.{k}"], atol=1e-4, rtol=1e-4)
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


@pytest.mark.parametrize("name,packed,down_packed", [
    ("gptq-4bit-g128", True, True), ("awq-4bit-g128-gemm", True, True),
    ("gptq-4bit-g128-actorder", True, False),  # down_proj's 3 groups are permuted; one-group layers are not
    ("gptq-8bit-g128", False, False)])
def test_bf16_cpu_keeps_contiguous_4bit_weights_packed(name, packed, down_packed):
    """4-bit weights with contiguous groups stay 4-bit on the int4 CPU kernel (permuted groups and 8-bit: dense);
    the logits stay within bf16 tolerance of the fp32 reference (the source README's 0.25, with margin)."""
    from engine.layers import Int4Linear

    loaded = load_model(str(QUANT / name), dtype=torch.bfloat16, device=torch.device("cpu"), int4_kernel="torch")
    assert any(isinstance(m, Int4Linear) for m in loaded.model.modules()) == packed
    assert all(isinstance(layer.mlp.down, Int4Linear) == down_packed for layer in loaded.model.layers)
    assert logit_error(loaded, name) < 0.3

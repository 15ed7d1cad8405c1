"""``--quantization q8_0|q4_0|q4_k``: a dense checkpoint folder's layer matrices quantized while loading, rounded to
nearest (every weight within half a step of its block's grid, the step from the block's largest weight as
llama.cpp sets it; Q4_K's blocks byte for byte those of llama.cpp's own reference quantizer), run on the native
kernels, and close to the dense model on a real one (SmolLM2-135M written out as a dense folder)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
from safetensors.torch import save_file

from engine import LLM
from engine.kernels import native
from engine.kernels.quantize import quantize_q4_k
from engine.layers import Q4Q8Linear, StoredLinear
from engine.quant.at_load import QuantizingSource
from engine.weights.sources import SafetensorsSource
from tests.llama_quants import quantize_q4_k_reference
from tests.unit.engine.test_models_vs_transformers import chat_ids

# mean KL per position from the dense bf16 model on SmolLM2-135M, as measured; the bound is twice that. Q4_K covers
# the down projections only (576-wide rows are not whole 256-value blocks: the others fall back to Q8_0). Q4_0 costs a
# model this small dearly (its weights came from Q4_1's asymmetric grid): torch's int4 kernel on the same Q4_0
# weights with bf16 activations measures 0.84, so nearly all of it is the rounding of the weights.
MEAN_KL = {"q8_0": 0.0098, "q4_0": 0.861, "q4_k": 0.0328}


@pytest.fixture(scope="module")
def smollm2_folder(smollm2_gguf, tmp_path_factory) -> Iterator[Path]:
    """The embedded SmolLM2 as a dense safetensors folder (its GGUF weights dequantized by transformers), removed
    after the module: half a gigabyte of fp32."""
    folder = tmp_path_factory.mktemp("smollm2-dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name,
                                                              dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # transformers marks a model read from GGUF as quantized; it is dense
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(tensors, folder / "model.safetensors")
    transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name).save_pretrained(
        folder)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_every_weight_is_rounded_to_its_blocks_nearest_step(smollm2_folder, kind):
    source = QuantizingSource(SafetensorsSource(smollm2_folder), kind, keep={"model.embed_tokens.weight"})
    name = "model.layers.3.mlp.down_proj.weight"
    weight = source.dense(name).float().numpy().astype(np.float64)
    stored = source.stored(name)
    assert stored.type == (T.Q8_0 if kind == "q8_0" else T.Q4_0)
    restored = dequantize(stored.blocks, stored.type).reshape(weight.shape).astype(np.float64)
    blocks = weight.reshape(weight.shape[0], -1, 32)
    largest = np.abs(blocks).max(-1, keepdims=True)
    step = largest / (127 if kind == "q8_0" else 8)
    # half a step, plus the step's own rounding to fp16 carried over up to 8 or 127 steps
    allowed = np.broadcast_to(step * (0.5 + 128 * 2.0**-11), blocks.shape).copy()
    if kind == "q4_0":  # the signed largest weight is code 0 (-8 steps); past +7.5 steps the other side clamps to +7
        signed = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
        allowed[blocks / (signed / -8) > 7.5] += step.repeat(32, -1)[blocks / (signed / -8) > 7.5] * 0.5
    error = np.abs(restored.reshape(blocks.shape) - blocks)
    assert (error <= allowed).all()
    assert source.stored("model.embed_tokens.weight") is None


@pytest.mark.parametrize("isa", native.ISAS)
def test_q4_k_blocks_are_llama_cpps_own(smollm2_folder, isa):
    """Byte for byte what llama.cpp's reference quantizer (llama-quantize without an importance matrix) writes, on
    both builds: the down projection's weights, and rows with a zero, a constant and an outlying sub-block."""
    if not native.runs_here(isa):
        pytest.skip(f"this CPU lacks the {isa} instruction set")
    source = QuantizingSource(SafetensorsSource(smollm2_folder), "q4_k", keep=set())
    weight = source.dense("model.layers.3.mlp.down_proj.weight").float().numpy()
    edges = np.random.default_rng(0).normal(size=(3, 512)).astype(np.float32)
    edges[0, :32], edges[1, 32:64], edges[2, 7] = 0, 0.25, 40
    for matrix in (weight, edges):
        assert (quantize_q4_k(matrix, isa) == quantize_q4_k_reference(matrix)).all()
    stored = source.stored("model.layers.3.mlp.down_proj.weight")
    assert stored.type == T.Q4_K and (stored.blocks == quantize_q4_k_reference(weight)).all()
    assert source.stored("model.layers.3.mlp.up_proj.weight").type == T.Q8_0  # 576 inputs: not whole super-blocks


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_k"])
def test_a_quantized_checkpoint_runs_on_the_native_kernels_close_to_bf16(smollm2_folder, kind):
    isa = native.isas()[0]
    dense = LLM(str(smollm2_folder), dtype="bfloat16", device="cpu", cpu_isa="torch")
    quantized = LLM(str(smollm2_folder), dtype="bfloat16", device="cpu", cpu_isa=isa, quantization=kind)
    layer = quantized.engine.runner.model.layers[0]
    assert isinstance(layer.attn.qkv, Q4Q8Linear if kind == "q4_0" else StoredLinear)
    if kind == "q4_k":
        assert [m.type for m in layer.mlp.down.matmul.matrices] == [T.Q4_K]
    klds = []
    for question in ("Name three primary colors.", "Which city is the capital of Germany?"):
        ids = chat_ids(dense, question)
        exact = dense.engine.prompt_logits(ids).log_softmax(-1)
        approx = quantized.engine.prompt_logits(ids).log_softmax(-1)
        klds.append((exact.exp() * (exact - approx)).sum(-1).mean().item())
    assert max(klds) <= 2 * MEAN_KL[kind]


def test_quantization_is_refused_where_it_cannot_run(smollm2_gguf, smollm2_folder):
    with pytest.raises(ValueError, match="GGUF file is served as quantized"):
        LLM(str(smollm2_gguf), dtype="bfloat16", device="cpu", quantization="q8_0")
    with pytest.raises(ValueError, match="native CPU kernels"):
        LLM(str(smollm2_folder), dtype="bfloat16", device="cpu", cpu_isa="torch", quantization="q8_0")

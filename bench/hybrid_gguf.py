"""A Qwen3.5-shaped GGUF of random weights for the speed bar against llama-server: an HF folder written by
transformers (``Qwen3_5TextConfig``; SmolLM2's tokenizer, so the benchmark's end-of-turn ban still applies),
converted by llama.cpp's own converter (``tests/llama_converter.py``) to F16 and quantized by its
``llama-quantize``. The values of the weights do not change the speed.

    .venv/bin/python -m bench.hybrid_gguf [--type Q4_K_M] [--layers 24]
    MODEL=<printed path> REQS=4,32 bash ../shared/bench/vs-llama-server.sh
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import transformers

from engine.weights.embedded import SMOLLM2_GGUF, asset_path
from tests.llama_converter import convert

PEER_DIR = Path(os.environ.get("PEER_DIR", "~/.cache/qwen-peers")).expanduser()
SHAPE = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
             linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
             linear_conv_kernel_dim=4, max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=49152)


def write_folder(folder: Path, layers: int) -> None:
    """Random bf16 weights of the shape, three linear layers to one attention layer, with SmolLM2's tokenizer."""
    config = transformers.Qwen3_5TextConfig(num_hidden_layers=layers, **SHAPE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.02)
    model.save_pretrained(folder)
    gguf = asset_path(SMOLLM2_GGUF)
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--type", default="Q4_K_M", help="llama-quantize type (F16: no quantization)")
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    models = PEER_DIR / "models"
    f16 = models / f"bench-qwen3.5-{args.layers}l-F16.gguf"
    if not f16.is_file():
        with tempfile.TemporaryDirectory() as folder:
            write_folder(Path(folder), args.layers)
            convert(Path(folder), f16.with_suffix(".part"), "--no-mtp", "--outtype", "f16")
        f16.with_suffix(".part").rename(f16)
    out = f16 if args.type == "F16" else models / f"bench-qwen3.5-{args.layers}l-{args.type}.gguf"
    if not out.is_file():
        quantize = PEER_DIR / "llama.cpp-build" / "bin" / "llama-quantize"
        subprocess.run([str(quantize), str(f16), str(out), args.type, "2"], check=True, capture_output=True)
    print(out)


if __name__ == "__main__":
    main()

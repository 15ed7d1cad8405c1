"""A Qwen3.5-shaped GGUF of random weights for the speed bar against llama-server: an HF folder written by
transformers (``Qwen3_5TextConfig``; SmolLM2's tokenizer, so the benchmark's end-of-turn ban still applies),
converted by llama.cpp's own converter (``tests/llama_converter.py``) to F16 and quantized by its
``llama-quantize``. The values of the weights do not change the speed.

    .venv/bin/python -m bench.hybrid_gguf [--type Q4_K_M] [--layers 24] [--mtp]
    MODEL=<printed path> REQS=4,32 bash ../shared/bench/vs-llama-server.sh

``--mtp`` adds a multi-token-prediction block of random weights (Qwen3.5's ``mtp.*``, written by the converter as
llama.cpp's ``nextn`` block) for ``bench.speculative``: its drafts are refused, so speculative decoding shows what it
costs. ``--mtp --copying`` makes the best case instead, at the same cost per step: every layer's output projections
are zero, so the model repeats its last token (its tied head scores a token's own embedding highest), and the
block's fc passes the next token's embedding through a layer that adds nothing, so it drafts that token again and
every draft stands.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

from engine.weights.embedded import SMOLLM2_GGUF, asset_path
from tests.llama_converter import convert

PEER_DIR = Path(os.environ.get("PEER_DIR", "~/.cache/qwen-peers")).expanduser()
SHAPE = dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
             linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
             linear_conv_kernel_dim=4, max_position_embeddings=8192, tie_word_embeddings=True, vocab_size=49152)


OUTPUTS = ("o_proj.weight", "out_proj.weight", "down_proj.weight")  # what each layer adds to the residual stream


def write_folder(folder: Path, layers: int, mtp: bool = False, copying: bool = False) -> None:
    """Random bf16 weights of the shape, three linear layers to one attention layer, with SmolLM2's tokenizer; with
    ``mtp``, a multi-token-prediction block shaped as the last layer (``copying``: see the module's help)."""
    config = transformers.Qwen3_5TextConfig(num_hidden_layers=layers, **SHAPE)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for name, parameter in model.named_parameters():
        parameter.data.normal_(0, 0.02)
        if copying and name.endswith(OUTPUTS):
            parameter.data.zero_()
    model.save_pretrained(folder)
    if mtp:
        add_block(folder, layers, copying)
    gguf = asset_path(SMOLLM2_GGUF)
    transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)


def add_block(folder: Path, layers: int, copying: bool) -> None:
    """``mtp.*`` beside the saved weights (random, as the model's), and ``mtp_num_hidden_layers`` in the config."""
    weights = load_file(folder / "model.safetensors")
    last = f"model.layers.{layers - 1}."
    block = {f"mtp.layers.0.{name.removeprefix(last)}": torch.randn_like(tensor) * 0.02
             * (0 if copying and name.endswith(OUTPUTS) else 1)
             for name, tensor in weights.items() if name.startswith(last)}
    hidden = SHAPE["hidden_size"]
    block["mtp.fc.weight"] = (torch.cat((torch.eye(hidden), torch.zeros(hidden, hidden)), 1).bfloat16() if copying
                              else torch.randn(hidden, 2 * hidden, dtype=torch.bfloat16) * 0.02)
    block |= {f"mtp.{norm}.weight": torch.zeros(hidden, dtype=torch.bfloat16)  # scales of 1 (stored as 1 + w)
              for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm")}
    save_file(weights | block, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--type", default="Q4_K_M", help="llama-quantize type (F16: no quantization)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--mtp", action="store_true", help="with a multi-token-prediction block")
    parser.add_argument("--copying", action="store_true", help="a model that repeats its last token (with --mtp)")
    args = parser.parse_args()
    models = PEER_DIR / "models"
    stem = f"bench-qwen3.5-{args.layers}l{'-mtp' if args.mtp else ''}{'-copying' if args.copying else ''}"
    f16 = models / f"{stem}-F16.gguf"
    if not f16.is_file():
        with tempfile.TemporaryDirectory() as folder:
            write_folder(Path(folder), args.layers, args.mtp, args.copying)
            convert(Path(folder), f16.with_suffix(".part"), *(() if args.mtp else ("--no-mtp",)), "--outtype", "f16")
        f16.with_suffix(".part").rename(f16)
    out = f16 if args.type == "F16" else models / f"{stem}-{args.type}.gguf"
    if not out.is_file():
        quantize = PEER_DIR / "llama.cpp-build" / "bin" / "llama-quantize"
        subprocess.run([str(quantize), str(f16), str(out), args.type, "2"], check=True, capture_output=True)
    print(out)


if __name__ == "__main__":
    main()

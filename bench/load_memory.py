"""Peak memory while loading a checkpoint: a ~1B-parameter random Qwen2 in bf16 safetensors (sharded), loaded
in a fresh process straight into bf16 on CPU. Target: peak RSS <= 1.3 x the checkpoint's size + 1 GiB.

Prints the checkpoint size, the process's RSS after imports, the peak RSS of the load (high-water mark of the
process, file-backed pages included), and the target.

Usage: python bench/load_memory.py [--folder /tmp/qwen2-1b] [--keep]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16, "num_attention_heads": 16,
         "num_key_value_heads": 16, "vocab_size": 32000}
GIB = 1 << 30


def write_checkpoint(folder: Path) -> int:
    """A random Qwen2 checkpoint, one shard per four layers (written a shard at a time); its size in bytes."""
    import torch
    from safetensors.torch import save_file

    h, inner, layers, vocab = (SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "vocab_size"))
    folder.mkdir(parents=True, exist_ok=True)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": rand(vocab, h)}]
    for i in range(layers):
        if i % 4 == 0:
            shards.append({})
        p = f"model.layers.{i}."
        shards[-1] |= {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       **{p + f"self_attn.{n}_proj.weight": rand(h, h) for n in "qkvo"},
                       **{p + f"self_attn.{n}_proj.bias": rand(h) for n in "qkv"},
                       p + "mlp.gate_proj.weight": rand(inner, h), p + "mlp.up_proj.weight": rand(inner, h),
                       p + "mlp.down_proj.weight": rand(h, inner)}
    shards.append({"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": rand(vocab, h)})
    weight_map = {}
    for index, tensors in enumerate(shards):
        name = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / name)
        weight_map |= dict.fromkeys(tensors, name)
        tensors.clear()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "rms_norm_eps": 1e-6,
                                                    "max_position_embeddings": 4096, "rope_theta": 1e6,
                                                    "tie_word_embeddings": False, **SHAPE}))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(folder: str) -> None:
    """Runs in the child: load, then print JSON with RSS after imports and the peak."""
    import torch

    from engine.weights.loader import load_model

    def rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    baseline = rss()
    loaded = load_model(folder, dtype=torch.bfloat16, device=torch.device("cpu"))
    params = sum(p.numel() for p in loaded.model.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"baseline": baseline, "peak": peak, "params": params}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="qwen2-1b-"))
    try:
        if (folder / "config.json").exists():
            size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        else:
            size = write_checkpoint(folder)
        # a fresh process, so nothing of the writer's memory counts against the loader
        child = subprocess.run([sys.executable, __file__, "--measure", str(folder)], check=True, capture_output=True,
                               text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
        target = 1.3 * size + GIB
        print(f"checkpoint: {size / GIB:.2f} GiB, {result['params'] / 1e9:.2f} B parameters (bf16)")
        print(f"RSS after imports: {result['baseline'] / GIB:.2f} GiB")
        print(f"peak RSS while loading: {result['peak'] / GIB:.2f} GiB "
              f"({result['peak'] / size:.2f}x the checkpoint)")
        verdict = "met" if result["peak"] <= target else "MISSED"
        print(f"target 1.3 x checkpoint + 1 GiB = {target / GIB:.2f} GiB: {verdict}")
    finally:
        if not args.keep and args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

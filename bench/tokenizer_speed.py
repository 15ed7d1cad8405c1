"""Tokenizer speed: encode throughput on mixed text and incremental detokenizer cost per token.

Usage: python bench/tokenizer_speed.py   (targets: encode >= 1M tokens/s, detokenizer <= 20 us/token)
"""

from __future__ import annotations

import time

from engine.weights.embedded import QWEN_TIKTOKEN, asset_path
from tokenizer import IncrementalDetokenizer, QwenTokenizer

MIXED = (
    "The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 "
    "def main():\n    return {'key': [1, 2, 3]}  # code\n"
    "Emoji 🍕🚀 and numbers 3.14159 2024-11-23. Привет мир! こんにちは世界。\n"
)


def best_of(runs: int, work) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    tokenizer = QwenTokenizer(asset_path(QWEN_TIKTOKEN))
    documents = [MIXED * 8 + str(i) for i in range(2000)]
    n_tokens = sum(len(ids) for ids in tokenizer.encode_batch(documents))

    single = best_of(3, lambda: [tokenizer.encode(d) for d in documents])
    batched = best_of(3, lambda: tokenizer.encode_batch(documents))
    print(f"encode, one call per document : {n_tokens / single / 1e6:6.2f} M tokens/s")
    print(f"encode_batch (thread pool)    : {n_tokens / batched / 1e6:6.2f} M tokens/s")

    ids = tokenizer.encode(MIXED * 400)

    def detokenize() -> None:
        detokenizer = IncrementalDetokenizer(tokenizer)
        for token_id in ids:
            detokenizer.push(token_id)
        detokenizer.flush()

    per_token = best_of(5, detokenize) / len(ids)
    print(f"incremental detokenizer       : {per_token * 1e6:6.2f} us/token over {len(ids)} tokens")


if __name__ == "__main__":
    main()

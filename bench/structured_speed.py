"""Cost of grammar-constrained decoding: tokens/s under a JSON-schema grammar against the same requests free,
at batch 1 and batch 8, on the embedded SmolLM2, in one run.

Both modes do the same work: every token that could close the JSON string is biased away and the end of text is
ignored, so the constrained requests write the string's content for all ``--new-tokens`` steps, as the free
ones write text. Prints tokens/s per mode and the ratio constrained / free (target >= 0.8).

Usage: python bench/structured_speed.py [--new-tokens 96] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.grammar import GrammarCompiler, json_schema_grammar
from engine.weights.embedded import SMOLLM2_GGUF, asset_path
from tokenizer import ChatMessage, build_prompt

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
TOPICS = ["the sea", "a robot", "winter", "coffee", "the moon", "a library", "trains", "music"]


def rate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> float:
    """Generated tokens per second with all ``prompts`` running together."""
    start = time.perf_counter()
    for index, ids in enumerate(prompts):
        engine.add_request(str(index), ids, params)
    tokens = 0
    while engine.has_unfinished():
        tokens += sum(len(out.new_token_ids) for out in engine.step())
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    engine = LLMEngine.from_model(str(asset_path(SMOLLM2_GGUF)), device="cpu",
                                  config=EngineConfig(max_model_len=1024, kv_cache_memory=128 << 20))
    tokenizer = engine.tokenizer
    start = time.perf_counter()
    compiler = GrammarCompiler(tokenizer, engine.model_config.vocab_size)
    grammar = compiler.compile(json_schema_grammar(json.dumps(SCHEMA)))
    print(f"vocabulary + grammar compile: {time.perf_counter() - start:.3f} s")
    closing = {i: -100.0 for i in range(tokenizer.vocab_size) if b'"' in tokenizer.token_bytes(i)}
    free = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, logit_bias=closing)
    constrained = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True, logit_bias=closing,
                                 grammar=grammar)
    prompts = [build_prompt(tokenizer, [ChatMessage("user", f"Tell a story about {t} as JSON.")]).token_ids
               for t in TOPICS]
    rate(engine, prompts[:2], free)  # warm-up
    for batch in (1, 8):
        rates = {}
        for name, params in (("free", free), ("json_schema", constrained)):
            rates[name] = max(rate(engine, prompts[:batch], params) for _ in range(args.repeats))
        ratio = rates["json_schema"] / rates["free"]
        print(f"batch {batch}: free {rates['free']:.1f} tok/s, json_schema {rates['json_schema']:.1f} tok/s, "
              f"ratio {ratio:.2f}x (target >= 0.8)")


if __name__ == "__main__":
    main()

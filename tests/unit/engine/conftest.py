"""Engine fixtures: the Qwen-1 reference model and its recorded oracles."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from engine import EngineConfig, LLMEngine
from engine.sampling import Sampler, SamplingParams
from tests.conftest import FIXTURES

QWEN1_MODEL = FIXTURES / "qwen1" / "model"


class RecordingSampler(Sampler):
    """Keeps the logits of every step (to compare with recorded decode logits)."""

    def __init__(self, vocab_limit=None) -> None:
        super().__init__(vocab_limit)
        self.steps: list[torch.Tensor] = []

    def __call__(self, logits, rows):
        self.steps.append(logits.clone())
        return super().__call__(logits, rows)


def run_requests(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, *,
                 staggered: bool = False) -> list[list[int]]:
    """Every prompt's new tokens, stepping the engine until all finish. The requests arrive together, or one per
    step when ``staggered`` (so prefills and decodes share steps)."""
    pending = list(enumerate(prompts))
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while pending or engine.has_unfinished():
        for index, ids in pending[: 1 if staggered else None]:
            engine.add_request(str(index), ids, params)
        pending = pending[1:] if staggered else []
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
    return list(outputs.values())


def decode_alone(engine: LLMEngine, prompt_ids: list[int], params: SamplingParams) -> tuple[list[int], torch.Tensor]:
    """One request run alone on ``engine``: its new tokens, and the logits of every step it took."""
    engine.sampler = recorder = RecordingSampler()
    engine.add_request("r", prompt_ids, params)
    tokens: list[int] = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    return tokens, torch.cat(recorder.steps)


def qwen1_engine(**config) -> LLMEngine:
    return LLMEngine.from_model(str(QWEN1_MODEL), dtype="float32", device="cpu", config=EngineConfig(**config))


@pytest.fixture(scope="session")
def qwen1_logits() -> dict[str, torch.Tensor]:
    return load_file(FIXTURES / "qwen1" / "logits.safetensors")

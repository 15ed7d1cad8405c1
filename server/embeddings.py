"""Embeddings: a request's inputs checked and tokenized (texts as plain text, with what the vocabulary's own
post-processing adds around an input, e.g. Qwen3-Embedding's closing token), each one a prefill-only sequence of the
engine's continuous batch (packed into steps beside chat requests, so chat keeps going), and rendered in OpenAI's
shape, floats or base64, cut to ``dimensions`` and re-normalised."""

from __future__ import annotations

import base64
from typing import Any

import torch
import torch.nn.functional as F

from server.errors import APIError
from server.generation import ModelService, engine_failures
from server.limits import Limits
from server.protocol import EmbeddingRequest


def require_task(service: ModelService, task: str) -> None:
    if service.task != task:
        raise APIError(400, f"'{service.name}' is served with --task {service.task}; this endpoint needs a server "
                            f"started with --task {task}", param="model", code="wrong_task")


def embedding_prompts(service: ModelService, body: EmbeddingRequest, limits: Limits) -> list[list[int]]:
    """Each input's token ids, within the context and the vocabulary (a 400 names the input)."""
    require_task(service, "embed")
    if body.dimensions is not None and body.dimensions > service.hidden_size:
        raise APIError(400, f"dimensions may be at most the model's {service.hidden_size}", param="dimensions")
    inputs = body.inputs()
    limits.check_embedding(inputs, service.max_model_len)
    prompts = []
    for index, given in enumerate(inputs):
        ids = service.tokenizer.encode_input(given) if isinstance(given, str) else given
        if not ids or len(ids) > service.max_model_len:
            raise APIError(400, f"input {index} has {len(ids)} tokens; each must have 1 to {service.max_model_len}",
                           param=f"input.{index}", code="context_length_exceeded")
        if any(not 0 <= t < service.vocab_size for t in ids):
            raise APIError(400, f"input {index}: token ids must be in [0, {service.vocab_size}) (ids from another "
                                f"vocabulary, such as the cl100k_base ones LangChain's OpenAIEmbeddings sends by "
                                f"default, name other tokens: send texts)", param=f"input.{index}")
        prompts.append(ids)
    return prompts


async def embed(service: ModelService, prompts: list[list[int]]) -> torch.Tensor:
    """The pooled, normalised vectors of ``prompts``, computed in the engine's continuous batch."""
    with engine_failures():
        return await service.engine.embed(prompts, service.pooling)


def embedding_response(service: ModelService, body: EmbeddingRequest, vectors: torch.Tensor,
                       prompt_tokens: int) -> dict[str, Any]:
    if body.dimensions is not None:
        vectors = F.normalize(vectors[:, : body.dimensions], dim=-1)
    if body.encoding_format == "base64":
        rendered: list[Any] = [base64.b64encode(row.numpy().astype("<f4").tobytes()).decode() for row in vectors]
    else:
        rendered = vectors.tolist()
    return {"object": "list", "model": service.name,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(rendered)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

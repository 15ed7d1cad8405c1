"""Rerank under ``--task rerank``: each document judged against the query with Qwen3-Reranker's prompt (a system
line asking for "yes" or "no", the instruction, query and document as the user's turn, an empty thought opening the
answer); its relevance is sigmoid(logit("yes") - logit("no")) at the prompt's last position. The query and the
documents are encoded as plain text between the prompt's trusted control tokens."""

from __future__ import annotations

import uuid
from typing import Any

import torch

from server.embeddings import require_task
from server.errors import APIError
from server.generation import ModelService, engine_failures
from server.limits import Limits
from server.protocol import RerankRequest, ScoreRequest
from tokenizer.chat import encode_trusted_specials

JUDGE_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
                'Note that the answer can only be "yes" or "no".')
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
OPENING = f"<|im_start|>system\n{JUDGE_SYSTEM}<|im_end|>\n<|im_start|>user\n"
CLOSING = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
ANSWERS = ("yes", "no")


def judge_prompts(service: ModelService, body: RerankRequest, limits: Limits) -> list[list[int]]:
    """One judge prompt's ids per document (a 400 names a document whose prompt exceeds the context)."""
    return pair_prompts(service, [(body.query, document) for document in body.texts()], body.instruction, limits)


def pair_prompts(service: ModelService, pairs: list[tuple[str, str]], instruction: str | None,
                 limits: Limits) -> list[list[int]]:
    """One judge prompt's ids per (query, document) pair."""
    require_task(service, "rerank")
    answer_ids(service)
    limits.check_rerank(pairs, service.max_model_len)
    instruction = instruction or DEFAULT_INSTRUCTION
    prompts = []
    for index, (query, document) in enumerate(pairs):
        question = f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
        ids = encode_trusted_specials(service.tokenizer, [(OPENING, True), (question, False), (CLOSING, True)])
        if len(ids) > service.max_model_len:
            raise APIError(400, f"document {index}'s judge prompt has {len(ids)} tokens; the context holds "
                                f"{service.max_model_len}", param=f"documents.{index}", code="context_length_exceeded")
        prompts.append(ids)
    return prompts


def answer_ids(service: ModelService) -> tuple[int, int]:
    """The ids of the single tokens "yes" and "no" (a 400 for a vocabulary without them)."""
    encoded = [service.tokenizer.encode(answer) for answer in ANSWERS]
    if any(len(ids) != 1 for ids in encoded):
        raise APIError(400, "this model's vocabulary has no single 'yes' and 'no' tokens: it is not a reranker",
                       param="model")
    return encoded[0][0], encoded[1][0]


async def scores(service: ModelService, prompts: list[list[int]]) -> torch.Tensor:
    """Each prompt's relevance in (0, 1)."""
    answers = answer_ids(service)
    with engine_failures():
        logits = await service.engine.last_token_logits(prompts, answers)
    return torch.sigmoid(logits[:, 0] - logits[:, 1])


def rerank_response(service: ModelService, body: RerankRequest, relevance: torch.Tensor,
                    prompt_tokens: int) -> dict[str, Any]:
    documents = body.texts()
    order = sorted(range(len(documents)), key=lambda i: -relevance[i].item())[: body.top_n]
    results = [{"index": i, "relevance_score": relevance[i].item(),
                **({"document": {"text": documents[i]}} if body.return_documents else {})} for i in order]
    return {"id": f"rerank-{uuid.uuid4().hex}", "model": service.name, "results": results,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def score_prompts(service: ModelService, body: ScoreRequest, limits: Limits) -> list[list[int]]:
    try:
        pairs = body.pairs()
    except ValueError as exc:
        raise APIError(400, str(exc), param="text_2") from None
    return pair_prompts(service, pairs, body.instruction, limits)


def score_response(service: ModelService, relevance: torch.Tensor, prompt_tokens: int) -> dict[str, Any]:
    return {"id": f"score-{uuid.uuid4().hex}", "object": "list", "model": service.name,
            "data": [{"index": i, "object": "score", "score": value} for i, value in enumerate(relevance.tolist())],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

"""POST /tokenize and /detokenize, in vLLM's shapes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.protocol import DetokenizeRequest, TokenizeRequest
from server.routes.deps import ready_service
from server.tools import plain_messages

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    service = ready_service(request, body.model)
    if body.messages is not None:
        tokens = service.chat_prompt_ids(plain_messages(body.messages),
                                         add_generation_prompt=body.add_generation_prompt)
    else:
        tokens = service.text_prompt_ids(body.prompt or "")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": service.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    service = ready_service(request, body.model)
    return {"prompt": service.tokenizer.decode(body.tokens)}

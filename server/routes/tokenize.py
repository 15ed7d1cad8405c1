"""POST /tokenize and /detokenize, in vLLM's shapes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.app_state import state_of
from server.errors import APIError
from server.messages import plain_messages
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.routes.deps import ready_service, until_disconnected

router = APIRouter()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    state = state_of(request)
    service = ready_service(request, body.model)
    if body.messages is not None and len(body.messages) > state.limits.max_messages:
        raise APIError(400, f"at most {state.limits.max_messages} messages", param="messages")

    def tokens() -> list[int]:
        if body.messages is not None:
            return service.chat_prompt(plain_messages(body.messages),
                                       add_generation_prompt=body.add_generation_prompt).token_ids
        return service.text_prompt_ids(body.prompt or "")

    ids = await until_disconnected(request, state.preparer.run(tokens))
    return {"tokens": ids, "count": len(ids), "max_model_len": service.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = state_of(request)
    service = ready_service(request, body.model)
    if any(token >= service.vocab_size for token in body.tokens):
        raise APIError(400, f"token ids must be in [0, {service.vocab_size})", param="tokens")
    text = await until_disconnected(request, state.preparer.run(lambda: service.tokenizer.decode(body.tokens)))
    return {"prompt": text}

"""POST /tokenize and /detokenize, in vLLM's shapes."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from server.app_state import state_of
from server.bodies import body_schema, json_reply, parse_body
from server.errors import APIError
from server.messages import plain_messages
from server.protocol import DetokenizeRequest, TokenizeRequest
from server.routes.deps import ready_service

router = APIRouter()


@router.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
async def tokenize(request: Request) -> Response:
    body = await parse_body(request, TokenizeRequest)
    state = state_of(request)
    service = ready_service(request, body.model)

    def tokens() -> dict:
        if body.messages is not None:
            if len(body.messages) > state.limits.max_messages:
                raise APIError(400, f"at most {state.limits.max_messages} messages", param="messages")
            messages = plain_messages(body.messages)
            state.limits.check_text([m.content for m in messages], service.max_model_len, "messages")
            ids = service.chat_prompt(messages, add_generation_prompt=body.add_generation_prompt).token_ids
        else:
            state.limits.check_text([body.prompt or ""], service.max_model_len, "prompt")
            ids = service.text_prompt_ids(body.prompt or "")
        return {"tokens": ids, "count": len(ids), "max_model_len": service.max_model_len}

    return await json_reply(request, tokens)


@router.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
async def detokenize(request: Request) -> Response:
    body = await parse_body(request, DetokenizeRequest)
    service = ready_service(request, body.model)

    def text() -> dict:
        if any(token >= service.vocab_size for token in body.tokens):
            raise APIError(400, f"token ids must be in [0, {service.vocab_size})", param="tokens")
        return {"prompt": service.tokenizer.decode(body.tokens)}

    return await json_reply(request, text)

"""A reply rendered as the Anthropic Messages API answers: the message, and its stream (``message_start``, each
block's ``content_block_start``/``_delta``/``_stop``, ``message_delta`` with the stop reason and usage,
``message_stop``). Blocks (``server.reply_blocks``): reasoning is a ``thinking`` block, text a ``text`` block, a
call a ``tool_use`` block whose ``input`` is the arguments' JSON object."""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import ServerSentEvent

from server.errors import APIError, anthropic_error_body
from server.generation import ChoiceEvent
from server.messages_request import MessagesRequest
from server.reply_blocks import Block, BlockEvent, ReplyBlocks
from server.streaming import NamedEvent, SSEStyle
from tokenizer.json_values import loads_strict

log = logging.getLogger("qwen_serve")


def _error_event(exc: APIError | None) -> NamedEvent:
    if exc is None:
        return NamedEvent("error", anthropic_error_body(500, "the reply failed while it streamed"))
    return NamedEvent("error", anthropic_error_body(exc.status, exc.message))


MESSAGES_STREAM = SSEStyle(error=_error_event, done=False,
                           ping=lambda: ServerSentEvent(event="ping", data='{"type": "ping"}'))


class MessageRenderer:
    def __init__(self, body: MessagesRequest) -> None:
        self.body = body
        self.message_id = f"msg_{secrets.token_hex(12)}"

    def message(self, reply: ReplyBlocks) -> dict[str, Any]:
        reason, sequence = self.stop_reason(reply)
        return {**self._shell(), "content": [_block(block, done=True) for block in reply.blocks],
                "stop_reason": reason, "stop_sequence": sequence, "usage": usage(reply)}

    def stop_reason(self, reply: ReplyBlocks) -> tuple[str, str | None]:
        """Anthropic's ``stop_reason`` and ``stop_sequence``."""
        if reply.finish_reason == "length":
            return "max_tokens", None
        if reply.called:
            return "tool_use", None
        if reply.stop_string is not None and reply.stop_string in self.body.stop_sequences:
            return "stop_sequence", reply.stop_string
        return "end_turn", None

    def _shell(self) -> dict[str, Any]:
        return {"id": self.message_id, "type": "message", "role": "assistant", "model": self.body.model}

    async def stream(self, first: ChoiceEvent | None, events: AsyncIterator[ChoiceEvent],
                     reply: ReplyBlocks) -> AsyncIterator[NamedEvent]:
        """The events of a reply whose first engine event (``first``) was awaited ahead; an error ends the stream
        with an ``error`` event (``MESSAGES_STREAM``)."""
        if first is not None:
            reply.prompt_tokens, reply.cached_tokens = first.prompt_tokens, first.cached_tokens
        start = {**self._shell(), "content": [], "stop_reason": None, "stop_sequence": None,
                 "usage": {**usage(reply), "output_tokens": 0}}
        yield _event("message_start", message=start)
        if first is not None:
            for event in reply.feed(first):
                yield _block_event(event)
        async for choice in events:
            for event in reply.feed(choice):
                yield _block_event(event)
        reason, sequence = self.stop_reason(reply)
        yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence}, usage=usage(reply))
        yield _event("message_stop")


def usage(reply: ReplyBlocks) -> dict[str, Any]:
    """Anthropic counts the prompt tokens read from the cache apart from ``input_tokens``."""
    return {"input_tokens": reply.prompt_tokens - reply.cached_tokens, "output_tokens": reply.output_tokens,
            "cache_read_input_tokens": reply.cached_tokens, "cache_creation_input_tokens": 0}


def _event(kind: str, /, **data: Any) -> NamedEvent:
    return NamedEvent(kind, {"type": kind, **data})


def _block(block: Block, *, done: bool) -> dict[str, Any]:
    if block.type == "reasoning":
        return {"type": "thinking", "thinking": block.text if done else "", "signature": ""}
    if block.type == "text":
        return {"type": "text", "text": block.text if done else ""}
    return {"type": "tool_use", "id": block.call_id, "name": block.name,
            "input": _arguments(block.text) if done else {}}


def _arguments(text: str) -> dict[str, Any]:
    """A call's arguments as the object ``input`` must be; text that is not one becomes ``{}`` (logged)."""
    try:
        value = loads_strict(text) if text.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        log.warning("a tool call's arguments are not a JSON object; sent as {}: %.200r", text)
        return {}
    return value


def _block_event(event: BlockEvent) -> NamedEvent:
    if event.kind == "start":
        return _event("content_block_start", index=event.index, content_block=_block(event.block, done=False))
    if event.kind == "stop":
        return _event("content_block_stop", index=event.index)
    kind = event.block.type
    if kind == "reasoning":
        delta = {"type": "thinking_delta", "thinking": event.delta}
    elif kind == "text":
        delta = {"type": "text_delta", "text": event.delta}
    else:
        delta = {"type": "input_json_delta", "partial_json": event.delta}
    return _event("content_block_delta", index=event.index, delta=delta)

"""A reply rendered as the Responses API answers: the response object, and its stream of events in the spec's order,
each with its ``sequence_number``. Blocks (``server.reply_blocks``) become output items: reasoning as a
``reasoning`` item with ``reasoning_text``, text as an assistant ``message`` with one ``output_text`` part, a call
as a ``function_call``. A stream always ends with ``response.completed``, ``response.incomplete`` or
``response.failed``."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from server.errors import APIError
from server.generation import ChoiceEvent
from server.reply_blocks import Block, BlockEvent, ReplyBlocks
from server.responses_request import ResponsesRequest
from server.streaming import NamedEvent

log = logging.getLogger("qwen_serve")
ITEM_PREFIX = {"reasoning": "rs", "text": "msg", "call": "fc"}


class ResponseRenderer:
    """One response's object and events; ``status`` follows the reply (in_progress, then its ending)."""

    def __init__(self, response_id: str, model: str, body: ResponsesRequest) -> None:
        self.response_id, self.model, self.body = response_id, model, body
        self.created_at = int(time.time())
        self.status = "in_progress"
        self.incomplete_reason: str | None = None
        self.error: dict[str, Any] | None = None
        self._item_ids: list[str] = []
        self._sequence = 0

    # -- the response object -----------------------------------------------------------------------------------

    def response(self, reply: ReplyBlocks | None = None) -> dict[str, Any]:
        body = self.body
        output = [] if reply is None else [self.item(i, b, done=True) for i, b in enumerate(reply.blocks)]
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format else None
        return {
            "id": self.response_id, "object": "response", "created_at": self.created_at, "status": self.status,
            "model": self.model, "output": output, "error": self.error,
            "incomplete_details": {"reason": self.incomplete_reason} if self.incomplete_reason else None,
            "instructions": body.instructions, "metadata": body.metadata or {},
            "parallel_tool_calls": body.parallel_tool_calls, "temperature": body.temperature, "top_p": body.top_p,
            "tool_choice": _choice(body), "max_output_tokens": body.max_output_tokens,
            "tools": [t.model_dump(exclude_none=True) for t in body.function_tools()],
            "previous_response_id": body.previous_response_id, "store": body.store,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "text": {"format": fmt or {"type": "text"}}, "truncation": "disabled", "user": body.user,
            "usage": None if reply is None or self.status == "in_progress" else usage(reply),
        }

    def settle(self, reply: ReplyBlocks) -> None:
        """The status of a reply whose events ended: cut by the length limit, whole, or cancelled (its events
        stopped before its end)."""
        if reply.finish_reason is None:
            self.status, self.incomplete_reason = "cancelled", "cancelled"
        elif reply.finish_reason == "length":
            self.status, self.incomplete_reason = "incomplete", "max_output_tokens"
        else:
            self.status = "completed"

    def fail(self, exc: APIError | None) -> None:
        self.status = "failed"
        if exc is None:
            self.error = {"code": "server_error", "message": "the reply failed while it streamed"}
        else:
            code = "rate_limit_exceeded" if exc.status == 429 else "server_error"
            self.error = {"code": code, "message": exc.message}

    def item(self, index: int, block: Block, *, done: bool) -> dict[str, Any]:
        while len(self._item_ids) <= index:
            self._item_ids.append(f"{ITEM_PREFIX[block.type]}_{uuid.uuid4().hex}")
        item_id = self._item_ids[index]
        status = "in_progress" if not done else ("incomplete" if block.cut else "completed")
        if block.type == "reasoning":
            return {"type": "reasoning", "id": item_id, "summary": [], "status": status,
                    "content": [{"type": "reasoning_text", "text": block.text}] if done else []}
        if block.type == "text":
            return {"type": "message", "id": item_id, "role": "assistant", "status": status,
                    "content": [_output_text(block.text)] if done else []}
        return {"type": "function_call", "id": item_id, "call_id": block.call_id, "name": block.name,
                "arguments": block.text if done else "", "status": status}

    # -- the stream ----------------------------------------------------------------------------------------------

    def event(self, kind: str, /, **data: Any) -> NamedEvent:
        self._sequence += 1
        return NamedEvent(kind, {"type": kind, "sequence_number": self._sequence - 1, **data})

    def opening(self) -> list[NamedEvent]:
        return [self.event("response.created", response=self.response()),
                self.event("response.in_progress", response=self.response())]

    def ending(self, reply: ReplyBlocks) -> NamedEvent:
        name = {"completed": "response.completed", "failed": "response.failed"}.get(self.status,
                                                                                   "response.incomplete")
        return self.event(name, response=self.response(reply))

    async def body_events(self, first: ChoiceEvent | None, events: AsyncIterator[ChoiceEvent],
                          reply: ReplyBlocks) -> AsyncIterator[NamedEvent]:
        """The events of a reply whose first engine event (``first``) was awaited ahead, up to its ending
        (``closing_events``); an error ends them early and fails the response."""
        for event in self.opening():
            yield event
        try:
            if first is not None:
                for event in self.block_events(reply.feed(first)):
                    yield event
            async for choice in events:
                for event in self.block_events(reply.feed(choice)):
                    yield event
        except APIError as exc:
            self.fail(exc)
        except Exception:  # this request's fault only: the stream still ends with its terminal event
            log.exception("a response failed while it streamed")
            self.fail(None)
        else:
            self.settle(reply)

    def closing_events(self, reply: ReplyBlocks) -> list[NamedEvent]:
        """Close a block left open (a failed or cancelled reply), then the terminal event."""
        events = self.block_events(reply.abandon())
        return [*events, self.ending(reply)]

    def block_events(self, events: list[BlockEvent]) -> list[NamedEvent]:
        out: list[NamedEvent] = []
        for event in events:
            out += self._block_event(event)
        return out

    def _block_event(self, event: BlockEvent) -> list[NamedEvent]:
        index, block = event.index, event.block
        item_id = self.item(index, block, done=False)["id"]
        where = {"item_id": item_id, "output_index": index}
        if event.kind == "start":
            out = [self.event("response.output_item.added", output_index=index,
                              item=self.item(index, block, done=False))]
            if block.type == "text":
                out.append(self.event("response.content_part.added", **where, content_index=0,
                                      part=_output_text("")))
            elif block.type == "reasoning":
                out.append(self.event("response.content_part.added", **where, content_index=0,
                                      part={"type": "reasoning_text", "text": ""}))
            return out
        if event.kind == "delta":
            if block.type == "text":
                return [self.event("response.output_text.delta", **where, content_index=0, delta=event.delta,
                                   logprobs=[])]
            if block.type == "reasoning":
                return [self.event("response.reasoning_text.delta", **where, content_index=0, delta=event.delta)]
            return [self.event("response.function_call_arguments.delta", **where, delta=event.delta)]
        done = self.item(index, block, done=True)
        if block.type == "call":
            out = [self.event("response.function_call_arguments.done", **where, name=block.name,
                              arguments=block.text)]
        elif block.type == "text":
            out = [self.event("response.output_text.done", **where, content_index=0, text=block.text, logprobs=[]),
                   self.event("response.content_part.done", **where, content_index=0, part=done["content"][0])]
        else:
            out = [self.event("response.reasoning_text.done", **where, content_index=0, text=block.text),
                   self.event("response.content_part.done", **where, content_index=0, part=done["content"][0])]
        return [*out, self.event("response.output_item.done", output_index=index, item=done)]


def usage(reply: ReplyBlocks) -> dict[str, Any]:
    return {"input_tokens": reply.prompt_tokens,
            "input_tokens_details": {"cached_tokens": reply.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": reply.output_tokens,
            "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
            "total_tokens": reply.prompt_tokens + reply.output_tokens}


def assistant_turn(reply: ReplyBlocks) -> dict[str, Any]:
    """The reply as the chat message a continued conversation carries (its reasoning left out, as templates do)."""
    text = "".join(block.text for block in reply.blocks if block.type == "text")
    calls = [{"id": b.call_id, "type": "function", "function": {"name": b.name, "arguments": b.text}}
             for b in reply.blocks if b.type == "call"]
    return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump(exclude_none=True)

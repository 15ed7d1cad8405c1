"""A chat reply as the content blocks that the Responses and Messages APIs render: reasoning, text and function
calls, in the order the model wrote them. Blocks are read from the chat reply's own deltas (``server.chat_reply``),
so every API reads a reply the one way; each block opens, grows by deltas and closes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from server.chat_plan import ChatPlan
from server.chat_reply import StreamedChatReply
from server.generation import ChoiceEvent
from server.protocol import ChatDelta

BlockType = Literal["reasoning", "text", "call"]


@dataclass
class Block:
    """One block: reasoning or answer text, or a call (``text`` is then its arguments)."""

    type: BlockType
    text: str = ""
    call_id: str = ""
    name: str = ""
    cut: bool = False  # the length limit ended the reply inside this block


@dataclass(frozen=True)
class BlockEvent:
    """``start`` (the block as it opens), ``delta`` (text added to it) or ``stop`` (the block whole)."""

    kind: Literal["start", "delta", "stop"]
    index: int
    block: Block
    delta: str = ""


@dataclass
class ReplyBlocks:
    """One reply's events in, block events out; ``blocks``, the finish reason and token counts accumulate."""

    plan: ChatPlan
    blocks: list[Block] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    _open: bool = False

    def __post_init__(self) -> None:
        self._reply = StreamedChatReply(self.plan)

    def feed(self, event: ChoiceEvent) -> list[BlockEvent]:
        if self._reply.in_thought:  # tokens read while the thought is open count as reasoning
            self.reasoning_tokens += len(event.token_ids)
        self.prompt_tokens, self.cached_tokens = event.prompt_tokens, event.cached_tokens
        self.output_tokens = event.completion_tokens
        out = self._deltas(self._reply.feed(event.text))
        if event.finish_reason is not None:
            closing, self.finish_reason = self._reply.finish(event.finish_reason)
            self.stop_string = event.stop_string
            out += self._deltas(closing)
            if self._open and event.finish_reason == "length":
                self.blocks[-1].cut = True
            out += self._close()
        return out

    def abandon(self) -> list[BlockEvent]:
        """Close the block a reply that ended early (failed, cancelled) left open."""
        return self._close()

    @property
    def called(self) -> bool:
        return any(block.type == "call" for block in self.blocks)

    def _deltas(self, deltas: list[ChatDelta]) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        for delta in deltas:
            if delta.reasoning_content:
                out += self._grow("reasoning", delta.reasoning_content)
            if delta.content:
                out += self._grow("text", delta.content)
            for call in delta.tool_calls or []:
                if call.id is not None:
                    out += self._close()
                    out += self._start(Block("call", call_id=call.id, name=call.function.name or ""))
                if call.function.arguments:
                    out += self._grow("call", call.function.arguments)
        return out

    def _grow(self, kind: BlockType, text: str) -> list[BlockEvent]:
        out: list[BlockEvent] = []
        if not self._open or self.blocks[-1].type != kind:
            out += self._close()
            out += self._start(Block(kind))
        block = self.blocks[-1]
        block.text += text
        return [*out, BlockEvent("delta", len(self.blocks) - 1, block, text)]

    def _start(self, block: Block) -> list[BlockEvent]:
        self.blocks.append(block)
        self._open = True
        return [BlockEvent("start", len(self.blocks) - 1, Block(block.type, "", block.call_id, block.name))]

    def _close(self) -> list[BlockEvent]:
        if not self._open:
            return []
        self._open = False
        return [BlockEvent("stop", len(self.blocks) - 1, self.blocks[-1])]

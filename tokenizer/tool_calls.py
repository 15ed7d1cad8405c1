"""Native tool calls: the ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks that chat templates
of the Qwen2 family teach their models, read from a reply whole or as it streams (several calls per reply).

The content is the text outside the blocks, white space at either end trimmed. A block cut off by the length
limit still counts as a call when its name is legible (its arguments are then the partial text).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from tokenizer.call_pieces import CallPiece, FunctionCall, TrimmedText, assemble, hold_partial
from tokenizer.json_values import loads_strict

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_PARTIAL_NAME = re.compile(r'^\s*\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"arguments"\s*:\s*(.*)$', re.DOTALL)


@dataclass(frozen=True)
class NativeReply:
    content: str
    calls: tuple[FunctionCall, ...]


def parse_tool_calls(text: str) -> NativeReply:
    """Content and calls of a whole reply."""
    parser = ToolCallStreamParser()
    return NativeReply(*assemble([*parser.feed(text), *parser.finish()]))


def read_block(body: str, complete: bool) -> FunctionCall | None:
    """The call in one block's text, or None when it is not one (``complete``: the block was closed)."""
    if complete:
        try:
            value = loads_strict(body)
            if isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]:
                arguments = value.get("arguments", {})
                text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
                return FunctionCall(value["name"], text)
        except (ValueError, RecursionError):  # not JSON we could write back out: the block stays text
            pass
        return None
    match = _PARTIAL_NAME.match(body)
    return FunctionCall(match.group(1), match.group(2).strip()) if match else None


class ToolCallStreamParser:
    """Reads a reply as it streams; the pieces reassemble to ``parse_tool_calls`` of the whole text.

    Content streams as it comes, except text that may be the start of ``<tool_call>`` and trailing white space,
    held until what follows shows what they are. A block is emitted as one call once it closes. ``prefix``:
    reply text already in the prompt (a forced call's opening).
    """

    def __init__(self, prefix: str = "") -> None:
        self._buffer = prefix
        self._in_call = False
        self._text = TrimmedText()
        self._calls = 0
        self._searched = 0  # in a call: the buffer before this holds no closing tag

    def feed(self, delta: str) -> list[CallPiece]:
        self._buffer += delta
        out: list[CallPiece] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE, max(0, self._searched - len(CLOSE) + 1))
                if end < 0:
                    self._searched = len(self._buffer)
                    return out
                out += self._block(self._buffer[:end], complete=True)
                self._buffer = self._buffer[end + len(CLOSE) :]
                self._in_call, self._searched = False, 0
                continue
            start = self._buffer.find(OPEN)
            if start < 0:
                ready, self._buffer = hold_partial(self._buffer, OPEN)
                out += self._content(ready)
                return out
            out += self._content(self._buffer[:start])
            self._buffer = self._buffer[start + len(OPEN) :]
            self._in_call = True

    def finish(self) -> list[CallPiece]:
        text, self._buffer = self._buffer, ""
        if self._in_call:
            return self._block(text, complete=False)
        return self._content(text)

    def _block(self, body: str, complete: bool) -> list[CallPiece]:
        call = read_block(body, complete)
        if call is None:  # not a call after all: its text stays content
            return self._content(OPEN + body + (CLOSE if complete else ""))
        self._calls += 1
        return [CallPiece(name=call.name, arguments=call.arguments, index=self._calls - 1)]

    def _content(self, text: str) -> list[CallPiece]:
        kept = self._text.push(text)
        return [CallPiece(content=kept)] if kept else []

"""What a tool-call format is: how tools and past calls enter the prompt, how a required call opens, the grammar
of a call, and how replies are read back into calls (streamed; a whole reply is a stream read at once)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

from engine.grammar import GrammarSpec
from server.protocol import ChatMessageIn
from tokenizer import ChatMessage
from tokenizer.call_pieces import CallPiece, FunctionCall, assemble
from tokenizer.react import Tool


class CallStreamParser(Protocol):
    def feed(self, text: str) -> list[CallPiece]: ...

    def finish(self) -> list[CallPiece]: ...


class ArgumentGrammars(Protocol):
    """Grammars of argument values under a tool's schema (checked against the server's limits)."""

    def arguments(self, tool: Tool) -> GrammarSpec:
        """A JSON object valid under the tool's parameters schema."""
        ...

    def value(self, tool: Tool, name: str, schema: Any) -> GrammarSpec:
        """A JSON value valid under ``schema``, parameter ``name`` of ``tool``."""
        ...


class ToolFormat(ABC):
    """One way a model is taught to call functions. Subclasses are stateless; one instance serves a model."""

    name: ClassVar[str]
    stop_strings: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def turns(self, messages: Sequence[ChatMessageIn], tools: Sequence[Tool],
              prefix: str) -> tuple[list[ChatMessage], bool]:
        """The conversation as the prompt's turns, and whether the last (assistant) turn is left open;
        ``prefix``: the opening of a required call, put at the start of the reply."""

    def template_kwargs(self, tools: Sequence[Tool]) -> dict[str, Any]:
        """What the chat template gets besides the messages."""
        return {}

    def check_tools(self, tools: Sequence[Tool]) -> None:  # noqa: B027 (a hook: most formats write any tool)
        """Raise a 400 ``APIError`` for a tool whose calls this format cannot write."""

    @abstractmethod
    def call_prefix(self, forced: str | None) -> str:
        """Reply text put in the prompt when a call is required (``forced``: of that function)."""

    @abstractmethod
    def call_grammar(self, tools: Sequence[Tool], forced: str | None, grammars: ArgumentGrammars) -> GrammarSpec:
        """The rest of a required call after ``call_prefix(forced)``: one call of ``forced`` or any tool."""

    @abstractmethod
    def stream_parser(self, tools: Sequence[Tool], prefix: str) -> CallStreamParser:
        """A reader of one reply whose first ``prefix`` is in the prompt."""

    def parse(self, tools: Sequence[Tool], prefix: str, text: str) -> tuple[str, tuple[FunctionCall, ...]]:
        """Content and calls of a whole reply, read as its stream would be."""
        parser = self.stream_parser(tools, prefix)
        return assemble([*parser.feed(text), *parser.finish()])

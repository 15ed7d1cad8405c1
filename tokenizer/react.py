"""Qwen's ReAct function calling: the prompt of Qwen's ``openai_api.py`` and the parser of model output.

Two deliberate differences from the original: the system message is used verbatim (the original strips it and
drops the default one), and tool results are encoded as plain text like every other content (the original's
text-completion path lets ``<|im_end|>`` inside a function result become a control token).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenizer.call_pieces import CallPiece, FunctionCall
from tokenizer.chat import ChatMessage

TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the {name_for_human} API "
    "useful for? {description_for_model} Parameters: {parameters}"
)
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
OBSERVATION = "Observation:"
STOP_STRINGS = (OBSERVATION,)


@dataclass(frozen=True)
class Tool:
    """A callable function as the ReAct prompt describes it."""

    name: str
    description: str = ""
    parameters: Any = field(default_factory=dict)
    name_for_human: str | None = None
    description_for_model: str | None = None

    @classmethod
    def from_function(cls, function: dict[str, Any]) -> Tool:
        """From an OpenAI function (``name``, ``description``, ``parameters``) or Qwen's own form
        (``name_for_model``, ``name_for_human``, ``description_for_model``, list-shaped ``parameters``)."""
        name = function.get("name_for_model") or function.get("name")
        if not name:
            raise ReactError("every function needs a name")
        return cls(name, function.get("description", ""), function.get("parameters", {}),
                   function.get("name_for_human"), function.get("description_for_model"))

    def describe(self) -> str:
        return TOOL_DESC.format(
            name_for_model=self.name,
            name_for_human=self.name_for_human or self.name,
            description_for_model=self.description_for_model or self.description,
            parameters=json.dumps(self.parameters, ensure_ascii=False),
        )


@dataclass(frozen=True)
class ReactInput:
    """One OpenAI message: ``calls`` for an assistant's tool/function calls; role ``function`` or ``tool`` for a
    result."""

    role: str
    content: str
    calls: tuple[FunctionCall, ...] = ()


class ReactError(ValueError):
    """A conversation the ReAct format cannot express."""


def instruction(tools: Sequence[Tool]) -> str:
    return REACT_INSTRUCTION.format(
        tools_text="\n\n".join(tool.describe() for tool in tools),
        tools_name_text=", ".join(tool.name for tool in tools),
    ).lstrip("\n").rstrip()


def _clean(text: str) -> str:
    return text.lstrip("\n").rstrip()


def react_messages(messages: Sequence[ReactInput], tools: Sequence[Tool]) -> tuple[list[ChatMessage], bool]:
    """ChatML turns for a conversation with tools, and whether the last assistant turn is left open (after a
    tool result the model continues with ``Thought:``; after an assistant message it continues that message)."""
    if not any(m.role == "user" for m in messages):
        raise ReactError("expecting at least one user message")
    rest = list(messages)
    roles: list[str] = []
    parts: list[list[str]] = []  # each turn's text in pieces, joined once at the end (no quadratic re-copying)
    if rest and rest[0].role == "system":  # without one, the prompt builder adds the model's default
        roles.append("system")
        parts.append([rest.pop(0).content])
    for index, message in enumerate(rest):
        content = _clean(message.content)
        if message.role in ("function", "tool"):
            if not roles or roles[-1] != "assistant":
                raise ReactError(f"a {message.role} result must follow an assistant message that called it")
            parts[-1].append(f"\n{OBSERVATION} {content}")
            if index == len(rest) - 1:
                parts[-1].append("\nThought:")
        elif message.role == "assistant":
            text = _assistant_text(content, message.calls, bool(tools))
            if roles and roles[-1] == "assistant":
                parts[-1].append(f"\n{text}")
            else:
                roles.append("assistant")
                parts.append([_clean(text)])
        else:
            roles.append(message.role)
            parts.append([content])
    turns = [ChatMessage(role, "".join(pieces)) for role, pieces in zip(roles, parts, strict=True)]
    if tools:
        _prefix_instruction(turns, instruction(tools))
    return turns, turns[-1].role == "assistant"


def _assistant_text(content: str, calls: Sequence[FunctionCall], with_tools: bool) -> str:
    if not calls:
        return f"Thought: I now know the final answer.\nFinal Answer: {content}" if with_tools else content
    parts = []
    for number, call in enumerate(calls):
        thought = content if number == 0 else ""
        if not thought.startswith("Thought:"):
            thought = f"Thought: {thought}"
        parts.append(f"{thought}\nAction: {call.name}\nAction Input: {call.arguments}")
    return "\n".join(parts)


def _prefix_instruction(turns: list[ChatMessage], text: str) -> None:
    """As the original: before the user message of the last answered exchange, else before the question."""
    history = turns[:-1] if turns[-1].role == "user" else turns
    answered = [i for i, turn in enumerate(history) if turn.role == "user"]
    target = answered[-1] if answered else len(turns) - 1
    turns[target] = ChatMessage("user", f"{text}\n\nQuestion: {turns[target].content}")


@dataclass(frozen=True)
class ReactReply:
    """Model output read as an OpenAI message: content, and a function call when the model chose one."""

    content: str
    call: FunctionCall | None

    @property
    def finish_reason(self) -> str:
        return "function_call" if self.call else "stop"


def parse_reply(text: str) -> ReactReply:
    """Exactly the reading of Qwen's ``parse_response``: an action needs ``\\nAction:`` before
    ``\\nAction Input:``; its thought becomes the content; otherwise the text after the last
    ``\\nFinal Answer: `` (or all of it) is the content."""
    action = text.find("\nAction:")
    action_input = text.find("\nAction Input:")
    if 0 <= action < action_input:
        if text.find(f"\n{OBSERVATION}") < action_input:
            text = text.rstrip() + f"\n{OBSERVATION}"
        observation = text.find(f"\n{OBSERVATION}")
        name = text[action + len("\nAction:") : action_input].strip()
        arguments = text[action_input + len("\nAction Input:") : observation].strip()
        if name:
            thought = text[:action]
            start = thought.find("Thought: ")
            if start >= 0:
                thought = thought[start + len("Thought: ") :]
            return ReactReply(thought.strip(), FunctionCall(name, arguments))
    final = text.rfind("\nFinal Answer: ")
    if final >= 0:
        text = text[final + len("\nFinal Answer: ") :]
    return ReactReply(text, None)


CALL_PREFIX = "Thought: \nAction:"


def forced_call_prefix(name: str | None) -> str:
    """The start of a reply that calls ``name`` (None: some function). Put in the prompt, it leaves the model only
    the arguments (and the name)."""
    return f"{CALL_PREFIX} {name}\nAction Input:" if name else CALL_PREFIX


class ReplyStreamParser:
    """Reads a ReAct reply as it streams; the pieces reassemble to ``parse_reply`` of the whole text.

    Text is held until the reply shows what it is: ``\nAction Input:`` after ``\nAction:`` (a call: the thought
    goes out as content, then the name, then the arguments as they come, white space at either end held back),
    or ``\nFinal Answer: `` (the answer streams from there). Anything else is read whole at the end.
    ``prefix``: reply text that sits in the prompt already (``forced_call_prefix``).
    """

    MARKERS = ("\nAction:", "\nAction Input:", "\nFinal Answer: ")

    def __init__(self, prefix: str = "") -> None:
        self._text = prefix
        self._mode = "undecided"
        self._found: dict[str, int] = {}  # first place of each marker seen so far
        self._searched = 0  # the text before this has been searched for every marker
        self._started = False  # arguments: leading white space is skipped until the first other character

    def feed(self, delta: str) -> list[CallPiece]:
        self._text += delta
        return self._decide() if self._mode == "undecided" else self._advance()

    def finish(self) -> list[CallPiece]:
        if self._mode != "undecided":
            return self._advance()
        reply = parse_reply(self._text)
        if reply.call is None:
            return [CallPiece(content=reply.content)] if reply.content else []
        return [*self._opening(reply.content, reply.call.name), CallPiece(arguments=reply.call.arguments)]

    def _first(self, marker: str) -> int:
        return self._found.get(marker, -1)

    def _decide(self) -> list[CallPiece]:
        text = self._text
        for marker in self.MARKERS:  # search only what is new (and a marker's width back)
            if marker not in self._found:
                place = text.find(marker, max(0, self._searched - len(marker) + 1))
                if place >= 0:
                    self._found[marker] = place
        self._searched = len(text)
        action, action_input, final = (self._first(marker) for marker in self.MARKERS)
        name = text[action + len("\nAction:") : action_input].strip() if 0 <= action < action_input else ""
        if name and not 0 <= final < action:
            thought = text[:action]
            start = thought.find("Thought: ")
            if start >= 0:
                thought = thought[start + len("Thought: ") :]
            self._mode = "arguments"
            self._text = text[action_input + len("\nAction Input:") :]
            return [*self._opening(thought.strip(), name), *self._advance()]
        if final >= 0 and not 0 <= action < final:
            self._mode, self._text = "answer", text[final + len("\nFinal Answer: ") :]
            return self._advance()
        return []

    @staticmethod
    def _opening(content: str, name: str) -> list[CallPiece]:
        return [*([CallPiece(content=content)] if content else []), CallPiece(name=name)]

    def _advance(self) -> list[CallPiece]:
        """Send what is new; ``_text`` keeps only what is not sent yet (arguments: white space at either end held
        back, as ``parse_reply`` strips it)."""
        if self._mode == "answer":
            fresh, self._text = self._text, ""
            return [CallPiece(content=fresh)] if fresh else []
        if not self._started:
            self._text = self._text.lstrip()
            self._started = bool(self._text)
        fresh = self._text.rstrip()
        self._text = self._text[len(fresh) :]
        return [CallPiece(arguments=fresh)] if fresh else []

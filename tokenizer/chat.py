"""Chat prompts: Qwen ChatML with ``make_context`` semantics, or the model's own chat template.

Everything a client sent (message contents, role names) is encoded with special tokens as plain text, so no
user string can become a control token.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from importlib import resources
from typing import Any

from jinja2 import TemplateError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenizer.base import Tokenizer
from tokenizer.json_values import path_text, strings

DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class ChatMessage:
    """One conversation turn. ``extra`` carries template-only fields (``name``, ``tool_calls``, ...)."""

    role: str
    content: str
    extra: dict[str, Any] = field(default_factory=dict)

    def as_template_dict(self, content: str | None = None) -> dict[str, Any]:
        return {**self.extra, "role": self.role, "content": self.content if content is None else content}


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: its text, its token ids, how many messages the context window dropped, and ``tail``: the
    template's own text after the last message (the reply's opening, e.g. a pre-opened ``<think>``)."""

    text: str
    token_ids: list[int]
    dropped_messages: int = 0
    tail: str = ""


class ChatTemplateError(ValueError):
    """The chat template refused the conversation (e.g. its own ``raise_exception``)."""


class ControlTokenError(ValueError):
    """Text the chat template renders as its own (tools, calls, names, template variables) spells a control
    token; ``field`` says where."""

    def __init__(self, token: str, field: str) -> None:
        super().__init__(f"{field} may not contain the control token {token!r}: the chat template renders it as "
                         "prompt text")
        self.token, self.field = token, field


def build_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage],
    *,
    max_window_size: int | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> Prompt:
    """The model's chat template when the tokenizer has one, else Qwen ChatML (``make_context``)."""
    if tokenizer.chat_template:
        return build_template_prompt(
            tokenizer, messages, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **(template_kwargs or {})
        )
    return build_chatml_prompt(
        tokenizer, messages, max_window_size=max_window_size, add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
    )


# --- Qwen ChatML -----------------------------------------------------------------------------------------


def build_chatml_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage],
    *,
    max_window_size: int | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
) -> Prompt:
    """ChatML exactly as Qwen's ``make_context``, generalised to any list of messages.

    A leading system message is the system prompt (``DEFAULT_SYSTEM`` when there is none); every other
    message becomes one ``<|im_start|>role\\ncontent<|im_end|>`` turn in order. Older turns are dropped as
    ``make_context`` drops history: walking from the newest, a unit (a user message and the replies after it)
    is kept while system + unit + kept tokens stay below ``max_window_size``; the last message always stays.
    ``continue_final_message`` leaves the last turn open (no ``<|im_end|>``, no new assistant header) for the
    model to continue it.
    """
    im_start = _special_id(tokenizer, IM_START)
    im_end = _special_id(tokenizer, IM_END)
    newline = tokenizer.encode("\n")

    def turn(message: ChatMessage) -> tuple[str, list[int]]:
        ids = [im_start, *tokenizer.encode(message.role), *newline, *tokenizer.encode(message.content), im_end]
        return f"{IM_START}{message.role}\n{message.content}{IM_END}", ids

    if messages and messages[0].role == "system":
        system, rest = messages[0], list(messages[1:])
    else:
        system, rest = ChatMessage("system", DEFAULT_SYSTEM), list(messages)
    text, ids = turn(system)
    kept_units: list[tuple[str, list[int]]] = []
    kept_tokens = 0
    dropped = 0
    units = _units(rest[:-1])
    for index in range(len(units) - 1, -1, -1):
        unit_turns = [turn(m) for m in units[index]]
        unit_text = "".join(f"\n{t}" for t, _ in unit_turns)
        unit_ids = [i for _, turn_ids in unit_turns for i in (*newline, *turn_ids)]
        if max_window_size is not None and len(ids) + len(unit_ids) + kept_tokens >= max_window_size:
            dropped = sum(len(u) for u in units[: index + 1])
            break
        kept_units.insert(0, (unit_text, unit_ids))
        kept_tokens += len(unit_ids)
    for unit_text, unit_ids in kept_units:
        text += unit_text
        ids += unit_ids
    for message in rest[-1:]:
        last_text, last_ids = turn(message)
        if continue_final_message:
            last_text, last_ids = last_text.removesuffix(IM_END), last_ids[:-1]
        text += f"\n{last_text}"
        ids += [*newline, *last_ids]
    tail = ""
    if add_generation_prompt and not continue_final_message:
        tail = f"\n{IM_START}assistant\n"
        ids += [*newline, im_start, *tokenizer.encode("assistant"), *newline]
    return Prompt(text + tail, ids, dropped, tail)


def _units(messages: list[ChatMessage]) -> list[list[ChatMessage]]:
    """Group turns for window truncation: each unit starts at a user message."""
    units: list[list[ChatMessage]] = []
    for message in messages:
        if message.role == "user" or not units:
            units.append([message])
        else:
            units[-1].append(message)
    return units


def _special_id(tokenizer: Tokenizer, surface: str) -> int:
    token_id = tokenizer.token_to_id(surface)
    if token_id is None:
        raise ValueError(f"the vocabulary has no {surface} token: ChatML needs it")
    return token_id


# --- chat templates --------------------------------------------------------------------------------------

def build_template_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[ChatMessage],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    **template_kwargs: Any,
) -> Prompt:
    """Render the model's jinja chat template; message contents are encoded as plain text.

    The template is rendered with a sentinel in place of every message content (private-use characters around a
    random nonce drawn for this render, so no text can forge one); the contents are put back afterwards. Special
    tokens are recognised only in the template's own text; the text between two of them (template text and
    contents alike) is encoded in one piece, as ``transformers`` would. Everything else the template renders
    (calls, names, tools, template variables) becomes its text, so a control token spelled anywhere in it is
    refused (``ControlTokenError``), after every decoding this side has done (call arguments are parsed JSON).
    """
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template")
    nonce = secrets.token_hex(8)
    stand_ins = [m.as_template_dict(f"\ue000{nonce}:{i}\ue001") for i, m in enumerate(messages)]
    refuse_control_tokens(tokenizer, {"messages": [m.extra for m in messages], **template_kwargs})
    rendered = render_chat_template(
        tokenizer.chat_template,
        stand_ins,
        add_generation_prompt=add_generation_prompt and not continue_final_message,
        bos_token=getattr(tokenizer, "bos_token", None),
        eos_token=getattr(tokenizer, "eos_token", None),
        **template_kwargs,
    )
    if continue_final_message and messages:
        last = f"\ue000{nonce}:{len(messages) - 1}\ue001"
        rendered = rendered[: rendered.rindex(last) + len(last)]  # the last turn stays open
    pieces: list[tuple[str, bool]] = []
    position = 0
    for match in re.finditer(f"\ue000{nonce}:(\\d+)\ue001", rendered):
        pieces.append((rendered[position : match.start()], True))
        pieces.append((messages[int(match.group(1))].content, False))
        position = match.end()
    pieces.append((rendered[position:], True))
    text = "".join(piece for piece, _ in pieces)
    return Prompt(text, encode_trusted_specials(tokenizer, pieces), tail=rendered[position:])


def refuse_control_tokens(tokenizer: Tokenizer, values: Any) -> None:
    """``ControlTokenError`` for the first string (object keys included) of ``values`` that spells a special
    token; walked without recursion."""
    specials = _special_pattern(tuple(sorted(tokenizer.special_tokens, key=len, reverse=True)))
    if specials is None:
        return
    for path, text in strings(values):
        found = specials.search(text)
        if found:
            raise ControlTokenError(found.group(), path_text(path)[:200])


def encode_trusted_specials(tokenizer: Tokenizer, pieces: Sequence[tuple[str, bool]]) -> list[int]:
    """Encode ``(text, trusted)`` pieces: only special surface forms inside trusted pieces become control ids."""
    specials = _special_pattern(tuple(sorted(tokenizer.special_tokens, key=len, reverse=True)))
    ids: list[int] = []
    pending: list[str] = []
    for piece, trusted in pieces:
        position = 0
        if trusted and specials is not None:
            for match in specials.finditer(piece):
                pending.append(piece[position : match.start()])
                ids += tokenizer.encode("".join(pending))
                pending.clear()
                ids.append(tokenizer.special_tokens[match.group()])
                position = match.end()
        pending.append(piece[position:])
    ids += tokenizer.encode("".join(pending))
    return ids


@lru_cache(maxsize=8)
def _special_pattern(surfaces: tuple[str, ...]) -> re.Pattern[str] | None:
    return re.compile("|".join(map(re.escape, surfaces))) if surfaces else None


def render_chat_template(template: str, messages: list[dict[str, Any]], **context: Any) -> str:
    """Render a HF-style chat template in a sandbox, with the globals and filters transformers provides."""
    try:
        return _compile_template(template).render(messages=messages, **{k: v for k, v in context.items()
                                                                         if v is not None})
    except TemplateError as exc:
        raise ChatTemplateError(str(exc)) from exc
    except (TypeError, ValueError, LookupError, AttributeError, RecursionError) as exc:  # request data it cannot take
        raise ChatTemplateError(f"{type(exc).__name__}: {exc}"[:300]) from exc


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile_template(template: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


RENDER_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                              "raise_exception", "strftime_now", "range", "namespace", "loop"})


@lru_cache(maxsize=8)
def template_variables(template: str | None) -> frozenset[str]:
    """The variables a chat template reads that the renderer does not set itself (``enable_thinking``, ...):
    what a request may pass as ``chat_template_kwargs``."""
    if not template:
        return frozenset()
    try:
        parsed = _compile_template(template).environment.parse(template)
    except TemplateError:
        return frozenset()
    return frozenset(meta.find_undeclared_variables(parsed)) - RENDER_VARIABLES


BUILTIN_TEMPLATES = {"qwen3": "qwen3.jinja", "qwen3_moe": "qwen3.jinja", "qwen3_next": "qwen3.jinja",
                     "qwen3_5": "qwen3_5.jinja", "qwen3_5_moe": "qwen3_5.jinja"}


def builtin_template(arch: str) -> str | None:
    """The documented chat format of an architecture whose checkpoints may ship without a template."""
    name = BUILTIN_TEMPLATES.get(arch)
    return resources.files("tokenizer").joinpath("templates", name).read_text() if name else None


def chat_stop_token_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Tokens that end an assistant turn: eos, and ChatML's ``<|im_end|>`` / ``<|im_start|>`` when present."""
    ids = {tokenizer.token_to_id(IM_END), tokenizer.token_to_id(IM_START), tokenizer.eos_token_id}
    return frozenset(i for i in ids if i is not None)

"""Bounds on what one request may ask for, checked before any of it reaches a tokenizer, a chat template, the
grammar compiler or the engine. Each bound is a setting (README, "Limits and security"); ranges that follow from
what the engine can represent are in ``server.protocol``. Every refusal is a 400 naming the field."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, encodable
from server.settings import Settings

TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
CHARS_PER_CONTEXT_TOKEN = 16  # default text bound: a prompt longer than this many characters a token cannot fit
SCHEMA_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


@dataclass(frozen=True)
class Limits:
    """The request bounds of one server (from its settings, same names)."""

    max_messages: int
    max_tools: int
    max_prompt_choices: int
    max_embedding_inputs: int
    max_rerank_documents: int
    max_logit_bias: int
    max_stop: int
    max_stop_chars: int
    max_schema_bytes: int
    max_schema_depth: int
    max_schema_refs: int
    max_schema_repeat: int
    max_prompt_chars: int | None

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})

    def check_sampling(self, body: SamplingFields, vocab_size: int) -> None:
        """Stop strings, ``logit_bias`` and ``top_k`` against the bounds and the vocabulary."""
        if len(body.stop) > self.max_stop:
            raise APIError(400, f"at most {self.max_stop} stop strings", param="stop")
        if any(len(stop) > self.max_stop_chars for stop in body.stop):
            raise APIError(400, f"stop strings may have at most {self.max_stop_chars} characters", param="stop")
        bias = body.logit_bias or {}
        if len(bias) > self.max_logit_bias:
            raise APIError(400, f"logit_bias may have at most {self.max_logit_bias} entries", param="logit_bias")
        if any(not 0 <= token < vocab_size for token in body.token_bias):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab_size})", param="logit_bias")
        if body.top_k is not None and body.top_k > vocab_size:
            raise APIError(400, f"top_k must be -1, 0 or at most the vocabulary size {vocab_size}", param="top_k")

    def check_text(self, texts: Iterable[str | list[int]], context: int, param: str) -> None:
        """The characters of a request's text (token-id prompts aside) against ``max_prompt_chars``, before any of
        it is tokenized."""
        self.check_chars(sum(len(text) for text in texts if isinstance(text, str)), context, param)

    def check_chars(self, total: int, context: int, param: str) -> None:
        limit = self.max_prompt_chars or CHARS_PER_CONTEXT_TOKEN * context
        if total > limit:
            raise APIError(400, f"the prompt has {total} characters; this server tokenizes at most {limit} "
                                f"(max_prompt_chars) for a context of {context} tokens", param=param,
                           code="context_length_exceeded")

    def check_chat(self, body: ChatCompletionRequest, vocab_size: int, context: int) -> None:
        """Counts, names and text size of a chat request (the schemas are walked by ``check_schema``)."""
        self.check_sampling(body, vocab_size)
        if len(body.messages) > self.max_messages:
            raise APIError(400, f"at most {self.max_messages} messages", param="messages")
        specs = body.function_specs
        if len(specs) > self.max_tools:
            raise APIError(400, f"at most {self.max_tools} tools", param="tools")
        texts = [m.text() for m in body.messages]
        texts += [call.function.arguments for m in body.messages for call in m.tool_calls or []]
        texts += [m.function_call.arguments for m in body.messages if m.function_call is not None]
        texts += [spec.description + (spec.description_for_model or "") for spec in specs]
        self.check_text(texts, context, "messages")
        names = [spec.model_name for spec in specs]
        names += [call.function.name for m in body.messages for call in m.tool_calls or []]
        names += [m.function_call.name for m in body.messages if m.function_call is not None]
        if body.forced_function is not None:
            names.append(body.forced_function)
        for name in names:
            if not TOOL_NAME.fullmatch(name):
                raise APIError(400, f"function names must match ^[A-Za-z0-9_-]{{1,64}}$, got {name[:80]!r}",
                               param="tools")

    def check_completion(self, body: CompletionRequest, vocab_size: int) -> None:
        self.check_sampling(body, vocab_size)
        if len(body.prompts()) * body.n > self.max_prompt_choices:
            raise APIError(400, f"prompts times n may be at most {self.max_prompt_choices}", param="prompt")

    def check_embedding(self, inputs: list[str | list[int]], context: int) -> None:
        if len(inputs) > self.max_embedding_inputs:
            raise APIError(400, f"at most {self.max_embedding_inputs} inputs (max_embedding_inputs)", param="input")
        self.check_text(inputs, context, "input")

    def check_rerank(self, pairs: list[tuple[str, str]], context: int) -> None:
        """The pair count, and the text of every judge prompt (its query and its document) before tokenizing."""
        if len(pairs) > self.max_rerank_documents:
            raise APIError(400, f"at most {self.max_rerank_documents} documents (max_rerank_documents)",
                           param="documents")
        self.check_chars(sum(len(query) + len(document) for query, document in pairs), context, "documents")

    def check_schema(self, schema: Any, param: str, *, enforced: bool = True) -> None:
        """Size, nesting, ``$ref`` count and (for a schema a grammar will enforce) repetition bounds of one JSON
        schema; text must be valid Unicode. Walked without recursion, so no nesting can exhaust the stack."""
        size, refs = 0, 0
        stack: list[tuple[Any, int]] = [(schema, 1)]
        while stack:
            node, depth = stack.pop()
            if depth > self.max_schema_depth:
                raise APIError(400, f"JSON schema nested deeper than {self.max_schema_depth} levels", param=param)
            if isinstance(node, dict):
                size += 2
                for key, value in node.items():
                    size += len(_text(key, param)) + 3
                    refs += key == "$ref"
                    if enforced and key in SCHEMA_BOUNDS and isinstance(value, int) and value > self.max_schema_repeat:
                        raise APIError(400, f"JSON schema {key} may be at most {self.max_schema_repeat}", param=param)
                    stack.append((value, depth + 1))
            elif isinstance(node, list):
                size += 2 + len(node)
                stack.extend((item, depth + 1) for item in node)
            else:
                size += len(_text(node, param)) if isinstance(node, str) else 8
            if size > self.max_schema_bytes:
                raise APIError(400, f"JSON schema larger than {self.max_schema_bytes} bytes", param=param)
        if refs > self.max_schema_refs:
            raise APIError(400, f"JSON schema has more than {self.max_schema_refs} $ref", param=param)


def _text(value: str, param: str) -> str:
    try:
        return encodable(value)
    except ValueError as exc:
        raise APIError(400, str(exc), param=param) from None

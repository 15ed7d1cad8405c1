"""OpenAI request and response schemas (pydantic). Unknown request fields are ignored."""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

log = logging.getLogger("qwen_serve")
MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_INT = 2**31 - 1  # counts and token ids fit an int32
# Ceilings on list lengths (the settings' finer bounds are checked after validation):
MAX_ITEMS = 1 << 14  # messages, tools, parts, stop strings, texts, map entries
MAX_TOKEN_IDS = 1 << 20  # token ids in one list
SEED_LIMIT = 2**64  # seeds are unsigned 64-bit integers
TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,10}")


def encodable(text: str) -> str:
    """Text that UTF-8 can hold: a lone surrogate (JSON's ``"\ud800"``) cannot be tokenized or echoed."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"text must be valid Unicode (a lone surrogate at character {exc.start})") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]
Identifier = Annotated[str, Field(max_length=256), AfterValidator(encodable)]
TokenId = Annotated[int, Field(ge=0, le=MAX_INT)]
Kind = Annotated[str, Field(max_length=64)]  # a ``type`` tag of an item, block or tool, known or not


def items(limit: int = MAX_ITEMS) -> Any:
    """A list bound: a longer list is refused, and validation stops at the first bad item (a body of a million bad
    items costs one error, not a million)."""
    return Field(max_length=limit, fail_fast=True)


TokenIds = Annotated[list[TokenId], items(MAX_TOKEN_IDS)]


class Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


def log_ignored(api: str, body: BaseModel) -> None:
    """A debug line naming the top-level fields of ``body`` that its model does not read (kept as extras)."""
    if body.model_extra and log.isEnabledFor(logging.DEBUG):
        names = sorted(repr(name[:64]) for name in body.model_extra)
        log.debug("%s: ignored fields %s", api, ", ".join(names[:32]))


class TextPart(Request):
    type: Literal["text"]
    text: Text


class FunctionCallIn(Request):
    name: Identifier
    arguments: Text = ""


class ToolCallIn(Request):
    id: Identifier | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class QwenParameter(Request):
    """One entry of Qwen's list-shaped ``parameters``: ``{"name", "description", "required", "schema"}``."""

    name: Identifier
    description: Text = ""
    required: bool = False
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")


class FunctionSpec(Request):
    """An OpenAI function, or Qwen's own form (``name_for_model``, ``name_for_human``, ``description_for_model``,
    ``parameters`` as a list of ``QwenParameter``)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, populate_by_name=True)
    name: Identifier | None = None
    name_for_model: Identifier | None = None
    name_for_human: Identifier | None = None
    description: Text = ""
    description_for_model: Text | None = None
    parameters: dict[str, Any] | Annotated[list[QwenParameter], items()] = Field(
        default_factory=lambda: {"type": "object", "properties": {}})

    @model_validator(mode="after")
    def _named_with_object_schema(self) -> FunctionSpec:
        if not (self.name or self.name_for_model):
            raise ValueError("every function needs a name")
        if isinstance(self.parameters, dict):
            kind = self.parameters.get("type", "object")
            if kind != "object":
                raise ValueError(f"function parameters must be a JSON schema of type object, not {kind!r}")
            if not isinstance(self.parameters.get("properties", {}), dict):
                raise ValueError("function parameters: properties must be an object")
            required = self.parameters.get("required", [])
            if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
                raise ValueError("function parameters: required must be a list of names")
        return self

    @property
    def model_name(self) -> str:
        return self.name_for_model or self.name or ""

    @property
    def described_parameters(self) -> dict[str, Any] | list[dict[str, Any]]:
        """The parameters as the request gave them (Qwen's list form as plain dicts), for prompts that show them."""
        if isinstance(self.parameters, dict):
            return self.parameters
        return [p.model_dump(by_alias=True) for p in self.parameters]


class ToolSpec(Request):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(Request):
    name: Identifier


class NamedToolChoice(Request):
    type: Literal["function"]
    function: NamedFunction


class ChatMessageIn(Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | Annotated[list[TextPart], items()] | None = None
    name: Identifier | None = None
    tool_calls: Annotated[list[ToolCallIn], items()] | None = None
    tool_call_id: Identifier | None = None
    function_call: FunctionCallIn | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class JsonSchemaFormat(Request):
    """``response_format.json_schema``: the schema a reply must follow (``strict`` is always honoured)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Identifier = "response"
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema")
        return self

    @property
    def structured(self) -> bool:
        return self.type != "text"


class StreamOptions(Request):
    include_usage: bool = False


Probability = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class SamplingFields(Request):
    """Fields shared by chat and text completions."""

    model: Identifier
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: Probability | None = None
    top_k: int | None = Field(default=None, ge=-1, le=MAX_INT)
    min_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Annotated[list[Text], items()] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(default=None, max_length=MAX_ITEMS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Identifier | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        return [s for s in stops if s] if isinstance(stops, list) else stops

    @field_validator("logit_bias")
    @classmethod
    def _bias_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not TOKEN_ID_KEY.fullmatch(key):
                raise ValueError("logit_bias keys must be token ids (decimal integers)")
        return value

    @property
    def token_bias(self) -> dict[int, float]:
        """``logit_bias`` keyed by token id."""
        return {int(key): value for key, value in (self.logit_bias or {}).items()}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TemplateValue = bool | int | float | Annotated[str, Field(max_length=1024), AfterValidator(encodable)] | None
MAX_TEMPLATE_KWARGS = 16


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=MAX_ITEMS, fail_fast=True)
    chat_template_kwargs: dict[Identifier, TemplateValue] | None = Field(default=None,
                                                                          max_length=MAX_TEMPLATE_KWARGS)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_INT)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    tools: Annotated[list[ToolSpec], items()] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    functions: Annotated[list[FunctionSpec], items()] | None = None
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tools and self.functions:
            raise ValueError("give tools or the legacy functions, not both")
        if self.tool_choice is not None and not self.tools:
            raise ValueError("tool_choice requires tools")
        if self.function_call is not None and not self.functions:
            raise ValueError("function_call requires functions")
        names = {f.model_name for f in self.function_specs}
        forced = self.forced_function
        if forced is not None and forced not in names:
            raise ValueError(f"the chosen function {forced!r} is not among the given ones")
        if self.response_format and self.response_format.structured and self.calls_allowed and not self.call_required:
            raise ValueError("a JSON response_format cannot be combined with tool_choice 'auto': use 'none', "
                             "'required' or a named function")
        return self

    @field_validator("chat_template_kwargs")
    @classmethod
    def _thinking_flag(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value and not isinstance(value.get("enable_thinking", True), bool):
            raise ValueError("chat_template_kwargs.enable_thinking must be true or false")
        return value

    def thinking(self, default: bool) -> bool:
        """Whether a thinking model thinks: ``enable_thinking``, else off for ``reasoning_effort: "none"``, else
        the server's default."""
        flag = (self.chat_template_kwargs or {}).get("enable_thinking")
        if isinstance(flag, bool):
            return flag
        return False if self.reasoning_effort == "none" else default

    @property
    def effective_choice(self) -> Any:
        """``tool_choice`` for tools, ``function_call`` for legacy functions."""
        return self.tool_choice if self.tools else self.function_call

    @property
    def function_specs(self) -> list[FunctionSpec]:
        return [t.function for t in self.tools or []] or list(self.functions or [])

    @property
    def legacy_functions(self) -> bool:
        return bool(self.functions)

    @property
    def calls_allowed(self) -> bool:
        return bool(self.function_specs) and self.effective_choice != "none"

    @property
    def call_required(self) -> bool:
        """The reply must be a call: tool_choice "required" or a named function."""
        choice = self.effective_choice
        return self.calls_allowed and (choice == "required" or isinstance(choice, NamedToolChoice | NamedFunction))

    @property
    def forced_function(self) -> str | None:
        """The function the reply must call: a named choice, or the only tool under "required"."""
        choice = self.effective_choice
        if isinstance(choice, NamedToolChoice):
            return choice.function.name
        if isinstance(choice, NamedFunction):
            return choice.name
        if choice == "required" and len(self.function_specs) == 1:
            return self.function_specs[0].model_name
        return None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


PromptInput = Text | Annotated[list[Text], items()] | TokenIds | Annotated[list[TokenIds], items()]


def non_empty(value: Any) -> Any:
    if isinstance(value, list) and not value:
        raise ValueError("must not be empty")
    return value


def each_prompt(value: str | list) -> list[str | list[int]]:
    """A text, texts, token ids or lists of token ids: one entry per prompt."""
    if isinstance(value, str):
        return [value]
    if all(isinstance(p, int) for p in value):
        return [list(value)]
    return list(value)


class CompletionRequest(SamplingFields):
    prompt: Annotated[PromptInput, AfterValidator(non_empty)]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        return each_prompt(self.prompt)


class EmbeddingRequest(Request):
    """``POST /v1/embeddings`` (OpenAI's shape)."""

    model: Identifier
    input: Annotated[PromptInput, AfterValidator(non_empty)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=MAX_INT)
    user: Identifier | None = None

    def inputs(self) -> list[str | list[int]]:
        return each_prompt(self.input)


class RerankDocument(Request):
    text: Text


class RerankRequest(Request):
    """``POST /v1/rerank`` (the Jina/Cohere shape vLLM and llama.cpp serve); ``instruction`` replaces the judge's
    default task description."""

    model: Identifier
    query: Text
    documents: Annotated[list[Text | RerankDocument], items(), AfterValidator(non_empty)]
    top_n: int | None = Field(default=None, ge=1, le=MAX_INT)
    return_documents: bool = True
    instruction: Text | None = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(Request):
    """``POST /v1/score`` (vLLM's shape): ``text_1`` (one query, or one per pair) against ``text_2``."""

    model: Identifier
    text_1: Text | Annotated[list[Text], items(), AfterValidator(non_empty)]
    text_2: Text | Annotated[list[Text], items(), AfterValidator(non_empty)]
    instruction: Text | None = None

    def pairs(self) -> list[tuple[str, str]]:
        """(query, document) pairs: one query against every document, or pairs in order (a 400 when the lists'
        lengths differ)."""
        queries = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        documents = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if len(queries) == 1:
            return [(queries[0], document) for document in documents]
        if len(queries) != len(documents):
            raise ValueError("text_1 and text_2 must have as many items, or text_1 just one")
        return list(zip(queries, documents, strict=True))


class TokenizeRequest(Request):
    model: Identifier | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessageIn], items()] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(Request):
    model: Identifier | None = None
    tokens: TokenIds


# --- responses ---------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    reasoning: str | None = None  # the same text under the newer name (vLLM, Ollama)
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = None

    @classmethod
    def of(cls, content: str | None, reasoning: str | None = None, **calls: Any) -> ChatMessageOut:
        """A message with its reasoning under both names (none when the reply had no thought)."""
        return cls(content=content, reasoning_content=reasoning or None, reasoning=reasoning or None, **calls)

    @model_serializer(mode="wrap")
    def _without_unset_calls(self, handler) -> dict[str, Any]:
        data = handler(self)
        for key in ("reasoning_content", "reasoning", "tool_calls", "function_call"):
            if data.get(key) is None:
                data.pop(key, None)
        return data


class SparseModel(BaseModel):
    """Serialized without its unset (None) fields, as OpenAI sends stream deltas."""

    @model_serializer(mode="wrap")
    def _without_unset(self, handler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class FunctionDelta(SparseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(SparseModel):
    index: int = 0
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(SparseModel):
    """A streamed message fragment."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionDelta | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

"""From an OpenAI request to engine requests and back: prompts, sampling defaults, text streams per choice."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from engine import AsyncEngine, EngineDeadError, InvalidRequestError, QueueFullError, SamplingParams
from engine.async_engine import RequestFailedError
from engine.grammar import Grammar, GrammarError, GrammarSpec
from engine.grammar_worker import IsolatedGrammarCompiler
from server.errors import APIError
from server.protocol import SEED_LIMIT, SamplingFields
from server.settings import GenerationDefaults
from server.tool_formats import ToolFormat, choose_format
from tokenizer import ChatMessage, IncrementalDetokenizer, Prompt, StopStringMatcher, Tokenizer, build_prompt
from tokenizer.chat import ChatTemplateError, ControlTokenError, chat_stop_token_ids, template_variables
from tokenizer.reasoning import THINK_OPEN

T = TypeVar("T")


@contextlib.contextmanager
def engine_failures() -> Iterator[None]:
    """The engine's refusals and failures of one request as API errors: a full queue 429, a dead engine 503, a
    request it cannot run or that failed inside it 400."""
    try:
        yield
    except QueueFullError as exc:
        raise APIError(429, "the server is at capacity; retry shortly", code="queue_full",
                       headers={"Retry-After": "1"}) from exc
    except EngineDeadError as exc:
        raise APIError(503, "the engine has failed; the server must be restarted", code="engine_dead") from exc
    except InvalidRequestError as exc:
        raise APIError(400, str(exc)) from exc
    except RequestFailedError as exc:
        raise APIError(400, str(exc), code="request_failed") from exc


@dataclass
class ChoiceEvent:
    """Progress of one choice: new text (stop strings already removed), its tokens and their logprobs."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    stop_string: str | None = None  # the stop string that ended the choice


@dataclass
class ChoiceResult:
    """A whole choice, gathered from its events (text in pieces, joined once)."""

    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


async def collect_choices(events: AsyncIterator[ChoiceEvent], n: int) -> list[ChoiceResult]:
    results = [ChoiceResult() for _ in range(n)]
    async with contextlib.aclosing(events):
        async for event in events:
            result = results[event.index]
            result.pieces.append(event.text)
            result.token_ids += event.token_ids
            result.logprobs += event.logprobs
            result.finish_reason = event.finish_reason or result.finish_reason
    return results


async def interleave(streams: Sequence[AsyncIterator[T]]) -> AsyncIterator[T]:
    """The items of every stream as they come, all streams running at once; the first error ends it, and leaving
    early closes every stream."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield item
        return
    queue: asyncio.Queue[tuple[T | BaseException | None]] = asyncio.Queue()

    async def pump(stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((item,))
            await queue.put((None,))
        except Exception as exc:
            await queue.put((exc,))

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            (item,) = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_cancelled(events: AsyncIterator[T], cancelled: asyncio.Event) -> AsyncIterator[T]:
    """The items of ``events`` until ``cancelled`` is set; then ``events`` is closed (aborting its engine
    requests) and the iteration ends early."""
    async with contextlib.aclosing(events):  # type: ignore[type-var]
        waiter = asyncio.ensure_future(cancelled.wait())
        try:
            while True:
                step = asyncio.ensure_future(anext(events))
                await asyncio.wait({step, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    await asyncio.gather(step, return_exceptions=True)
                    return
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            waiter.cancel()


@dataclass
class Generation:
    """What one request asks the engine for (``n`` choices share prompt and params)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_strings: list[str]
    n: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class ModelService:
    """The served model: its engine, tokenizer, name and generation defaults. It knows the engine only through
    ``AsyncEngine``'s narrow surface (``info``, ``stats``, ``generate``, ``prompt_logprobs``)."""

    def __init__(self, engine: AsyncEngine, name: str, grammars: IsolatedGrammarCompiler, *, tool_call_format: str,
                 enable_thinking: bool, clamp_max_tokens: bool = True,
                 generation_defaults: GenerationDefaults | None = None, task: str = "generate",
                 pooling: str = "last") -> None:
        info = engine.info
        if info.tokenizer is None:
            raise ValueError("the model has no tokenizer; the server needs one")
        self.engine = engine
        self.name = name
        self.grammars = grammars
        self.tokenizer: Tokenizer = info.tokenizer
        self.max_model_len = info.max_model_len
        self.generation_config = (generation_defaults or GenerationDefaults()).over(info.generation_config)
        self.vocab_size = info.vocab_size
        self.hidden_size = info.hidden_size
        self.task, self.pooling = task, pooling
        self.chat_stop_ids = chat_stop_token_ids(self.tokenizer) | self._configured_stop_ids()
        template = self.tokenizer.chat_template
        self.tool_format: ToolFormat = choose_format(tool_call_format, template)
        self.thinks = THINK_OPEN in (template or "")  # the template teaches (or opens) <think>...</think> replies
        self.enable_thinking = enable_thinking
        self.clamp_max_tokens = clamp_max_tokens
        self.template_variables = template_variables(template)

    def _configured_stop_ids(self) -> frozenset[int]:
        words = self.generation_config.get("stop_words_ids") or []
        return frozenset(w[0] for w in words if isinstance(w, list) and len(w) == 1)

    # -- prompts ---------------------------------------------------------------------------------------------

    def chat_prompt(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True,
                    continue_final_message: bool = False, template_kwargs: dict[str, Any] | None = None) -> Prompt:
        try:
            prompt = build_prompt(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                                  continue_final_message=continue_final_message,
                                  max_window_size=self.generation_config.get("max_window_size"),
                                  template_kwargs=template_kwargs)
        except ChatTemplateError as exc:
            raise APIError(400, f"the chat template refused the conversation: {exc}", param="messages") from exc
        except ControlTokenError as exc:
            raise APIError(400, str(exc), param=exc.field, code="control_token") from exc
        return prompt

    def text_prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, allow_special=True)  # the client owns a raw prompt
        if any(not 0 <= t < self.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
        return list(prompt)

    # -- grammars --------------------------------------------------------------------------------------------

    def compile_grammar(self, spec: GrammarSpec | None) -> Grammar | None:
        """Compile for this vocabulary in a grammar process (blocks: call it on a preparation thread)."""
        if spec is None:
            return None
        try:
            return self.grammars.compile(spec)
        except GrammarError as exc:
            raise APIError(400, f"cannot constrain output to this grammar: {exc}",
                           param="response_format") from exc

    # -- sampling --------------------------------------------------------------------------------------------

    def sampling_params(self, request: SamplingFields, prompt_len: int, *, chat: bool,
                        logprobs: int | None) -> SamplingParams:
        """Request values, else the model's generation_config, else neutral; validated against the context."""
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                                f"has {prompt_len} tokens.", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        limit = request.token_limit  # type: ignore[attr-defined]
        if limit is not None and prompt_len + limit > self.max_model_len and self.clamp_max_tokens:
            limit = room  # clients sized for larger contexts: the reply ends with "length" where the context does
        elif limit is not None and prompt_len + limit > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                f"you requested {prompt_len + limit} tokens ({prompt_len} in the prompt, {limit} "
                                f"in the completion).", param="max_tokens", code="context_length_exceeded")
        defaults = self.generation_config
        max_tokens = min(limit or defaults.get("max_new_tokens") or room, room)
        temperature = request.temperature
        if temperature is None:
            temperature = defaults.get("temperature", 1.0) if defaults.get("do_sample", True) else 0.0
        top_k = request.top_k if request.top_k is not None else defaults.get("top_k", 0)
        return SamplingParams(
            temperature=temperature,
            top_p=request.top_p if request.top_p is not None else defaults.get("top_p", 1.0),
            top_k=max(top_k or 0, 0),
            min_p=request.min_p if request.min_p is not None else 0.0,
            seed=request.seed,
            max_tokens=max_tokens,
            stop_token_ids=tuple(self.chat_stop_ids) if chat else (),
            repetition_penalty=(request.repetition_penalty if request.repetition_penalty is not None
                                else defaults.get("repetition_penalty", 1.0)),
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            logit_bias=request.token_bias,
            logprobs=logprobs,
        )

    # -- generation ------------------------------------------------------------------------------------------

    async def stream(self, generation: Generation) -> AsyncIterator[ChoiceEvent]:
        """Events of all ``n`` choices, interleaved as they come; leaving early aborts every choice."""
        async with contextlib.aclosing(interleave([self._choice(i, generation) for i in range(generation.n)])) as all_:
            async for event in all_:
                yield event

    async def _choice(self, index: int, generation: Generation) -> AsyncIterator[ChoiceEvent]:
        params = generation.params
        if generation.n > 1 and params.seed is not None:
            params = dataclasses.replace(params, seed=(params.seed + index) % SEED_LIMIT)
        detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        matcher = StopStringMatcher(generation.stop_strings)
        request_id = f"{generation.request_id}-{index}"
        stream = self.engine.generate(request_id, generation.prompt_ids, params)
        async with contextlib.aclosing(stream):
            with engine_failures():
                async for out in stream:
                    text = "".join(matcher.push(detokenizer.push(t)) for t in out.new_token_ids)
                    finish = out.finish_reason
                    if out.finished and not matcher.stopped:
                        text += matcher.push(detokenizer.flush())
                        text += matcher.flush()
                    if matcher.stopped:
                        finish = "stop"
                    yield ChoiceEvent(index, text, out.new_token_ids, out.new_logprobs, finish,
                                      out.num_prompt_tokens, out.num_output_tokens, out.num_cached_tokens,
                                      matcher.matched)
                    if matcher.stopped:
                        return

    async def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[dict[int, float] | None]:
        """Log-probabilities of each prompt token given the ones before it (the first has none), from the engine
        thread."""
        try:
            return await self.engine.prompt_logprobs(prompt_ids, top)
        except InvalidRequestError as exc:
            raise APIError(400, str(exc), param="prompt") from exc
        except EngineDeadError as exc:
            raise APIError(503, "the engine has failed; the server must be restarted", code="engine_dead") from exc
        except Exception as exc:  # e.g. out of memory for a long prompt: this request's, and the engine runs on
            raise APIError(503, f"prompt logprobs could not be computed: {type(exc).__name__}",
                           code="prompt_logprobs_failed", headers={"Retry-After": "1"}) from exc

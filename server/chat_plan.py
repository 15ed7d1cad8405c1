"""A chat request planned once, before it runs: prompt ids, stop strings, sampling parameters with their grammar,
the tool plan and whether the reply starts inside a thought. ``plan_chat`` is the heavy part of a request
(schema checks, grammar compilation, chat-template rendering, tokenization), so it runs on a preparation thread,
never on the loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from engine import SamplingParams
from server.errors import APIError
from server.generation import ModelService
from server.limits import Limits
from server.messages import plain_messages
from server.protocol import ChatCompletionRequest
from server.structured import check_tool_schemas, reply_grammar
from server.tools import ToolPlan
from tokenizer import Prompt
from tokenizer.reasoning import prompt_opens_thought


@dataclass(frozen=True)
class ChatPlan:
    prompt_ids: list[int]
    stop_strings: list[str]
    params: SamplingParams
    tools: ToolPlan | None
    thinks: bool = False  # replies are split into reasoning and answer
    in_thought: bool = False  # the prompt opened the reply's thought


def plan_chat(service: ModelService, body: ChatCompletionRequest, limits: Limits) -> ChatPlan:
    """Everything ``body`` needs before the engine sees it; raises ``APIError`` (4xx) for what it cannot run.
    The grammar compiles last, after every cheaper check."""
    prompt, stops, plan = _prompt(service, body, limits)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = service.sampling_params(body, len(prompt.token_ids), chat=True, logprobs=top)
    grammar = service.compile_grammar(reply_grammar(body, plan, limits))
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    thinks = service.thinks and not (plan is not None and plan.required)  # a required call starts the reply
    return ChatPlan(prompt.token_ids, stops, params, plan, thinks=thinks,
                    in_thought=thinks and prompt_opens_thought(prompt.tail))


def count_prompt_tokens(service: ModelService, body: ChatCompletionRequest, limits: Limits) -> int:
    """The tokens of the prompt ``body`` would run, checked as ``plan_chat`` checks it (nothing is sampled)."""
    return len(_prompt(service, body, limits)[0].token_ids)


def _prompt(service: ModelService, body: ChatCompletionRequest,
            limits: Limits) -> tuple[Prompt, list[str], ToolPlan | None]:
    """The request's bounds checked, its prompt rendered and tokenized; its stop strings and tool plan."""
    limits.check_chat(body, service.vocab_size, service.max_model_len)
    kwargs = template_kwargs(service, body)
    plan = ToolPlan.of(body, service.tool_format)
    if plan is None:
        prompt = service.chat_prompt(plain_messages(body.messages), add_generation_prompt=body.add_generation_prompt,
                                     template_kwargs=kwargs)
        return prompt, body.stop, None
    check_tool_schemas(plan, limits)
    plan.format.check_tools(plan.tools)
    turns, open_last = plan.messages(body.messages)
    prompt = service.chat_prompt(turns, add_generation_prompt=not open_last, continue_final_message=open_last,
                                 template_kwargs={**kwargs, **plan.template_kwargs})
    return prompt, [*body.stop, *plan.stop_strings], plan


def template_kwargs(service: ModelService, body: ChatCompletionRequest) -> dict[str, Any]:
    """The request's ``chat_template_kwargs``: only variables the model's template reads (a 400 for others), and
    ``enable_thinking`` (from the request or the server's default) for a template that reads it."""
    given = dict(body.chat_template_kwargs or {})
    given.pop("enable_thinking", None)
    unknown = sorted(set(given) - service.template_variables)
    if unknown:
        raise APIError(400, f"chat_template_kwargs: the chat template does not read {unknown[0]!r}",
                       param="chat_template_kwargs")
    if "enable_thinking" in service.template_variables:
        given["enable_thinking"] = body.thinking(service.enable_thinking)
    return given

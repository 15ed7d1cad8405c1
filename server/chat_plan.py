"""A chat request planned once, before it runs: prompt ids, stop strings, sampling parameters with their grammar,
and the tool plan that reads the reply. ``plan_chat`` is the heavy part of a request (schema checks, grammar
compilation, chat-template rendering, tokenization), so it runs on a preparation thread, never on the loop."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine import SamplingParams
from server.generation import ModelService
from server.limits import Limits
from server.protocol import ChatCompletionRequest
from server.structured import check_tool_schemas, reply_grammar
from server.tools import ToolPlan, plain_messages


@dataclass(frozen=True)
class ChatPlan:
    prompt_ids: list[int]
    stop_strings: list[str]
    params: SamplingParams
    tools: ToolPlan | None


def plan_chat(service: ModelService, body: ChatCompletionRequest, limits: Limits) -> ChatPlan:
    """Everything ``body`` needs before the engine sees it; raises ``APIError`` (4xx) for what it cannot run.
    The grammar compiles last, after every cheaper check."""
    plan = ToolPlan.of(body, native=service.native_tools)
    if plan is None:
        prompt_ids = service.chat_prompt_ids(plain_messages(body.messages),
                                             add_generation_prompt=body.add_generation_prompt)
        stops = body.stop
    else:
        check_tool_schemas(plan, limits)
        plan.check_no_control_tokens(service.tokenizer, body.messages)
        turns, open_last = plan.messages(body.messages)
        prompt_ids = service.chat_prompt_ids(turns, add_generation_prompt=not open_last,
                                             continue_final_message=open_last, template_kwargs=plan.template_kwargs)
        stops = [*body.stop, *plan.stop_strings]
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = service.sampling_params(body, len(prompt_ids), chat=True, logprobs=top)
    grammar = service.compile_grammar(reply_grammar(body, plan, limits))
    if grammar is not None:
        params = dataclasses.replace(params, grammar=grammar)
    return ChatPlan(prompt_ids, stops, params, plan)

"""The built-in Qwen3 and Qwen3.5 chat formats render every text conversation as the templates published with those
models do (llama.cpp keeps them as ``models/templates/Qwen-Qwen3-0.6B.jinja`` and ``Qwen3.5-4B.jinja``): system
turns, tools, past calls and their results, reasoning kept after the last question, thinking on and off."""

from __future__ import annotations

import pytest

from tests.llama_converter import published_template
from tokenizer.chat import builtin_template, render_chat_template

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}, "days": {"type": "integer"}}}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                      "arguments": {"city": "Paris", "days": 2, "units": ["C"]}}}
CONVERSATIONS = {
    "one question": ([{"role": "user", "content": "Hi there"}], None),
    "system": ([{"role": "system", "content": "  Be brief.\n"}, {"role": "user", "content": "Hi"}], None),
    "multi-turn with reasoning": ([
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6", "reasoning_content": "again"},
        {"role": "user", "content": "Thanks"}], None),
    "tools and a call": ([
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "warm"}], [WEATHER]),
    "a call without text": ([
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "tool_calls": [CALL, CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "ok"}], [WEATHER]),
}


PUBLISHED = {"qwen3": "Qwen-Qwen3-0.6B.jinja", "qwen3_5": "Qwen3.5-4B.jinja"}
# how a reply opens with thinking on (left to the model in Qwen3, pre-opened in Qwen3.5), and off
OPENINGS = {"qwen3": ("<|im_start|>assistant\n", "<think>\n\n</think>\n\n"),
            "qwen3_5": ("<|im_start|>assistant\n<think>\n", "<think>\n\n</think>\n\n")}


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("arch", list(PUBLISHED))
def test_the_builtin_format_renders_as_the_published_template(arch, name, thinking):
    messages, tools = CONVERSATIONS[name]
    context = {"tools": tools, "add_generation_prompt": True, "enable_thinking": thinking}
    published = render_chat_template(published_template(PUBLISHED[arch]), messages, **context)
    assert render_chat_template(builtin_template(arch), messages, **context) == published
    assert published.endswith(OPENINGS[arch][thinking is False])

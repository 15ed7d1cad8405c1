"""The built-in Qwen3.5 chat format renders every text conversation as the template published with Qwen3.5 does
(llama.cpp keeps it as ``models/templates/Qwen3.5-4B.jinja``): system turns, tools, past calls and their results,
reasoning kept after the last question, thinking on and off."""

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


@pytest.mark.parametrize("thinking", [None, True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_the_builtin_qwen3_5_format_renders_as_the_published_template(name, thinking):
    messages, tools = CONVERSATIONS[name]
    context = {"tools": tools, "add_generation_prompt": True, "enable_thinking": thinking}
    published = render_chat_template(published_template("Qwen3.5-4B.jinja"), messages, **context)
    assert render_chat_template(builtin_template("qwen3_5"), messages, **context) == published
    assert published.endswith("<think>\n\n</think>\n\n" if thinking is False else "<|im_start|>assistant\n<think>\n")

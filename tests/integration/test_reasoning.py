"""Thinking models end to end: a scripted Qwen3 checkpoint (``tests.integration.scripted``) with the built-in
Qwen3 template makes the server really generate ``<think>`` blocks, calls after them and cut-offs; clients read
them over a socket, streamed and whole, and the two readings agree."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.integration.conftest import RunningServer
from tests.integration.scripted import HI, WEATHER, chat, scripted_fixture, scripted_server, streamed
from tokenizer.chat import builtin_template

QWEN3 = builtin_template("qwen3")
THOUGHT_SCRIPT = ["<think>", "\nThe user", " greets me;", " a <tool_call> here", " is only a thought.",
                  "\n</think>\n\n", "Hello", " there!"]
CALL_AFTER_THOUGHT = ["<think>", "\nI need the weather.", "\n</think>\n\n", "<tool_call>\n",
                      '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}', "\n</tool_call>"]


thinker = scripted_fixture(THOUGHT_SCRIPT, QWEN3)


thinking_caller = scripted_fixture(CALL_AFTER_THOUGHT, QWEN3)


def test_the_thought_goes_to_reasoning_and_the_rest_to_content(thinker):
    reply = chat(thinker)
    message = reply["choices"][0]["message"]
    thought = "The user greets me; a <tool_call> here is only a thought."
    assert message["reasoning_content"] == message["reasoning"] == thought
    assert message["content"] == "Hello there!"
    assert reply["choices"][0]["finish_reason"] == "stop"
    folded, reason = streamed(thinker)
    assert (folded["reasoning_content"], folded["reasoning"], folded["content"], reason) == \
        (thought, thought, "Hello there!", "stop")


def test_a_reply_cut_inside_the_thought_is_all_reasoning(thinker):
    message = chat(thinker, max_tokens=3)["choices"][0]["message"]
    assert message["reasoning_content"] == "The user greets me;"
    assert message["content"] == ""
    folded, reason = streamed(thinker, max_tokens=3)
    assert (folded["reasoning_content"], folded["content"], reason) == ("The user greets me;", "", "length")


def test_text_inside_the_thought_is_never_a_call(thinker):
    reply = chat(thinker, tools=[WEATHER])["choices"][0]
    assert "tool_calls" not in reply["message"] and reply["finish_reason"] == "stop"
    assert "<tool_call>" in reply["message"]["reasoning_content"]


def test_a_call_after_the_thought_is_parsed(thinking_caller):
    reply = chat(thinking_caller, tools=[WEATHER])["choices"][0]
    assert reply["message"]["reasoning_content"] == "I need the weather."
    (call,) = reply["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert reply["finish_reason"] == "tool_calls"
    folded, reason = streamed(thinking_caller, tools=[WEATHER])
    assert folded["reasoning_content"] == "I need the weather." and reason == "tool_calls"
    assert [(name, "".join(args)) for name, args in folded["tool_calls"].values()] == \
        [("get_weather", call["function"]["arguments"])]


def prompt_tokens(server: RunningServer, **body) -> int:
    return chat(server, max_tokens=1, **body)["usage"]["prompt_tokens"]


def test_thinking_off_renders_the_templates_closed_thought(thinker):
    closed = len(httpx.post(f"{thinker.url}/tokenize", json={"model": "scripted", "prompt": "<think>\n\n</think>\n\n"},
                            timeout=30).json()["tokens"])
    on = prompt_tokens(thinker)
    assert prompt_tokens(thinker, chat_template_kwargs={"enable_thinking": True}) == on
    assert prompt_tokens(thinker, chat_template_kwargs={"enable_thinking": False}) == on + closed
    assert prompt_tokens(thinker, reasoning_effort="none") == on + closed
    assert prompt_tokens(thinker, reasoning_effort="high") == on


@pytest.mark.parametrize("kwargs", [{"custom_flag": True}, {"tools": "x"}, {"messages": 1},
                                    {"enable_thinking": "no"}])
def test_unknown_or_reserved_template_kwargs_are_a_400(thinker, kwargs):
    response = httpx.post(f"{thinker.base}/chat/completions", json={
        "model": "scripted", "messages": HI, "chat_template_kwargs": kwargs}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_the_server_default_can_turn_thinking_off(tmp_path):
    with scripted_server(tmp_path / "m", THOUGHT_SCRIPT, QWEN3, enable_thinking=False) as server:
        off = prompt_tokens(server)
        assert prompt_tokens(server, chat_template_kwargs={"enable_thinking": True}) < off


PRE_OPENING = ("{%- for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
               "{%- endfor %}"
               "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}")


def test_a_thought_the_template_opened_is_reasoning(tmp_path):
    """Templates of thinking-only models put ``<think>`` in the prompt: the reply starts inside the thought."""
    with scripted_server(tmp_path / "m", ["The user", " says hi.", "\n</think>\n\n", "Hi!"], PRE_OPENING) as server:
        message = chat(server)["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == ("The user says hi.", "Hi!")
        folded, _ = streamed(server)
        assert (folded["reasoning_content"], folded["content"]) == ("The user says hi.", "Hi!")


def test_langchain_gets_the_answer_without_the_thought(thinker):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(base_url=thinker.base, api_key="unused", model="scripted", temperature=0)
    assert model.invoke("Hi!").content == "Hello there!"
    assert "".join(chunk.content for chunk in model.stream("Hi!")) == "Hello there!"
    quiet = ChatOpenAI(base_url=thinker.base, api_key="unused", model="scripted", temperature=0,
                       reasoning_effort="none")
    assert quiet.invoke("Hi!").content == "Hello there!"  # accepted; the scripted model answers the same

"""Function calling over a real socket: tools and legacy functions on Qwen's ReAct prompt, streamed too."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from tests.integration.conftest import QWEN_NAME, SMOL_NAME

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location.",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                     "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["location"]}}}
SEARCH = {"type": "function", "function": {
    "name": "web_search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
ASK = [{"role": "user", "content": "What's the weather like in Boston?"}]


def bounded(tool: dict) -> dict:
    """``tool`` with every string parameter at most 24 characters: under a grammar even the random-weight model's
    call then ends within the test's ``max_tokens``."""
    parameters = tool["function"]["parameters"]
    properties = {name: {**schema, "maxLength": 24} if schema["type"] == "string" and "enum" not in schema
                  else schema for name, schema in parameters["properties"].items()}
    return {**tool, "function": {**tool["function"], "parameters": {**parameters, "properties": properties}}}


@pytest.fixture(params=["smol", "qwen1"])
def api(request, smol_server, qwen1_server):
    server, model = (smol_server, SMOL_NAME) if request.param == "smol" else (qwen1_server, QWEN_NAME)
    return openai.OpenAI(base_url=server.base, api_key="x", max_retries=0, timeout=120), model, server


def streamed_call(stream) -> tuple[str | None, str, str, str | None]:
    """(id, name, arguments, finish_reason) reassembled from tool-call deltas."""
    call_id, name, arguments, reason = None, "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                assert delta.index == 0
                call_id = call_id or delta.id
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
            reason = choice.finish_reason or reason
    return call_id, name, arguments, reason


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "web_search"}}, "required"])
def test_forced_tool_choice_returns_a_call_streamed_or_not(api, choice):
    client, model, _ = api
    tools = [bounded(WEATHER), bounded(SEARCH)] if choice != "required" else [bounded(SEARCH)]
    kwargs = {"model": model, "messages": ASK, "tools": tools, "tool_choice": choice, "temperature": 0,
              "max_tokens": 256}
    whole = client.chat.completions.create(**kwargs)
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls"
    (call,) = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "web_search"
    jsonschema.validate(json.loads(call.function.arguments), SEARCH["function"]["parameters"])
    call_id, name, arguments, reason = streamed_call(client.chat.completions.create(**kwargs, stream=True))
    assert call_id.startswith("call_")
    assert (name, arguments, reason) == (call.function.name, call.function.arguments, whole.choices[0].finish_reason)


def test_tool_choice_none_keeps_tools_out_of_the_prompt(api):
    client, model, _ = api
    plain = client.chat.completions.create(model=model, messages=ASK, max_tokens=8, temperature=0)
    none = client.chat.completions.create(model=model, messages=ASK, max_tokens=8, temperature=0, tools=[WEATHER],
                                          tool_choice="none")
    auto = client.chat.completions.create(model=model, messages=ASK, max_tokens=8, temperature=0, tools=[WEATHER])
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content is not None


def test_round_trip_with_a_tool_result(api):
    client, model, _ = api
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], temperature=0,
                                           tool_choice={"type": "function", "function": {"name": WEATHER["function"]
                                                                                         ["name"]}}, max_tokens=32)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22, "unit": "celsius"}'}]
    second = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=32,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    streamed = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], max_tokens=32,
                                              temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == (second.choices[0].message.content or "")
    assert "Observation" not in text and "Thought:" not in text


def test_legacy_functions(api):
    client, model, _ = api
    kwargs = {"model": model, "messages": ASK, "functions": [bounded(WEATHER)["function"]], "temperature": 0,
              "function_call": {"name": "get_current_weather"}, "max_tokens": 256}
    whole = client.chat.completions.create(**kwargs)
    assert whole.choices[0].finish_reason == "function_call"
    assert whole.choices[0].message.function_call.name == "get_current_weather"
    jsonschema.validate(json.loads(whole.choices[0].message.function_call.arguments), WEATHER["function"]["parameters"])
    name = arguments = ""
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            if choice.delta.function_call:
                name += choice.delta.function_call.name or ""
                arguments += choice.delta.function_call.arguments or ""
    assert (name, arguments) == (whole.choices[0].message.function_call.name,
                                 whole.choices[0].message.function_call.arguments)


@pytest.mark.parametrize("body,fragment", [
    ({"tool_choice": "auto"}, "tool_choice requires tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "object"),
    ({"tools": [{"type": "function", "function": {"description": "nameless"}}]}, "name"),
    ({"tools": [WEATHER], "functions": [WEATHER["function"]]}, "not both"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "orphan result"}],
      "tools": [WEATHER]}, "must follow an assistant"),
])
def test_invalid_function_requests_get_400(smol_server, body, fragment):
    response = httpx.post(f"{smol_server.base}/chat/completions", json={"model": SMOL_NAME, "messages": ASK, **body})
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]

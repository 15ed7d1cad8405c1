"""Constrained decoding over a real socket: JSON response formats and required tool calls always give JSON that
validates against the schema (unless cut by the length limit), streamed or not, with openai and LangChain.

Many requests go at once so they share batches; the int4 CPU kernel is not bit-identical across batch sizes, so
greedy replies are compared with each other only when sent one at a time."""

from __future__ import annotations

import asyncio
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import QWEN_NAME, SMOL_NAME
from tests.integration.schemas import SCHEMAS

DECOY = {"type": "function", "function": {
    "name": "web_search", "description": "Search the web.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string", "maxLength": 40}},
                   "required": ["query"]}}}


def tool_for(name: str, schema: dict) -> dict:
    return {"type": "function", "function": {"name": f"answer_{name}", "description": "Answer the question.",
                                             "parameters": schema}}


def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


async def complete(client: openai.AsyncOpenAI, stream: bool, **kwargs) -> tuple[str, list, str]:
    """(content, tool calls as (name, arguments), finish_reason), reassembled when streamed."""
    if not stream:
        response = await client.chat.completions.create(**kwargs)
        choice = response.choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        return choice.message.content or "", calls, choice.finish_reason
    content, name, arguments, reason = "", "", "", None
    async for chunk in await client.chat.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                name += delta.function.name or ""
                arguments += delta.function.arguments or ""
            reason = choice.finish_reason or reason
    return content, [(name, arguments)] if name else [], reason


def client_for(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base, api_key="x", max_retries=0, timeout=300)


def run_all(server, requests: list[dict]) -> list[tuple[str, list, str]]:
    async def main():
        async with client_for(server) as client:
            return await asyncio.gather(*(complete(client, **r) for r in requests))

    return asyncio.run(main())


def test_json_schema_replies_validate_streamed_or_not(smol_server):
    requests = [{"stream": stream, "model": SMOL_NAME, "messages": ask(question), "temperature": 0, "max_tokens": 96,
                 "response_format": {"type": "json_schema",
                                     "json_schema": {"name": name, "schema": schema, "strict": True}}}
                for name, (question, schema) in SCHEMAS.items() for stream in (False, True)]
    results = run_all(smol_server, requests)
    finished = 0
    for request, (content, calls, reason) in zip(requests, results, strict=True):
        assert not calls
        if reason != "length":
            assert reason == "stop"
            jsonschema.validate(json.loads(content), request["response_format"]["json_schema"]["schema"])
            finished += 1
    assert finished >= 30, f"only {finished} of 40 replies ended before the length limit"


@pytest.mark.parametrize("server_name", ["smol", "qwen1"])
def test_required_and_named_tool_calls_validate(server_name, smol_server, qwen1_server):
    server, model = (smol_server, SMOL_NAME) if server_name == "smol" else (qwen1_server, QWEN_NAME)
    requests = []
    for name, (question, schema) in SCHEMAS.items():
        tool = tool_for(name, schema)
        for choice in ("required", {"type": "function", "function": {"name": f"answer_{name}"}}):
            for stream in (False, True):
                requests.append({"stream": stream, "model": model, "messages": ask(question), "tools": [tool, DECOY],
                                 "tool_choice": choice, "temperature": 0, "max_tokens": 96})
    results = run_all(server, requests)
    finished = 0
    for request, (content, calls, reason) in zip(requests, results, strict=True):
        (name, arguments), = calls
        assert content == ""  # nothing of the ReAct scaffolding leaks
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in request["tools"]}
        assert name in schemas
        if isinstance(request["tool_choice"], dict):
            assert name == request["tool_choice"]["function"]["name"]
        if reason != "length":
            assert reason == "tool_calls"
            jsonschema.validate(json.loads(arguments), schemas[name])
            finished += 1
    assert finished >= len(requests) // 2, f"only {finished} of {len(requests)} calls ended before the length limit"


def test_streamed_constrained_reply_equals_the_whole_one(smol_server):
    question, schema = SCHEMAS["optional_unit"]
    tool = tool_for("optional_unit", schema)
    for extra in ({"tools": [tool, DECOY], "tool_choice": "required"},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}}):
        request = {"model": SMOL_NAME, "messages": ask(question), "temperature": 0, "max_tokens": 64, **extra}
        whole = run_all(smol_server, [{"stream": False, **request}])[0]
        streamed = run_all(smol_server, [{"stream": True, **request}])[0]
        assert streamed == whole and whole[2] in ("tool_calls", "stop")


def test_json_object_reply_is_an_object(smol_server):
    results = run_all(smol_server, [{"stream": stream, "model": SMOL_NAME, "temperature": 0, "max_tokens": 96,
                                     "messages": ask("Describe a cat called Tom, 3 years old, as a JSON object "
                                                     "with the keys name and age."),
                                     "response_format": {"type": "json_object"}} for stream in (False, True)])
    for content, _, reason in results:
        assert reason == "stop"
        assert isinstance(json.loads(content), dict)


def test_unconstrained_requests_are_untouched_by_constrained_neighbours(qwen1_server):
    """On the fp32 Qwen-1 server (batch-invariant), a free reply is the same alone and amid constrained ones."""
    plain = {"stream": False, "model": QWEN_NAME, "messages": ask("Write one sentence about rain."),
             "temperature": 0, "max_tokens": 32}
    alone = run_all(qwen1_server, [plain])[0]
    constrained = [{"stream": False, "model": QWEN_NAME, "messages": ask(question), "temperature": 0,
                    "max_tokens": 32, "response_format": {"type": "json_schema",
                                                          "json_schema": {"name": name, "schema": schema}}}
                   for name, (question, schema) in list(SCHEMAS.items())[:7]]
    mixed = run_all(qwen1_server, [*constrained, plain])
    assert mixed[-1] == alone


@pytest.mark.parametrize("body,fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "invalid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
     "unsupported JSON schema keywords: not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/gone"}}}},
     "cannot constrain output"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
    ({"response_format": {"type": "json_object"}, "tools": [DECOY]}, "cannot be combined with tool_choice 'auto'"),
    ({"tools": [tool_for("bad", {"type": "object", "properties": {"a": {"type": 5}}})], "tool_choice": "required"},
     "invalid JSON schema"),
    ({"tools": [tool_for("bad", {"type": "object", "properties": {"a": {"type": 5}}})]}, "invalid JSON schema"),
    ({"tools": [tool_for("keys", {"type": "object", "propertyNames": {"pattern": "^a"}})], "tool_choice": "required"},
     "unsupported JSON schema keywords: propertyNames"),
    ({"tools": [tool_for("long", {"type": "object", "properties": {"a": {"type": "string", "maxLength": 100_000}}})],
      "tool_choice": "required"}, "maxLength may be at most"),
])
def test_bad_structured_requests_get_400(smol_server, body, fragment):
    response = httpx.post(f"{smol_server.base}/chat/completions", timeout=30,
                          json={"model": SMOL_NAME, "messages": ask("hi"), **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


def test_a_keyword_no_grammar_enforces_is_fine_where_the_model_only_reads_the_schema(smol_server):
    """Under ``tool_choice: "auto"`` the schema is shown, not enforced (Claude Code's tools use ``propertyNames`` and
    bounds past the grammar's repetition limit)."""
    tool = tool_for("keys", {"type": "object", "propertyNames": {"pattern": "^a"},
                             "properties": {"a": {"type": "string", "maxLength": 100_000}}})
    response = httpx.post(f"{smol_server.base}/chat/completions", timeout=60, json={
        "model": SMOL_NAME, "messages": ask("hi"), "tools": [tool], "max_tokens": 2})
    assert response.status_code == 200, response.text


class Weather(BaseModel):
    """Get the current weather in a given location."""

    location: str = Field(max_length=24)
    unit: Literal["celsius", "fahrenheit"]


@pytest.fixture
def chat(smol_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=smol_server.base, api_key="unused", model=SMOL_NAME, temperature=0, max_tokens=64)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(chat, method):
    kwargs = {} if method == "json_schema" else {"method": method}  # json_schema is the default
    result = chat.with_structured_output(Weather, **kwargs).invoke("What's the weather like in Boston?")
    assert isinstance(result, Weather)


def test_langchain_bind_tools_with_a_named_choice_invoked_and_streamed(chat):
    bound = chat.bind_tools([Weather], tool_choice="Weather")
    message = bound.invoke("What's the weather like in Boston?")
    (call,) = message.tool_calls
    assert call["name"] == "Weather"
    Weather.model_validate(call["args"])
    chunks = list(bound.stream("What's the weather like in Boston?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged += chunk
    assert len(chunks) > 2
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(call["name"], call["args"])]

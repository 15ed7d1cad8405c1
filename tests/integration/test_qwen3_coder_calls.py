"""Qwen3-Coder's XML calls end to end: scripted checkpoints (``tests.integration.scripted``) with an XML-teaching
template make the server really generate the calls; the openai and LangChain clients read them over a socket,
streamed and whole, and a required call follows the tool's schema against the model's will."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from tests.integration.scripted import TIME, WEATHER, chat, scripted_fixture, scripted_server, streamed

CODER_TEMPLATE = (Path(__file__).parent / "qwen3_coder_template.jinja").read_text()
XML_SCRIPT = ["Let me check.", "\n<tool_call>\n<function=get_weather>\n", "<parameter=city>\n", "Paris",
              "\n</parameter>\n", "<parameter=days>\n", "3", "\n</parameter>\n</function>\n</tool_call>",
              "\n<tool_call>\n<function=get_time>\n<parameter=zone>\nCET\n</parameter>\n</function>\n</tool_call>"]
FORCED_XML_SCRIPT = ["<function=get_weather>\n", "<parameter=city>\n", "Paris", "\n</parameter>\n",
                     "<parameter=days>\n", "three", "\n</parameter>\n</function>\n</tool_call>"]


coder = scripted_fixture(XML_SCRIPT, CODER_TEMPLATE)


forced_coder = scripted_fixture(FORCED_XML_SCRIPT, CODER_TEMPLATE)


def test_xml_calls_whole_and_streamed_agree(coder):
    reply = chat(coder, tools=[WEATHER, TIME])["choices"][0]
    assert reply["message"]["content"] == "Let me check."
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in reply["message"]["tool_calls"]]
    assert calls == [("get_weather", '{"city": "Paris", "days": 3}'), ("get_time", '{"zone": "CET"}')]
    assert reply["finish_reason"] == "tool_calls"
    folded, reason = streamed(coder, tools=[WEATHER, TIME])
    assert folded["content"] == "Let me check." and reason == "tool_calls"
    assert [(name, "".join(args)) for name, args in folded["tool_calls"].values()] == calls
    weather_pieces = [a for a in folded["tool_calls"][0][1] if a]
    assert weather_pieces == ['{"city": "Paris"', ', "days": 3', "}"]  # one delta per parameter as it closes


def test_xml_calls_through_langchain(coder):
    from langchain_openai import ChatOpenAI

    chat_model = ChatOpenAI(base_url=coder.base, api_key="unused", model="scripted", temperature=0)
    answer = chat_model.bind_tools([WEATHER, TIME]).invoke("Weather in Paris and the time?")
    assert [(c["name"], c["args"]) for c in answer.tool_calls] == [("get_weather", {"city": "Paris", "days": 3}),
                                                                   ("get_time", {"zone": "CET"})]
    streamed_answer = None
    for chunk in chat_model.bind_tools([WEATHER, TIME]).stream("Weather in Paris and the time?"):
        streamed_answer = chunk if streamed_answer is None else streamed_answer + chunk
    assert [(c["name"], c["args"]) for c in streamed_answer.tool_calls] == [(c["name"], c["args"])
                                                                            for c in answer.tool_calls]


def test_the_format_is_read_from_the_template_and_can_be_overridden(coder, tmp_path):
    assert coder.app.state.qwen.service.tool_format.name == "qwen3_coder"
    with scripted_server(tmp_path / "m", XML_SCRIPT, CODER_TEMPLATE, tool_call_format="hermes") as server:
        message = chat(server, tools=[WEATHER])["choices"][0]["message"]
        assert "tool_calls" not in message and "<function=get_weather>" in message["content"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_xml_call_follows_the_schema_against_the_models_will(forced_coder, choice):
    """The script writes ``days`` as "three"; the grammar only lets an integer through."""
    reply = chat(forced_coder, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=64)["choices"][0]
    (call,) = reply["message"]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert call["function"]["name"] == "get_weather" and arguments["city"] == "Paris"
    assert isinstance(arguments["days"], int) and reply["finish_reason"] == "tool_calls"
    folded, reason = streamed(forced_coder, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=64)
    assert [(name, "".join(args)) for name, args in folded["tool_calls"].values()] == \
        [("get_weather", call["function"]["arguments"])] and reason == "tool_calls"

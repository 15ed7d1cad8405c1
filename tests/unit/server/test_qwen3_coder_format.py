"""Qwen3-Coder's grammar for a required call, compiled by xgrammar for a real vocabulary: it accepts the calls
its own parser reads back as valid arguments, and refuses the calls the schema forbids."""

from __future__ import annotations

import json

import jsonschema
import pytest

from server.tool_formats import detect_format
from server.tool_formats.qwen3_coder import Qwen3CoderFormat
from tests.unit.server.test_tool_formats import TIME, WEATHER, accepts


def xml_call(name: str, **parameters: str) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters.items())
    return f"<function={name}>\n{body}</function>\n</tool_call>"


@pytest.mark.parametrize("text", [xml_call("get_weather", city="Paris", days="3"),
                                  xml_call("get_weather", city="New York\nNY", days="10", unit="f", hourly="true"),
                                  xml_call("get_time"), xml_call("get_time", zone="CET")])
def test_xml_grammar_accepts_valid_calls_and_they_read_back_valid(compiler, text):
    fmt = Qwen3CoderFormat()
    assert accepts(compiler, fmt, None, text)
    prefix = fmt.call_prefix(None)
    _, (call,) = fmt.parse([WEATHER, TIME], prefix, text)
    schema = WEATHER.parameters if call.name == "get_weather" else TIME.parameters
    jsonschema.validate(json.loads(call.arguments), schema)


@pytest.mark.parametrize("text", [xml_call("get_weather", city="Paris"),  # a required parameter missing
                                  xml_call("get_weather", city="Paris", days="three"),
                                  xml_call("get_weather", city="Paris", days="0"),
                                  xml_call("get_weather", city="Paris", days="2", unit="k"),
                                  xml_call("get_weather", city="a<b", days="2"),
                                  xml_call("get_news", topic="x")])
def test_xml_grammar_refuses_what_the_schema_forbids(compiler, text):
    assert not accepts(compiler, Qwen3CoderFormat(), None, text)


def test_a_named_xml_call_has_its_function_in_the_prefix(compiler):
    fmt = Qwen3CoderFormat()
    assert fmt.call_prefix("get_time") == "<tool_call>\n<function=get_time>\n"
    assert accepts(compiler, fmt, "get_time", "<parameter=zone>\nUTC\n</parameter>\n</function>\n</tool_call>")
    assert not accepts(compiler, fmt, "get_time", xml_call("get_weather", city="Paris", days="3"))


def test_a_template_that_teaches_xml_calls_gets_this_format():
    assert isinstance(detect_format("{% if tools %}<function=x><parameter=y>{% endif %}<tool_call>"),
                      Qwen3CoderFormat)

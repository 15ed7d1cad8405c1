"""Qwen3-Coder's XML tool calls: values converted by their schema, several calls, cut-off calls, and streams that
reassemble to the whole-text reading however the text is cut."""

from __future__ import annotations

import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.tokenizer.chunking import fed_in_pieces
from tokenizer.call_pieces import FunctionCall, assemble
from tokenizer.xml_tool_calls import XmlToolCallStreamParser, convert_value, parse_xml_tool_calls

SCHEMAS = {"get_weather": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "hourly": {"type": "boolean"},
    "ratio": {"type": "number"}, "tags": {"type": "array"}, "where": {"type": "object"},
    "note": {"type": ["null", "string"]}}}}


def block(name: str, **parameters: str) -> str:
    body = "".join(f"<parameter={key}>\n{value}\n</parameter>\n" for key, value in parameters.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


WEATHER = block("get_weather", city="Paris", days="3")
TIME = block("get_time", zone="CET")


def test_values_follow_their_schema_types():
    text = block("get_weather", city="42", days="3", hourly="True", ratio="0.5", tags='["a", 1]',
                 where='{"lat": 1}', note="null")
    _, (call,) = parse_xml_tool_calls(text, SCHEMAS)
    assert json.loads(call.arguments) == {"city": "42", "days": 3, "hourly": True, "ratio": 0.5, "tags": ["a", 1],
                                          "where": {"lat": 1}, "note": None}


def test_values_that_do_not_fit_their_type_stay_text():
    assert convert_value("three", {"type": "integer"}) == "three"
    assert convert_value("2.5", {"type": "integer"}) == "2.5"
    assert convert_value("true", {"type": "number"}) == "true"
    assert convert_value("[1", {"type": "array"}) == "[1"
    assert convert_value(" 7 ", None) == " 7 "


def test_multi_line_text_keeps_its_inner_line_breaks():
    _, (call,) = parse_xml_tool_calls(block("write", code="def f():\n    return 1\n"))
    assert json.loads(call.arguments) == {"code": "def f():\n    return 1\n"}


def test_several_calls_and_surrounding_text():
    content, calls = parse_xml_tool_calls("Checking both.\n" + WEATHER + "\n" + TIME + "\n", SCHEMAS)
    assert content == "Checking both."
    assert calls == (FunctionCall("get_weather", '{"city": "Paris", "days": 3}'),
                     FunctionCall("get_time", '{"zone": "CET"}'))


def test_a_function_without_parameters_has_empty_arguments():
    assert parse_xml_tool_calls("<tool_call>\n<function=now>\n</function>\n</tool_call>")[1] == \
        (FunctionCall("now", "{}"),)


def test_a_missing_closing_parameter_tag_ends_at_the_next_tag():
    text = "<tool_call>\n<function=f>\n<parameter=a>\n1\n<parameter=b>\n2\n</function>\n</tool_call>"
    assert json.loads(parse_xml_tool_calls(text)[1][0].arguments) == {"a": "1", "b": "2"}


def test_a_cut_off_call_keeps_its_name_and_the_parameters_that_closed():
    cut = WEATHER[: WEATHER.index("3")]
    assert parse_xml_tool_calls(cut, SCHEMAS)[1] == (FunctionCall("get_weather", '{"city": "Paris"}'),)


def test_a_block_without_a_function_is_content():
    text = "Use <tool_call>like this</tool_call> please."
    assert parse_xml_tool_calls(text) == (text, ())
    assert parse_xml_tool_calls("ends with <tool_ca") == ("ends with <tool_ca", ())


def test_a_name_spanning_lines_is_not_a_call():
    text = "<tool_call>\n<function=a\nb>\n</tool_call>"
    assert parse_xml_tool_calls(text)[1] == ()


TEXTS = ["Let me check.\n" + WEATHER, WEATHER + "\n" + TIME, "Sure! " + TIME + "\nDone.", "No calls.  ",
         "a <tool_cal b " + TIME, "<tool_call>oops</tool_call> text", WEATHER[:-30], WEATHER[:40],
         block("write", code="x = '<b>'\n\n", n="2"), "  \n " + TIME + "\n\n"]


@given(text=st.sampled_from(TEXTS), cuts=st.lists(st.integers(0, 300), max_size=12))
@settings(max_examples=400, deadline=None)
def test_streamed_pieces_reassemble_to_the_whole_reading(text, cuts):
    parser = XmlToolCallStreamParser(SCHEMAS)
    pieces = fed_in_pieces(parser, text, cuts)
    assert assemble(pieces) == parse_xml_tool_calls(text, SCHEMAS)
    calls = [p.index for p in pieces if p.name is not None]
    assert calls == list(range(len(calls)))
    for _, call in itertools.groupby([p for p in pieces if p.is_call], key=lambda p: p.index):
        assert json.loads("".join(p.arguments for p in call)) is not None  # every call's arguments are JSON


def test_arguments_stream_one_parameter_at_a_time():
    parser = XmlToolCallStreamParser(SCHEMAS)
    head = WEATHER[: WEATHER.index("<parameter=days>")]
    pieces = parser.feed(head)
    assert [p.name for p in pieces if p.name] == ["get_weather"]
    assert "".join(p.arguments for p in pieces) == '{"city": "Paris"'
    rest = parser.feed(WEATHER[len(head) :]) + parser.finish()
    assert "".join(p.arguments for p in rest) == ', "days": 3}'

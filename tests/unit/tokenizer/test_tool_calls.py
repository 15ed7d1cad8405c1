"""Native ``<tool_call>`` blocks: whole replies, several calls, cut-off calls, and streams that reassemble to the
whole-text reading however the text is cut."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.tokenizer.chunking import fed_in_pieces
from tokenizer.react import FunctionCall
from tokenizer.tool_calls import ToolCallStreamParser, parse_tool_calls

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'


def test_plain_text_is_content():
    assert parse_tool_calls("  Hello there.\n") == parse_tool_calls("Hello there.")
    assert parse_tool_calls("Hello there.").calls == ()
    assert parse_tool_calls("Hello there.").content == "Hello there."


def test_one_call_with_text_before_it():
    reply = parse_tool_calls("Let me look that up.\n" + WEATHER)
    assert reply.content == "Let me look that up."
    (call,) = reply.calls
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris", "unit": "celsius"}


def test_several_calls_in_one_reply():
    reply = parse_tool_calls(WEATHER + "\n" + TIME)
    assert reply.content == ""
    assert [c.name for c in reply.calls] == ["get_weather", "get_time"]


def test_string_arguments_are_kept_as_given():
    reply = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>')
    assert reply.calls == (FunctionCall("f", '{"a": 1}'),)


def test_a_block_that_is_not_a_call_stays_content():
    text = "Use <tool_call>not json</tool_call> like this."
    assert parse_tool_calls(text).content == text
    assert parse_tool_calls(text).calls == ()


def test_a_cut_off_call_keeps_its_name_and_partial_arguments():
    reply = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    assert reply.calls == (FunctionCall("get_weather", '{"city": "Par'),)
    assert parse_tool_calls("<tool_call>\n{").calls == ()


def test_a_near_miss_of_the_opening_tag_is_content():
    assert parse_tool_calls("a <tool_cal b").content == "a <tool_cal b"
    assert parse_tool_calls("ends with <tool_").content == "ends with <tool_"


TEXTS = ["Let me check.\n" + WEATHER, WEATHER + "\n" + TIME, "Sure! " + WEATHER + "\nDone.", "No calls here.  ",
         "a <tool_cal b " + TIME, "<tool_call>oops</tool_call> text", WEATHER[:-20], "  \n " + TIME + "\n\n"]


@given(text=st.sampled_from(TEXTS), cuts=st.lists(st.integers(0, 200), max_size=12))
def test_streamed_pieces_reassemble_to_the_whole_reading(text, cuts):
    parser = ToolCallStreamParser()
    pieces = fed_in_pieces(parser, text, cuts)
    whole = parse_tool_calls(text)
    assert "".join(p.content for p in pieces) == whole.content
    calls = [p for p in pieces if p.is_call]
    assert tuple(FunctionCall(p.name, p.arguments) for p in calls) == whole.calls
    assert [p.index for p in calls] == list(range(len(calls)))
    malformed = text == "<tool_call>oops</tool_call> text"  # a block that is not a call stays content
    assert ("<tool_call>" in "".join(p.content for p in pieces)) == malformed

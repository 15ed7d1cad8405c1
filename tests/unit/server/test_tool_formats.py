"""The ReAct and Hermes formats' grammars for a required call, compiled by xgrammar for a real vocabulary, and the
format read from a chat template."""

from __future__ import annotations

from engine.grammar import GrammarCompiler
from server.limits import Limits
from server.settings import Settings
from server.structured import SchemaGrammars
from server.tool_formats import FORMATS, detect_format
from server.tool_formats.hermes import HermesFormat
from server.tool_formats.qwen3_coder import Qwen3CoderFormat
from server.tool_formats.react import ReactFormat
from tokenizer.chat import builtin_template
from tokenizer.react import Tool

WEATHER = Tool("get_weather", "Weather in a city.", {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1},
                                     "unit": {"enum": ["c", "f"]}, "hourly": {"type": "boolean"}},
    "required": ["city", "days"]})
TIME = Tool("get_time", "", {"type": "object", "properties": {"zone": {"type": "string"}}})


def accepts(compiler: GrammarCompiler, fmt, forced: str | None, text: str) -> bool:
    grammar = compiler.compile(fmt.call_grammar([WEATHER, TIME], forced, SchemaGrammars(Limits.of(Settings()))))
    matcher = grammar.matcher([])
    return matcher.accept_string(text) and matcher.is_terminated()


def test_hermes_and_react_grammars_follow_their_formats(compiler):
    hermes = '{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
    assert accepts(compiler, HermesFormat(), None, hermes)
    assert not accepts(compiler, HermesFormat(), None, hermes.replace("2", '"2"'))
    assert accepts(compiler, ReactFormat(), None, ' get_time\nAction Input: {"zone": "CET"}')


def test_the_format_is_read_from_the_chat_template():
    assert isinstance(detect_format(None), ReactFormat)
    assert isinstance(detect_format(builtin_template("qwen3")), HermesFormat)
    assert isinstance(detect_format(builtin_template("qwen3_5")), Qwen3CoderFormat)
    assert {"react", "hermes"} <= set(FORMATS)

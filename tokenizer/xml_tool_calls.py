"""Qwen3-Coder's XML tool calls, read from a reply whole or as it streams (several calls per reply)::

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

Parameter values are text; each is converted by its JSON-schema type (``convert_value``) and the arguments are
the JSON object of the converted values, streamed one parameter at a time: ``{"city": "Paris"`` when the first
parameter closes, ``, "days": 3`` for the next, ``}`` when the function closes. A parameter left open by the next
``<parameter=`` or ``</function>`` ends there (models drop the closing tag). A call cut by the length limit keeps
its name and the parameters that closed. The content is the text outside the blocks, trimmed at both ends; a
block without a ``<function=...>`` is content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from tokenizer.call_pieces import CallPiece, FunctionCall, TrimmedText, assemble, hold_partial
from tokenizer.json_values import loads_strict

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"
MAX_NAME = 256  # a function or parameter name longer than this is not one

Schemas = Mapping[str, Any]  # function name -> its parameters schema


def parse_xml_tool_calls(text: str, schemas: Schemas | None = None) -> tuple[str, tuple[FunctionCall, ...]]:
    """Content and calls of a whole reply."""
    parser = XmlToolCallStreamParser(schemas)
    return assemble([*parser.feed(text), *parser.finish()])


def convert_value(raw: str, schema: Any) -> Any:
    """A parameter's text as the JSON value its schema's ``type`` asks for; the text itself when it is not one
    (or the schema says string, or nothing)."""
    kinds = schema.get("type", []) if isinstance(schema, dict) else []
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    text = raw.strip()
    for kind in kinds:
        if kind == "null" and text == "null":
            return None
        if kind == "boolean" and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if kind in ("integer", "number", "object", "array"):
            try:
                value = loads_strict(text)  # 1e999 or NaN stay text: the arguments must stay JSON
            except ValueError:
                continue
            if _is_kind(value, kind):
                return value
    return raw


def _is_kind(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, dict if kind == "object" else list)


def _value_text(raw: str) -> str:
    """The value between the tags, without the one line break on each side that the format puts there."""
    raw = raw.removeprefix("\n")
    return raw.removesuffix("\n")


class XmlToolCallStreamParser:
    """Reads a reply as it streams; the pieces reassemble to ``parse_xml_tool_calls`` of the whole text.

    ``schemas``: each function's parameters schema, for converting values. ``prefix``: reply text already in the
    prompt (a forced call's opening).
    """

    def __init__(self, schemas: Schemas | None = None, prefix: str = "") -> None:
        self._schemas = schemas or {}
        self._buffer = prefix
        self._state = "text"  # text | block | function | parameter | after
        self._text = TrimmedText()
        self._calls = 0
        self._name = ""  # the open function
        self._parameter = ""  # the open parameter
        self._written = 0  # parameters of the open function sent so far
        self._searched = 0  # the buffer before this holds none of the tags the state looks for
        self._steps = {"text": self._in_text, "block": self._in_block, "function": self._in_function,
                       "parameter": self._in_parameter, "after": self._in_after}

    def feed(self, delta: str) -> list[CallPiece]:
        self._buffer += delta
        out: list[CallPiece] = []
        while True:
            step = self._steps[self._state]()
            if step is None:
                return out
            out += step

    def finish(self) -> list[CallPiece]:
        rest, self._buffer = self._buffer, ""
        if self._state == "text":
            return self._content(rest)
        if self._state == "block":
            return self._content(OPEN + rest)
        if self._state in ("function", "parameter"):  # cut off: the parameters that closed, and the call closes
            return [self._close_arguments()]
        return []

    # -- states: each returns the pieces of one step, or None to wait for more text -------------------------

    def _in_text(self) -> list[CallPiece] | None:
        (start,) = self._find(OPEN)
        if start < 0:
            text = hold_partial(self._buffer, OPEN)[0]
            self._consume(len(text))
            return self._content(text) or None
        text = self._buffer[:start]
        self._consume(start + len(OPEN))
        self._state = "block"
        return self._content(text)

    def _in_block(self) -> list[CallPiece] | None:
        start, close = self._find(FUNCTION, CLOSE)
        if close >= 0 and not 0 <= start < close:  # closed without a function: not a call
            body = self._buffer[: close + len(CLOSE)]
            self._consume(len(body))
            self._state = "text"
            return self._content(OPEN + body)
        name = self._tag_name(start, FUNCTION) if start >= 0 else None
        if not name:
            return None if name is None else []
        self._name, self._written, self._state = name, 0, "function"
        self._calls += 1
        return [CallPiece(name=name, index=self._calls - 1)]

    def _in_function(self) -> list[CallPiece] | None:
        start, end = self._find(PARAMETER, FUNCTION_END)
        if end >= 0 and not 0 <= start < end:
            self._consume(end + len(FUNCTION_END))
            self._state = "after"
            return [self._close_arguments()]
        name = self._tag_name(start, PARAMETER) if start >= 0 else None
        if not name:
            return None if name is None else []
        self._parameter, self._state = name, "parameter"
        return []

    def _in_parameter(self) -> list[CallPiece] | None:
        ends = [place for place in self._find(PARAMETER_END, PARAMETER, FUNCTION_END) if place >= 0]
        if not ends:
            return None
        end = min(ends)
        raw = self._buffer[:end]
        self._consume(end + (len(PARAMETER_END) if self._buffer.startswith(PARAMETER_END, end) else 0))
        self._state = "function"
        schema = self._schemas.get(self._name, {})
        properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
        value = convert_value(_value_text(raw), properties.get(self._parameter) if isinstance(properties, dict)
                              else None)
        opening = "{" if self._written == 0 else ", "
        self._written += 1
        try:
            written = json.dumps(value, ensure_ascii=False)
        except RecursionError:  # nested deeper than it can be written back: the text itself
            written = json.dumps(_value_text(raw), ensure_ascii=False)
        text = f"{opening}{json.dumps(self._parameter, ensure_ascii=False)}: {written}"
        return [CallPiece(arguments=text, index=self._calls - 1)]

    def _in_after(self) -> list[CallPiece] | None:
        (close,) = self._find(CLOSE)
        if close < 0:
            return None
        self._consume(close + len(CLOSE))
        self._state = "text"
        return []

    # -- helpers ---------------------------------------------------------------------------------------------

    def _find(self, *tags: str) -> list[int]:
        """Where each tag first occurs in the buffer (-1: nowhere). Only text not searched before is read (and a
        tag's width back); when none is found, the next search starts where this one stopped."""
        start = max(0, self._searched - max(map(len, tags)) + 1)
        places = [self._buffer.find(tag, start) for tag in tags]
        if all(place < 0 for place in places):
            self._searched = len(self._buffer)
        return places

    def _consume(self, size: int) -> None:
        """Drop the first ``size`` characters of the buffer (searching starts over)."""
        self._buffer, self._searched = self._buffer[size:], 0

    def _tag_name(self, start: int, tag: str) -> str | None:
        """The name in ``<tag=name>`` at ``start``, consuming the tag; None while its ``>`` has not arrived; ""
        for a tag whose name is empty, too long or spans lines (consumed, and skipped)."""
        begin = start + len(tag)
        end = self._buffer.find(">", begin, begin + MAX_NAME + 1)
        if end < 0:
            if len(self._buffer) - begin <= MAX_NAME:
                return None
            self._consume(begin)
            return ""
        name = self._buffer[begin:end].strip()
        self._consume(end + 1)
        return "" if "\n" in name else name

    def _close_arguments(self) -> CallPiece:
        return CallPiece(arguments="}" if self._written else "{}", index=self._calls - 1)

    def _content(self, text: str) -> list[CallPiece]:
        kept = self._text.push(text)
        return [CallPiece(content=kept)] if kept else []

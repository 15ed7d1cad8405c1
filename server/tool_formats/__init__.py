"""Tool-call formats, one class each; the server serves a model with one of them (``choose_format``)."""

from __future__ import annotations

from server.tool_formats.base import ToolFormat
from server.tool_formats.hermes import HermesFormat
from server.tool_formats.qwen3_coder import Qwen3CoderFormat
from server.tool_formats.react import ReactFormat

FORMATS: dict[str, type[ToolFormat]] = {f.name: f for f in (ReactFormat, HermesFormat, Qwen3CoderFormat)}


def detect_format(chat_template: str | None) -> ToolFormat:
    """The format a chat template teaches: Qwen3-Coder's XML, Hermes ``<tool_call>`` JSON, else ReAct (templates
    that do not render tools, and Qwen-1's ChatML)."""
    template = chat_template or ""
    if "tools" in template and "<function=" in template and "<parameter=" in template:
        return Qwen3CoderFormat()
    if "tools" in template and "tool_call" in template:
        return HermesFormat()
    return ReactFormat()


def choose_format(name: str, chat_template: str | None) -> ToolFormat:
    """``name`` from ``--tool-call-format``; ``auto`` reads the chat template."""
    return detect_format(chat_template) if name == "auto" else FORMATS[name]()


__all__ = ["FORMATS", "ToolFormat", "choose_format", "detect_format"]

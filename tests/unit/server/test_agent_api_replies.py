"""The Responses and Messages renderers against the chat reading of the same reply: a reply (a thought, text,
Hermes calls) cut into events at arbitrary places streams events in each spec's order whose deltas, folded, equal
both the API's whole rendering and chat's ``whole_reply`` of the text."""

from __future__ import annotations

import asyncio
import itertools
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from engine import SamplingParams
from server.chat_plan import ChatPlan
from server.chat_reply import whole_reply
from server.generation import ChoiceEvent
from server.messages_render import MessageRenderer
from server.messages_request import MessagesRequest
from server.reply_blocks import ReplyBlocks
from server.responses_render import ResponseRenderer
from server.responses_request import ResponsesRequest
from server.tool_formats import HermesFormat
from server.tools import ToolPlan
from tokenizer.react import Tool

TOOLS = [Tool("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})]
WORDS = st.sampled_from(["Hello", " there", "!", " a", "\n", " é", "{", "}"])
ARGUMENTS = st.dictionaries(st.sampled_from(["city", "days"]), st.sampled_from(["Paris", 3, "Köln"]), max_size=2)


def plan(thinks: bool = True) -> ChatPlan:
    tools = ToolPlan(TOOLS, required=False, forced=None, legacy=False, format=HermesFormat())
    return ChatPlan([1, 2, 3], [], SamplingParams(), tools, thinks=thinks)


@st.composite
def replies(draw) -> tuple[str, list[int], str]:
    """A reply's text, the places it is cut into events, and how it ends."""
    thought = "".join(draw(st.lists(WORDS, max_size=4)))
    text = f"<think>\n{thought}\n</think>\n\n" if draw(st.booleans()) else ""
    text += "".join(draw(st.lists(WORDS, max_size=5)))
    for arguments in draw(st.lists(ARGUMENTS, max_size=2)):
        text += '<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(arguments) + "}\n</tool_call>"
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=12)))
    return text, cuts, draw(st.sampled_from(["stop", "length"]))


def events(text: str, cuts: list[int], reason: str) -> list[ChoiceEvent]:
    bounds = [0, *cuts, len(text)]
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    return [ChoiceEvent(0, piece, [7], [], reason if i == len(pieces) - 1 else None, prompt_tokens=3,
                        completion_tokens=i + 1) for i, piece in enumerate(pieces)]


async def _aiter(items):
    for item in items:
        yield item


def collect(stream) -> list:
    async def run() -> list:
        return [event async for event in stream]

    return asyncio.run(run())


def chat_reading(text: str, reason: str) -> tuple[str, str, list[tuple[str, dict]]]:
    message, _ = whole_reply(plan(), text, reason)
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    return message.reasoning_content or "", message.content or "", calls


@settings(max_examples=150, deadline=None)
@given(replies())
def test_responses_stream_folds_to_its_whole_response_and_to_chats_reading(reply_cut):
    text, cuts, reason = reply_cut
    body = ResponsesRequest(model="m", input="hi")
    renderer, reply = ResponseRenderer("resp_1", "m", body), ReplyBlocks(plan())
    stream = collect(renderer.body_events(None, _aiter(events(text, cuts, reason)), reply))
    stream += renderer.closing_events(reply)
    names = [event.name for event in stream]
    assert [event.data["sequence_number"] for event in stream] == list(range(len(stream)))
    assert names[:2] == ["response.created", "response.in_progress"]
    assert names[-1] == ("response.incomplete" if reason == "length" else "response.completed")
    final = stream[-1].data["response"]
    items: dict[int, dict] = {}
    for event in stream[2:-1]:
        data = event.data
        if event.name == "response.output_item.added":
            assert data["output_index"] == len(items)  # items open in order, one at a time
            items[data["output_index"]] = {**data["item"], "text": ""}
        elif event.name.endswith(".delta"):
            items[data["output_index"]]["text"] += data["delta"]
        elif event.name == "response.output_item.done":
            done, item = data["item"], items[data["output_index"]]
            assert done == final["output"][data["output_index"]]
            folded = {"message": lambda d: d["content"][0]["text"], "reasoning": lambda d: d["content"][0]["text"],
                      "function_call": lambda d: d["arguments"]}[done["type"]](done)
            assert item["text"] == folded
    assert len(items) == len(final["output"])
    reasoning = "".join(i["content"][0]["text"] for i in final["output"] if i["type"] == "reasoning")
    content = "".join(i["content"][0]["text"] for i in final["output"] if i["type"] == "message")
    calls = [(i["name"], json.loads(i["arguments"])) for i in final["output"] if i["type"] == "function_call"]
    assert (reasoning, content, calls) == chat_reading(text, reason)


@settings(max_examples=150, deadline=None)
@given(replies())
def test_messages_stream_folds_to_its_whole_message_and_to_chats_reading(reply_cut):
    text, cuts, reason = reply_cut
    body = MessagesRequest(model="m", max_tokens=9, messages=[{"role": "user", "content": "hi"}])
    renderer = MessageRenderer(body)
    reply = ReplyBlocks(plan())
    stream = collect(renderer.stream(None, _aiter(events(text, cuts, reason)), reply))
    whole_reply_blocks = ReplyBlocks(plan())
    for event in events(text, [], reason):
        whole_reply_blocks.feed(event)
    whole = renderer.message(whole_reply_blocks)
    names = [event.name for event in stream]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks: list[dict] = []
    open_index = None
    for event in stream[1:-2]:
        data = event.data
        if event.name == "content_block_start":
            assert open_index is None and data["index"] == len(blocks)
            blocks.append({**data["content_block"], "partial": ""})
            open_index = data["index"]
        elif event.name == "content_block_delta":
            assert data["index"] == open_index
            delta = data["delta"]
            blocks[open_index]["partial"] += delta.get("text") or delta.get("thinking") or delta.get(
                "partial_json") or ""
        else:
            assert event.name == "content_block_stop" and data["index"] == open_index
            open_index = None
    assert open_index is None
    folded = []
    for block in blocks:
        partial = block.pop("partial")
        if block["type"] == "tool_use":
            block["input"] = json.loads(partial)
        else:
            block[block["type"] if block["type"] == "text" else "thinking"] = partial
        folded.append(block)
    assert folded == renderer.message(reply)["content"]
    assert [{**b, "id": None} for b in folded] == [{**b, "id": None} for b in whole["content"]]  # ids are fresh
    assert stream[-2].data["delta"]["stop_reason"] == whole["stop_reason"]
    reasoning = "".join(b["thinking"] for b in whole["content"] if b["type"] == "thinking")
    content = "".join(b["text"] for b in whole["content"] if b["type"] == "text")
    calls = [(b["name"], b["input"]) for b in whole["content"] if b["type"] == "tool_use"]
    assert (reasoning, content, calls) == chat_reading(text, reason)
    expected = "max_tokens" if reason == "length" else "tool_use" if calls else "end_turn"
    assert whole["stop_reason"] == expected

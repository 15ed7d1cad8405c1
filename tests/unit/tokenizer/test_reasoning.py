"""A thinking model's reply split into reasoning and answer: opened by the reply or by the prompt, pre-closed, cut
inside the thought, and streams that reassemble to the whole-text split however the text is cut."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.tokenizer.chunking import fed_in_pieces
from tokenizer.reasoning import ReasoningSplitter, prompt_opens_thought, split_reasoning


def test_a_thought_the_reply_opens():
    assert split_reasoning("<think>\nWhat is 2+2? Four.\n</think>\n\nIt is 4.") == ("What is 2+2? Four.", "It is 4.")


def test_a_thought_the_prompt_opened():
    assert split_reasoning("Four, clearly.\n</think>\n\n4", in_thought=True) == ("Four, clearly.", "4")


def test_an_empty_thought_leaves_only_the_answer():
    assert split_reasoning("<think>\n\n</think>\n\nHi!") == ("", "Hi!")


def test_a_reply_without_a_thought_is_all_answer():
    assert split_reasoning("  Hello <think> there") == ("", "  Hello <think> there")
    assert split_reasoning("<thin") == ("", "<thin")


def test_a_reply_cut_inside_the_thought_is_all_reasoning():
    assert split_reasoning("<think>\nLet me see, first") == ("Let me see, first", "")
    assert split_reasoning("still thinking </thi", in_thought=True) == ("still thinking </thi", "")


def test_think_tags_in_the_answer_stay_answer():
    assert split_reasoning("<think>a</think>b <think>c</think>") == ("a", "b <think>c</think>")


def test_the_prompt_decides_whether_the_reply_starts_in_a_thought():
    assert prompt_opens_thought("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thought("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_thought("<|im_start|>assistant\n")


TEXTS = [("<think>\nStep one.\nStep two.\n</think>\n\nDone.", False), ("x</think>y", True),
         ("  <think> a </think>  b  ", False), ("<think>cut", False), ("plain 🍕 text", False),
         ("<think>\n\n</think>\n\n<tool_call>\n{}</tool_call>", False), ("a </thin", True)]


@given(case=st.sampled_from(TEXTS), cuts=st.lists(st.integers(0, 80), max_size=10))
@settings(max_examples=400, deadline=None)
def test_streamed_pieces_reassemble_to_the_whole_split(case, cuts):
    text, in_thought = case
    splitter = ReasoningSplitter(in_thought)
    pieces = fed_in_pieces(splitter, text, cuts)
    assert ("".join(p.reasoning for p in pieces), "".join(p.content for p in pieces)) == \
        split_reasoning(text, in_thought)

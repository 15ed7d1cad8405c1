"""Property tests: incremental detokenization and stop-string matching over random inputs."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenizer import IncrementalDetokenizer, StopStringMatcher

CJK_EMOJI = st.text(
    alphabet=st.sampled_from(list("你好世界中文字符测试한국어日本語🍕😀👨‍👩‍👧🇫🇷é ñ\n ab1")), min_size=0, max_size=40
)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def stream(tokenizer, ids):
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids]
    return deltas, detokenizer.flush()


@PROPERTY
@given(text=CJK_EMOJI, noise=st.lists(st.integers(0, 151850), max_size=12), seed=st.randoms())
def test_qwen_detokenizer_deltas_concatenate_to_decode(qwen_tokenizer, text, noise, seed):
    ids = qwen_tokenizer.encode(text) + noise
    seed.shuffle(noise)
    ids += noise
    deltas, tail = stream(qwen_tokenizer, ids)
    assert "".join(deltas) + tail == qwen_tokenizer.decode(ids)


@PROPERTY
@given(text=CJK_EMOJI)
def test_detokenizer_never_emits_half_a_character(qwen_tokenizer, text):
    deltas, tail = stream(qwen_tokenizer, qwen_tokenizer.encode(text))
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) == qwen_tokenizer.decode(qwen_tokenizer.encode(text))
    assert tail == ""


@PROPERTY
@given(text=CJK_EMOJI, noise=st.lists(st.integers(0, 49151), max_size=12))
def test_gguf_detokenizer_deltas_concatenate_to_decode(smollm2_tokenizer, hf_smollm2_tokenizer, text, noise):
    ids = smollm2_tokenizer.encode(text) + noise
    deltas, tail = stream(smollm2_tokenizer, ids)
    assert "".join(deltas) + tail == smollm2_tokenizer.decode(ids)
    clean = smollm2_tokenizer.encode(text)
    assert "".join(stream(smollm2_tokenizer, clean)[0]) == hf_smollm2_tokenizer.decode(clean)


SMALL_ALPHABET = st.text(alphabet="abc<|>\n", max_size=60)


@st.composite
def chunked(draw, text_strategy=SMALL_ALPHABET):
    text = draw(text_strategy)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in pairwise(bounds)]


@settings(max_examples=1000, deadline=None)
@given(sample=chunked(), stops=st.lists(st.text(alphabet="abc<|>\n", min_size=1, max_size=5), max_size=4))
def test_stop_matcher_emits_exactly_the_text_before_the_first_completed_stop(sample, stops):
    text, chunks = sample
    matcher = StopStringMatcher(stops)
    emitted = "".join(matcher.push(c) for c in chunks) + matcher.flush()
    hits = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    expected = text[: min(hits)[1]] if hits else text
    assert emitted == expected
    assert matcher.stopped == bool(hits)
    assert not any(s in emitted for s in stops)


@settings(max_examples=300, deadline=None)
@given(sample=chunked(), stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3))
def test_stop_matcher_holds_back_only_possible_stop_prefixes(sample, stops):
    _, chunks = sample
    matcher = StopStringMatcher(stops)
    seen = emitted = ""
    for chunk in chunks:
        seen += chunk
        emitted += matcher.push(chunk)
        if matcher.stopped:
            break
        held = seen[len(emitted):]
        assert seen.startswith(emitted)
        assert held == "" or any(s.startswith(held) and s != held for s in stops)

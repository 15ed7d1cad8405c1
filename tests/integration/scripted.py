"""Tiny checkpoints whose greedy replies follow a script, so the server really generates what a test needs
(``<think>`` blocks, tool calls, replies cut by the length limit).

The model is a Qwen3 whose layers add nothing (zero output projections) and whose hidden state is the one-hot
embedding of the current token, so its next token is a fixed function of the current one: every script piece is
its own (non-special) added token and leads to the next piece, the last to ``<|im_end|>``, any other token to the
first piece. Further scripts (``more``) start where a chat template writes their first piece at the end of a
prompt (e.g. after a tool result). The pieces must be distinct; text may repeat across pieces of different
spelling."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from engine.weights.loader import load_model
from server.settings import Settings
from tests.integration.conftest import RunningServer, engine_for, serve

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"},
                                                "days": {"type": "integer", "minimum": 1, "maximum": 16}},
                                                "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}}}}
HI = [{"role": "user", "content": "Hi!"}]


def _byte_alphabet() -> list[str]:
    return pre_tokenizers.ByteLevel.alphabet()


def write_scripted_model(folder: Path, script: list[str], chat_template: str, *, more: Sequence[list[str]] = (),
                         context: int = 4096) -> Path:
    """A Qwen3 folder (weights, config, tokenizer, template) whose greedy reply to any prompt is ``script`` (or the
    rest of a ``more`` script whose first piece ends the prompt)."""
    pieces = [piece for chain in (script, *more) for piece in chain]
    if len(set(pieces)) != len(pieces):
        raise ValueError("script pieces must be distinct (spell a repeated text differently)")
    raw = Tokenizer(models.BPE({char: i for i, char in enumerate(sorted(_byte_alphabet()))}, []))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    raw.add_tokens([AddedToken(piece, special=False, normalized=False) for piece in pieces])
    vocab = raw.get_vocab_size(with_added_tokens=True)
    successor = torch.full((vocab,), raw.token_to_id(script[0]))
    for chain in (script, *more):
        ids = [raw.token_to_id(piece) for piece in chain]
        successor[ids] = torch.tensor([*ids[1:], raw.token_to_id("<|im_end|>")])

    hidden, heads, kv_heads, head_dim, inner = -(-vocab // 64) * 64, 2, 1, 32, 64
    embed = torch.zeros(vocab, hidden)
    embed[torch.arange(vocab), torch.arange(vocab)] = 1.0  # the hidden state names the current token
    lm_head = torch.zeros(vocab, hidden)
    lm_head[successor, torch.arange(vocab)] = 4.0  # ...and the head names its successor (logit 4 * sqrt(hidden))
    p = "model.layers.0."
    tensors = {"model.embed_tokens.weight": embed, "lm_head.weight": lm_head, "model.norm.weight": torch.ones(hidden),
               p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight":
               torch.ones(hidden), p + "self_attn.q_proj.weight": torch.zeros(heads * head_dim, hidden),
               p + "self_attn.k_proj.weight": torch.zeros(kv_heads * head_dim, hidden),
               p + "self_attn.v_proj.weight": torch.zeros(kv_heads * head_dim, hidden),
               p + "self_attn.o_proj.weight": torch.zeros(hidden, heads * head_dim),
               p + "self_attn.q_norm.weight": torch.ones(head_dim), p + "self_attn.k_norm.weight": torch.ones(head_dim),
               p + "mlp.gate_proj.weight": torch.zeros(inner, hidden), p + "mlp.up_proj.weight":
               torch.zeros(inner, hidden), p + "mlp.down_proj.weight": torch.zeros(hidden, inner)}
    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden, "intermediate_size":
        inner, "num_hidden_layers": 1, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": vocab, "max_position_embeddings": context, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False}))
    raw.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>",
                                                              "chat_template": chat_template}))
    return folder


@contextlib.contextmanager
def scripted_server(folder: Path, script: list[str], template: str, *, more: Sequence[list[str]] = (),
                    context: int = 2048, **settings) -> Iterator[RunningServer]:
    """Serve a scripted model (``write_scripted_model``) with a context of ``context`` tokens while the context
    manager lasts."""
    write_scripted_model(folder, script, template, more=more, context=max(context, 4096))
    engine = engine_for(load_model(str(folder), dtype=torch.float32, device=torch.device("cpu")),
                        max_model_len=context)
    try:
        yield from serve(Settings(served_model_name="scripted", **settings), engine)
    finally:
        engine.shutdown()


def scripted_fixture(script: list[str], template: str, **settings):
    """A module-scoped fixture serving a scripted model."""

    @pytest.fixture(scope="module")
    def server(tmp_path_factory) -> Iterator[RunningServer]:
        with scripted_server(tmp_path_factory.mktemp("scripted") / "m", script, template, **settings) as running:
            yield running

    return server


def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base, api_key="unused", max_retries=0, timeout=120)


def chat(server: RunningServer, **body) -> dict:
    response = httpx.post(f"{server.base}/chat/completions", json={"model": "scripted", "messages": HI,
                                                                   "temperature": 0, **body}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(server: RunningServer, **body) -> tuple[dict, str | None]:
    """The stream's deltas folded into one message (calls by index), and its finish reason."""
    stream = client(server).chat.completions.create(model="scripted", messages=HI, temperature=0, stream=True,
                                                    **body)
    message: dict = {"content": "", "reasoning_content": "", "reasoning": "", "tool_calls": {}}
    reason = None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            for key in ("content", "reasoning_content", "reasoning"):
                message[key] += delta.get(key) or ""
            for call in delta.get("tool_calls") or []:
                name, arguments = message["tool_calls"].get(call["index"], ("", []))
                message["tool_calls"][call["index"]] = (name + (call["function"].get("name") or ""),
                                                        [*arguments, call["function"].get("arguments") or ""])
            reason = choice.finish_reason or reason
    return message, reason

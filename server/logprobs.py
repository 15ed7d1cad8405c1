"""Log-probabilities in the OpenAI shapes (chat's per-token objects, the legacy completions arrays)."""

from __future__ import annotations

from server.protocol import ChoiceLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob
from tokenizer import Tokenizer


def _top(entry: dict[int, float], count: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda item: -item[1])[:count]


def chat_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float]],
                  top: int) -> ChoiceLogprobs:
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        content.append(TokenLogprob(
            token=tokenizer.decode([token_id]), logprob=entry[token_id], bytes=list(tokenizer.token_bytes(token_id)),
            top_logprobs=[TopLogprob(token=tokenizer.decode([i]), logprob=lp, bytes=list(tokenizer.token_bytes(i)))
                          for i, lp in _top(entry, top)],
        ))
    return ChoiceLogprobs(content=content)


def completion_logprobs(tokenizer: Tokenizer, token_ids: list[int], entries: list[dict[int, float] | None],
                        top: int, offset: int = 0) -> CompletionLogprobs:
    result = CompletionLogprobs()
    for token_id, entry in zip(token_ids, entries, strict=False):
        text = tokenizer.decode([token_id])
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        result.token_logprobs.append(None if entry is None else entry[token_id])
        result.top_logprobs.append(None if entry is None else {tokenizer.decode([i]): lp for i, lp in _top(entry, top)})
    return result

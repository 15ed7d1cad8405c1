"""The seed's way, as a baseline: FastAPI around HF ``generate``, one request at a time, streamed.

Run by bench/serve_speed.py: ``python bench/baseline_server.py PORT``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import torch
import uvicorn
from fastapi import FastAPI, Request
from sse_starlette import EventSourceResponse
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList, TextIteratorStreamer

from engine.weights.embedded import SMOLLM2_GGUF, asset_path
from tokenizer import ChatMessage, build_prompt
from tokenizer.hf import load_gguf_tokenizer

PATH = asset_path(SMOLLM2_GGUF)
TOKENIZER = load_gguf_tokenizer(PATH)
MODEL = AutoModelForCausalLM.from_pretrained(str(PATH.parent), gguf_file=PATH.name, dtype=torch.float32).eval()
LOCK = threading.Lock()
app = FastAPI()


class Bias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]) -> None:
        self.bias = bias

    def __call__(self, input_ids, scores):
        for token, value in self.bias.items():
            scores[:, token] += value
        return scores


class Streamer(TextIteratorStreamer):
    """Decodes with our tokenizer (the HF one needs the GGUF conversion too)."""

    def __init__(self) -> None:
        super().__init__(tokenizer=None, skip_prompt=True)

    def put(self, value):
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.on_finalized_text(TOKENIZER.decode(value.flatten().tolist()))

    def end(self):
        self.on_finalized_text("", stream_end=True)


@app.post("/v1/chat/completions")
async def chat(request: Request):
    body = await request.json()
    messages = [ChatMessage(m["role"], m["content"]) for m in body["messages"]]
    ids = torch.tensor([build_prompt(TOKENIZER, messages).token_ids])
    streamer = Streamer()
    bias = {int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()}

    def run() -> None:
        with LOCK, torch.inference_mode():
            MODEL.generate(ids, max_new_tokens=body.get("max_tokens", 64), do_sample=False, streamer=streamer,
                           logits_processor=LogitsProcessorList([Bias(bias)]), pad_token_id=0)

    threading.Thread(target=run, daemon=True).start()

    async def events():
        count = 0
        iterator = iter(streamer)
        while True:
            text = await asyncio.to_thread(next, iterator, None)
            if text is None:
                break
            count += 1
            chunk = {"id": "x", "object": "chat.completion.chunk", "created": int(time.time()), "model": "hf",
                     "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            yield {"data": json.dumps(chunk)}
        usage = {"prompt_tokens": ids.shape[1], "completion_tokens": count, "total_tokens": ids.shape[1] + count}
        yield {"data": json.dumps({"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "hf",
                                   "choices": [], "usage": usage})}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())


@app.get("/health")
async def health():
    return {"status": "ok"}


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")

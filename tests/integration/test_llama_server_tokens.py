"""llama.cpp's own server as a second reference for hybrid Qwen GGUF files: the tiny checkpoints of
``test_hybrid_models`` converted by llama.cpp's converter, served by ``llama-server`` (built by
``../shared/bench/setup-llama-server.sh`` from the same sdist), give the same greedy tokens as our engine on the
same file. Runs where that build exists (``QWEN_PEER_DIR``, default ``~/.cache/qwen-peers``)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from engine import LLM
from tests.integration.conftest import free_port
from tests.llama_converter import convert
from tests.unit.engine.test_hybrid_models import CONFIGS, GREEDY, build_config, random_prompt, write_checkpoint

LLAMA_SERVER = Path(os.environ.get("QWEN_PEER_DIR", "~/.cache/qwen-peers")).expanduser() / \
    "llama.cpp-build/bin/llama-server"
pytestmark = pytest.mark.skipif(not LLAMA_SERVER.is_file(), reason=f"no llama-server build at {LLAMA_SERVER}")


def greedy_from_llama_server(server: str, prompt: list[int]) -> list[int]:
    body = json.dumps({"prompt": prompt, "n_predict": GREEDY.max_tokens, "temperature": 0, "top_k": 1,
                       "cache_prompt": False, "return_tokens": True, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{server}/completion", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)["tokens"]


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_llama_server_gives_our_greedy_tokens(arch, smollm2_tokenizer_files, tmp_path):
    folder = tmp_path / "hf"
    write_checkpoint(folder, build_config(arch, vocab_size=49152))
    for file in smollm2_tokenizer_files.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    gguf = convert(folder, tmp_path / "model.gguf", "--no-mtp")
    port = free_port()
    server = subprocess.Popen([str(LLAMA_SERVER), "-m", str(gguf), "--port", str(port), "-c", "1024", "-np", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "llama-server did not start"
                time.sleep(0.2)
        ours = LLM(str(gguf), dtype="float32", device="cpu")
        for length, seed in ((300, 1), (23, 2)):
            prompt = [token * 151 % 49152 for token in random_prompt(length, seed)]
            assert greedy_from_llama_server(url, prompt) == ours.generate([prompt], GREEDY)[0].token_ids
    finally:
        server.terminate()
        server.wait(timeout=30)

"""Real servers for the integration tests: uvicorn on a loopback socket, in a thread, around real engines."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from safetensors.torch import save_file

from engine import AsyncEngine, EngineConfig, LLMEngine, SchedulerConfig
from engine.weights.loader import LoadedModel, int4_kernel_for, load_model
from server.app import create_app
from server.settings import Settings

SMOL_NAME = "SmolLM2-135M-Instruct"
QWEN_NAME = "qwen-7b-chat-tiny"
API_KEY = "sesame"


@dataclass
class RunningServer:
    url: str
    app: object
    engine: AsyncEngine

    @property
    def base(self) -> str:
        return f"{self.url}/v1"

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, seconds: float) -> bool:
    """Poll ``/health`` until it answers 200 (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    return False


def wait_for(condition: Callable[[], object], seconds: float = 60, what: str = "condition") -> object:
    """Poll ``condition`` until it is truthy (its value) or ``seconds`` pass (an assertion error)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


class StreamReader(threading.Thread):
    """Reads a streamed chat completion in the background: its ``data`` lines as they come; ``started`` is set once
    ``after`` lines arrived."""

    def __init__(self, url: str, body: dict, after: int = 1) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.after = url, body, after
        self.lines: list[str] = []
        self.started = threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=self.body, timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.lines.append(line)
                if len(self.lines) >= self.after:
                    self.started.set()


def serve(settings: Settings, engine: AsyncEngine) -> Iterator[RunningServer]:
    """Run the app on a free loopback port until the fixture ends."""
    port = free_port()
    app = create_app(settings.model_copy(update={"port": port}), engine)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    assert wait_healthy(url, 30)
    try:
        yield RunningServer(url, app, engine)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def engine_for(loaded: LoadedModel, *, max_model_len: int = 2048, **scheduler) -> AsyncEngine:
    config = EngineConfig(max_model_len=max_model_len, kv_cache_memory=256 << 20,
                          scheduler=SchedulerConfig(**{"max_num_seqs": 32, **scheduler}))
    return AsyncEngine(LLMEngine(loaded, config))


@pytest.fixture(scope="session")
def smol_loaded(smollm2_gguf) -> LoadedModel:
    from engine.device import select_dtype

    cpu, dtype = torch.device("cpu"), select_dtype(None, torch.device("cpu"))
    return load_model(str(smollm2_gguf), dtype=dtype, device=cpu, int4_kernel=int4_kernel_for(cpu, dtype))


@pytest.fixture(scope="session")
def smol_server(smol_loaded) -> Iterator[RunningServer]:
    engine = engine_for(smol_loaded)
    yield from serve(Settings(served_model_name=SMOL_NAME), engine)
    engine.shutdown()


@pytest.fixture(scope="module")
def keyed_server(smol_loaded) -> Iterator[RunningServer]:
    """SmolLM2 behind the API key ``API_KEY``."""
    engine = engine_for(smol_loaded)
    yield from serve(Settings(served_model_name=SMOL_NAME, api_key=[API_KEY]), engine)
    engine.shutdown()


def write_tiny_qwen1(folder: Path, vocab_file: Path) -> Path:
    """A Qwen-7B-Chat-shaped folder (config, generation config, qwen.tiktoken) with tiny random weights."""
    hidden, layers, heads, inner, vocab = 64, 2, 4, 256, 151936
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": hidden,
              "num_attention_heads": heads, "kv_channels": hidden // heads, "num_hidden_layers": layers,
              "intermediate_size": inner, "vocab_size": vocab, "layer_norm_epsilon": 1e-6, "rotary_emb_base": 10000,
              "rotary_pct": 1.0, "seq_length": 64, "max_position_embeddings": 1024, "use_dynamic_ntk": True,
              "use_logn_attn": True, "no_bias": True, "tie_word_embeddings": False}
    generation = {"chat_format": "chatml", "eos_token_id": 151643, "pad_token_id": 151643,
                  "stop_words_ids": [[151643]], "max_window_size": 6144, "max_new_tokens": 512, "do_sample": True,
                  "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1}
    generator = torch.Generator().manual_seed(7)

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    tensors = {"transformer.wte.weight": randn(vocab, hidden, std=1.0),
               "transformer.ln_f.weight": 1 + randn(hidden, std=0.1),
               "lm_head.weight": randn(vocab, hidden, std=2.0 / hidden**0.5)}
    for i in range(layers):
        prefix = f"transformer.h.{i}."
        tensors |= {prefix + "ln_1.weight": 1 + randn(hidden, std=0.1),
                    prefix + "ln_2.weight": 1 + randn(hidden, std=0.1),
                    prefix + "attn.c_attn.weight": randn(3 * hidden, hidden, std=hidden**-0.5),
                    prefix + "attn.c_attn.bias": randn(3 * hidden, std=0.1),
                    prefix + "attn.c_proj.weight": randn(hidden, hidden, std=hidden**-0.5),
                    prefix + "mlp.w1.weight": randn(inner // 2, hidden, std=hidden**-0.5),
                    prefix + "mlp.w2.weight": randn(inner // 2, hidden, std=hidden**-0.5),
                    prefix + "mlp.c_proj.weight": randn(hidden, inner // 2, std=(inner // 2) ** -0.5)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps(generation))
    shutil.copy(vocab_file, folder / "qwen.tiktoken")
    return folder


@pytest.fixture(scope="session")
def qwen1_folder(tmp_path_factory, qwen_vocab_path) -> Path:
    return write_tiny_qwen1(tmp_path_factory.mktemp("qwen1") / QWEN_NAME, qwen_vocab_path)


@pytest.fixture(scope="session")
def qwen1_server(qwen1_folder) -> Iterator[RunningServer]:
    loaded = load_model(str(qwen1_folder), dtype=torch.float32, device=torch.device("cpu"))
    engine = engine_for(loaded)
    yield from serve(Settings(served_model_name=QWEN_NAME), engine)
    engine.shutdown()

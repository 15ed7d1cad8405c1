"""Speculative decoding by a model's multi-token-prediction block, qwen-serve against llama-server on the same GGUF
file (one with the block: ``python -m bench.hybrid_gguf --mtp``), in one run: each server without drafts and with
them (``--speculative mtp`` / ``--spec-type draft-mtp``, the same number of tokens drafted a step), driven by
``../shared/bench/loadgen.py`` (streaming, temperature 0, the end-of-turn token banned, 128 tokens a request).
Prints tok/s of each, the speed-up drafting gives each server, the ratio of the two drafting servers, and the
acceptance qwen-serve counted (random weights draft badly: the figures measure what drafting costs).

    .venv/bin/python -m bench.speculative --model ~/.cache/qwen-peers/models/bench-qwen3.5-24l-mtp-Q4_K_M.gguf
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench.servers import cpu_model, wait_healthy

PEER_DIR = Path(os.environ.get("PEER_DIR", "~/.cache/qwen-peers")).expanduser()
LOADGEN = Path(__file__).resolve().parents[2] / "shared" / "bench" / "loadgen.py"
PORT = 18561


def qwen_serve(model: Path, drafted: int) -> list[str]:
    flags = ["--speculative", "mtp", "--num-speculative-tokens", str(drafted)] if drafted else []
    return [".venv/bin/qwen-serve", "--model", str(model), "--host", "127.0.0.1", "--port", str(PORT), *flags]


def llama_server(model: Path, drafted: int) -> list[str]:
    flags = ["--spec-type", "draft-mtp", "--spec-draft-n-max", str(drafted)] if drafted else []
    return [str(PEER_DIR / "llama.cpp-build" / "bin" / "llama-server"), "-m", str(model), "--host", "127.0.0.1",
            "--port", str(PORT), "-c", "8192", "-np", "4", "--kv-unified", "-t", "2", "-tb", "2", *flags]


def measure(command: list[str], label: str, args: argparse.Namespace, work: Path) -> tuple[dict, str]:
    """Start ``command``, drive it with loadgen at each concurrency, stop it; (loadgen's JSON, its /metrics or
    log text)."""
    log = (work / f"{label}.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{PORT}"
    try:
        wait_healthy(url, process)
        out = work / f"{label}.json"
        subprocess.run([sys.executable, str(LOADGEN), "--base-url", f"{url}/v1", "--concurrency", args.concurrency,
                        "--requests", args.requests, "--max-tokens", "128", "--ignore-eos", "--eos-token-id", "2",
                        "--label", label, "--out", str(out)], check=True, capture_output=True)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text if "qwen-serve" in command[0] else ""
        return json.loads(out.read_text()), metrics
    finally:
        process.terminate()
        process.wait(60)
        log.close()


def counter(metrics: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(name + "{"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="a GGUF file with a multi-token-prediction block")
    parser.add_argument("--tokens", type=int, default=2, help="tokens drafted a step")
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--requests", default="4,8")
    args = parser.parse_args()
    print(f"{cpu_model()}; {args.model.name}; {args.tokens} drafted a step")
    rates: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for server, make in (("qwen-serve", qwen_serve), ("llama-server", llama_server)):
            for drafted in (0, args.tokens):
                label = f"{server}{'+mtp' if drafted else ''}"
                result, metrics = measure(make(args.model, drafted), label, args, work)
                rates[label] = {level["concurrency"]: level["agg_output_tok_s"] for level in result["levels"]}
                line = ", ".join(f"@{c} {rate:.1f} tok/s" for c, rate in rates[label].items())
                if metrics:
                    drafted_tokens = counter(metrics, "vllm:spec_decode_num_draft_tokens_total")
                    accepted = counter(metrics, "vllm:spec_decode_num_accepted_tokens_total")
                    if drafted_tokens:
                        line += f"; accepted {accepted:.0f} of {drafted_tokens:.0f} drafted"
                elif drafted:
                    rate = re.findall(r"acceptance rate\s*=\s*([0-9.]+)", (work / f"{label}.log").read_text())
                    line += f"; llama-server's acceptance rate {rate[-1]}" if rate else ""
                print(f"{label:<18} {line}")
    for level in rates["qwen-serve"]:
        ours, theirs = (rates[f"{name}+mtp"][level] / rates[name][level] for name in ("qwen-serve", "llama-server"))
        both = rates["qwen-serve+mtp"][level] / rates["llama-server+mtp"][level]
        print(f"@{level}: drafting speeds qwen-serve {ours:.2f}x, llama-server {theirs:.2f}x; "
              f"qwen-serve/llama-server, both drafting: {both:.2f}x")


if __name__ == "__main__":
    main()

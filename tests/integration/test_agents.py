"""The real coding agents from npm (``tests.integration.agents``), non-interactive with auto-approval in a
temporary directory, set up exactly as README says: each writes a file through its own tool when a scripted model
(``tests.integration.scripted``) calls that tool, and ends; each says hello with the embedded model and exits 0.
Telemetry and update checks are off in every setup."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.settings import Settings
from tests.integration.agents import ensure_agents, exported, readme_block
from tests.integration.conftest import SMOL_NAME, RunningServer, engine_for, serve
from tests.integration.scripted import scripted_server

TEMPLATES = Path(__file__).parent
AFTER_RESULT = "[the tool answered]"  # what the agents' template writes after a tool result; starts the last turn
DONE = [AFTER_RESULT, " The file is written."]
CONTEXT = 1 << 17  # the agents' prompts, one token per byte with the scripted tokenizer
AGENT_SECONDS = 600
# Short system prompts under which the embedded model (greedy) ends its reply in a few words; its output is
# sensitive to the rest of each agent's prompt (paths, dates), so each agent has the one that held over repeated runs
HELLO_SYSTEM = "You are a helpful assistant."
CODEX_HELLO_SYSTEM = 'Reply with exactly "Hello!" and nothing else.'
HELLO_TOKENS = 64  # a reply cut short keeps a run on the embedded model short


def agent_template() -> str:
    """The Hermes test template, whose generation prompt after a tool result ends with ``AFTER_RESULT``."""
    template = (TEMPLATES / "tool_template.jinja").read_text()
    prompt = "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    assert prompt in template
    return template.replace(prompt, "{%- if add_generation_prompt %}<|im_start|>assistant\n{% if messages[-1].role"
                                     " == 'tool' %}" + AFTER_RESULT + "{% endif %}{% endif %}")


def calling(name: str, arguments: dict) -> list[str]:
    """A scripted reply that is one Hermes call of ``name``."""
    return ["<tool_call>\n", f'{{"name": "{name}", "arguments": ', json.dumps(arguments), "}\n</tool_call>"]


@pytest.fixture(scope="module")
def agents() -> dict[str, Path]:
    return ensure_agents()


@contextlib.contextmanager
def scripted_agent_server(folder: Path, script: list[str]) -> Iterator[RunningServer]:
    with scripted_server(folder, script, agent_template(), more=[DONE], context=CONTEXT) as server:
        yield server


@pytest.fixture(scope="module")
def smol_8k(smol_loaded) -> Iterator[RunningServer]:
    """The embedded model with its whole 8K context (the agents' prompts are long), greedy where a request leaves
    its temperature out (none of the agents sets one)."""
    engine = engine_for(smol_loaded, max_model_len=8192)
    yield from serve(Settings(served_model_name=SMOL_NAME, override_generation_config={"temperature": 0}), engine)
    engine.shutdown()


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    home = cwd.parent / "home"
    home.mkdir(exist_ok=True)
    base = {key: os.environ[key] for key in ("PATH", "LANG", "TERM") if key in os.environ}
    result = subprocess.run(command, cwd=cwd, env={**base, "HOME": str(home), "CI": "1", **env},
                            capture_output=True, text=True, timeout=AGENT_SECONDS, stdin=subprocess.DEVNULL)
    print(result.stdout[-3000:], result.stderr[-3000:])  # shown when a test fails
    return result


def workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    return work


# -- Codex CLI: the Responses API ---------------------------------------------------------------------------------

def codex(agents: dict[str, Path], server: RunningServer, model: str, work: Path, prompt: str, *args: str):
    codex_home = work.parent / "codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(readme_block("codex-config", server.url, model))
    return run([str(agents["codex"]), "exec", "--skip-git-repo-check",
                "--dangerously-bypass-approvals-and-sandbox", *args, prompt], work, {"CODEX_HOME": str(codex_home)})


def test_codex_writes_a_file_with_its_shell_tool(agents, tmp_path):
    work = workdir(tmp_path)
    script = calling("exec_command", {"cmd": "printf 'made by codex' > hello.txt"})
    with scripted_agent_server(tmp_path / "model", script) as server:
        result = codex(agents, server, "scripted", work, "Write hello.txt")
    assert result.returncode == 0
    assert (work / "hello.txt").read_text() == "made by codex"
    assert "The file is written." in result.stdout


def test_codex_says_hello_with_the_embedded_model(agents, smol_8k, tmp_path):
    work = workdir(tmp_path)
    instructions = work.parent / "instructions.md"
    instructions.write_text(CODEX_HELLO_SYSTEM)
    result = codex(agents, smol_8k, SMOL_NAME, work, "Say hello.", "-c", f"model_instructions_file={instructions}")
    assert result.returncode == 0 and result.stdout.strip()


# -- Claude Code: the Messages API ----------------------------------------------------------------------------------

def claude(agents: dict[str, Path], server: RunningServer, model: str, work: Path, *args: str,
           **env: str):
    setup = exported(readme_block("claude-code-env", server.url, model))
    return run([str(agents["claude"]), "-p", *args], work, {**setup, **env})


def test_claude_code_writes_a_file_with_its_write_tool(agents, tmp_path):
    work = workdir(tmp_path)
    script = calling("Write", {"file_path": str(work / "hello.txt"), "content": "made by claude"})
    with scripted_agent_server(tmp_path / "model", script) as server:
        result = claude(agents, server, "scripted", work, "Write hello.txt", "--allowedTools", "Write")
    assert result.returncode == 0
    assert (work / "hello.txt").read_text() == "made by claude"
    assert "The file is written." in result.stdout


def test_claude_code_says_hello_with_the_embedded_model(agents, smol_8k, tmp_path):
    result = claude(agents, smol_8k, SMOL_NAME, workdir(tmp_path), "Say hello.", "--tools", "", "--system-prompt",
                    HELLO_SYSTEM, CLAUDE_CODE_MAX_OUTPUT_TOKENS=str(HELLO_TOKENS))
    assert result.returncode == 0 and result.stdout.strip()


# -- Qwen Code: chat completions ---------------------------------------------------------------------------------

def qwen(agents: dict[str, Path], server: RunningServer, model: str, work: Path, *args: str,
         sampling: dict | None = None):
    settings = json.loads(readme_block("qwen-code-settings", server.url, model))
    if sampling is not None:
        settings["model"]["generationConfig"] = {"samplingParams": sampling}
    path = work.parent / "home" / ".qwen" / "settings.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(settings))
    return run([str(agents["qwen"]), "-p", *args], work, {})


def test_qwen_code_writes_a_file_with_its_write_tool(agents, tmp_path):
    work = workdir(tmp_path)
    script = calling("write_file", {"file_path": str(work / "hello.txt"), "content": "made by qwen"})
    with scripted_agent_server(tmp_path / "model", script) as server:
        result = qwen(agents, server, "scripted", work, "Write hello.txt", "--yolo")
    assert result.returncode == 0
    assert (work / "hello.txt").read_text() == "made by qwen"
    assert "The file is written." in result.stdout


def test_qwen_code_says_hello_with_the_embedded_model(agents, smol_8k, tmp_path):
    result = qwen(agents, smol_8k, SMOL_NAME, workdir(tmp_path), "Say hello.", "--system-prompt",
                  HELLO_SYSTEM, "--exclude-tools", QWEN_TOOLS,
                  sampling={"max_tokens": HELLO_TOKENS})
    assert result.returncode == 0 and result.stdout.strip()


QWEN_TOOLS = ("agent,task_stop,send_message,skill,list_directory,read_file,grep_search,glob,edit,write_file,"
              "run_shell_command,todo_write,web_fetch,monitor,tool_search")

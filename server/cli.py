"""The ``qwen-serve`` command: flags, ``QWEN_SERVE_*`` variables and ``--config FILE.yaml`` into one Settings."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

import uvicorn
from pydantic import ValidationError
from sse_starlette.sse import AppStatus

from server import __version__
from server.settings import Settings, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-serve", description="OpenAI-compatible inference server for Qwen-family chat models. Every flag "
        "is also a QWEN_SERVE_<FLAG> environment variable and a key of the --config YAML file.")
    parser.add_argument("--version", action="version", version=f"qwen-serve {__version__}")
    parser.add_argument("--config", default=os.environ.get("QWEN_SERVE_CONFIG"),
                        help="YAML file with settings (flags and environment win over it); env QWEN_SERVE_CONFIG")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the memory plan of --model (a local folder: only config.json is read) on one "
                        "CUDA card, this machine's or an sm90 one, and exit")
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.annotation is bool:  # --flag and --no-flag; unset leaves the environment's or the file's value
            default = "on" if field.get_default() else "off"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default: {default})")
        elif name in ("api_key", "open_paths", "cors_origins"):
            parser.add_argument(flag, action="append", help=f"{help_text} (repeatable or comma-separated)")
        else:
            parser.add_argument(flag, help=f"{help_text} (default: {field.get_default(call_default_factory=True)})")
    return parser


def parse_settings(argv: list[str] | None = None) -> Settings:
    return parse_command(argv)[0]


def parse_command(argv: list[str] | None = None) -> tuple[Settings, bool]:
    """The settings, and whether a dry run was asked for."""
    args = vars(build_parser().parse_args(argv))
    config_file, dry_run = args.pop("config"), args.pop("dry_run")
    for key in ("api_key", "open_paths", "cors_origins"):
        if args.get(key):
            args[key] = ",".join(args[key])
    return load_settings(args, config_file), dry_run


def dry_run(settings: Settings) -> None:
    """Print the memory plan of ``settings.model`` on a CUDA card."""
    from engine.dry_run import plan_memory

    if settings.model is None or settings.device not in ("auto", "cuda"):
        sys.exit("qwen-serve: --dry-run plans a --model folder on --device cuda")
    try:
        plan = plan_memory(settings.model, dtype=settings.dtype, max_model_len=settings.max_model_len,
                           kv_cache_memory=settings.kv_cache_memory, kv_cache_dtype=settings.kv_cache_dtype,
                           cuda_int4_kernel=settings.cuda_int4_kernel, max_num_seqs=settings.max_num_seqs,
                           state_snapshots=settings.state_snapshots,
                           speculative_tokens=settings.speculative_tokens)
    except (OSError, ValueError, KeyError) as exc:
        sys.exit(f"qwen-serve: --dry-run: {exc}")
    print("\n".join(plan.lines()))


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT: refuse new work with 503 at once, let running requests finish, then exit 0. A model that
    fails to load, or an engine that fails, stops it too, and the process exits non-zero (a container restarts
    rather than idles)."""

    def handle_exit(self, sig: int, frame) -> None:
        self.config.app.state.qwen.draining = True
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:  # the terminal client
        from server.chat_cli import main as chat

        return chat(argv[1:])
    try:
        settings, plan_only = parse_command(argv)
    except (ValidationError, FileNotFoundError) as exc:
        sys.exit(f"qwen-serve: invalid settings: {exc}")
    if plan_only:
        return dry_run(settings)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.drain_timeout))
    # Draining lets running streams finish (uvicorn cuts them at --drain-timeout), and uvicorn re-raises the
    # signal after its graceful shutdown: a drained SIGTERM is a clean exit for us.
    AppStatus.disable_automatic_graceful_drain()
    signal.signal(signal.SIGTERM, lambda *_: None)
    server = DrainingServer(config)
    state = app.state.qwen
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    server.run()
    if state.failure is not None:
        sys.exit(f"qwen-serve: {state.failure}")


if __name__ == "__main__":
    main()

"""The ``qwen-serve`` command."""

from __future__ import annotations

import argparse

from server import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-serve", description="OpenAI-compatible inference server for Qwen-family chat models."
    )
    parser.add_argument("--version", action="version", version=f"qwen-serve {__version__}")
    return parser


def main(argv: list[str] | None = None) -> None:
    build_parser().parse_args(argv)


if __name__ == "__main__":
    main()

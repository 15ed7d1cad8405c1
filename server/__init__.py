"""The OpenAI-compatible HTTP layer. It knows the OpenAI API and nothing about tensors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qwen-serve")
except PackageNotFoundError:  # running from a checkout that is not installed
    __version__ = "0.0.0+local"

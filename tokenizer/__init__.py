"""Every string <-> token-id rule: vocabularies, ChatML, chat templates, detokenization, stop strings.

This package never imports torch.
"""

from tokenizer.base import Tokenizer
from tokenizer.chat import ChatMessage, Prompt, build_prompt
from tokenizer.detokenize import IncrementalDetokenizer
from tokenizer.hf import HFTokenizer
from tokenizer.qwen import QwenTokenizer
from tokenizer.stop import StopStringMatcher

__all__ = [
    "ChatMessage",
    "HFTokenizer",
    "IncrementalDetokenizer",
    "Prompt",
    "QwenTokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "build_prompt",
]

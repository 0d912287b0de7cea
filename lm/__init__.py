"""The Llama 3 language model: config, model, tokenizer, chat format, checkpoints, generation.

Depends on torch, tiktoken and safetensors only.
"""

from lm.checkpoint import load_pretrained, save_pretrained
from lm.config import PRESETS, LMConfig, RopeScaling
from lm.generate import generate, stream_generate
from lm.model import Transformer
from lm.tokenizer import ChatFormat, Tokenizer

__all__ = [
    "PRESETS",
    "ChatFormat",
    "LMConfig",
    "RopeScaling",
    "Tokenizer",
    "Transformer",
    "generate",
    "load_pretrained",
    "save_pretrained",
    "stream_generate",
]

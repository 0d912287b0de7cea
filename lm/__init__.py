"""The Llama 3 language model: config, model, tokenizer, chat format, checkpoints, generation.

Depends on torch, tiktoken and safetensors only.
"""

import warnings

from lm.checkpoint import load_pretrained, save_pretrained
from lm.config import PRESETS, LMConfig, RopeScaling
from lm.generate import SamplingConfig, generate, stream_generate
from lm.model import Transformer
from lm.tokenizer import ChatFormat, Tokenizer

# `python -m lm.generate` runs a module this package has already imported (for the `generate` function);
# runpy's warning about that is harmless, and the function must stay bound as `lm.generate`.
warnings.filterwarnings("ignore", message="'lm.generate' found in sys.modules", category=RuntimeWarning)

__all__ = [
    "PRESETS",
    "ChatFormat",
    "LMConfig",
    "RopeScaling",
    "SamplingConfig",
    "Tokenizer",
    "Transformer",
    "generate",
    "load_pretrained",
    "save_pretrained",
    "stream_generate",
]

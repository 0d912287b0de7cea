"""The Llama 3 tokenizer (tiktoken BPE, 128K vocabulary) and the Llama 3 chat format.

Token ids equal those of Meta's reference implementation (`llama_models.llama3.tokenizer`)
on the same `tokenizer.model` file; tests/test_tokenizer.py proves it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any, Literal

import tiktoken
from tiktoken.load import load_tiktoken_bpe

__all__ = ["ChatFormat", "MLLAMA_IMAGE_TOKEN_ID", "Tokenizer", "default_tokenizer_path"]

# Llama 3's pre-tokenizer split pattern, verbatim from the reference implementation.
PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_RESERVED_SPECIAL_TOKENS = 256

# Order defines the ids (128000 upward); the reference names the remaining slots
# <|reserved_special_token_2|> ... <|reserved_special_token_245|> (HF's tokenizer.json
# numbers the same slots differently, e.g. 128255 is <|reserved_special_token_247|> there).
NAMED_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
)

# tiktoken's Rust core panics on inputs much over 400K characters, and its regex
# backtracking overflows on very long runs of whitespace or non-whitespace
# (openai/tiktoken#195). The reference cuts input at exactly these limits; matching
# them keeps ids identical to the reference at the cut points too.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000

# Llama 3.2 Vision (and HF Mllama's image_token_index) feeds images to the model as
# id 128256, one past the text vocabulary; the reference ChatFormat remaps <|image|>
# (128011) to it on output. Pass it as ChatFormat(image_token_id=...) for such weights.
MLLAMA_IMAGE_TOKEN_ID = 128256

# Python's re `\s` and str.isspace() agree on every code point (tested), so maximal
# runs found here are the runs the reference finds by walking characters one by one.
_RUN_RE = re.compile(r"\s+|\S+")

_ROLES = frozenset({"system", "user", "assistant", "ipython"})


def default_tokenizer_path() -> Path:
    """Return the path of the Llama 3 `tokenizer.model` shipped in the `llama-models` package."""
    try:
        root = importlib.resources.files("llama_models")
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            "Llama 3 tokenizer not found: the llama-models package (which ships "
            "llama_models/llama3/tokenizer.model) is not installed; pip install llama-models "
            "or pass Tokenizer(path)"
        ) from e
    return Path(str(root / "llama3" / "tokenizer.model"))


def _split_runs(s: str, max_run: int) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive (non-)whitespace characters."""
    # Same cut points as the reference's per-character loop: every `max_run` characters
    # from the start of each over-long run, but found with one regex scan.
    if len(s) <= max_run:
        yield s
        return
    start = 0
    for m in _RUN_RE.finditer(s):
        if m.end() - m.start() > max_run:
            for cut in range(m.start() + max_run, m.end(), max_run):
                yield s[start:cut]
                start = cut
    yield s[start:]


class Tokenizer:
    """Llama 3 tokenizer: tiktoken BPE over 128,000 ranks plus 256 special tokens."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        """Load `path` (default: the `llama-models` package's Llama 3 tokenizer.model)."""
        model_path = Path(path) if path is not None else default_tokenizer_path()
        if not model_path.is_file():
            raise FileNotFoundError(f"Tokenizer model file not found: {model_path}")
        self.path = model_path
        self._sha256 = hashlib.sha256(model_path.read_bytes()).hexdigest()
        # tiktoken caches files by path in a temp dir and, without a hash, would return a
        # stale copy after the file at that path changes; the hash forces a re-read.
        mergeable_ranks = load_tiktoken_bpe(str(model_path), expected_hash=self._sha256)
        num_base = len(mergeable_ranks)

        reserved = [
            f"<|reserved_special_token_{2 + i}|>"
            for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
        ]
        names = list(NAMED_SPECIAL_TOKENS) + reserved
        self._special_tokens: dict[str, int] = {name: num_base + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=model_path.name,
            pat_str=PAT_STR,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self._special_tokens,
        )

        self.n_words: int = num_base + len(names)
        self.bos_id: int = self._special_tokens["<|begin_of_text|>"]
        self.eos_id: int = self._special_tokens["<|end_of_text|>"]
        self.eot_id: int = self._special_tokens["<|eot_id|>"]
        self.eom_id: int = self._special_tokens["<|eom_id|>"]
        self.pad_id: int = self._special_tokens["<|finetune_right_pad_id|>"]
        self.python_tag_id: int = self._special_tokens["<|python_tag|>"]
        self.start_header_id: int = self._special_tokens["<|start_header_id|>"]
        self.end_header_id: int = self._special_tokens["<|end_header_id|>"]
        self.image_id: int = self._special_tokens["<|image|>"]
        # Llama 3 has no audio token. Speech-adapter embeddings replace a placeholder, so we
        # claim the last reserved special token (128255): Meta assigns new special tokens
        # from the front of the reserved range, so the last slot is the least likely to
        # collide with a future official meaning.
        self.audio_id: int = num_base + len(names) - 1
        self.stop_tokens: frozenset[int] = frozenset({self.eos_id, self.eom_id, self.eot_id})

    @property
    def special_tokens(self) -> dict[str, int]:
        """Map special-token text to id (a copy, so callers cannot corrupt the encoder)."""
        return dict(self._special_tokens)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the tokenizer.model file contents, for recording in data manifests."""
        return self._sha256

    @property
    def vocab_size(self) -> int:
        """Alias of `n_words`: base ranks plus special tokens (128,256 for Llama 3)."""
        return self.n_words

    def __len__(self) -> int:
        """Return the vocabulary size."""
        return self.n_words

    def __repr__(self) -> str:
        return f"Tokenizer(path={str(self.path)!r}, n_words={self.n_words})"

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | AbstractSet[str] | None = None,
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Encode `s` to ids; special-token text is plain text unless listed in `allowed_special`."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        if allowed_special is None:
            allowed_special = set()
        ids: list[int] = [self.bos_id] if bos else []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in _split_runs(s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                ids.extend(
                    self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
                )
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        if not isinstance(ids, list):
            # Tensors and arrays: tiktoken needs Python ints.
            ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self.model.decode(ids)

    def decode_token(self, token_id: int) -> bytes:
        """Return the raw bytes of one token, for streaming output that may split characters."""
        return self.model.decode_single_token_bytes(int(token_id))


Message = Mapping[str, Any]


class ChatFormat:
    """Llama 3 chat prompt format: `<|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>`."""

    def __init__(self, tokenizer: Tokenizer, *, image_token_id: int | None = None) -> None:
        """Wrap `tokenizer`; `image_token_id` overrides the id emitted for image items."""
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.image_id if image_token_id is None else image_token_id

    def encode_header(self, message: Message | str) -> list[int]:
        """Encode the header of `message` (or of a bare role name)."""
        role = message if isinstance(message, str) else message["role"]
        # The reference accepts "tool" and writes it as "ipython" in the prompt.
        role = "ipython" if role == "tool" else role
        if role not in _ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {sorted(_ROLES)} or 'tool'")
        tok = self.tokenizer
        return [
            tok.start_header_id,
            *tok.encode(role, bos=False, eos=False),
            tok.end_header_id,
            *tok.encode("\n\n", bos=False, eos=False),
        ]

    def encode_content(self, content: str | Sequence[Any]) -> list[int]:
        """Encode message content (a str or a list of items), stripped of outer whitespace."""
        parts = self._content_parts(content)
        # Strip the content as a whole, like Meta's llama3 reference and HF's chat template
        # (`| trim`); text items next to a media item keep their whitespace.
        while parts and isinstance(parts[0], str):
            parts[0] = parts[0].lstrip()
            if parts[0]:
                break
            parts.pop(0)
        while parts and isinstance(parts[-1], str):
            parts[-1] = parts[-1].rstrip()
            if parts[-1]:
                break
            parts.pop()
        ids: list[int] = []
        for part in parts:
            # Each text item is encoded on its own, as the reference does.
            if isinstance(part, str):
                ids.extend(self.tokenizer.encode(part, bos=False, eos=False))
            else:
                ids.append(part)
        return ids

    def encode_message(self, message: Message) -> list[int]:
        """Encode one message: header, stripped content, then `<|eot_id|>` (or `<|eom_id|>`)."""
        ids = self.encode_header(message)
        ids.extend(self.encode_content(message["content"]))
        # An assistant turn that stopped to call a tool ends in <|eom_id|>, as in the reference.
        eom = message["role"] == "assistant" and message.get("stop_reason") == "end_of_message"
        ids.append(self.tokenizer.eom_id if eom else self.tokenizer.eot_id)
        return ids

    def encode_dialog_prompt(self, dialog: Sequence[Message]) -> list[int]:
        """Encode a dialog as a prompt: bos, every message, then an open assistant header."""
        ids = [self.tokenizer.bos_id]
        for message in dialog:
            ids.extend(self.encode_message(message))
        ids.extend(self.encode_header("assistant"))
        return ids

    def decode_assistant(self, ids: Sequence[int]) -> str:
        """Decode generated assistant ids up to (not including) the first stop token."""
        ids = list(ids) if not hasattr(ids, "tolist") else ids.tolist()
        stops = self.tokenizer.stop_tokens
        end = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        return self.tokenizer.decode(ids[:end])

    def _content_parts(self, content: str | Sequence[Any]) -> list[str | int]:
        """Flatten content into text pieces and special-token ids."""
        items = [content] if isinstance(content, str) else list(content)
        parts: list[str | int] = []
        for item in items:
            if isinstance(item, str):
                parts.append(item)
                continue
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind == "text":
                parts.append(item["text"])
            elif kind == "image":
                parts.append(self.image_token_id)
            elif kind == "audio":
                parts.append(self.tokenizer.audio_id)
            else:
                raise ValueError(f"unsupported content item {item!r}: expected str or type text|image|audio")
        return parts

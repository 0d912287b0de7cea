"""lm.tokenizer against Meta's reference Llama 3 tokenizer and chat format (llama-models package)."""

from __future__ import annotations

import io
import pickle
import random
import re
import sys

import llama_models.datatypes as ref_types
import llama_models.llama3.chat_format as ref_chat
import llama_models.llama3.tokenizer as ref_tokenizer
import pytest

from lm.tokenizer import (
    MAX_NO_WHITESPACES_CHARS,
    MLLAMA_IMAGE_TOKEN_ID,
    ChatFormat,
    Tokenizer,
    _split_runs,
    default_tokenizer_path,
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def ref():
    return ref_tokenizer.Tokenizer(default_tokenizer_path())


TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog. It's 3.14159 -- isn't it? I'll say: 12345678!",
    "chinese": "我们的目标是构建一个能够理解和生成自然语言的大型语言模型。今天天气很好！",
    "emoji": "Hi 👋🏽 family: 👨‍👩‍👧‍👦, flag: 🏳️‍🌈, heart: ❤️‍🔥, keycap 1️⃣ 🇯🇵",
    "code": (
        "def fib(n: int) -> int:\n"
        '    """Return the n-th Fibonacci number."""\n'
        "    if n < 2:\n"
        "        return n\n"
        "\treturn fib(n - 1) + fib(n - 2)\n\n\n"
        "class A:\n    pass\n"
    ),
    "whitespace": " \t lead\r\n\r\n  mid \u00a0\u3000 nbsp\x0b\x0c\n\n\n   trail \t\n   ",
    "special_text": "<|begin_of_text|>hi<|eot_id|><|start_header_id|>user<|end_header_id|><|image|>",
    "mixed": "Ünïcödé façade — naïve café; Ελληνικά; русский; العربية; हिन्दी; 한국어; 日本語",
    "empty": "",
    "long_a": "a" * 100_000,
    "long_space": " " * 100_000,
    "long_newline_mix": ("x" * 30_000 + "\n" * 30_000) * 2,
    "over_chunk": "b" * 420_000 + " tail",
}


@pytest.mark.parametrize("name", list(TEXTS))
def test_ids_equal_reference(tok: Tokenizer, ref, name: str) -> None:
    text = TEXTS[name]
    for bos, eos in [(False, False), (True, True)]:
        ids = tok.encode(text, bos=bos, eos=eos)
        assert ids == ref.encode(text, bos=bos, eos=eos)
    assert tok.decode(tok.encode(text, bos=False, eos=False)) == text


def test_special_text_is_plain_by_default(tok: Tokenizer, ref) -> None:
    text = TEXTS["special_text"]
    ids = tok.encode(text, bos=False, eos=False)
    assert not set(ids) & set(tok.special_tokens.values())
    allowed = tok.encode(text, bos=False, eos=False, allowed_special="all")
    assert allowed == ref.encode(text, bos=False, eos=False, allowed_special="all")
    assert allowed[0] == 128000 and allowed[-1] == tok.image_id
    subset = tok.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert subset == ref.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"})
    assert tok.eot_id in subset and tok.bos_id not in subset
    with pytest.raises(ValueError):
        tok.encode(text, bos=False, eos=False, disallowed_special="all")


def test_random_texts_equal_reference(tok: Tokenizer, ref) -> None:
    rng = random.Random(0)
    alphabet = "ab \n\t\u00a0.,'!9é中🙂\u200d"
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 80)))
        assert tok.encode(text, bos=False, eos=False) == ref.encode(text, bos=False, eos=False)


def test_split_runs_matches_reference_splitter() -> None:
    rng = random.Random(1)
    split_ref = ref_tokenizer.Tokenizer._split_whitespaces_or_nonwhitespaces
    for _ in range(500):
        text = "".join(rng.choice("a b\n\u3000x") for _ in range(rng.randrange(0, 40)))
        for max_run in (1, 2, 3, 5):
            assert list(_split_runs(text, max_run)) == list(split_ref(text, max_run))
    long = "q" * (3 * MAX_NO_WHITESPACES_CHARS + 7) + " " * (MAX_NO_WHITESPACES_CHARS + 1)
    assert list(_split_runs(long, MAX_NO_WHITESPACES_CHARS)) == list(split_ref(long, MAX_NO_WHITESPACES_CHARS))


def test_regex_whitespace_equals_isspace() -> None:
    # _split_runs relies on re's \s agreeing with str.isspace on every code point.
    every = "".join(map(chr, range(sys.maxunicode + 1)))
    by_regex = [m.start() for m in re.finditer(r"\s", every)]
    assert by_regex == [i for i, c in enumerate(every) if c.isspace()]


def test_special_token_ids_equal_reference(tok: Tokenizer, ref) -> None:
    assert tok.special_tokens == ref.special_tokens
    assert tok.n_words == ref.n_words == 128_256
    for name in ("bos_id", "eos_id", "eot_id", "eom_id", "pad_id", "python_tag_id"):
        assert getattr(tok, name) == getattr(ref, name), name
    assert (tok.bos_id, tok.eos_id, tok.eom_id, tok.eot_id) == (128000, 128001, 128008, 128009)
    assert tok.stop_tokens == set(ref.stop_tokens) == {128001, 128008, 128009}
    assert tok.image_id == ref.special_tokens["<|image|>"] == 128011
    # The audio placeholder is the last reserved special token.
    assert tok.audio_id == 128_255
    assert tok.special_tokens["<|reserved_special_token_245|>"] == tok.audio_id


def test_decode_helpers(tok: Tokenizer) -> None:
    ids = tok.encode("héllo 🙂", bos=False, eos=False)
    assert b"".join(tok.decode_token(i) for i in ids).decode("utf-8") == "héllo 🙂"
    assert tok.decode(tuple(ids)) == "héllo 🙂"
    assert tok.decode([tok.bos_id]) == "<|begin_of_text|>"


def test_sha256_and_pickle(tok: Tokenizer) -> None:
    import hashlib

    assert tok.sha256 == hashlib.sha256(default_tokenizer_path().read_bytes()).hexdigest()
    clone = pickle.loads(pickle.dumps(tok))
    text = "pickled text"
    assert clone.encode(text, bos=True, eos=False) == tok.encode(text, bos=True, eos=False)


def test_missing_path_raises(tmp_path) -> None:
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Tokenizer(missing)


def test_explicit_path_equals_default(tok: Tokenizer) -> None:
    other = Tokenizer(str(default_tokenizer_path()))
    assert other.sha256 == tok.sha256
    assert other.encode(TEXTS["code"], bos=True, eos=True) == tok.encode(TEXTS["code"], bos=True, eos=True)


DIALOG = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "2+2 equals 4."},
    {"role": "user", "content": "And 3+3? Answer in one word."},
]

PROMPT = (
    "<|begin_of_text|>"
    "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n2+2 equals 4.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3? Answer in one word.<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def _ref_messages(dialog):
    return [ref_types.RawMessage(role=m["role"], content=m["content"]) for m in dialog]


def test_dialog_equals_reference_chat_format(tok: Tokenizer, ref) -> None:
    ids = ChatFormat(tok).encode_dialog_prompt(DIALOG)
    assert ids == ref_chat.ChatFormat(ref).encode_dialog_prompt(_ref_messages(DIALOG)).tokens


def test_dialog_equals_published_prompt_format(tok: Tokenizer) -> None:
    ids = ChatFormat(tok).encode_dialog_prompt(DIALOG)
    assert tok.decode(ids) == PROMPT
    # Tokenizing the rendered template (as HF chat templates do) gives the same ids here.
    assert tok.encode(PROMPT, bos=False, eos=False, allowed_special="all") == ids


def test_message_content_is_stripped(tok: Tokenizer, ref) -> None:
    fmt = ChatFormat(tok)
    padded = [{"role": m["role"], "content": f"  \n{m['content']}\n "} for m in DIALOG]
    assert fmt.encode_dialog_prompt(padded) == fmt.encode_dialog_prompt(DIALOG)
    listed = [{"role": "user", "content": [" \n", {"type": "text", "text": " What is 2+2? "}]}]
    assert fmt.encode_dialog_prompt(listed) == fmt.encode_dialog_prompt([DIALOG[1]])


def test_headers_and_roles(tok: Tokenizer, ref) -> None:
    fmt, ref_fmt = ChatFormat(tok), ref_chat.ChatFormat(ref)
    for role in ("system", "user", "assistant", "ipython"):
        assert fmt.encode_header({"role": role, "content": ""}) == ref_fmt._encode_header(role)
    assert fmt.encode_header("tool") == fmt.encode_header("ipython")
    tool_msg = {"role": "tool", "content": '{"result": 42}'}
    assert (
        fmt.encode_message(tool_msg)
        == ref_fmt.encode_message(ref_types.RawMessage(**tool_msg), ref_types.ToolPromptFormat.json)[0]
    )
    eom = {"role": "assistant", "content": "calling", "stop_reason": "end_of_message"}
    assert fmt.encode_message(eom)[-1] == tok.eom_id
    with pytest.raises(ValueError, match="unknown role"):
        fmt.encode_header("narrator")


def test_image_and_audio_items(tok: Tokenizer, ref) -> None:
    from PIL import Image

    fmt = ChatFormat(tok)
    content = [{"type": "image"}, "Describe this.", {"type": "text", "text": " And this:"}, {"type": "audio"}]
    ids = fmt.encode_message({"role": "user", "content": content})
    assert ids.count(tok.image_id) == 1 and ids.count(tok.audio_id) == 1
    assert ids[len(fmt.encode_header("user"))] == tok.image_id
    assert ids[-2] == tok.audio_id

    # Against the reference, which emits Mllama's image id (128256) in its model input.
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    image_item = ref_types.RawMediaItem(data=png.getvalue())
    ref_dialog = [ref_types.RawMessage(role="user", content=[image_item, ref_types.RawTextItem(text="Describe this.")])]
    ref_ids = ref_chat.ChatFormat(ref).encode_dialog_prompt(ref_dialog).tokens
    ours = ChatFormat(tok, image_token_id=MLLAMA_IMAGE_TOKEN_ID).encode_dialog_prompt(
        [{"role": "user", "content": [{"type": "image"}, "Describe this."]}]
    )
    assert ours == ref_ids and MLLAMA_IMAGE_TOKEN_ID in ours
    with pytest.raises(ValueError, match="unsupported content item"):
        fmt.encode_content([{"type": "video"}])


def test_decode_assistant(tok: Tokenizer) -> None:
    fmt = ChatFormat(tok)
    reply = tok.encode("Six.", bos=False, eos=False)
    assert fmt.decode_assistant(reply + [tok.eot_id, 99, 100]) == "Six."
    assert fmt.decode_assistant(reply + [tok.eom_id]) == "Six."
    assert fmt.decode_assistant(reply) == "Six."

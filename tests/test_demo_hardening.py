"""The demo is shared by many users: nothing one of them sends may take it down. Media bombs, generations that
overlap or are stopped, bad settings and prompts, unexpected failures and a damaged model directory are each
answered with a reason (in the chat, or at start-up) while the demo goes on serving."""

from __future__ import annotations

from pathlib import Path

import pytest

from demo.app import (
    ERROR_PREFIX,
    GENERATION_QUEUE,
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARACTERS,
    UPLOAD_CLEANUP,
    DemoChat,
    Settings,
    build_app,
    main,
)
from tests.test_demo import build_tiny_model

GREEDY = Settings(temperature=0.0, top_p=1.0, max_new_tokens=6, prompt_format="completion")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, single_thread):
    """A tiny random model and the directory it is saved in (mm/ beside the lm/ it names)."""
    return build_tiny_model(tmp_path_factory.mktemp("hardening"))


@pytest.fixture(scope="module")
def chat(tiny) -> DemoChat:
    """The demo's answering side over the tiny model (no server)."""
    mm, path = tiny
    return DemoChat(mm, path)


@pytest.fixture(scope="module")
def saved(tiny) -> Path:
    """The folder holding the tiny model's mm/ and lm/ checkpoints."""
    return tiny[1].parent


def answer(chat: DemoChat, text: str, settings: Settings = GREEDY) -> str:
    """The whole answer to one text message in a new conversation."""
    return list(chat.stream(text, [], settings))[-1]


# ---- one generation at a time -------------------------------------------------------------------------------


def test_interleaved_generations_each_equal_their_solo_answer(chat):
    """Two answers stepped alternately (as two users' requests would run if they overlapped) each equal the
    answer given alone: neither overwrites the other's KV cache on the shared model."""
    solo = {text: answer(chat, text) for text in ("A small red circle", "Two blue squares")}
    first, second = (chat.stream(text, [], GREEDY) for text in solo)
    answers = dict.fromkeys(solo, "")
    pending = {"A small red circle": first, "Two blue squares": second}
    while pending:
        for text, stream in list(pending.items()):
            try:
                answers[text] = next(stream)
            except StopIteration:
                del pending[text]
    assert answers == solo and all(solo.values())


def test_a_stopped_generation_closed_later_leaves_the_next_answer_intact(chat):
    """A user stops an answer after two pieces; another's request starts; the stopped generator is closed only
    then (as a server may close it late): the other answer is still its solo answer."""
    expected = answer(chat, "Two blue squares")
    stopped = chat.stream("A small red circle", [], GREEDY)
    next(stopped), next(stopped)
    other = chat.stream("Two blue squares", [], GREEDY)
    first = next(other)
    stopped.close()
    assert [first, *other][-1] == expected


def test_every_generating_event_shares_one_queue(chat, tmp_path):
    """The page's submit (and retry, examples) and the /chat API event sit in one Gradio concurrency group with
    limit 1, so a browser user and an API client never generate at the same time."""
    app = build_app(chat, tmp_path / "examples")
    generating = [fn for fn in app.fns.values() if getattr(fn.fn, "__wrapped__", None) == chat.respond]
    assert len({id(fn.fn) for fn in generating}) >= 2  # the page's wrapper and the API's
    assert {(fn.concurrency_id, fn.concurrency_limit) for fn in generating} == {(GENERATION_QUEUE, 1)}
    assert any(fn.api_name == "chat" for fn in generating)


# ---- settings and prompts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "top_p", "max_new_tokens", "reason"),
    [
        (float("nan"), 0.9, 8, "settings: temperature must be a finite number >= 0, got nan"),
        (float("inf"), 0.9, 8, "settings: temperature must be a finite number >= 0, got inf"),
        (-0.5, 0.9, 8, "settings: temperature must be a finite number >= 0, got -0.5"),
        (0.6, float("nan"), 8, "settings: top_p must be in (0, 1] (or None), got nan"),
        (0.6, -1.0, 8, "settings: top_p must be in (0, 1] (or None), got -1.0"),
        (0.6, 0.9, 2.5, f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got 2.5"),
        (0.6, 0.9, 10**9, f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got 1000000000"),
        (0.6, 0.9, float("inf"), f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got inf"),
        (0.6, 0.9, 0, f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS:,}, got 0"),
        ("warm", 0.9, 8, "temperature must be a number, got 'warm'"),
        (0.6, None, 8, "top-p must be a number, got None"),
    ],
)
def test_bad_settings_from_the_api_are_answered_with_the_reason(chat, temperature, top_p, max_new_tokens, reason):
    """Settings the page's sliders would not send (NaN, inf, negative, fractional or huge) arrive through the
    /chat API as the ChatInterface function's inputs: the answer is one message with the reason."""
    got = list(chat.respond("A small red circle", [], temperature, top_p, max_new_tokens, "completion"))
    assert got == [ERROR_PREFIX + reason]


def test_good_settings_from_the_api_are_taken_as_the_page_sends_them(chat):
    """Whole-number floats and numeric strings (as JSON clients send them) are accepted; the answer equals the
    same settings given directly."""
    got = list(chat.respond("A small red circle", [], "0", 1, 6.0, "completion"))[-1]
    assert got == answer(chat, "A small red circle") and not got.startswith(ERROR_PREFIX)
    assert list(chat.respond("hi", [], 0.0, 1.0, 6, "poetry")) == [
        ERROR_PREFIX + "prompt format 'poetry': choose one of completion, chat"
    ]


def test_huge_prompts_are_refused_before_tokenising_and_empty_ones_answered(chat, monkeypatch):
    """A 3 MB message, or a conversation whose history adds up to more than MAX_PROMPT_CHARACTERS, is refused
    without being tokenised; an empty message is answered with what to send."""
    tokenised = []
    encode = chat.mm.tokenizer.encode
    monkeypatch.setattr(
        chat.mm.tokenizer, "encode", lambda text, **kw: tokenised.append(len(text)) or encode(text, **kw)
    )
    huge = "the red circle " * 200_000
    refused = list(chat.stream(huge, [], GREEDY))
    assert refused == [
        ERROR_PREFIX + f"the conversation's text is {len(huge):,} characters; the demo takes up to "
        f"{MAX_PROMPT_CHARACTERS:,}: shorten the message or clear the conversation"
    ]
    half = "x" * (MAX_PROMPT_CHARACTERS // 2 + 1)
    history = [{"role": "user", "content": half}, {"role": "assistant", "content": half}]
    chat_settings = Settings(0.0, 1.0, 4, "chat")
    assert list(chat.stream("and?", history, chat_settings))[0].startswith(ERROR_PREFIX + "the conversation's text is")
    assert tokenised == []
    assert list(chat.stream({"text": "", "files": []}, [], GREEDY)) == [
        ERROR_PREFIX + "the message is empty: type some text or upload a file"
    ]


# ---- unexpected failures and uploads ------------------------------------------------------------------------


def test_an_unexpected_failure_is_a_short_message_and_the_next_request_works(chat, monkeypatch, caplog):
    """A generate() that raises (here after its first piece) is answered with a short message naming the kind of
    failure, no traceback, logged on the server; the next message is answered as usual."""
    generate = chat.mm.generate

    def failing(*args, **kwargs):
        yield "A"
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(chat.mm, "generate", failing)
    got = list(chat.respond("A small red circle", [], 0.0, 1.0, 6, "completion"))
    assert got[-1] == (
        ERROR_PREFIX + "the demo failed while answering (RuntimeError); it goes on serving: send the message "
        "again, or start a new chat"
    )
    assert "illegal memory access" in caplog.text  # the server's log keeps the detail
    monkeypatch.setattr(chat.mm, "generate", generate)
    assert answer(chat, "A small red circle") == list(chat.respond("A small red circle", [], 0, 1, 6, "completion"))[-1]
    assert not answer(chat, "A small red circle").startswith(ERROR_PREFIX)


def test_uploads_are_deleted_after_a_day(chat, tmp_path):
    """The app asks Gradio to delete its cached uploads: hourly, those older than a day."""
    app = build_app(chat, tmp_path / "examples")
    assert app.delete_cache == UPLOAD_CLEANUP == (3600, 86400)


# ---- a damaged model directory ------------------------------------------------------------------------------


def _halved(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("damaged", "damage"),
    [
        ("mm/vision_adapter/model.safetensors", _halved),
        ("mm/llama3mm.json", lambda data: b'{"format": "llama3mm",'),
        ("mm/speech_encoder/config.json", lambda data: b"{dim: 64}"),
        ("lm/model.safetensors", _halved),
        ("lm/config.json", lambda data: b"\xff\xfe not json"),
    ],
)
def test_a_damaged_checkpoint_stops_the_demo_naming_the_file(saved, tmp_path, damaged, damage):
    """A truncated safetensors part or a malformed JSON file, in a Llama3MM checkpoint or a bare LM checkpoint,
    stops main() at start-up with exit code 1 and a message naming the file: no traceback from a library."""
    import os
    import shutil

    part = damaged.split("/")[0]  # mm/ names the original lm/ (an absolute path), so one folder is copied
    checkpoint = tmp_path / part
    shutil.copytree(saved / part, checkpoint, copy_function=os.symlink)  # links: the LM is 66 MB
    target = tmp_path / damaged
    data = target.read_bytes()
    target.unlink()  # the link, not the original
    target.write_bytes(damage(data))
    with pytest.raises(SystemExit) as stopped:
        main(["--checkpoint", str(checkpoint)])
    message = str(stopped.value.code)
    assert message.startswith(f"--checkpoint {checkpoint}: cannot load it: {target} is damaged")
    assert "Traceback" not in message and len(message) < 400

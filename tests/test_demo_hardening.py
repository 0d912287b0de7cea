"""The demo is shared by many users: nothing one of them sends may take it down. Media bombs, generations that
overlap or are stopped, bad settings and prompts, unexpected failures and a damaged model directory are each
answered with a reason (in the chat, or at start-up) while the demo goes on serving."""

from __future__ import annotations

import pytest

from demo.app import GENERATION_QUEUE, DemoChat, Settings, build_app
from tests.test_demo import build_tiny_model

GREEDY = Settings(temperature=0.0, top_p=1.0, max_new_tokens=6, prompt_format="completion")


@pytest.fixture(scope="module")
def chat(tmp_path_factory, single_thread) -> DemoChat:
    """The demo's answering side over a tiny random model (no server)."""
    mm, path = build_tiny_model(tmp_path_factory.mktemp("hardening"))
    return DemoChat(mm, path)


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

"""train.posttrain.heldout: the graded held-out accuracy, overall and per kind of question."""

from __future__ import annotations

import pytest

from data.instruct import make_dialogs
from lm.tokenizer import ChatFormat, Tokenizer
from train.posttrain import heldout
from train.posttrain.heldout import HeldOutGrader, graded_accuracy


def test_accuracy_per_kind(monkeypatch):
    """Answers right for every scene question and wrong for every sum: the per-kind figures say which."""
    rows = make_dialogs(40, seed=3)
    chat = ChatFormat(Tokenizer())
    answers = iter([row["messages"][-1]["content"] if row["kind"] != "math" else "It is 1234567." for row in rows])

    def fake_generate(model, tokenizer, prompts, **settings):
        return [tokenizer.encode(next(answers), bos=False, eos=False) for _ in prompts]

    monkeypatch.setattr(heldout, "generate", fake_generate)
    result = graded_accuracy(None, chat, rows, max_new_tokens=8)
    kinds = [row["kind"] for row in rows]
    assert result["eval/accuracy"] == pytest.approx(1 - kinds.count("math") / len(rows))
    assert {key: result[key] for key in result if key.startswith("eval/accuracy/")} == {
        "eval/accuracy/colour": 1.0,
        "eval/accuracy/shape": 1.0,
        "eval/accuracy/count": 1.0,
        "eval/accuracy/relation": 1.0,
        "eval/accuracy/math": 0.0,
        "eval/accuracy/translation": 1.0,
    }
    grader = HeldOutGrader.__new__(HeldOutGrader)  # the names only: no model needed
    grader.rows = [row for row in rows if row["kind"] in ("count", "math")]
    assert grader.metric_names == [
        "eval/accuracy",
        "eval/chance",
        "eval/stopped",
        "eval/accuracy/count",
        "eval/accuracy/math",
    ]


def test_stop_rate_counts_answers_that_ended_within_the_budget(monkeypatch):
    """generate returns no stop token: an answer shorter than max_new_tokens stopped, one that fills it did not."""
    rows = make_dialogs(8, seed=5)
    chat = ChatFormat(Tokenizer())
    lengths = iter([3, 8, 7, 8, 1, 8, 8, 2])

    def fake_generate(model, tokenizer, prompts, **settings):
        assert settings["max_new_tokens"] == 8
        return [[tokenizer.encode(" no", bos=False, eos=False)[0]] * next(lengths) for _ in prompts]

    monkeypatch.setattr(heldout, "generate", fake_generate)
    assert graded_accuracy(None, chat, rows, max_new_tokens=8)["eval/stopped"] == 4 / 8

"""Rejection sampling (`train/rejection.py`): the reward model's choice among K seeded samples, recorded so it can be
checked, the same on 1 and 2 ranks, written as SFT and preference data the other stages read back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from data.chat import ChatDataError, read_dialogs
from data.instruct import grade, make_dialogs
from data.preference import encode_answer, read_preferences
from lm import LMConfig, Transformer, load_pretrained, save_pretrained
from lm.generate import generate
from lm.reward import score_sequences
from lm.tokenizer import ChatFormat, Tokenizer
from tests.dist_utils import torchrun
from train import rejection
from train.rejection import (
    RejectionSamplingConfig,
    choose,
    preference_rows,
    read_prompts,
    rejection_sample,
    write_outputs,
)

K, NEW_TOKENS = 4, 6


@pytest.fixture(scope="module")
def chat():
    return ChatFormat(Tokenizer())


def _tiny(seed: int, **overrides) -> Transformer:
    """A random tiny Llama 3 with the whole Llama 3 vocabulary (the chat format's special tokens included)."""
    torch.manual_seed(seed)
    model = Transformer(LMConfig.from_preset("debug", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, **overrides))
    model.init_weights()
    return model.eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A policy, a reward model and 7 prompts: graded dialogs (one and two turns) and an ungraded prompt."""
    root = tmp_path_factory.mktemp("rejection")
    save_pretrained(_tiny(0), root / "policy")
    save_pretrained(_tiny(1, num_labels=1), root / "reward")
    rows = make_dialogs(6, seed=1) + [{"messages": [{"role": "user", "content": "Say something."}]}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _argv(root, out, *extra):
    return [
        "--policy", str(root / "policy"),
        "--reward", str(root / "reward"),
        f"--run.dir={out}",
        f"--data.files={root / 'prompts.jsonl'}",
        f"--sampling.samples={K}",
        f"--sampling.max_new_tokens={NEW_TOKENS}",
        f"--sampling.batch_size={2 * K}",  # 4 batches of 2 prompts: both ranks sample
        "--sampling.seed=3",
        "--sampling.require_stop=false",  # a random policy seldom stops
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(setup):
    """The same rejection run on 1 and on 2 ranks."""
    dirs = {}
    for nproc in (1, 2):
        dirs[nproc] = setup / f"rs{nproc}"
        proc = torchrun("train/rejection.py", nproc, _argv(setup, dirs[nproc]), timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        assert "prompts/s" in proc.stdout + proc.stderr
    return dirs


def _records(out):
    return [json.loads(line) for line in (out / rejection.SAMPLES_FILE).read_text().splitlines()]


def _check_summary(summary):
    """Best-of-K by the reward model never beats best-of-K by the grader (it picks among the same answers)."""
    assert summary["accuracy_best_of_k_reward"] <= summary["accuracy_best_of_k_oracle"]
    assert summary["accuracy_one_sample"] <= summary["accuracy_best_of_k_oracle"]


def test_one_and_two_ranks_give_the_same_outputs(runs):
    for name in (rejection.SAMPLES_FILE, rejection.SFT_FILE, rejection.PREFERENCE_FILE):
        assert (runs[1] / name).read_text() == (runs[2] / name).read_text(), name
    summaries = [json.loads((runs[n] / rejection.SUMMARY_FILE).read_text()) for n in (1, 2)]
    for summary in summaries:
        _check_summary(summary)
        del summary["wall_s"], summary["prompts_per_s"]
    assert summaries[0] == summaries[1]
    assert summaries[0]["prompts"] == 7 and summaries[0]["graded_prompts"] == 6
    assert summaries[0]["samples_per_prompt"] == K


def test_the_choice_is_the_best_recorded_reward_and_each_reward_is_the_reward_models(setup, runs, chat):
    reward = load_pretrained(setup / "reward")
    records = _records(runs[1])
    assert [r["index"] for r in records] == list(range(7))
    for record in records:
        samples = record["samples"]
        assert len(samples) == K and len({s["text"] for s in samples}) > 1
        rewards = [s["reward"] for s in samples]
        assert record["chosen"] == max(range(K), key=lambda i: rewards[i])
        rows = [encode_answer(record["prompt"], s["text"], chat, 10_000).ids for s in samples]
        torch.testing.assert_close(torch.tensor(rewards), score_sequences(reward, rows), rtol=1e-5, atol=1e-6)
        for s in samples:
            assert s["stopped"] == (s["tokens"] < NEW_TOKENS)
            assert s.get("grade") == (grade(record["kind"], s["text"], record["answer"]) if "kind" in record else None)
    assert "kind" not in records[-1] and records[-1]["prompt"][-1]["content"] == "Say something."
    # A two-turn dialog's prompt keeps its first answer and drops the last.
    assert any(len(r["prompt"]) > 2 and r["prompt"][-2]["role"] == "assistant" for r in records)


def test_sampling_is_seeded_per_prompt(setup, runs, chat, single_thread):
    """The samples come back from the seed, whichever prompts share the batch; another seed draws others."""
    policy, reward = load_pretrained(setup / "policy"), load_pretrained(setup / "reward")
    prompts = read_prompts([setup / "prompts.jsonl"], chat, max_prompt_tokens=2048)
    recorded = [[s["text"] for s in r["samples"]] for r in _records(runs[1])]

    def texts(subset, **settings):
        cfg = RejectionSamplingConfig(samples=K, max_new_tokens=NEW_TOKENS, require_stop=False, **settings)
        records = rejection_sample(policy, reward, chat, subset, cfg)
        return [[s["text"] for s in r["samples"]] for r in records]

    # Prompts 5 and 1 in one batch: each equals its recorded samples, drawn beside prompt 0 or 4.
    assert texts([prompts[5], prompts[1]], seed=3, batch_size=2 * K) == [recorded[5], recorded[1]]
    assert texts([prompts[1]], seed=4, batch_size=K)[0] != recorded[1]
    tokens = generate(policy, None, [prompts[0].ids] * 2, max_new_tokens=3, temperature=1.0, row_seeds=(7, 7))
    assert tokens[0] == tokens[1]
    with pytest.raises(ValueError, match="row_seeds has 1 seeds for a batch of 2"):
        generate(policy, None, [prompts[0].ids] * 2, max_new_tokens=2, temperature=1.0, row_seeds=(7,))


def test_outputs_read_back_as_sft_and_preference_data(setup, chat, tmp_path, single_thread):
    """With a stand-in annotator marking some answers right, each graded prompt with a right and a wrong answer
    gives a pair (the best-rewarded of each), and the chosen answers are SFT dialogs. The annotator is shown each
    prompt's question."""
    policy, reward = load_pretrained(setup / "policy"), load_pretrained(setup / "reward")
    prompts = read_prompts([setup / "prompts.jsonl"], chat, max_prompt_tokens=2048)
    cfg = RejectionSamplingConfig(samples=K, max_new_tokens=NEW_TOKENS, require_stop=False, batch_size=4 * K)
    questions = []

    def annotator(kind: str, text: str, answer: str, question: str) -> bool:
        questions.append(question)
        return "e" in text

    records = rejection_sample(policy, reward, chat, prompts, cfg, grader=annotator)
    graded = [p.messages[-1]["content"] for p in prompts if p.kind is not None]
    assert questions == [q for q in graded for _ in range(K)]
    summary = write_outputs(tmp_path, records, cfg)
    _check_summary(summary)
    dialogs, _ = read_dialogs([tmp_path / rejection.SFT_FILE], chat, max_tokens=2048)
    assert len(dialogs) == summary["sft_rows"] == 7
    pairs, _ = read_preferences([tmp_path / rejection.PREFERENCE_FILE], chat, max_tokens=2048)
    rows = [json.loads(line) for line in (tmp_path / rejection.PREFERENCE_FILE).read_text().splitlines()]
    mixed = [r for r in records if "kind" in r and len({s["grade"] for s in r["samples"]}) == 2]
    assert len(pairs) == len(rows) == len(mixed) == summary["preference_pairs"] > 0
    for row, record in zip(rows, mixed, strict=True):
        for key, right in (("chosen", True), ("rejected", False)):
            group = [s for s in record["samples"] if s["grade"] == right]
            assert row[key] == max(group, key=lambda s: s["reward"])["text"]


def test_without_a_reward_model_the_answers_are_graded_into_pairs_and_skip_keeps_their_seeds(
    setup, runs, chat, tmp_path, single_thread
):
    """The rounds' preference collection: no reward model, nothing chosen, the first right and the first wrong
    answer of each graded prompt a pair; prompts after ``data.skip`` draw what they drew in a run over all."""
    argv = _argv(setup, tmp_path / "collect", "--models.reward=", "--data.skip=2", "--data.limit=3")
    del argv[argv.index("--reward") : argv.index("--reward") + 2]
    summary = rejection.main(argv)
    records = _records(tmp_path / "collect")
    assert [r["index"] for r in records] == [2, 3, 4]
    everything = _records(runs[1])
    for record in records:
        assert [s["text"] for s in record["samples"]] == [s["text"] for s in everything[record["index"]]["samples"]]
        assert record["chosen"] is None and all(s["reward"] is None for s in record["samples"])
    assert summary["accuracy_best_of_k_reward"] is None and summary["sft_rows"] == 0
    assert (tmp_path / "collect" / rejection.SFT_FILE).read_text() == ""

    policy = load_pretrained(setup / "policy")
    prompts = read_prompts([setup / "prompts.jsonl"], chat, max_prompt_tokens=2048)
    cfg = RejectionSamplingConfig(samples=K, max_new_tokens=NEW_TOKENS, require_stop=False, batch_size=4 * K)
    records = rejection_sample(policy, None, chat, prompts, cfg, grader=lambda *args: "e" in args[1])
    summary = write_outputs(tmp_path / "pairs", records, cfg)
    rows = [json.loads(line) for line in (tmp_path / "pairs" / rejection.PREFERENCE_FILE).read_text().splitlines()]
    mixed = [r for r in records if "kind" in r and len({s["grade"] for s in r["samples"]}) == 2]
    assert len(rows) == len(mixed) == summary["preference_pairs"] > 0
    for row, record in zip(rows, mixed, strict=True):
        assert row["chosen"] == next(s["text"] for s in record["samples"] if s["grade"])
        assert row["rejected"] == next(s["text"] for s in record["samples"] if not s["grade"])


def test_every_pair_sets_each_distinct_right_answer_against_each_distinct_wrong_one():
    """``sampling.pairs = "all"``: a repeated answer gives its pairs once, an answer that did not stop none, and a
    prompt without a right answer none; "best" keeps one pair a prompt (the first of each, with no rewards)."""

    def sample(text, grade, stopped=True):
        return {"text": text, "grade": grade, "stopped": stopped, "reward": None}

    prompt = [{"role": "user", "content": "2 + 2?"}]
    records = [
        {"prompt": prompt, "kind": "math", "answer": "4", "samples": [
            sample("4", True), sample("5", False), sample("four", True), sample("5", False), sample("3", False),
            sample("4", True), sample("6", False, stopped=False),
        ]},
        {"prompt": prompt, "kind": "math", "answer": "4", "samples": [sample("5", False), sample("3", False)]},
        {"prompt": prompt, "samples": [sample("4", True), sample("5", False)]},  # ungraded: no kind
    ]  # fmt: skip
    rows = preference_rows(records, require_stop=True, every_pair=True)
    pairs = [(row["chosen"], row["rejected"]) for row in rows]
    assert pairs == [("4", "5"), ("4", "3"), ("four", "5"), ("four", "3")]
    assert all(row["prompt_messages"] == prompt and row["kind"] == "math" and row["answer"] == "4" for row in rows)
    assert [(r["chosen"], r["rejected"]) for r in preference_rows(records, require_stop=True)] == [("4", "5")]
    everything = preference_rows(records, require_stop=False, every_pair=True)
    assert len(everything) == 2 * 3 and ("four", "6") in [(r["chosen"], r["rejected"]) for r in everything]


def test_the_choice_skips_answers_that_did_not_stop_or_could_not_be_scored():
    samples = [
        {"reward": 3.0, "stopped": False},
        {"reward": None, "stopped": True},
        {"reward": 1.0, "stopped": True},
        {"reward": 2.0, "stopped": True},
    ]
    assert choose(samples, require_stop=True) == 3
    assert choose(samples, require_stop=False) == 0
    assert choose(samples[:2], require_stop=True) is None


def test_the_reward_models_ordering_of_right_against_wrong_answers_counts_each_distinct_answer_once():
    def sample(text, reward, grade):
        return {"text": text, "reward": reward, "grade": grade, "stopped": True, "tokens": 3}

    records = [
        # Distinct answers: right "a" (2.0); wrong "b" (1.0, drawn twice), "c" (3.0), "d" (2.0, a tie).
        {"kind": "math", "chosen": 2, "samples": [sample("a", 2.0, True), sample("b", 1.0, False),
                                                   sample("c", 3.0, False), sample("b", 1.0, False),
                                                   sample("d", 2.0, False)]},
        # Only right answers, and an unscored wrong one: no pair.
        {"kind": "math", "chosen": 0, "samples": [sample("e", 0.0, True), sample("f", None, False)]},
        {"kind": "math", "chosen": 0, "samples": [sample("g", 5.0, True), sample("h", -1.0, False)]},
    ]  # fmt: skip
    summary = rejection.summarize(records, samples=5)
    assert summary["reward_pair_accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert rejection.summarize(records[1:2], samples=2)["reward_pair_accuracy"] is None


def test_bad_input_names_file_and_line(setup, tmp_path, chat, capsys):
    good = {"messages": [{"role": "user", "content": "Hi"}]}
    for bad, reason in (
        ({"prompt": "Hi"}, "no 'messages'"),
        ({**good, "kind": "colour"}, "both 'kind' and 'answer'"),
        ({**good, "kind": "size", "answer": "big"}, "not one of"),
        ({"messages": [{"role": "assistant", "content": "Hi"}]}, "no prompt before its answer"),
    ):
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(ChatDataError, match=f"bad.jsonl:2: .*{reason}"):
            read_prompts([path], chat, max_prompt_tokens=2048)
    with pytest.raises(SystemExit):
        rejection.main(_argv(setup, tmp_path / "out", f"--data.files={tmp_path / 'missing.jsonl'}"))
    assert "missing.jsonl" in capsys.readouterr().err


def test_a_finished_run_is_skipped_unless_overwritten(setup, runs, tmp_path, single_thread):
    out = shutil.copytree(runs[1], tmp_path / "run")
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary = rejection.main(_argv(setup, out))
    assert summary == json.loads((out / rejection.SUMMARY_FILE).read_text())
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    rejection.main(_argv(setup, out, "--overwrite"))
    assert (out / rejection.SAMPLES_FILE).stat().st_mtime_ns != stamps[rejection.SAMPLES_FILE]
    assert _records(out) == _records(runs[1])


def test_the_configs_parse():
    """The tiny config and the 8B one (K within the paper's 10 to 30)."""
    from train.config import load_config

    tiny = load_config(rejection.RejectionConfig, "configs/posttrain/rejection_tiny.toml")
    assert tiny.models.reward == "runs/posttrain/reward_tiny/hf" and tiny.sampling.samples == 8
    large = load_config(rejection.RejectionConfig, "configs/posttrain/rejection_llama3_8b.toml")
    assert 10 <= large.sampling.samples <= 30 and large.models.dtype == "bfloat16"

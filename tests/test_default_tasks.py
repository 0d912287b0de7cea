"""evaluation.tasks: the embedded default's own lm-eval tasks. Their committed rows are what the generator writes,
they load from any working directory, and the graders give full marks to the reference answers and none to
wrong ones, through lm-eval's own evaluator."""

from __future__ import annotations

import json

import pytest
from lm_eval import simple_evaluate
from lm_eval.api.model import LM

from evaluation.harness import task_manager
from evaluation.tasks import ROWS, TASK_ROWS, TASKS_DIR


def test_committed_rows_are_the_generators_and_held_apart_from_the_corpus():
    for name, make_rows in TASK_ROWS.items():
        committed = (TASKS_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [json.loads(line) for line in committed] == make_rows(ROWS), name
    math = TASK_ROWS["default_math"](ROWS)
    assert all(row["solution"].endswith(f"The answer is {row['answer']}.") for row in math)


class Answers(LM):
    """Generates each document's reference answer, or ``wrong`` ones (a number off by one, another sentence)."""

    def __init__(self, wrong: bool = False) -> None:
        super().__init__()
        self.wrong = wrong
        rows = {name: make(ROWS) for name, make in TASK_ROWS.items()}
        self.math = {f"Question: {r['question']}\nAnswer:": r for r in rows["default_math"]}
        self.translation = {f"English: {r['english']}\n{r['language']}:": r for r in rows["default_translation"]}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for request in requests:
            prompt = request.args[0]
            if prompt in self.math:
                row = self.math[prompt]
                answer = str(int(row["answer"]) + 1) if self.wrong else row["answer"]
                out.append(f" {row['solution'].rsplit('The answer is', 1)[0]}The answer is {answer}.")
            else:
                target = self.translation[prompt]["target"]
                out.append(" " + (target.replace(" ", " un ", 1) if self.wrong else target.upper()))
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError


@pytest.mark.parametrize("wrong, expected", [(False, 1.0), (True, 0.0)])
def test_generation_tasks_grade_references_right_and_wrong_answers_wrong(tmp_path, monkeypatch, wrong, expected):
    monkeypatch.chdir(tmp_path)  # the YAMLs find their rows beside them, not in the working directory
    tasks = ["default_math", "default_translation"]
    result = simple_evaluate(
        model=Answers(wrong), tasks=tasks, task_manager=task_manager(tasks, [TASKS_DIR]), limit=50
    )
    for name in tasks:
        assert result["results"][name]["acc,none"] == expected, name

"""`train/lm.py --eval.tasks`: lm-eval task metrics logged while the LM trains. On 2 FSDP ranks they equal 1
rank's (each rank scores half of the documents), and at the last step they equal lm-eval's own evaluation of the
saved checkpoint through the ``llama3herd`` backend."""

from __future__ import annotations

import re

import pytest
import torch

from tests.lm_runs import args, run
from train.metrics import read_metrics

EVAL = ['--eval.tasks=["scene_colour"]', "--eval.limit=24", "--train.eval_interval=3", "--train.steps=6"]
EVAL += ["--optim.schedule_steps=6", "--checkpoint.enable=true", "--checkpoint.interval=6"]


def eval_records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(str(run_dir)) if "eval/scene_colour/acc" in r}


def test_task_metrics_on_two_ranks_equal_one_rank_and_lm_eval_on_the_checkpoint(setup, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.api.instance import Instance

    from data.scenes import COLOURS
    from evaluation.harness import Llama3HerdLM, load_lm, task_manager
    from evaluation.tasks import TASKS_DIR, scene_colour_rows

    runs = {}
    for nproc in (1, 2):
        run(nproc, args(setup, tmp_path / f"ranks{nproc}", *EVAL))
        runs[nproc] = eval_records(tmp_path / f"ranks{nproc}")
        assert sorted(runs[nproc]) == [3, 6]
    for step in (3, 6):
        for metric in ("acc", "nll"):
            key = f"eval/scene_colour/{metric}"
            assert runs[2][step][key] == pytest.approx(runs[1][step][key], abs=1e-5), (step, key)
    assert runs[1][3]["eval/scene_colour/nll"] != runs[1][6]["eval/scene_colour/nll"]  # measured anew each time

    # The checkpoint of step 6, scored by lm-eval's evaluator, gives the accuracy logged at step 6; the NLL logged
    # is the mean over documents of -log p(correct colour | scene).
    model = load_lm(tmp_path / "ranks1", "cpu", torch.float32)
    backend = Llama3HerdLM(model=model, batch_size=8)
    result = simple_evaluate(
        model=backend, tasks=["scene_colour"], task_manager=task_manager(["scene_colour"], [TASKS_DIR]), limit=24
    )
    assert runs[1][6]["eval/scene_colour/acc"] == pytest.approx(result["results"]["scene_colour"]["acc,none"])
    rows = scene_colour_rows(24)
    gold = [
        Instance("loglikelihood", {}, (f"{row['text']} The {row['shape']} is", f" {COLOURS[row['gold']]}"), 0)
        for row in rows
    ]
    nll = -sum(score for score, _ in backend.loglikelihood(gold, True)) / len(rows)
    assert runs[1][6]["eval/scene_colour/nll"] == pytest.approx(nll, abs=1e-4)


@pytest.mark.parametrize(
    "tasks, message",
    [
        ('["scene_colur"]', r"no lm-eval task or group named \['scene_colur'\]"),
        ('["default_math"]', "not multiple-choice"),
    ],
)
def test_a_task_that_cannot_be_scored_is_named_before_training(setup, tmp_path, tasks, message):
    proc = run(1, args(setup, tmp_path / "run", f"--eval.tasks={tasks}", "--train.steps=2"), check=False)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr + proc.stdout), proc.stderr[-2000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not read_metrics(str(tmp_path / "run"))

"""Benchmark metrics while a model trains: the training loop's ``eval_fn`` for lm-eval's multiple-choice tasks.

Every ``train.eval_interval`` steps (and at the end) each task's accuracy and the mean negative log-likelihood of
its correct answers go into metrics.jsonl and TensorBoard as ``eval/<task>/acc`` and ``eval/<task>/nll``. The
paper predicts a benchmark's accuracy from compute in two steps (section 3.2.1): the correct answers'
negative log-likelihood against training FLOPs, then accuracy against that log-likelihood; a run that logs both
gives the points of both fits.

Ranks split each task's documents (lm-eval's own split by rank) and sum their counts. Every rank scores with an
unsharded copy of the weights, gathered from the sharded model at each evaluation: the model being trained is
left as it is, and the copy costs one more model's memory per rank (fine up to models that fit one device; not
under pipeline parallel, where no rank holds every layer).

    torchrun --nproc-per-node 2 train/lm.py --config configs/lm/debug.toml --eval.tasks='["scene_colour"]' \
        --train.eval_interval=50
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lm.config import LMConfig
from lm.model import Transformer
from train.config import NonNegativeInt, PositiveInt

# The embedded default's own tasks (evaluation/tasks), found whatever the working directory.
DEFAULT_INCLUDE = str(Path(__file__).with_name("tasks"))


@dataclass
class TaskEvalConfig:
    """lm-eval tasks scored during training (multiple-choice ones: accuracy and the correct answers' NLL)."""

    # Task or group names, e.g. ["scene_colour"] or ["mmlu_offline"] (a group's tasks are each reported).
    tasks: list[str] = field(default_factory=list)
    # Directories of task YAMLs besides lm-eval's own; the embedded default's tasks are always included.
    include_path: list[str] = field(default_factory=list)
    # Documents scored per task, the first ones (0 = all).
    limit: NonNegativeInt = 200
    batch_size: PositiveInt = 16


def load_tasks(config: TaskEvalConfig) -> dict[str, Any]:
    """The leaf tasks of ``config.tasks`` by name; every one must be a multiple choice (named when it is not)."""
    from evaluation.harness import task_manager

    manager = task_manager(list(config.tasks), [DEFAULT_INCLUDE, *config.include_path])
    unknown = [name for name in config.tasks if name not in manager.all_tasks]
    if unknown:
        raise ValueError(f"eval.tasks: no lm-eval task or group named {unknown} (include_path {config.include_path})")
    tasks = manager.load(list(config.tasks))["tasks"]
    generative = sorted(name for name, task in tasks.items() if task.OUTPUT_TYPE != "multiple_choice")
    if generative:
        raise ValueError(
            f"eval.tasks: {generative} are not multiple-choice tasks; during training only multiple-choice tasks "
            "are scored (run the others with python -m evaluation on a checkpoint)"
        )
    return tasks


def task_evaluator(config: TaskEvalConfig, lm_config: LMConfig, device: torch.device) -> TaskEvaluator | None:
    """The loop's ``eval_fn`` for ``config.tasks``, or None when no task is asked for."""
    return TaskEvaluator(config, lm_config, device) if config.tasks else None


class TaskEvaluator:
    """The loop's ``eval_fn``: each task's accuracy and correct-answer NLL (a collective: every rank calls it)."""

    def __init__(self, config: TaskEvalConfig, lm_config: LMConfig, device: torch.device) -> None:
        from evaluation.harness import Llama3HerdLM

        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.tasks = load_tasks(config)
        for task in self.tasks.values():
            task.build_all_requests(limit=config.limit or None, rank=rank, world_size=world)
        self.device = device
        self.shadow = Transformer(lm_config).to(device).eval()
        self.lm = Llama3HerdLM(model=self.shadow, batch_size=config.batch_size, device=str(device))

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        """Copy the trained weights in, score this rank's documents, sum over ranks."""
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        self.shadow.load_state_dict(state)
        del state
        sums = []  # per task: correct answers, their summed NLL, documents
        for task in self.tasks.values():
            instances = task.instances
            scores = self.lm.loglikelihood(instances, disable_tqdm=True)
            by_doc: dict[int, list] = {}
            for instance, score in zip(instances, scores, strict=True):
                by_doc.setdefault(instance.doc_id, []).append((instance.idx, instance.doc, score))
            correct = nll = 0.0
            for choices in by_doc.values():
                choices.sort(key=lambda item: item[0])
                doc, results = choices[0][1], [score for _, _, score in choices]
                correct += task.process_results(doc, results)["acc"]
                gold = task.doc_to_target(doc)
                gold = task.doc_to_choice(doc).index(gold) if isinstance(gold, str) else gold
                nll -= results[gold][0]
            sums.append([correct, nll, len(by_doc)])
        totals = torch.tensor(sums, dtype=torch.float64, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        metrics = {}
        for name, (correct, nll, docs) in zip(self.tasks, totals.tolist(), strict=True):
            metrics[f"eval/{name}/acc"] = correct / max(docs, 1)
            metrics[f"eval/{name}/nll"] = nll / max(docs, 1)
        return metrics

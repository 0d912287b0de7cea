"""Held-out grading of a chat model during post-training: greedy answers to prompts it never trained on.

Rows are ``data.instruct``'s (``messages`` whose last assistant turn is the reference, ``kind``, ``answer``); the
prompt is every message before that answer, in the Llama 3 chat format, and ``data.instruct.grade`` checks the
generation. Rank 0 generates with an unsharded copy of the trained weights; every rank takes part in gathering them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from data.grading import majority_rate
from data.instruct import KINDS, grade, prompt_of
from lm.config import LMConfig
from lm.generate import generate
from lm.model import Transformer
from lm.tokenizer import ChatFormat, Tokenizer
from train.checkpoint import full_state_dict

GENERATION_BATCH = 16


def read_graded_rows(path: str | Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a JSONL file of graded dialogs (each with ``messages``, ``kind``, ``answer``)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if len(rows) == limit:
                break
            row = json.loads(line)
            if not {"messages", "kind", "answer"} <= set(row):
                raise ValueError(f"{path}:{number}: a graded row needs 'messages', 'kind' and 'answer'")
            rows.append(row)
    return rows


def _kind_order(kinds: Iterable[str]) -> list[str]:
    """The kinds in ``data.instruct.KINDS`` order, any others after them sorted."""
    kinds = set(kinds)
    return [kind for kind in KINDS if kind in kinds] + sorted(kinds - set(KINDS))


def graded_accuracy(
    model: Transformer, chat: ChatFormat, rows: list[dict[str, Any]], max_new_tokens: int
) -> dict[str, float]:
    """eval/accuracy of greedy answers to the rows' prompts, eval/chance (always the commonest answer),
    eval/stopped (the share of answers that ended with a stop token within ``max_new_tokens``: DPO must not make
    the model stop less often), and eval/accuracy/<kind> for each kind of question (``data.instruct.KINDS`` order;
    kinds absent from rows left out)."""
    hits: dict[str, list[bool]] = {}
    stopped = 0
    for start in range(0, len(rows), GENERATION_BATCH):
        batch = rows[start : start + GENERATION_BATCH]
        prompts = [chat.encode_dialog_prompt(prompt_of(row)) for row in batch]
        outputs = generate(model, chat.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        for row, out in zip(batch, outputs, strict=True):
            right = grade(row["kind"], chat.decode_assistant(out), row["answer"], prompt_of(row)[-1]["content"])
            hits.setdefault(row["kind"], []).append(right)
            stopped += len(out) < max_new_tokens  # the stop token is not returned: a full budget never stopped
    n = max(1, len(rows))
    chance = majority_rate([{row["answer"]} for row in rows])
    result = {"eval/accuracy": sum(map(sum, hits.values())) / n, "eval/chance": chance, "eval/stopped": stopped / n}
    result.update({f"eval/accuracy/{kind}": sum(hits[kind]) / len(hits[kind]) for kind in _kind_order(hits)})
    return result


class HeldOutGrader:
    """The loop's ``eval_fn``: held-out accuracy of the model being trained (a collective: every rank calls it)."""

    def __init__(
        self, lm_config: LMConfig, rows: list[dict[str, Any]], rank: int, device: torch.device, max_new_tokens: int
    ) -> None:
        self.rows, self.device, self.max_new_tokens = rows, device, max_new_tokens
        self.shadow = Transformer(lm_config).to(device) if rank == 0 else None
        self.chat = ChatFormat(Tokenizer())

    def __call__(self, model: nn.Module, step: int) -> dict[str, float]:
        """Gather the weights onto rank 0, grade its greedy answers, share the scores."""
        state = full_state_dict(model)
        # Every rank knows the metric names (the rows' kinds), so only the values need broadcasting.
        names = self.metric_names
        scores = torch.zeros(len(names), dtype=torch.float64)
        if self.shadow is not None:
            self.shadow.load_state_dict(state)
            self.shadow.eval()
            result = graded_accuracy(self.shadow, self.chat, self.rows, self.max_new_tokens)
            scores = torch.tensor([result[name] for name in names], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            scores = scores.to(self.device)
            dist.broadcast(scores, src=0)  # the others wait here while rank 0 generates
        return dict(zip(names, scores.tolist(), strict=True))

    @property
    def metric_names(self) -> list[str]:
        """The names ``__call__`` returns: eval/accuracy, eval/chance, eval/stopped, then eval/accuracy/<kind> per
        kind present."""
        kinds = _kind_order({row["kind"] for row in self.rows})
        return ["eval/accuracy", "eval/chance", "eval/stopped", *(f"eval/accuracy/{kind}" for kind in kinds)]

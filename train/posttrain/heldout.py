"""Held-out grading of a chat model during post-training: greedy answers to prompts it never trained on.

Rows are ``data.instruct``'s (``messages`` whose last assistant turn is the reference, ``kind``, ``answer``); the
prompt is every message before that answer, in the Llama 3 chat format, and ``data.instruct.grade`` checks the
generation. Rank 0 generates with an unsharded copy of the trained weights; every rank takes part in gathering them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from data.grading import majority_rate
from data.instruct import grade, prompt_of
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


def graded_accuracy(
    model: Transformer, chat: ChatFormat, rows: list[dict[str, Any]], max_new_tokens: int
) -> dict[str, float]:
    """eval/accuracy of greedy answers to the rows' prompts, and eval/chance (always the commonest answer)."""
    hits = 0
    for start in range(0, len(rows), GENERATION_BATCH):
        batch = rows[start : start + GENERATION_BATCH]
        prompts = [chat.encode_dialog_prompt(prompt_of(row)) for row in batch]
        outputs = generate(model, chat.tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
        hits += sum(
            grade(row["kind"], chat.decode_assistant(out), row["answer"])
            for row, out in zip(batch, outputs, strict=True)
        )
    chance = majority_rate([{row["answer"]} for row in rows])
    return {"eval/accuracy": hits / max(1, len(rows)), "eval/chance": chance}


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
        scores = torch.zeros(2, dtype=torch.float64)
        if self.shadow is not None:
            self.shadow.load_state_dict(state)
            self.shadow.eval()
            result = graded_accuracy(self.shadow, self.chat, self.rows, self.max_new_tokens)
            scores = torch.tensor([result["eval/accuracy"], result["eval/chance"]], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            scores = scores.to(self.device)
            dist.broadcast(scores, src=0)  # the others wait here while rank 0 generates
        accuracy, chance = scores.tolist()
        return {"eval/accuracy": accuracy, "eval/chance": chance}

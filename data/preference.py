"""Preference data for DPO (paper section 4.1.4): a prompt, a chosen and a rejected answer, in the Llama 3 format.

Rows in the field's format (JSONL or Parquet): the prompt as ``prompt`` (one user turn) or ``prompt_messages``
(``[{role, content}]``), ``chosen`` and ``rejected`` (assistant answers) and an optional ``edited`` answer (checked;
the reward model ranks it above ``chosen``, DPO trains on chosen vs rejected). Each answer is encoded as the whole
dialog prompt + answer; the labels are the answer's tokens and its ``<|eot_id|>`` only (an assistant turn inside a
multi-turn prompt is context, not trained). Bad rows are ``data.chat.ChatDataError`` naming ``file:line``.

`PreferenceBatches` pads each pair's two sequences to rows of ``seq_len + 1`` (chosen rows first, then rejected)
and yields a global batch of pairs per step, this rank's share, resumably. `write_preference_data` makes the
embedded default pairs offline from ``data.instruct``'s tasks: the chosen answer is right and the rejected one a
plausible mistake (the scene's other colour or shape, a count off by one, an arithmetic answer off by one or ten),
and no prompt of ``data.instruct``'s held-out file is among them (those prompts make the held-out pairs).

    python -m data.preference --out runs/data/instruct
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_text
from data import scenes
from data.chat import IGNORE_INDEX, EncodedDialog, StepBatches, encode_checked, encode_dialog, read_encoded_rows
from data.instruct import (
    DATA_VERSION,
    HELDOUT_FILE,
    INVERSE_RELATION,
    TRAIN_FILE,
    VERSION_FILE,
    data_versions,
    ensure_instruct_data,
    make_dialogs,
    prompt_of,
)
from lm.tokenizer import ChatFormat

log = logging.getLogger(__name__)

PREFERENCE_FILE, HELDOUT_PREFERENCE_FILE = "preference.jsonl", "preference_heldout.jsonl"
COLUMNS = ("prompt", "prompt_messages", "chosen", "rejected", "edited")
# The reward model's 300 steps of 16 pairs see each pair about once.
PAIRS = 5_000
# The stream of dialogs further held-out prompts are drawn from (bench/RESULTS.md grades 1,000 of them).
FURTHER_SEED = 777_001


@dataclass(frozen=True)
class PreferencePair:
    """A prompt's chosen and rejected dialogs (and the edited one, when the row has it), each labelled on its final
    answer only."""

    chosen: EncodedDialog
    rejected: EncodedDialog
    edited: EncodedDialog | None = None  # the reward model ranks it above chosen; DPO does not use it


def row_prompt(row: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The row's prompt messages: ``prompt_messages``, or ``prompt`` as one user turn."""
    if row.get("prompt_messages") is not None:
        prompt = row["prompt_messages"]
        if not isinstance(prompt, list) or not prompt:
            raise ValueError("'prompt_messages' must be a non-empty list of {role, content}")
        return list(prompt)
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        return [{"role": "user", "content": row["prompt"]}]
    raise ValueError("the row has no 'prompt' or 'prompt_messages'")


def encode_answer(prompt: list[dict[str, Any]], answer: Any, chat: ChatFormat, max_tokens: int) -> EncodedDialog:
    """The dialog prompt + assistant ``answer``, labelled on the answer and its end of turn only."""
    if not isinstance(answer, str):
        raise ValueError("an answer ('chosen', 'rejected', 'edited') is missing or not a string")
    dialog = encode_checked([*prompt, {"role": "assistant", "content": answer}], chat, max_tokens)
    context = len(encode_dialog(prompt, chat).ids)
    return EncodedDialog(dialog.ids, [IGNORE_INDEX] * context + dialog.labels[context:])


def encode_preference(row: Mapping[str, Any], chat: ChatFormat, max_tokens: int) -> PreferencePair:
    """A checked, encoded preference row (ValueError says what is wrong with it)."""
    prompt = row_prompt(row)
    if prompt[-1].get("role") == "assistant":
        raise ValueError("the prompt ends with an assistant turn: the answers would follow it")
    edited = None if row.get("edited") is None else encode_answer(prompt, row["edited"], chat, max_tokens)
    chosen, rejected = (encode_answer(prompt, row.get(k), chat, max_tokens) for k in ("chosen", "rejected"))
    return PreferencePair(chosen, rejected, edited)


def read_preferences(
    paths: Sequence[str | Path],
    chat: ChatFormat,
    *,
    max_tokens: int,
    skip_bad: bool = False,
    balance_kinds: Collection[str] = (),
    seed: int = 0,
) -> tuple[list[PreferencePair], int]:
    """Encode every preference row of JSONL/Parquet ``paths``; returns them and how many bad rows were skipped.
    With ``balance_kinds``, the rows of those kinds are first thinned by ``balance_answer_words`` (from ``seed``)."""
    if not balance_kinds:
        return read_encoded_rows(
            paths, lambda row: encode_preference(row, chat, max_tokens), columns=COLUMNS, skip_bad=skip_bad
        )
    read, skipped = read_encoded_rows(
        paths,
        lambda row: (encode_preference(row, chat, max_tokens), answer_difference(row)),
        columns=(*COLUMNS, "kind"),
        skip_bad=skip_bad,
    )
    keep = balance_answer_words([difference for _, difference in read], balance_kinds, seed)
    balanced = [kept for (_, (kind, _, _)), kept in zip(read, keep, strict=True) if kind in balance_kinds]
    log.info(
        "balancing the answer words of %s kept %d of their %d pairs",
        ", ".join(balance_kinds),
        sum(balanced),
        len(balanced),
    )
    return [pair for (pair, _), kept in zip(read, keep, strict=True) if kept], skipped


def answer_difference(row: Mapping[str, Any]) -> tuple[Any, frozenset[str], frozenset[str]]:
    """The row's ``kind``, the words (lower case) only its chosen answer holds and those only its rejected one holds."""
    chosen, rejected = (set(re.findall(r"\w+", str(row.get(key, "")).lower())) for key in ("chosen", "rejected"))
    return row.get("kind"), frozenset(chosen - rejected), frozenset(rejected - chosen)


def balance_answer_words(
    differences: Sequence[tuple[Any, frozenset[str], frozenset[str]]], kinds: Collection[str], seed: int = 0
) -> list[bool]:
    """Which rows to keep (``answer_difference`` of each) so that within each of ``kinds`` every word is about as
    often in a kept row's chosen answer alone as in its rejected answer alone; rows of other kinds are all kept.

    Pairs sampled from a policy reject the words it says too often: the tiny round's colour pairs reject "blue" 63
    times and choose it 20. DPO learns that as a prior on the word, whatever the scene, and overshoots. A row of
    ``kinds`` is kept with the probability of its most over-represented word: the least of C/R over the words its
    rejected answer alone holds and R/C over those its chosen answer alone holds (C, R: how often the word is
    chosen-only, rejected-only among the kind's rows), and 1 at most.
    """
    chosen, rejected = Counter(), Counter()
    for kind, chosen_only, rejected_only in differences:
        if kind in kinds:
            chosen.update((kind, word) for word in chosen_only)
            rejected.update((kind, word) for word in rejected_only)
    rng = random.Random(seed)
    keep = []
    for kind, chosen_only, rejected_only in differences:
        odds = [1.0]
        if kind in kinds:
            odds += [rejected[kind, word] / chosen[kind, word] for word in chosen_only]
            odds += [chosen[kind, word] / rejected[kind, word] for word in rejected_only]
        keep.append(rng.random() < min(odds))
    return keep


class PreferenceBatches(StepBatches):
    """Global batches of ``batch_size`` pairs per step, reshuffled each epoch from ``seed + epoch``; this rank's
    ``batch_size / dp_size`` pairs split into ``grad_accum`` micro-batches.

    A micro-batch of b pairs holds ``tokens``, ``labels``, ``document_ids`` [2b, seq_len + 1] (the chosen rows,
    then the rejected ones; padding is a document of its own), ``index`` [b] (the pairs' positions in ``pairs``)
    and ``nll_tokens``: the global batch's chosen target tokens / (dp x grad_accum), which makes the chosen NLL
    averaged over ranks and micro-batches the global batch's token mean. The state (steps taken) resumes onto any
    layout.
    """

    def __init__(
        self,
        pairs: Sequence[PreferencePair],
        *,
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        grad_accum: int,
        seed: int,
    ) -> None:
        if not pairs:
            raise ValueError("no preference pairs to train on")
        super().__init__(
            seq_len=seq_len, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, grad_accum=grad_accum, seed=seed
        )
        self.pairs = pairs

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.pairs)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def global_indices(self, step: int) -> list[int]:
        """The pairs of the ``step``-th global batch (from 0); epochs follow one another pair by pair."""
        first = step * self.batch_size
        epochs = range(first // len(self.pairs), (first + self.batch_size - 1) // len(self.pairs) + 1)
        flat = [i for epoch in epochs for i in self._order(epoch)]
        start = first - epochs[0] * len(self.pairs)
        return flat[start : start + self.batch_size]

    def pairs_within(self, steps: int) -> list[int]:
        """The pairs the first ``steps`` global batches hold, in index order (all of them once those span an epoch)."""
        if steps * self.batch_size >= len(self.pairs):
            return list(range(len(self.pairs)))
        return sorted(self._order(0)[: steps * self.batch_size])

    def rows(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Padded rows of the pairs ``indices``: chosen rows then rejected rows, and ``index``."""
        dialogs = [self.pairs[i].chosen for i in indices] + [self.pairs[i].rejected for i in indices]
        return {**pad_rows(dialogs, self.width), "index": torch.tensor(list(indices))}

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of pairs of global batch ``step``, each with the global batch's NLL tokens."""
        indices = self.global_indices(step)
        chosen_tokens = sum(_targets(self.pairs[i].chosen) for i in indices)
        nll_tokens = torch.tensor(max(1, chosen_tokens) / (self.dp_size * self.grad_accum))
        mine = indices[self.dp_rank * self.share : (self.dp_rank + 1) * self.share]
        micro = self.share // self.grad_accum
        return [{**self.rows(mine[k : k + micro]), "nll_tokens": nll_tokens} for k in range(0, self.share, micro)]

    def stats(self) -> dict[str, Any]:
        """Metrics: the epoch the next batch comes from (fractional)."""
        return {"data/epoch": self.steps_taken * self.batch_size / len(self.pairs)}


def _targets(dialog: EncodedDialog) -> int:
    return sum(label != IGNORE_INDEX for label in dialog.labels[1:])


def pad_rows(dialogs: Sequence[EncodedDialog], width: int) -> dict[str, torch.Tensor]:
    """``tokens``, ``labels`` and ``document_ids`` [len(dialogs), width]: each dialog padded to ``width``."""
    longest = max(len(d.ids) for d in dialogs)
    if longest > width:
        raise ValueError(f"a dialog of {longest} tokens does not fit a row of seq_len + 1 = {width}")
    tokens = torch.zeros(len(dialogs), width, dtype=torch.long)  # padding: never a target, never attended to
    labels = torch.full((len(dialogs), width), IGNORE_INDEX, dtype=torch.long)
    documents = torch.ones(len(dialogs), width, dtype=torch.long)
    for row, dialog in enumerate(dialogs):
        n = len(dialog.ids)
        tokens[row, :n], labels[row, :n], documents[row, :n] = torch.tensor(dialog.ids), torch.tensor(dialog.labels), 0
    return {"tokens": tokens, "labels": labels, "document_ids": documents}


# ---------------------------------------------------------------- the embedded default pairs


def _replace_word(text: str, word: str, by: str) -> str:
    return re.sub(rf"\b{re.escape(word)}\b", by, text)


def wrong_answer(dialog: dict[str, Any], rng: random.Random) -> str:
    """A plausible wrong version of the dialog's last answer: the scene's other colour or shape (a colour or shape
    not in it when it has no other), a count off by one, the inverse relation (the objects read the other way
    round), an arithmetic result off by one or by a carry (ten), or a translation left in the wrong language (the
    English sentence it was asked to translate)."""
    kind, key, answer = dialog["kind"], dialog["answer"], dialog["messages"][-1]["content"]
    if kind == "relation":
        return _replace_word(answer, key, INVERSE_RELATION[key])
    if kind == "translation":
        return dialog["messages"][-2]["content"].split(": ", 1)[1]
    if kind == "count":
        number = scenes.DIGITS.index(key)
        step = 1 if number <= 1 else -1 if number == len(scenes.DIGITS) - 1 else rng.choice([-1, 1])
        wrong = scenes.DIGITS[number + step]
        return _replace_word(answer, key, wrong)
    if kind == "math":
        value = int(key)
        wrong = str(value + rng.choice([-1, 1, 10] + [-10] * (value >= 20)))
        return _replace_word(answer, key, wrong)
    vocabulary = scenes.COLOURS if kind == "colour" else scenes.SHAPES
    context = " ".join(m["content"] for m in dialog["messages"] if m["role"] == "user").lower()
    in_scene = [w for w in vocabulary if w != key and re.search(rf"\b{w}s?\b", context)]
    return _replace_word(answer, key, rng.choice(in_scene or [w for w in vocabulary if w != key]))


def preference_row(dialog: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``{prompt_messages, chosen, rejected, kind, answer}``: a graded dialog's answer against a wrong one."""
    chosen, rejected = dialog["messages"][-1]["content"], wrong_answer(dialog, rng)
    return {"prompt_messages": prompt_of(dialog), "chosen": chosen, "rejected": rejected, **_graded(dialog)}


def make_preference_rows(count: int, seed: int, exclude_prompts: set[str] = frozenset()) -> list[dict[str, Any]]:
    """Up to ``count`` preference rows from ``data.instruct``'s tasks, none on a prompt of ``exclude_prompts``."""
    rng = random.Random(seed)
    dialogs = [d for d in make_dialogs(count, seed) if prompt_key(prompt_of(d)) not in exclude_prompts]
    return [preference_row(d, rng) for d in dialogs]


def _graded(dialog: dict[str, Any]) -> dict[str, str]:
    return {"kind": dialog["kind"], "answer": dialog["answer"]}


def prompt_key(prompt: list[dict[str, Any]]) -> str:
    """A prompt's identity, for keeping held-out prompts out of training."""
    return json.dumps(prompt, sort_keys=True)


def write_preference_data(out: str | Path, *, pairs: int = PAIRS, seed: int = 0) -> Path:
    """``data.instruct``'s files under ``out`` (written if missing), ``preference.jsonl``: pairs drawn apart from
    the SFT training dialogs (another seed) and never on a prompt of the held-out file, and
    ``preference_heldout.jsonl``: the held-out dialogs as pairs (for held-out reward accuracy)."""
    out = ensure_instruct_data(out, seed=seed)
    held = [json.loads(line) for line in (out / HELDOUT_FILE).read_text().splitlines()]
    rows = make_preference_rows(pairs, seed + 2_000_003, {prompt_key(prompt_of(d)) for d in held})
    rng = random.Random(seed + 3_000_017)
    atomic_write_text(out / HELDOUT_PREFERENCE_FILE, "".join(json.dumps(preference_row(d, rng)) + "\n" for d in held))
    atomic_write_text(out / PREFERENCE_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    versions = {**data_versions(out), "preference": DATA_VERSION}
    atomic_write_text(out / VERSION_FILE, json.dumps(versions) + "\n")
    return out / PREFERENCE_FILE


def ensure_preference_data(out: str | Path, *, seed: int = 0) -> Path:
    """The embedded preference file under ``out``, written unless it exists in the current version (with the
    instruction data's)."""
    path = Path(out) / PREFERENCE_FILE
    current = data_versions(out).get("preference") == DATA_VERSION
    files = (PREFERENCE_FILE, HELDOUT_PREFERENCE_FILE, HELDOUT_FILE)
    if not (current and all((Path(out) / name).is_file() for name in files)):
        write_preference_data(out, seed=seed)
    return path


def further_heldout(out: str | Path, count: int, seed: int = FURTHER_SEED) -> list[dict[str, Any]]:
    """The first ``count`` of ``make_dialogs``' dialogs from ``seed`` whose prompt no embedded file under ``out``
    holds (written if missing), each prompt once: held-out prompts beyond ``heldout.jsonl``'s 200, whose 3.5 points
    of noise exceed the effect of a tiny DPO run (1,000 give 1.5). They are the rarer prompts, as the common short
    ones are taken."""
    out = ensure_instruct_data(out)
    ensure_preference_data(out)
    seen = set()
    for name in (TRAIN_FILE, HELDOUT_FILE, PREFERENCE_FILE, HELDOUT_PREFERENCE_FILE):
        for line in (out / name).read_text().splitlines():
            row = json.loads(line)
            seen.add(prompt_key(prompt_of(row) if "messages" in row else row_prompt(row)))
    # make_dialogs(n, seed) is a prefix of make_dialogs(2 * n, seed): drawing more never changes the first ones.
    drawn = 3 * count
    while True:
        fresh, taken = [], set(seen)
        for dialog in make_dialogs(drawn, seed):
            key = prompt_key(prompt_of(dialog))
            if key not in taken:
                fresh.append(dialog)
                taken.add(key)
        if len(fresh) >= count:
            return fresh[:count]
        if drawn > 64 * count + 1_000:
            raise ValueError(f"{out}: only {len(fresh)} of {drawn} dialogs have a prompt no file holds ({count} asked)")
        drawn *= 2


def main(argv: list[str] | None = None) -> int:
    """Command line: write the embedded preference data."""
    parser = argparse.ArgumentParser(prog="python -m data.preference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/data/instruct")
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"wrote {write_preference_data(args.out, pairs=args.pairs, seed=args.seed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

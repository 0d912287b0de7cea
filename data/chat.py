"""Chat data in the Llama 3 format: dialogs (``messages: [{role, content}]``) tokenized with ``lm.ChatFormat``.

SFT (paper section 4.1.3) trains on the assistant's tokens only: `encode_dialog` gives each token of a dialog a label,
its own id where the model learns it (an assistant turn's content and its ``<|eot_id|>``) and ``IGNORE_INDEX``
elsewhere (the system, user and tool turns, every header). `read_dialogs` reads JSONL or Parquet files of rows
``{"messages": [...]}`` and names the file and line of a bad row. `PackedDialogs` packs encoded dialogs into rows
of ``seq_len + 1`` tokens with document ids (no dialog attends to another) and yields a global batch's share per
data-parallel rank, resumably.

`formatting_mask` marks the tokens the format writes rather than the model chooses (headers and ends of turn):
DPO leaves them out of the chosen and rejected log-likelihoods (paper section 4.1.4).
"""

from __future__ import annotations

import abc
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from lm.tokenizer import ChatFormat, Tokenizer

IGNORE_INDEX = -100
T = TypeVar("T")
ROLES = ("system", "user", "assistant", "ipython", "tool")


class ChatDataError(ValueError):
    """A row of a chat file that cannot be trained on; the message starts with ``file:line``."""


@dataclass(frozen=True)
class EncodedDialog:
    """A dialog's token ids (bos first) and their labels (the id where trained, IGNORE_INDEX elsewhere)."""

    ids: list[int]
    labels: list[int]


def encode_dialog(messages: Sequence[Mapping[str, Any]], chat: ChatFormat) -> EncodedDialog:
    """Tokenize a whole dialog; only the assistant turns' content and end of turn are labelled."""
    ids, labels = [chat.tokenizer.bos_id], [IGNORE_INDEX]
    for message in messages:
        header = chat.encode_header(message)
        turn = chat.encode_message(message)
        ids.extend(turn)
        if message["role"] == "assistant":
            labels.extend([IGNORE_INDEX] * len(header) + turn[len(header) :])
        else:
            labels.extend([IGNORE_INDEX] * len(turn))
    return EncodedDialog(ids, labels)


def check_messages(messages: Any) -> None:
    """Raise ValueError naming what is wrong with a row's ``messages`` (roles, contents, an assistant answer)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content}")
    for turn, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"message {turn} has no role")
        if message["role"] not in ROLES:
            raise ValueError(f"message {turn} has unknown role {message['role']!r}; expected one of {ROLES}")
        content = message.get("content")
        if not isinstance(content, str):
            raise ValueError(f"message {turn} ({message['role']}) has no text content")
        if message["role"] == "assistant" and not content.strip():
            raise ValueError(f"message {turn} is an empty assistant answer")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the dialog has no assistant answer to train on")


def _rows(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[int, Any]]:
    """(line number, row) of a JSONL file, or (row number from 1, row) of a Parquet file (``columns`` of it)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # only for Parquet input

        table = pq.read_table(path, columns=None if columns is None else [c for c in columns if c in _names(path)])
        for number, row in enumerate(table.to_pylist(), start=1):
            yield number, row
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, ValueError(f"not JSON ({e.msg})")


def _names(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return pq.read_schema(path).names


def read_encoded_rows(
    paths: Sequence[str | Path],
    encode: Callable[[Mapping[str, Any]], T],
    *,
    columns: Sequence[str] | None = None,
    skip_bad: bool = False,
) -> tuple[list[T], int]:
    """``encode(row)`` of every row of JSONL/Parquet ``paths``; returns them and how many bad rows were skipped.

    A row that is not a JSON object, or that ``encode`` rejects with ValueError, raises ChatDataError naming
    ``file:line``, or with ``skip_bad`` is skipped and counted.
    """
    encoded, skipped = [], 0
    for path in map(Path, paths):
        for number, row in _rows(path, columns):
            try:
                if isinstance(row, Exception):
                    raise row
                if not isinstance(row, Mapping):
                    raise ValueError("the row is not a JSON object")
                item = encode(row)
            except ValueError as e:
                if not skip_bad:
                    raise ChatDataError(f"{path}:{number}: {e}") from None
                skipped += 1
                continue
            encoded.append(item)
    return encoded, skipped


def encode_checked(messages: Any, chat: ChatFormat, max_tokens: int) -> EncodedDialog:
    """`check_messages`, then `encode_dialog`; ValueError when the dialog is over ``max_tokens``."""
    check_messages(messages)
    dialog = encode_dialog(messages, chat)
    if len(dialog.ids) > max_tokens:
        raise ValueError(f"the dialog has {len(dialog.ids)} tokens, over the {max_tokens} a row holds")
    return dialog


def read_dialogs(
    paths: Sequence[str | Path], chat: ChatFormat, *, max_tokens: int, skip_bad: bool = False
) -> tuple[list[EncodedDialog], int]:
    """Encode every dialog of JSONL/Parquet ``paths``; returns them and how many bad rows were skipped.

    A bad row (not JSON, no messages, a missing or unknown role, an empty assistant answer, a dialog over
    ``max_tokens``) raises ChatDataError naming ``file:line``, or with ``skip_bad`` is skipped and counted.
    """

    def encode(row: Mapping[str, Any]) -> EncodedDialog:
        if "messages" not in row:
            raise ValueError("the row has no 'messages'")
        return encode_checked(row["messages"], chat, max_tokens)

    return read_encoded_rows(paths, encode, columns=["messages"], skip_bad=skip_bad)


def pack_dialogs(dialogs: Sequence[EncodedDialog], width: int, seed: int) -> list[tuple[list, list, list]]:
    """Rows of ``width`` tokens: ``(ids, labels, document ids)``, dialogs in a seeded order, first fit in order.

    A dialog that does not fit the open row starts the next; the rest of a row is padding (eot, unlabelled, its
    own document). Document ids count up from 0 within each row. A dialog longer than a row is an error (the
    readers refuse or skip those before: ``encode_checked``).
    """
    too_long = next((i for i, dialog in enumerate(dialogs) if len(dialog.ids) > width), None)
    if too_long is not None:
        raise ValueError(f"dialog {too_long} is {len(dialogs[too_long].ids)} tokens, longer than a row of {width}")
    order = list(range(len(dialogs)))
    random.Random(seed).shuffle(order)
    rows, ids, labels, docs = [], [], [], []
    for index in order:
        dialog = dialogs[index]
        if len(ids) + len(dialog.ids) > width:
            rows.append(_close_row(ids, labels, docs, width))
            ids, labels, docs = [], [], []
        doc = docs[-1] + 1 if docs else 0
        ids += dialog.ids
        labels += dialog.labels
        docs += [doc] * len(dialog.ids)
    if ids:
        rows.append(_close_row(ids, labels, docs, width))
    return rows


def _close_row(ids: list, labels: list, docs: list, width: int) -> tuple[list, list, list]:
    pad = width - len(ids)
    # Padding is a document of its own: no real token attends to it.
    return ids + [_PAD_ID] * pad, labels + [IGNORE_INDEX] * pad, docs + [docs[-1] + 1] * pad


_PAD_ID = 0  # any valid id: padding is never a target and never attended to by a dialog


class StepBatches(abc.ABC):
    """A global batch of ``batch_size`` per optimizer step, this rank's share cut into ``grad_accum`` micro-batches;
    the state is the steps taken, the same on every rank, so it resumes onto any layout."""

    def __init__(
        self, *, seq_len: int, batch_size: int, dp_rank: int, dp_size: int, grad_accum: int, seed: int
    ) -> None:
        if batch_size % (dp_size * grad_accum):
            raise ValueError(f"batch_size={batch_size} is not divisible by dp ({dp_size}) x grad_accum ({grad_accum})")
        self.width, self.seed = seq_len + 1, seed
        self.batch_size, self.dp_rank, self.dp_size, self.grad_accum = batch_size, dp_rank, dp_size, grad_accum
        self.share = batch_size // dp_size  # this rank's part of each global batch
        self.steps_taken = 0
        self._pending: list[dict[str, torch.Tensor]] = []

    @abc.abstractmethod
    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's ``grad_accum`` micro-batches of global batch ``step``."""

    def __iter__(self) -> StepBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if not self._pending:
            self._pending = self.micro_batches(self.steps_taken)
            self.steps_taken += 1
        return self._pending.pop(0)

    def state_dict(self) -> dict:
        """The optimizer steps taken (the same on every rank)."""
        if self._pending:
            raise RuntimeError("data state taken in the middle of an optimizer step's micro-batches")
        return {"steps_taken": self.steps_taken, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Continue after ``state['steps_taken']`` global batches."""
        self.steps_taken, self._pending = int(state["steps_taken"]), []


class PackedDialogs(StepBatches):
    """Packed rows of ``seq_len + 1`` tokens, a global batch per optimizer step, this rank's micro-batches.

    Every rank packs the same rows (the data is small and in memory) and takes rows ``dp_rank * B / D ...`` of
    each global batch of B, split into ``grad_accum`` micro-batches; the order is reshuffled each epoch from
    ``seed + epoch``. Each micro-batch carries ``loss_scale``: dp x grad_accum / the target tokens in the whole
    global batch, which makes each rank's summed token loss, averaged over ranks and micro-batches as the loop
    does, the global batch's mean token loss under every layout. The state (steps taken) resumes onto any layout.
    """

    def __init__(
        self,
        dialogs: Sequence[EncodedDialog],
        *,
        seq_len: int,
        batch_size: int,
        dp_rank: int,
        dp_size: int,
        grad_accum: int,
        seed: int,
    ) -> None:
        if not dialogs:
            raise ValueError("no dialogs to train on")
        super().__init__(
            seq_len=seq_len, batch_size=batch_size, dp_rank=dp_rank, dp_size=dp_size, grad_accum=grad_accum, seed=seed
        )
        longest = max(len(d.ids) for d in dialogs)
        if longest > seq_len + 1:
            raise ValueError(f"a dialog of {longest} tokens does not fit a row of seq_len + 1 = {seq_len + 1}")
        self.dialogs = dialogs
        self._epoch_rows: tuple[int, list] | None = None
        self._epoch_sizes: dict[int, int] = {}

    def _rows(self, epoch: int) -> list:
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            self._epoch_rows = (epoch, pack_dialogs(self.dialogs, self.width, self.seed + epoch))
            self._epoch_sizes[epoch] = len(self._epoch_rows[1])
        return self._epoch_rows[1]

    def _epoch_size(self, epoch: int) -> int:
        return self._epoch_sizes[epoch] if epoch in self._epoch_sizes else len(self._rows(epoch))

    def _global_batch(self, step: int) -> list:
        """The ``step``-th global batch's rows; epochs follow one another row by row."""
        rows, start, epoch = [], step * self.batch_size, 0
        while len(rows) < self.batch_size:
            if start >= self._epoch_size(epoch):
                start -= self._epoch_size(epoch)
                epoch += 1
                continue
            rows += self._rows(epoch)[start : start + self.batch_size - len(rows)]
            start, epoch = 0, epoch + 1
        return rows

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's packed micro-batches of global batch ``step``, each with the global batch's loss scale."""
        ids, labels, docs = (torch.tensor(column) for column in zip(*self._global_batch(step), strict=True))
        scale = self.dp_size * self.grad_accum / max(1, int((labels[:, 1:] != IGNORE_INDEX).sum()))
        mine = slice(self.dp_rank * self.share, (self.dp_rank + 1) * self.share)
        return [
            {"tokens": t, "labels": lab, "document_ids": d, "loss_scale": torch.tensor(scale)}
            for t, lab, d in zip(*(x[mine].chunk(self.grad_accum) for x in (ids, labels, docs)), strict=True)
        ]

    def stats(self) -> dict[str, Any]:
        """Metrics: the epoch the next batch comes from (fractional)."""
        return {"data/epoch": self.steps_taken * self.batch_size / self._epoch_size(0)}


def formatting_mask(ids: torch.Tensor, tokenizer: Tokenizer) -> torch.Tensor:
    """True at the chat format's own tokens of ``ids`` [..., T]: each header and each end of turn (or message).

    A header is ``<|start_header_id|>``, the role name's tokens, ``<|end_header_id|>`` and the blank line
    ``ChatFormat.encode_header`` writes after it (fixed by the format, so no preference signal either).
    """
    is_start = ids == tokenizer.start_header_id
    is_end = ids == tokenizer.end_header_id
    # From a header's start up to (not including) its end: the start and the role name.
    in_header = is_start.cumsum(-1) > is_end.cumsum(-1)
    blank_line = tokenizer.encode("\n\n", bos=False, eos=False)
    after_end = F.pad(is_end[..., :-1], (1, 0)) & (ids == blank_line[0]) if len(blank_line) == 1 else False
    stops = (ids == tokenizer.eot_id) | (ids == tokenizer.eom_id)
    return in_header | is_end | after_end | stops

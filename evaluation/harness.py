"""This project's Llama 3 models as an lm-evaluation-harness backend, registered as ``llama3herd``.

    python -m evaluation --model llama3herd --model_args checkpoint=DIR[,dtype=float32] --batch_size 8 \
        --tasks TASKS [any other lm_eval flag]

Under ``torchrun --nproc-per-node N -m evaluation ...`` the N ranks split the documents and rank 0 prints and
writes the results. The command imports this module (which registers the model) and hands its arguments to
lm-eval's own CLI. DIR is any checkpoint the project reads (`load_lm`: Meta or HF layout, a `train/lm.py` run,
a Llama3MM directory). Requests are tokenized by lm-eval's ``TemplateLM`` with the Llama 3 tokenizer, as its
``hf`` backend tokenizes them, and scored here:
``loglikelihood`` one forward per batch, projecting only the continuation positions onto the vocabulary (never a
[tokens, 128K] logits tensor for the context); ``loglikelihood_rolling`` in lm-eval's disjoint windows of the
model's context; ``generate_until`` with the project's batched KV-cache generation, cut at the stop strings.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from lm.generate import generate
from lm.model import Transformer
from lm.tokenizer import ChatFormat, Tokenizer

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

BOS_TEXT = "<|begin_of_text|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_lm(checkpoint: str | Path, device: str, dtype: torch.dtype) -> Transformer:
    """The LM of any checkpoint the project reads: Meta or HF layout, a ``train/lm.py`` run directory (its newest
    complete checkpoint) or one of its ``step-N`` checkpoints, or a Llama3MM directory (its frozen LM, for text
    tasks)."""
    from llama3mm.checkpoint import MANIFEST
    from train.average import model_with, read_input

    path = Path(checkpoint)
    if (path / MANIFEST).is_file():
        from llama3mm import Llama3MM

        return Llama3MM.from_pretrained(path, device=device).lm.to(dtype=dtype).eval()
    config, state = read_input(path)
    return model_with(config, state).to(device=device, dtype=dtype).eval()


@register_model("llama3herd")
class Llama3HerdLM(TemplateLM):
    """lm-eval's model interface over an ``lm.Transformer`` and the Llama 3 tokenizer.

    Under ``torchrun`` every rank holds the whole model and lm-eval gives each rank its share of the documents
    (data parallel); the metrics are gathered on rank 0, which alone returns results.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        model: Transformer | None = None,
        batch_size: int | str = 8,
        dtype: str = "float32",
        max_length: int | None = None,
        device: str | None = None,
        max_gen_toks: int = 256,
        max_batch_size: int | None = None,  # lm-eval passes it for batch_size=auto, which this backend refuses
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:  # a misspelt model_args key would otherwise be dropped without a word
            raise ValueError(
                f"llama3herd: unknown model_args {sorted(unknown)}; it takes checkpoint, dtype, max_length"
            )
        if (checkpoint is None) == (model is None):
            raise ValueError("llama3herd takes exactly one of checkpoint=DIR or model=")
        if dtype not in DTYPES:
            raise ValueError(f"llama3herd: dtype={dtype!r}; choose from {sorted(DTYPES)}")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"llama3herd: batch_size={batch_size!r}; give a positive number")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            from train.parallel.mesh import init_distributed

            init_distributed()
        if dist.is_initialized():
            self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        local = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if self._world_size > 1 else "cuda"
        device = device or (local if torch.cuda.is_available() else "cpu")
        if model is None:
            model = load_lm(checkpoint, device=device, dtype=DTYPES[dtype])
        self.model = model.eval()
        self.tok = Tokenizer()
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.config.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        """Where the model and its inputs live."""
        return self._device

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor``, concatenated in rank order (scalars stacked)."""
        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` on rank ``dst`` (None elsewhere)."""
        if self._world_size == 1:
            return [obj]
        gathered = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        """Wait for every rank."""
        if self._world_size > 1:
            dist.barrier()

    @property
    def eot_token_id(self) -> int:
        """<|end_of_text|>."""
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        """<|begin_of_text|>: what an empty context is conditioned on."""
        return self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``, <|begin_of_text|> first unless ``add_special_tokens`` is False or (None) the
        text already starts with it. Special-token text (a chat template's headers) becomes its id, as HF's
        tokenizers read it."""
        bos = add_special_tokens is not False
        if add_special_tokens is None and string.startswith(BOS_TEXT):
            bos = False
        return self.tok.encode(string, bos=bos, eos=False, allowed_special="all")

    @property
    def tokenizer_name(self) -> str:
        """What request caches are keyed by when a chat template is applied."""
        return "llama3"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The Llama 3 chat format (lm.tokenizer.ChatFormat), named; None when templates are off."""
        return "llama3" if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The dialog in the Llama 3 chat format, as text (special tokens written out), ending in an open
        assistant header, or (``add_generation_prompt`` False) in the last message's own turn, left open."""
        chat = ChatFormat(self.tok)
        if add_generation_prompt:
            ids = chat.encode_dialog_prompt(chat_history)
        else:  # the last message is a prefilled assistant turn that the model continues
            ids = chat.encode_dialog_prompt(chat_history[:-1])[: -len(chat.encode_header("assistant"))]
            ids += chat.encode_message(chat_history[-1])[:-1]
        return self.tok.decode(ids)

    def tok_decode(self, tokens: list[int]) -> str:
        """The text of ``tokens``."""
        return self.tok.decode(tokens)

    def _model_input(self, context: list[int], continuation: list[int]) -> tuple[int, ...]:
        """The tokens the model reads for a request: context + continuation but the last, cut from the left."""
        return tuple((context + continuation)[-(self.max_length + 1) : -1])

    @torch.inference_mode()
    def _score(self, inputs: list[tuple[int, ...]], members: list[list[list[int]]]) -> list[list[tuple[float, bool]]]:
        """For each distinct input row, (log-likelihood, greedy) of each of its continuations, one forward in all.

        The continuations of one row have one length and differ at most in their last token (a multiple choice's
        one-token answers after a shared context), so the row's positions are projected once for all of them.
        """
        width = max(map(len, inputs))
        # Right padding: a causal row never attends to what follows it, so the pad value does not matter.
        tokens = torch.full((len(inputs), width), self.tok.eos_id, dtype=torch.long, device=self._device)
        for i, row in enumerate(inputs):
            tokens[i, : len(row)] = torch.tensor(row)
        hidden = self.model(tokens, output="hidden")
        lengths = [len(conts[0]) for conts in members]
        rows_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).to(self._device)
        cols_idx = torch.cat([torch.arange(len(row) - n, len(row)) for row, n in zip(inputs, lengths, strict=True)])
        logprobs = F.log_softmax(self.model.output(hidden[rows_idx, cols_idx.to(self._device)]).float(), dim=-1)
        greedy = logprobs.argmax(-1)
        results, start = [], 0
        for n, conts in zip(lengths, members, strict=True):
            span = slice(start, start + n)
            targets = torch.tensor(conts, device=self._device)  # [continuations, n]
            picked = logprobs[span].gather(1, targets.T).T  # [continuations, n]
            hits = (greedy[span][None] == targets).all(1)
            results.append([(float(p.sum()), bool(h)) for p, h in zip(picked, hits, strict=True)])
            start += n
        return results

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) per tokenized request, in the requests' order. Requests that read the same
        tokens (the choices of one question) share a row; rows of similar length share a batch of batch_size."""
        rows: dict[tuple[tuple[int, ...], int], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            rows.setdefault((self._model_input(context, continuation), len(continuation)), []).append(i)
        order = sorted(rows, key=lambda key: (-len(key[0]), key[0]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="llama3herd loglikelihood")
        for start in range(0, len(order), self.batch_size):
            keys = order[start : start + self.batch_size]
            members = [[requests[i][2][-n:] for i in rows[(row, n)]] for row, n in keys]
            scored = self._score([row for row, _ in keys], members)
            for key, row_results in zip(keys, scored, strict=True):
                for i, result in zip(rows[key], row_results, strict=True):
                    results[i] = result
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
                    bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of the model's context (lm-eval's windows)."""
        out = []
        for request in tqdm(requests, disable=disable_tqdm, desc="llama3herd loglikelihood_rolling"):
            (text,) = request.args
            windows = [
                (None, *make_disjoint_window(window))
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens(windows, disable_tqdm=True)
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first stop string; requests with the same settings share a batch."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            settings = dict(request.args[1] or {})
            stops = settings.pop("until", None) or []
            stops = (stops,) if isinstance(stops, str) else tuple(stops)
            max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
            # lm-eval's HF convention: greedy unless do_sample, which samples at temperature (default 1).
            temperature = float(settings.get("temperature", 1.0)) if settings.get("do_sample", False) else 0.0
            groups.setdefault((stops, max_new, temperature), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="llama3herd generate")
        for (stops, max_new, temperature), members in groups.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0])[-(self.max_length - max_new) :] for i in chunk]
                generated = generate(self.model, self.tok, prompts, max_new_tokens=max_new, temperature=temperature)
                for i, tokens in zip(chunk, generated, strict=True):
                    text = self.tok.decode(tokens)
                    for stop in stops:
                        text = text.split(stop)[0]
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        return out  # type: ignore[return-value]


def task_manager(names: list[str], include_path: list[str | Path]) -> TaskManager:
    """lm-eval's TaskManager for ``names``: the include paths alone when they define every one of them, else
    lm-eval's own tasks as well (indexing those thousands of YAMLs costs about 15 s a process on a small CPU)."""
    from lm_eval.tasks import TaskManager

    paths = [str(path) for path in include_path]
    local = TaskManager(include_path=paths, include_defaults=False)
    if all(name in local.all_tasks for name in names):
        return local
    return TaskManager(include_path=paths)


def save_hf_tokenizer(directory: str | Path) -> None:
    """Write the Llama 3 tokenizer as transformers' tokenizer files into ``directory`` (converted from the same
    tokenizer.model by transformers' TikTokenConverter, <|begin_of_text|> before every text as in Meta's release),
    so HF-layout checkpoints of this project load in tools that need an HF tokenizer (lm-eval's ``hf`` backend)."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from lm.tokenizer import PAT_STR, default_tokenizer_path

    tok = Tokenizer()
    specials = [name for name, _ in sorted(tok.special_tokens.items(), key=lambda item: item[1])]
    fast = TikTokenConverter(
        vocab_file=str(default_tokenizer_path()), pattern=PAT_STR, additional_special_tokens=specials
    ).converted()
    fast.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TEXT} $A", special_tokens=[(BOS_TEXT, tok.bos_id)]
    )
    PreTrainedTokenizerFast(tokenizer_object=fast, bos_token=BOS_TEXT, eos_token="<|end_of_text|>").save_pretrained(
        str(directory)
    )


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the ``llama3herd`` model registered (``python -m evaluation``)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    try:
        cli_evaluate()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

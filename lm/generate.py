"""Text generation with the KV cache: greedy, temperature, top-k and nucleus (top-p) sampling.

One prefill of the (left-padded) prompt batch, then one-token decode steps. A row stops at its first stop
token (which is *not* part of the returned ids), after `max_new_tokens`, or when prompt + output reach the
model's `max_seq_len`. Also a command line: `python -m lm.generate --checkpoint DIR --prompt "..."`.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import functools
import math
import numbers
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lm.attention import attention_inputs

if TYPE_CHECKING:
    from lm.model import Transformer
    from lm.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def _encode_prompts(tokenizer: Tokenizer | None, prompt) -> tuple[list[list[int]], bool]:
    """Normalize a prompt or a batch of prompts to token id lists; also say whether it was a batch."""
    if hasattr(prompt, "tolist"):  # tensors and numpy arrays
        prompt = prompt.tolist()
    if isinstance(prompt, str) or (isinstance(prompt, Sequence) and prompt and not _is_prompt(prompt[0])):
        prompts, batched = [prompt], False
    else:
        prompts, batched = list(prompt), True
    rows = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            p = tokenizer.encode(p, bos=True, eos=False)
        row = [int(t) for t in p]
        if not row:
            raise ValueError("empty prompt: pass at least one token (e.g. the BOS id)")
        rows.append(row)
    if not rows:
        raise ValueError("empty prompt batch")
    return rows, batched


def _is_prompt(x) -> bool:
    return isinstance(x, (str, Sequence, torch.Tensor))


@dataclass(frozen=True)
class SamplingConfig:
    """How new tokens are drawn, checked once: temperature 0 is greedy; top_p None (or 1) and top_k None (or 0)
    leave the distribution whole; stop_tokens None means the tokenizer's. row_seeds (one per prompt of the batch,
    over seed) give each row a generator of its own, so a row's draws do not depend on the rows beside it."""

    max_new_tokens: int = 256
    temperature: float = 0.6
    top_p: float | None = 0.9
    top_k: int | None = None
    seed: int | None = None
    stop_tokens: tuple[int, ...] | None = None
    row_seeds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        positive = isinstance(self.max_new_tokens, numbers.Integral) and self.max_new_tokens >= 1
        if isinstance(self.max_new_tokens, bool) or not positive:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        temperature = self.temperature
        if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if self.top_p is not None and not (isinstance(self.top_p, numbers.Real) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None), got {self.top_p!r}")
        if self.top_k is not None and not (isinstance(self.top_k, numbers.Integral) and self.top_k >= 0):
            raise ValueError(f"top_k must be an int >= 0 (or None), got {self.top_k!r}")
        if self.stop_tokens is not None:
            object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens))
        if self.row_seeds is not None:
            object.__setattr__(self, "row_seeds", tuple(int(s) for s in self.row_seeds))

    @classmethod
    def of(cls, sampling: SamplingConfig | None = None, **settings: Any) -> SamplingConfig:
        """`sampling` (default: the defaults) with the given keyword settings replacing its fields."""
        return dataclasses.replace(sampling or cls(), **settings)


Generators = torch.Generator | Sequence[torch.Generator] | None


def _sample(logits: torch.Tensor, sampling: SamplingConfig, generator: Generators) -> torch.Tensor:
    """Pick the next token of each row from logits [B, V]; temperature 0 is greedy (argmax)."""
    temperature, top_p, top_k = sampling.temperature, sampling.top_p, sampling.top_k
    if temperature <= 0 or top_k == 1:
        # max() returns the first maximal index like argmax, but argmax is ~4x slower on bf16 CPU tensors.
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    use_top_p = top_p is not None and top_p < 1.0
    if top_k is not None and 0 < top_k < vocab:
        values, indices = torch.topk(logits, top_k, dim=-1)  # sorted, as top-p needs
        probs = torch.softmax(values, dim=-1)
    elif use_top_p:
        probs, indices = _nucleus_candidates(torch.softmax(logits, dim=-1), top_p)
    else:
        return draw_index(torch.softmax(logits, dim=-1), generator)
    if use_top_p:
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays), as Meta does.
        cumulative = probs.cumsum(dim=-1)
        probs = probs.masked_fill(cumulative - probs > top_p, 0.0)
    return indices.gather(-1, draw_index(probs, generator)[:, None]).squeeze(-1)


def _nucleus_candidates(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable tokens of each row (probabilities, indices; sorted), k large enough to hold the nucleus.

    Sorting a 128K vocabulary costs tens of ms on a CPU. The nucleus is almost always small, so take the top k,
    growing k until the k hold more than top_p of the mass: then every token outside them falls outside the
    nucleus, and the result equals a full sort's. Only the rows still short of top_p grow k (one broad row must
    not sort the whole batch); the others are padded with zero probabilities, which are never drawn.
    """
    vocab = probs.shape[-1]
    k = min(256, vocab)
    top, indices = torch.topk(probs, k, dim=-1)
    short = top.sum(dim=-1) <= top_p
    while k < vocab and bool(short.any()):
        k = min(k * 8, vocab)
        rows = short.nonzero().squeeze(1)
        more, more_indices = torch.topk(probs[rows], k, dim=-1)
        width = k - top.shape[1]
        top = F.pad(top, (0, width))
        indices = torch.cat([indices, indices[:, :1].expand(-1, width)], dim=1)  # any real token: never drawn
        top[rows], indices[rows] = more, more_indices
        short[rows] = more.sum(dim=-1) <= top_p
    return top, indices


def draw_index(weights: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One index per row of weights [B, N] (not necessarily normalized), with probability ~ weight; `generator` may
    be one per row."""
    # Inverse CDF with one uniform per row: torch.multinomial draws one exponential per entry
    # instead, which costs milliseconds on a 128K vocabulary.
    cdf = weights.cumsum(dim=-1)
    if isinstance(generator, Sequence):
        if len(generator) != weights.shape[0]:
            raise ValueError(f"{len(generator)} generators for {weights.shape[0]} rows")
        u = torch.cat([torch.rand(1, 1, generator=g, device=weights.device, dtype=cdf.dtype) for g in generator])
    else:
        u = torch.rand(weights.shape[0], 1, generator=generator, device=weights.device, dtype=cdf.dtype)
    # right=True skips zero-weight entries (their cdf equals the previous one).
    index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return index.clamp_(max=weights.shape[-1] - 1).squeeze(-1)


@dataclass
class _PaddedBatch:
    """A left-padded prompt batch [B, prompt_len]; for ragged rows, each cache column's RoPE position and whether
    it holds a real token (None when no row is padded: the model derives both and takes its mask-free path)."""

    tokens: torch.Tensor
    positions: torch.Tensor | None
    key_valid: torch.Tensor | None


def _left_pad(rows: list[list[int]], total_len: int, device: torch.device) -> _PaddedBatch:
    """Left-pad `rows` to the longest; cache column c holds row b's token at RoPE position c - pad[b]."""
    lengths = [len(r) for r in rows]
    prompt_len = max(lengths)
    tokens = torch.zeros(len(rows), prompt_len, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, prompt_len - len(row) :] = torch.tensor(row)
    tokens = tokens.to(device)
    if all(n == prompt_len for n in lengths):
        return _PaddedBatch(tokens, None, None)
    pad = torch.tensor([prompt_len - n for n in lengths], device=device)
    columns = torch.arange(total_len, device=device)
    return _PaddedBatch(tokens, (columns[None, :] - pad[:, None]).clamp(min=0), columns[None, :] >= pad[:, None])


def _forward_at(
    model: Transformer,
    tokens: torch.Tensor,
    start_pos: int,
    key_valid: torch.Tensor | None,
    positions: torch.Tensor | None,
    output: str,
) -> torch.Tensor:
    """The model over `tokens` [B, S] written to the KV cache at [start_pos, start_pos + S); left-padded rows bring
    their padding's `key_valid` and RoPE `positions`."""
    if positions is None:
        return model(tokens, start_pos=start_pos, output=output)
    attention = attention_inputs(
        model.config, *tokens.shape, tokens.device, start_pos=start_pos, key_valid=key_valid, positions=positions
    )
    return model(tokens, attention=attention, output=output)


def _step(
    forward: Callable[..., torch.Tensor], tokens: torch.Tensor, batch: _PaddedBatch, start_pos: int, output: str
) -> torch.Tensor:
    """`forward` (`_forward_at` of a model, or its compiled graph) at `start_pos`, with the batch's padding."""
    if batch.positions is None:
        return forward(tokens, start_pos, None, None, output)
    end = start_pos + tokens.shape[1]
    return forward(tokens, start_pos, batch.key_valid[:, :end], batch.positions[:, start_pos:end], output)


def _decode_logits(
    model: Transformer, tokens: torch.Tensor, batch: _PaddedBatch, start_pos: int, compile: bool
) -> torch.Tensor:
    """Logits [B, V] of one decode step."""
    if compile:
        # The compiled graph fuses the vocabulary projection too, beating the eager BLAS path.
        return _step(_compiled(model), tokens, batch, start_pos, "logits")[:, -1]
    hidden = _step(functools.partial(_forward_at, model), tokens, batch, start_pos, "hidden")[:, -1]
    return vocab_projection(hidden, model.output.weight)


def _stream_rows(
    model: Transformer,
    rows: list[list[int]],
    sampling: SamplingConfig,
    stop_tokens: Iterable[int],
    compile: bool = False,
) -> Iterator[list[int | None]]:
    """Yield, per decode step, each row's new token, or None once that row has finished."""
    if model.config.num_labels:
        raise ValueError("the model has a score head (a reward model): it scores text, it does not generate")
    max_seq_len = model.config.max_seq_len
    prompt_len = max(len(r) for r in rows)
    if prompt_len >= max_seq_len:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room under max_seq_len={max_seq_len}")
    total_len = min(max_seq_len, prompt_len + sampling.max_new_tokens)
    output_weight = model.output.weight
    device = output_weight.device
    stops = frozenset(int(t) for t in stop_tokens)
    batch = _left_pad(rows, total_len, device)
    generator = _generators(sampling, len(rows), device)
    # The last sampled token is never fed back, so the cache needs one column less than the sequence.
    model.setup_cache(len(rows), total_len - 1)
    try:
        # The norm is per position, so the last one's hidden state is the same as normalising it alone.
        hidden = _step(functools.partial(_forward_at, model), batch.tokens, batch, 0, "hidden")[:, -1]
        logits = vocab_projection(hidden.contiguous(), output_weight)
        done = [False] * len(rows)
        for cur in range(prompt_len, total_len):
            next_token = _sample(logits, sampling, generator)
            # One host sync per step: the ids are needed for stop checks (and streaming) anyway.
            ids = next_token.tolist()
            done = [finished or t in stops for finished, t in zip(done, ids, strict=True)]
            yield [None if finished else t for finished, t in zip(done, ids, strict=True)]
            if all(done) or cur + 1 == total_len:
                break
            logits = _decode_logits(model, next_token[:, None], batch, cur, compile)
    finally:
        model.clear_cache()


def _generators(sampling: SamplingConfig, rows: int, device: torch.device) -> Generators:
    """The batch's generator (seeded, or None for the global one), or one per row for `row_seeds`."""
    if sampling.row_seeds is not None:
        if len(sampling.row_seeds) != rows:
            raise ValueError(f"row_seeds has {len(sampling.row_seeds)} seeds for a batch of {rows} prompts")
        return [torch.Generator(device=device).manual_seed(seed) for seed in sampling.row_seeds]
    if sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


_GEMV_THREADS: ThreadPoolExecutor | None = None


def vocab_projection(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Logits [B, V] from final hidden states [B, D]: the largest matrix of a decode step, read once per token."""
    if hidden.shape[0] > 1 or hidden.device.type != "cpu" or weight.dtype != torch.float32:
        return F.linear(hidden, weight)
    # Batch-1 decoding on a CPU: MKL runs an fp32 matrix-vector product on one thread, which leaves the
    # other cores idle while streaming the 128K-row vocabulary matrix (most of a step's time). Split the
    # rows across threads (torch releases the GIL inside the kernel).
    global _GEMV_THREADS
    threads = torch.get_num_threads()
    if threads == 1:
        return F.linear(hidden, weight)
    if _GEMV_THREADS is None or _GEMV_THREADS._max_workers != threads:
        _GEMV_THREADS = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gemv")
    logits = torch.empty(1, weight.shape[0], dtype=hidden.dtype)
    vector = hidden[0].detach()
    parts = zip(weight.detach().chunk(threads), logits[0].chunk(threads), strict=True)
    for job in [_GEMV_THREADS.submit(_mv_into, rows, vector, out) for rows, out in parts]:
        job.result()
    return logits


def _mv_into(matrix: torch.Tensor, vector: torch.Tensor, out: torch.Tensor) -> None:
    with torch.inference_mode():  # grad modes are per thread; the caller's does not reach a worker
        torch.mv(matrix, vector, out=out)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled(model: Transformer) -> Callable[..., torch.Tensor]:
    """`_forward_at` of the model compiled once for decode steps (dynamic shapes: one graph for every position)."""
    if model not in _COMPILED:
        _COMPILED[model] = torch.compile(functools.partial(_forward_at, model), dynamic=True)
    return _COMPILED[model]


def _stop_tokens(sampling: SamplingConfig, tokenizer: Tokenizer | None) -> Iterable[int]:
    """The ids that end a row: the sampling's own, else the tokenizer's, else none."""
    if sampling.stop_tokens is not None:
        return sampling.stop_tokens
    return tokenizer.stop_tokens if tokenizer is not None else ()


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompt: Prompt | Sequence[Prompt],
    *,
    sampling: SamplingConfig | None = None,
    echo: bool = False,
    compile: bool = False,
    **settings: Any,
) -> list[int] | list[list[int]]:
    """New token ids (stop token excluded) for one prompt, or a list of them for a batch of prompts.

    `settings` are SamplingConfig's fields (max_new_tokens, temperature, top_p, top_k, seed, row_seeds,
    stop_tokens), over `sampling` when both are given. compile=True runs decode steps through torch.compile: a
    one-time compile (tens of seconds on a CPU) buys fused kernels and far less per-token overhead, worth it for
    long or repeated runs.
    """
    sampling = SamplingConfig.of(sampling, **settings)
    rows, batched = _encode_prompts(tokenizer, prompt)
    outputs: list[list[int]] = [list(r) if echo else [] for r in rows]
    for step in _stream_rows(model, rows, sampling, _stop_tokens(sampling, tokenizer), compile=compile):
        for out, t in zip(outputs, step, strict=True):
            if t is not None:
                out.append(t)
    return outputs if batched else outputs[0]


@torch.inference_mode()
def stream_generate(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompt: Prompt,
    *,
    sampling: SamplingConfig | None = None,
    echo: bool = False,
    compile: bool = False,
    **settings: Any,
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are sampled (stop token excluded); arguments as `generate`."""
    sampling = SamplingConfig.of(sampling, **settings)
    rows, batched = _encode_prompts(tokenizer, prompt)
    if batched:
        raise ValueError("stream_generate takes a single prompt; use generate for a batch")
    if echo:
        yield from rows[0]
    for (t,) in _stream_rows(model, rows, sampling, _stop_tokens(sampling, tokenizer), compile=compile):
        if t is None:
            return
        yield t


# ---- command line ---------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns token ids into text pieces without splitting multi-byte UTF-8 characters across tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # A character cut between tokens stays buffered here until its last byte arrives.
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Text completed by this token ('' while a character is still incomplete)."""
        return self.utf8.decode(self.tokenizer.decode_token(token))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end becomes U+FFFD)."""
        return self.utf8.decode(b"", final=True)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: stream a completion of --prompt from a checkpoint to stdout."""
    parser = argparse.ArgumentParser(prog="python -m lm.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="Meta or HF checkpoint directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat format)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16"), default="auto", help="auto: as stored in the checkpoint"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow start)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model path (default: Llama 3's)")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.checkpoint):
        parser.error(f"checkpoint directory not found: {args.checkpoint}")
    from lm.checkpoint import load_pretrained
    from lm.tokenizer import ChatFormat, Tokenizer

    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else Tokenizer()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model = load_pretrained(args.checkpoint, device=args.device, dtype=dtype)
    if args.chat:
        prompt = ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)

    decoder = IncrementalDecoder(tokenizer)
    start = time.perf_counter()
    first = None
    count = 0
    for token in stream_generate(
        model,
        tokenizer,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        compile=args.compile,
    ):
        if first is None:
            first = time.perf_counter()
        count += 1
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    sys.stdout.write(decoder.flush() + "\n")
    sys.stdout.flush()
    end = time.perf_counter()
    prefill = (first or end) - start
    decode_rate = (count - 1) / (end - first) if first is not None and count > 1 and end > first else 0.0
    print(
        f"{count} tokens in {end - start:.2f} s ({count / (end - start):.1f} tokens/s; prompt {len(prompt)} "
        f"tokens, first token {prefill * 1000:.0f} ms, decode {decode_rate:.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "IncrementalDecoder",
    "SamplingConfig",
    "draw_index",
    "generate",
    "main",
    "stream_generate",
    "vocab_projection",
]

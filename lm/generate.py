"""Text generation with the KV cache: greedy, temperature, top-k and nucleus (top-p) sampling.

One prefill of the (left-padded) prompt batch, then one-token decode steps. A row stops at its first stop
token (which is *not* part of the returned ids), after `max_new_tokens`, or when prompt + output reach the
model's `max_seq_len`. Also a command line: `python -m lm.generate --checkpoint DIR --prompt "..."`.
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lm.model import Transformer
    from lm.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def _encode_prompts(tokenizer: Tokenizer | None, prompt) -> tuple[list[list[int]], bool]:
    """Normalize a prompt or a batch of prompts to token id lists; also say whether it was a batch."""
    if isinstance(prompt, torch.Tensor):
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


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick the next token of each row from logits [B, V]; temperature 0 is greedy (argmax)."""
    if temperature <= 0 or top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    vocab = logits.shape[-1]
    use_top_p = top_p is not None and top_p < 1.0
    if top_k is not None and 0 < top_k < vocab:
        values, indices = torch.topk(logits, top_k, dim=-1)  # sorted, as top-p needs
        probs = torch.softmax(values, dim=-1)
    elif use_top_p:
        # Sorting a 128K vocabulary costs tens of ms on a CPU. The nucleus is almost always small, so
        # take the top k by probability, growing k until the k hold more than top_p of the mass: then
        # every token outside them falls outside the nucleus, and the result equals a full sort's.
        full = torch.softmax(logits, dim=-1)
        k = min(256, vocab)
        while True:
            probs, indices = torch.topk(full, k, dim=-1)
            if k == vocab or bool((probs.sum(dim=-1) > top_p).all()):
                break
            k = min(k * 8, vocab)
    else:
        probs = torch.softmax(logits, dim=-1)
        # With replacement: the same law for one draw, but a cumulative-sum search instead of one
        # exponential random number per vocabulary entry.
        return torch.multinomial(probs, 1, replacement=True, generator=generator).squeeze(-1)
    if use_top_p:
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays), as Meta does.
        cumulative = probs.cumsum(dim=-1)
        probs = probs.masked_fill(cumulative - probs > top_p, 0.0)
    choice = torch.multinomial(probs, 1, replacement=True, generator=generator)
    return indices.gather(-1, choice).squeeze(-1)


def _stream_rows(
    model: Transformer,
    rows: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    stop_tokens: Iterable[int],
    seed: int | None,
) -> Iterator[list[int | None]]:
    """Yield, per decode step, each row's new token, or None once that row has finished."""
    max_seq_len = model.config.max_seq_len
    batch = len(rows)
    lengths = [len(r) for r in rows]
    prompt_len = max(lengths)
    if prompt_len >= max_seq_len:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room under max_seq_len={max_seq_len}")
    total_len = min(max_seq_len, prompt_len + max_new_tokens)
    if total_len <= prompt_len:
        return
    weight = model.output.weight if model.output is not None else model.tok_embeddings.weight
    device = weight.device
    stops = frozenset(int(t) for t in stop_tokens)

    tokens = torch.zeros(batch, prompt_len, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, prompt_len - len(row) :] = torch.tensor(row)
    tokens = tokens.to(device)
    padded = any(n != prompt_len for n in lengths)
    if padded:
        # Cache column c holds row b's token at RoPE position c - pad[b]; pad columns are masked out.
        pad = torch.tensor([prompt_len - n for n in lengths], device=device)
        columns = torch.arange(total_len, device=device)
        key_valid = columns[None, :] >= pad[:, None]
        positions = (columns[None, :] - pad[:, None]).clamp(min=0)
    else:
        # Unpadded: let the model derive positions and take its mask-free single-token path.
        key_valid = positions = None

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    # The last sampled token is never fed back, so the cache needs one column less than the sequence.
    model.setup_cache(batch, total_len - 1)
    try:
        logits = model(
            tokens,
            start_pos=0,
            key_valid=None if key_valid is None else key_valid[:, :prompt_len],
            positions=None if positions is None else positions[:, :prompt_len],
            last_only=True,
        )
        done = [False] * batch
        for cur in range(prompt_len, total_len):
            next_token = _sample(logits[:, -1], temperature, top_p, top_k, generator)
            # One host sync per step: the ids are needed for stop checks (and streaming) anyway.
            ids = next_token.tolist()
            out: list[int | None] = []
            for b, t in enumerate(ids):
                if done[b] or t in stops:
                    done[b] = True
                    out.append(None)
                else:
                    out.append(t)
            yield out
            if all(done) or cur + 1 == total_len:
                break
            logits = model(
                next_token[:, None],
                start_pos=cur,
                key_valid=None if key_valid is None else key_valid[:, : cur + 1],
                positions=None if positions is None else positions[:, cur : cur + 1],
            )
    finally:
        model.clear_cache()


@torch.inference_mode()
def generate(
    model: Transformer,
    tokenizer: Tokenizer | None,
    prompt: Prompt | Sequence[Prompt],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.6,
    top_p: float | None = 0.9,
    top_k: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    seed: int | None = None,
    echo: bool = False,
) -> list[int] | list[list[int]]:
    """New token ids (stop token excluded) for one prompt, or a list of them for a batch of prompts."""
    rows, batched = _encode_prompts(tokenizer, prompt)
    if stop_tokens is None:
        stop_tokens = tokenizer.stop_tokens if tokenizer is not None else ()
    outputs: list[list[int]] = [list(r) if echo else [] for r in rows]
    for step in _stream_rows(
        model,
        rows,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_tokens=stop_tokens,
        seed=seed,
    ):
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
    max_new_tokens: int = 256,
    temperature: float = 0.6,
    top_p: float | None = 0.9,
    top_k: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    seed: int | None = None,
    echo: bool = False,
) -> Iterator[int]:
    """Yield the new token ids of one prompt as they are sampled (stop token excluded)."""
    rows, batched = _encode_prompts(tokenizer, prompt)
    if batched:
        raise ValueError("stream_generate takes a single prompt; use generate for a batch")
    if stop_tokens is None:
        stop_tokens = tokenizer.stop_tokens if tokenizer is not None else ()
    if echo:
        yield from rows[0]
    for (t,) in _stream_rows(
        model,
        rows,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop_tokens=stop_tokens,
        seed=seed,
    ):
        if t is None:
            return
        yield t


# ---- command line ---------------------------------------------------------------------------------


class _IncrementalDecoder:
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
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model path (default: Llama 3's)")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.checkpoint):
        parser.error(f"checkpoint directory not found: {args.checkpoint}")
    from lm.checkpoint import load_pretrained
    from lm.tokenizer import ChatFormat, Tokenizer

    tokenizer = Tokenizer(args.tokenizer) if args.tokenizer else Tokenizer()
    model = load_pretrained(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    if args.chat:
        prompt = ChatFormat(tokenizer).encode_dialog_prompt([{"role": "user", "content": args.prompt}])
    else:
        prompt = tokenizer.encode(args.prompt, bos=True, eos=False)

    decoder = _IncrementalDecoder(tokenizer)
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


__all__ = ["generate", "main", "stream_generate"]

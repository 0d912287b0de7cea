"""Data pipeline throughput beside what a training step consumes: `python bench/data.py [--scale 1.0]`.

1. prepare: the default corpus's text tokenized into shards (MB/s and tokens/s of text, all CPU cores).
2. loader: tokens/s of packed [B, seq_len + 1] rows with document ids delivered to a consumer that does
   nothing, in-process and with 2 DataLoader workers.
3. train step: forward + backward + AdamW of the CPU bench LM config (dim 512, 8 layers, 8 heads, 2 KV heads,
   FFN 1536, vocab 128256, fp32) on batch 4 x 256 tokens with document masks, tokens/s.
The loader must deliver >= 20x what a training step consumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.default import ANNEAL_WEIGHTS, DEFAULT_WEIGHTS, write_raw_corpus  # noqa: E402
from data.loader import PackedLoader  # noqa: E402
from data.mixture import Mixture  # noqa: E402
from data.prepare import prepare_text  # noqa: E402
from lm import LMConfig, Transformer  # noqa: E402

BATCH, SEQ = 4, 256


def bench_prepare(tmp: Path, scale: float) -> tuple[float, float, Mixture]:
    """Generate the default corpus text, then time tokenizing it into shards; returns (MB/s, tokens/s, mixture)."""
    started = time.perf_counter()
    inputs = write_raw_corpus(tmp / "raw", scale=scale)
    print(f"generate: default corpus text in {time.perf_counter() - started:.1f} s")
    text_bytes = tokens = 0
    seconds = 0.0
    for name, files in inputs.items():
        started = time.perf_counter()
        manifest = prepare_text(files, tmp / "corpus" / name, progress=False)
        seconds += time.perf_counter() - started
        text_bytes += manifest["input_bytes"]
        tokens += manifest["tokens"]
    print(f"prepare: {text_bytes / 1e6:.1f} MB of text, {tokens} tokens in {seconds:.1f} s ({os.cpu_count()} workers)")
    mixture = Mixture({n: tmp / "corpus" / n for n in DEFAULT_WEIGHTS}, DEFAULT_WEIGHTS, ANNEAL_WEIGHTS, 0.1)
    return text_bytes / 1e6 / seconds, tokens / seconds, mixture


def bench_loader(mixture: Mixture, workers: int, steps: int) -> float:
    """Tokens/s of batches handed to a consumer that does nothing."""
    loader = PackedLoader(mixture, seq_len=SEQ, batch_size=BATCH, num_workers=workers, total_steps=10**6)
    it = iter(loader)
    for _ in range(20):  # warm up: worker start, shard verification
        next(it)
    started = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    seconds = time.perf_counter() - started
    it.close()
    return steps * batch.tokens[:, :-1].numel() / seconds


def bench_train_step(mixture: Mixture, repeats: int) -> float:
    """Tokens/s of one forward + backward + AdamW step of the CPU bench config."""
    torch.manual_seed(0)
    cfg = LMConfig(
        dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=128256, ffn_dim_multiplier=None, multiple_of=256
    )
    model = Transformer(cfg)
    model.init_weights()
    hidden = model.layers["0"].feed_forward.w1.weight.shape[0]
    assert hidden == 1536, f"FFN hidden {hidden}, want 1536"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    it = iter(PackedLoader(mixture, seq_len=SEQ, batch_size=BATCH))
    times = []
    for i in range(repeats + 1):
        batch = next(it)
        started = time.perf_counter()
        logits = model(batch.tokens[:, :-1], document_ids=batch.document_ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step allocates optimizer state
            times.append(time.perf_counter() - started)
    times.sort()
    return BATCH * SEQ / times[len(times) // 2]


def main() -> None:
    """Run the three measurements and print them with the loader/consumer ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="default corpus size (1.0: about 10 MB text)")
    parser.add_argument("--loader-steps", type=int, default=2000)
    parser.add_argument("--train-steps", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        mb_s, tok_s, mixture = bench_prepare(Path(tmp), args.scale)
        print(f"prepare throughput: {mb_s:.2f} MB/s, {tok_s:,.0f} tokens/s")
        loader0 = bench_loader(mixture, 0, args.loader_steps)
        print(f"loader, in process:  {loader0:,.0f} tokens/s")
        loader2 = bench_loader(mixture, 2, args.loader_steps)
        print(f"loader, 2 workers:   {loader2:,.0f} tokens/s")
        train = bench_train_step(mixture, args.train_steps)
        print(f"train step (CPU bench config, batch {BATCH}x{SEQ}, fp32): {train:,.0f} tokens/s")
        print(
            f"loader / train step: {loader0 / train:,.0f}x in process, {loader2 / train:,.0f}x with 2 workers "
            f"(target >= 20x)"
        )


if __name__ == "__main__":
    main()

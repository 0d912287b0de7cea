"""Decode speed: lm.generate vs HF transformers' LlamaForCausalLM.generate on the same random weights.

Both engines run greedy decoding of a 16-token prompt to 64 new tokens, batch 1, in one process, in fp32
and bf16. Decode time per token is measured the same way for both: the median time of a 64-token run
minus the median time of a 1-token run (prefill plus the first token), divided by the 63 decode steps
between them. The floor is the median time to multiply every weight matrix of the model (all linear
layers and the output projection) by one vector in the same dtype: a decode step must stream every
weight once, so it cannot be faster; it is timed like the engines (mean of 63 passes, median over
repeats, interleaved with them). "% of floor" = floor time / per-token time. MKL runs an fp32
matrix-vector product on one thread, so that floor is not the machine's limit: the read-only floor
(summing every weight once, all threads) is also printed, the true least cost of streaming the weights.
On CUDA the same figures come from a larger model (the 8B shape with its layers cut, ``--preset``/``--layers``),
synchronising the device around every timed call.

    python bench/generate.py [--threads 2] [--repeats 7]
    python bench/generate.py --device cuda --preset llama3-8b --layers 8 --prompt-len 128 --new-tokens 128
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm.checkpoint import save_pretrained  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from lm.generate import generate  # noqa: E402
from lm.model import Transformer  # noqa: E402

# ffn_hidden_dim = 512 * ceil(int(2 * 4 * 512 / 3) / 512) = 512 * ceil(1365 / 512) = 1536.
CONFIG = LMConfig(
    dim=512, n_layers=8, n_heads=8, n_kv_heads=2, vocab_size=128256, multiple_of=512, ffn_dim_multiplier=None
)


def _timed(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ours(model, prompt: list[int], n: int, compile: bool = False) -> list[int]:
    return generate(model, None, prompt, max_new_tokens=n, temperature=0, stop_tokens=(), compile=compile)


def _hf(model, prompt: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            min_new_tokens=n,
            max_new_tokens=n,
            pad_token_id=0,
        )
    return out[0, prompt.shape[1] :].tolist()


def _floor_fn(model: Transformer, dtype: torch.dtype):
    """Multiply every linear weight (and the output projection) by one vector; returns the fastest way."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert any(w is model.output.weight for w in weights)
    vectors = {w.shape[1]: torch.randn(w.shape[1], dtype=dtype, device=w.device) for w in weights}
    rows = {k: v[None] for k, v in vectors.items()}

    def mv():
        for w in weights:
            torch.mv(w, vectors[w.shape[1]])

    def linear():
        for w in weights:
            F.linear(rows[w.shape[1]], w)

    def read():
        for w in weights:
            w.sum()

    return {"torch.mv": mv, "F.linear": linear, "read": read}


def bench_dtype(
    dtype: torch.dtype, base: Transformer, path: Path, repeats: int, prompt_len: int, new: int, compile: bool
):
    """Per-token decode times (seconds) of ours, HF and the floor in one dtype, interleaved."""
    import transformers

    device = base.output.weight.device
    ours = base.to(dtype)
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)
    vocab = base.config.vocab_size
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(0))
    prompt_ids, prompt_tensor = prompt.tolist(), prompt[None].to(device)
    floors = _floor_fn(ours, dtype)

    # Warm up: allocator, oneDNN kernel selection, HF's lazy generation setup.
    ours_ids = _ours(ours, prompt_ids, new)
    hf_ids = _hf(hf, prompt_tensor, new)
    _ours(ours, prompt_ids, 1), _hf(hf, prompt_tensor, 1)
    compiled_ids = _ours(ours, prompt_ids, new, compile=True) if compile else None  # pays the compile here
    for fn in floors.values():
        fn()

    engines = ("ours_1", "ours_n", "hf_1", "hf_n") + (("compiled_1", "compiled_n") if compile else ())
    times = {k: [] for k in (*engines, *floors)}
    # Interleaved, so that load from other processes hits every engine alike.
    with torch.inference_mode():
        for _ in range(repeats):
            times["ours_1"].append(_timed(lambda: _ours(ours, prompt_ids, 1)))
            times["ours_n"].append(_timed(lambda: _ours(ours, prompt_ids, new)))
            times["hf_1"].append(_timed(lambda: _hf(hf, prompt_tensor, 1)))
            times["hf_n"].append(_timed(lambda: _hf(hf, prompt_tensor, new)))
            if compile:
                times["compiled_1"].append(_timed(lambda: _ours(ours, prompt_ids, 1, compile=True)))
                times["compiled_n"].append(_timed(lambda: _ours(ours, prompt_ids, new, compile=True)))
            for name, fn in floors.items():
                # Same statistic as the engines: the mean over as many passes as decode steps.
                times[name].append(_timed(lambda fn=fn: [fn() for _ in range(new - 1)]) / (new - 1))
    med = {k: statistics.median(v) for k, v in times.items()}
    floor_name = min(("torch.mv", "F.linear"), key=lambda k: med[k])
    matched = sum(a == b for a, b in zip(ours_ids, hf_ids, strict=True))
    return {
        "ours": (med["ours_n"] - med["ours_1"]) / (new - 1),
        "hf": (med["hf_n"] - med["hf_1"]) / (new - 1),
        "ours_prefill": med["ours_1"],
        "hf_prefill": med["hf_1"],
        "floor": med[floor_name],
        "floor_how": floor_name,
        "floor_all": {k: med[k] for k in floors},
        "read": med["read"],
        "match": f"{matched}/{new}",
        "compiled": (med["compiled_n"] - med["compiled_1"]) / (new - 1) if compile else None,
        "compiled_match": f"{sum(a == b for a, b in zip(compiled_ids, hf_ids, strict=True))}/{new}" if compile else "",
    }


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd decode row")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--preset", default=None, help="an LMConfig preset instead of the CPU config (e.g. llama3-8b)")
    parser.add_argument("--layers", type=int, default=None, help="layers kept of the preset (fit one device)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers

    config = CONFIG
    if args.preset:
        config = LMConfig.from_preset(args.preset)
        config = dataclasses.replace(config, n_layers=args.layers or config.n_layers)
    with torch.device(args.device):
        model = Transformer(config)
        model.init_weights()
    model.eval()
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{device}; config: dim {config.dim}, {config.n_layers} layers, {config.n_heads} heads, "
        f"{config.n_kv_heads} KV heads, FFN {config.ffn_hidden_dim}, vocab {config.vocab_size}; "
        f"{n_weights / 1e6:.1f}M matrix weights"
    )
    print(
        f"batch 1, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, greedy; "
        f"median of {args.repeats} repeats"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, format="hf")
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            results[name] = bench_dtype(
                dtype, model, Path(tmp), args.repeats, args.prompt_len, args.new_tokens, not args.no_compile
            )

    header = (
        f"{'dtype':<17} {'ours tok/s':>10} {'HF tok/s':>9} {'ours/HF':>8} {'floor ms':>9} "
        f"{'ours ms':>8} {'HF ms':>7} {'ours %floor':>11} {'HF %floor':>9} {'ids = HF':>9}"
    )
    print()
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(
            f"{name:<17} {1 / r['ours']:>10.1f} {1 / r['hf']:>9.1f} {r['hf'] / r['ours']:>8.2f} "
            f"{r['floor'] * 1e3:>9.2f} {r['ours'] * 1e3:>8.2f} {r['hf'] * 1e3:>7.2f} "
            f"{100 * r['floor'] / r['ours']:>10.0f}% {100 * r['floor'] / r['hf']:>8.0f}% {r['match']:>9}"
        )
        if r["compiled"] is not None:
            label = f"{name}+compile"
            print(
                f"{label:<17} {1 / r['compiled']:>10.1f} {1 / r['hf']:>9.1f} {r['hf'] / r['compiled']:>8.2f} "
                f"{r['floor'] * 1e3:>9.2f} {r['compiled'] * 1e3:>8.2f} {r['hf'] * 1e3:>7.2f} "
                f"{100 * r['floor'] / r['compiled']:>10.0f}% {100 * r['floor'] / r['hf']:>8.0f}% "
                f"{r['compiled_match']:>9}"
            )
    print()
    for name, r in results.items():
        floors = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in r["floor_all"].items() if k != "read")
        print(
            f"{name}: read-only floor (sum every weight once) {r['read'] * 1e3:.2f} ms: ours at "
            f"{100 * r['read'] / r['ours']:.0f}%, HF at {100 * r['read'] / r['hf']:.0f}% of memory bandwidth"
        )
        print(
            f"{name}: floor = fastest of ({floors}); prefill + first token: ours {r['ours_prefill'] * 1e3:.1f} ms, "
            f"HF {r['hf_prefill'] * 1e3:.1f} ms"
        )


if __name__ == "__main__":
    main()

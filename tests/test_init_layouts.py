"""Random initialisation is one model under every layout: the same seed gives the same bits on 1 rank, FSDP, TP,
PP and their combinations, and the same as ``Transformer.init_weights(seed)``.

Also a torchrun entry: ``tests/test_init_layouts.py [train/lm.py options]`` builds the model as ``train/lm.py``
does (``parallelize_llama``, random init) and each rank saves the full weights of its parameters, gathered from
their shards, to ``RUN_DIR/weights-rank{R}.pt``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    # As a torchrun script tests/ leads sys.path; the repo root must win so `train` is the package.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import lm.model  # noqa: E402
from lm.config import LMConfig  # noqa: E402
from lm.model import Transformer, init_values  # noqa: E402

SCRIPT = "tests/test_init_layouts.py"
SEED = 5
# The debug preset shrunk to what the layouts need: 2 layers (2 pipeline stages), 2 KV heads (tp=2).
SHAPE = {"dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 1024}


def small_config(**overrides) -> LMConfig:
    """The model every layout below builds (``overrides``: other [model] shape keys)."""
    return LMConfig.from_preset("debug", **(SHAPE | overrides))


# ----------------------------------------------------------------------------------------------------------------
# One process.


def test_any_region_draws_the_same_bits_as_the_whole(monkeypatch):
    """Shards spanning several generator blocks, and column slices of them, are slices of the full draw."""
    monkeypatch.setattr(lm.model, "INIT_BLOCK_ELEMENTS", 7 * 32)  # 7-row blocks: shard edges fall inside blocks
    config, name, shape = small_config(), "layers.1.feed_forward.w1.weight", (96, 32)
    whole = init_values(name, shape, config, SEED)
    for rows, cols in [(slice(0, 48), slice(0, 32)), (slice(48, 96), slice(16, 32)), (slice(5, 6), slice(3, 9))]:
        assert torch.equal(init_values(name, shape, config, SEED, [rows, cols]), whole[rows, cols])
    assert init_values(name, shape, config, SEED, [slice(96, 96), slice(0, 32)]).shape == (0, 32)


def test_init_weights_follows_the_init_table():
    """Llama's distributions: embedding N(0, 1), output cut at 3 std, depth-scaled residual outputs, unit norms."""
    model = Transformer(small_config())
    model.init_weights(seed=SEED)
    weights = dict(model.named_parameters())
    assert weights["tok_embeddings.weight"].std().item() == pytest.approx(1.0, rel=0.05)
    out_std = model.config.dim**-0.5
    assert weights["output.weight"].abs().max().item() <= 3 * out_std
    for name in ("layers.0.attention.wq.weight", "layers.1.feed_forward.w1.weight"):
        assert weights[name].std().item() == pytest.approx(0.02, rel=0.1), name
    for layer in (0, 1):
        depth_std = 0.02 / (2 * (layer + 1)) ** 0.5
        for proj in ("attention.wo", "feed_forward.w2", "feed_forward.w3"):
            got = weights[f"layers.{layer}.{proj}.weight"].std().item()
            assert got == pytest.approx(depth_std, rel=0.1), (layer, proj)
    for name in ("norm.weight", "layers.1.attention_norm.weight", "layers.0.ffn_norm.weight"):
        assert torch.equal(weights[name], torch.ones_like(weights[name]))
    with pytest.raises(KeyError, match="no initialisation rule"):
        lm.model.param_init("layers.0.attention.wz.weight", model.config)


def test_init_weights_seeds():
    """A seed fixes the bits; without one ``torch.manual_seed`` decides and consecutive models differ."""
    config = small_config()

    def weights(seed: int | None) -> torch.Tensor:
        model = Transformer(config)
        model.init_weights(seed)
        return model.layers["0"].attention.wq.weight

    assert torch.equal(weights(SEED), weights(SEED)) and not torch.equal(weights(SEED), weights(SEED + 1))
    torch.manual_seed(0)
    first, second = weights(None), weights(None)
    torch.manual_seed(0)
    assert torch.equal(weights(None), first) and not torch.equal(first, second)


# ----------------------------------------------------------------------------------------------------------------
# Every layout, through train/lm.py's own model build.

LAYOUTS = {
    "one-rank": (1, [], {}),
    "fsdp2": (2, [], {}),
    "fsdp2-uneven": (2, [], {"vocab_size": 1001}),  # embedding and output shards of 501 and 500 rows
    "tp2": (2, ["--parallel.tp=2"], {}),
    "pp2": (2, ["--parallel.pp=2", "--parallel.dp_shard=1"], {}),
    # FSDP over TP shards (strided shards of dim 0), and HSDP replicas of TP shards.
    "fsdp2xtp2": (4, ["--parallel.tp=2"], {}),
    "hsdp2xtp2": (4, ["--parallel.dp_replicate=2", "--parallel.dp_shard=1", "--parallel.tp=2"], {}),
}


def built_weights(run_dir: Path, nproc: int, options: list[str], shape: dict) -> dict[str, torch.Tensor]:
    """The full weights ``nproc`` ranks start from under ``options``, merged over the ranks (each parameter must
    be the same on every rank that holds it)."""
    from tests.dist_utils import torchrun

    argv = ["--config", "configs/lm/debug.toml", f"--run.dir={run_dir}", f"--run.seed={SEED}", *options]
    argv += [f"--model.{key}={value}" for key, value in (SHAPE | shape).items()]
    proc = torchrun(SCRIPT, nproc, argv, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    merged: dict[str, torch.Tensor] = {}
    for rank in range(nproc):
        for name, tensor in torch.load(run_dir / f"weights-rank{rank}.pt").items():
            assert torch.equal(merged.setdefault(name, tensor), tensor), f"rank {rank} disagrees on {name}"
    return merged


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_starts_from_the_one_rank_model(tmp_path, layout):
    """The trainer's random init under ``layout`` is ``Transformer.init_weights(SEED)``, bit for bit."""
    nproc, options, shape = LAYOUTS[layout]
    got = built_weights(tmp_path, nproc, options, shape)
    model = Transformer(small_config(**shape))
    model.init_weights(seed=SEED)
    want = dict(model.named_parameters())
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # The bug this guards against: every shard drawn from one RNG state, each half of a matrix a copy of the other.
    for name in ("tok_embeddings.weight", "output.weight", "layers.1.attention.wq.weight"):
        top, bottom = got[name].chunk(2)
        assert not torch.equal(top[: len(bottom)], bottom), name


# ----------------------------------------------------------------------------------------------------------------
# The torchrun entry.


def save_built_weights(argv: list[str] | None = None) -> None:
    """Build the model as ``train/lm.py`` does and save each rank's gathered parameters; no data, no training."""
    from torch.distributed.tensor import DTensor

    from train.config import parse_cli
    from train.lm import LMJobConfig, validate
    from train.loop import init_run
    from train.parallel.llama import parallelize_llama
    from train.parallel.mesh import run_then_destroy

    cfg, _ = parse_cli(LMJobConfig, argv)
    lm_config = validate(cfg)
    ctx = init_run(cfg)

    def gather() -> None:
        model = parallelize_llama(cfg, lm_config, ctx)
        weights = {
            name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for name, p in model.named_parameters()
        }
        torch.save(weights, os.path.join(cfg.run.dir, f"weights-rank{ctx.rank}.pt"))

    run_then_destroy(gather)  # no rank tears gloo down while another still talks to it


if __name__ == "__main__":
    from train.parallel.mesh import exit_rank

    save_built_weights()
    exit_rank()


def test_values_are_drawn_on_the_cpu_under_any_default_device():
    """`with torch.device("cuda"): model.init_weights()` (bench/generate.py on the GPU) once drew into the default
    device with a CPU generator and failed; the values come from the CPU whatever the default device is."""
    cfg = LMConfig.from_preset("debug")
    expected = init_values("layers.0.attention.wq.weight", (64, 128), cfg, seed=3)
    with torch.device("meta"):
        got = init_values("layers.0.attention.wq.weight", (64, 128), cfg, seed=3)
    assert got.device.type == "cpu" and torch.equal(got, expected)

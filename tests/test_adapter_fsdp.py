"""Adapter training under FSDP2, one forward/backward per modality on 2 gloo ranks with tiny random models: the
gradients equal a 1-rank run without FSDP on the same batch (fp32, 1e-5), and no sharded block returns a view.

FSDP2 warns when a wrapped module (or a method registered with ``register_fsdp_forward_method``, as the
cross-attention blocks' ``media_kv`` is) returns a view: an in-place op on it would drop FSDP's pre-backward hook
and skip the all-gather backward needs. The model is sharded by ``train.stage.shard`` over ``fsdp_blocks``, as
``train/adapter.py`` shards it. Run as a script, this file is the rank worker (``tests/dist_utils.torchrun``).
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    # As a script tests/ leads sys.path; the repository root must come first so `train` is the package.
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    sys.path.insert(0, os.path.dirname(_HERE))

import copy  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODALITIES = ("vision", "video", "speech")
WORLD = 2
TILE = 32  # image and frame side: the tiny encoder at its cheapest
VIEW_WARNING = "returned a view tensor"
# The classes fsdp_blocks shards one by one, by the names fully_shard gives them (train_encoder on, as by default).
SHARDED_BLOCKS = {
    "vision": ["FSDPCrossAttentionBlock", "FSDPEncoderBlock"],
    "video": ["FSDPCrossAttentionBlock", "FSDPPerceiverLayer"],
    "speech": ["FSDPConformerBlock"],
}


# ----------------------------------------------------------------------------------------------------------------
# Tiny models and batches of WORLD rows (one per rank), built alike on every rank.


def _tiny_lm():
    from lm.config import LMConfig
    from lm.model import Transformer

    cfg = LMConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=256)
    lm = Transformer(cfg)
    lm.init_weights()
    return lm


def _open_gates(model: torch.nn.Module) -> None:
    """Gates as if trained: at 0 (fresh) the parameters behind a gate would all get zero gradients."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name.rsplit(".", 1)[-1]:
                p.fill_(0.5)


def vision_case() -> tuple[Any, dict[str, Any]]:
    """train/adapter.py's vision stage: a frozen LM, a trained image encoder and a new image adapter."""
    from adapters.vision import VisionAdapter, VisionAdapterConfig
    from encoders.vision import VisionEncoder, VisionEncoderConfig
    from llama3mm import Llama3MM

    lm = _tiny_lm()
    encoder = VisionEncoder(VisionEncoderConfig.from_preset("tiny", image_size=TILE, max_num_tiles=1))
    adapter = VisionAdapter(VisionAdapterConfig.from_lm(lm.config, encoder.cfg.output_dim, num_layers=2))
    mm = Llama3MM(lm, vision_encoder=encoder, vision_adapter=adapter)
    _open_gates(mm)
    tokens = torch.randint(0, 256, (WORLD, 10))
    tokens[:, 1] = mm.image_token_id
    images = torch.rand(WORLD, 1, 1, 3, TILE, TILE)
    return mm, {"tokens": tokens, "images": images, "aspect_ratio_ids": torch.ones(WORLD, 1, dtype=torch.long)}


def video_case() -> tuple[Any, dict[str, Any]]:
    """train/adapter.py's video stage: a vision-stage model, all frozen, and a new video adapter."""
    from adapters.video import VideoAdapter, VideoAdapterConfig

    mm, _ = vision_case()
    mm.requires_grad_(False)
    enc = mm.vision_encoder.cfg
    shape = {"tokens_per_frame": enc.num_tokens, "motion_grid": enc.grid, "frames_per_group": 4}
    video = VideoAdapterConfig.from_vision(mm.vision_adapter.cfg, num_latents=4, aggregator_heads=4, **shape)
    mm.video_adapter = VideoAdapter(video)
    _open_gates(mm.video_adapter)
    clips = [torch.randint(0, 256, (6, 3, TILE, TILE), dtype=torch.uint8) for _ in range(WORLD)]  # 2 groups each
    return mm, {"tokens": torch.randint(0, 256, (WORLD, 10)), "video": clips}


def speech_case() -> tuple[Any, dict[str, Any]]:
    """train/adapter.py's speech stage: a frozen LM, a trained speech encoder and a new speech adapter."""
    from adapters.speech import SpeechAdapter, SpeechAdapterConfig
    from encoders.speech import SpeechEncoder, SpeechEncoderConfig
    from llama3mm import Llama3MM

    lm = _tiny_lm()
    encoder = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny"))
    adapter = SpeechAdapter(SpeechAdapterConfig(encoder_dim=encoder.cfg.dim, lm_dim=64, dim=64, heads=4, ffn_dim=128))
    mm = Llama3MM(lm, speech_encoder=encoder, speech_adapter=adapter)
    clips = [0.1 * torch.randn(2400) for _ in range(WORLD)]  # equal lengths: every rank scores as many tokens
    rows = [[1, mm.audio_token_id, 5, 6, 7] for _ in range(WORLD)]
    batch = mm.processor(rows, audio=clips, pad_id=0)
    return mm, {"tokens": batch["tokens"], "audio": batch["audio"], "audio_lengths": batch["audio_lengths"]}


CASES = {"vision": vision_case, "video": video_case, "speech": speech_case}


def rows(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows [start, stop) of a batch (every input, tensor or list of clips, is per row)."""
    return {key: value[start:stop] for key, value in batch.items()}


def loss_of(model: torch.nn.Module, batch: dict[str, Any], labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position: equal row lengths make the ranks' mean the global one."""
    logits = model(**batch)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


# ----------------------------------------------------------------------------------------------------------------
# The rank worker.


def compare(modality: str, rank: int, mesh) -> dict[str, Any]:
    """One step of ``modality``: the unsharded reference over the whole batch, then FSDP over this rank's row."""
    from train.adapter import AdapterJobConfig, fsdp_blocks
    from train.stage import shard

    torch.manual_seed(0)  # the same model and batch on every rank
    mm, batch = CASES[modality]()
    labels = torch.randint(0, 256, batch["tokens"].shape)
    reference = copy.deepcopy(mm)
    loss_of(reference, batch, labels).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    # shard() reads only these three fields of the stage train/adapter.py builds.
    stage = SimpleNamespace(
        model=mm, blocks=fsdp_blocks(mm), frozen={p for p in mm.parameters() if not p.requires_grad}
    )
    shard(AdapterJobConfig(), SimpleNamespace(mesh=mesh), stage)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss_of(mm, rows(batch, rank, rank + 1), labels[rank : rank + 1]).backward()

    got = {}
    for name, p in mm.named_parameters():
        if p.requires_grad and p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            got[name] = grad.reshape(expected[name].shape)  # fully_shard stores 0-dim parameters as [1]
    mismatched = []
    for name, want in expected.items():
        if want is None or name not in got or not torch.allclose(got[name], want, rtol=1e-5, atol=1e-5):
            diff = None if want is None or name not in got else (got[name] - want).abs().max().item()
            mismatched.append(f"{name} (max |diff| {diff})")
    return {
        "blocks": sorted({type(b).__name__ for b in stage.blocks}),
        "trainable": len(expected),
        "zero_grads": sorted(n for n, g in expected.items() if g is None or not g.any()),
        "mismatched": mismatched,
        "warnings": [str(w.message) for w in caught],
    }


def worker(out_dir: str) -> None:
    """Every modality on this rank; writes OUT_DIR/rank{R}.json."""
    from train.config import ParallelConfig
    from train.parallel.mesh import run_then_destroy, setup

    torch.set_num_threads(1)
    _, mesh = setup(ParallelConfig())
    rank = torch.distributed.get_rank()
    results = run_then_destroy(lambda: {modality: compare(modality, rank, mesh) for modality in MODALITIES})
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))


# ----------------------------------------------------------------------------------------------------------------
# The test.


def test_fsdp_adapter_gradients_equal_one_rank_and_no_block_returns_a_view(tmp_path):
    """Vision, video and speech stages on 2 ranks: gradients equal the unsharded run's, no FSDP view warning."""
    from dist_utils import torchrun

    proc = torchrun(os.path.relpath(__file__, os.path.dirname(_HERE)), WORLD, [str(tmp_path)], timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    for rank in range(WORLD):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for modality in MODALITIES:
            r = results[modality]
            views = [w for w in r["warnings"] if VIEW_WARNING in w]
            assert not views, f"rank {rank}, {modality}: {views}"
            assert not r["mismatched"], f"rank {rank}, {modality}: gradients differ: {r['mismatched']}"
            # Every trainable parameter was compared and got a gradient (the speech placeholders' embedding row
            # is replaced by the clip's, so the extra token table alone gets none there).
            assert r["trainable"] > 0 and set(r["zero_grads"]) <= {"extra_embeddings"}, (rank, modality, r)
            assert r["blocks"] == SHARDED_BLOCKS[modality], (rank, modality, r["blocks"])


@pytest.mark.parametrize("n_kv_heads, media_tokens", [(2, 5), (1, 5), (2, 1)])
def test_media_kv_returns_fresh_tensors_with_unchanged_values(n_kv_heads, media_tokens):
    """Keys and values are no views, also where the head-major transpose is already contiguous (one KV head, one
    media token), and equal the projections split into heads."""
    from adapters.vision import CrossAttention, VisionAdapterConfig

    torch.manual_seed(0)
    cfg = VisionAdapterConfig(vision_dim=8, dim=64, n_heads=4, n_kv_heads=n_kv_heads, ffn_hidden_dim=128)
    attention = CrossAttention(cfg)
    media = torch.randn(2, media_tokens, 64)
    k, v = attention.media_kv(media)
    assert k._base is None and v._base is None
    heads = (2, media_tokens, n_kv_heads, cfg.head_dim)
    torch.testing.assert_close(k, attention.k_norm(attention.wk(media).view(heads)).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(v, attention.wv(media).view(heads).transpose(1, 2), rtol=0, atol=0)


if __name__ == "__main__":
    from train.parallel.mesh import exit_rank

    worker(sys.argv[1])
    exit_rank()

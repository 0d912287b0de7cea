"""`train/adapter.py --dry-run` and `train/encoder.py --dry-run` (train.dryrun_media): each block's activation formula
is what autograd keeps for that block alone, and whole fp32 micro-batches of every media stage keep what the plan
says, with and without full checkpointing; the planned frozen, trainable and AdamW bytes are a real build's; the 8B
vision stage fits 8 x 80 GiB and is planned in seconds, while a 70B replicated on one 80 GiB rank does not fit."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from train import dryrun_media as dm
from train.dryrun import GIB, optimizer_state_bytes
from train.dryrun_media import activation_bytes, adapter_parts, bestrq_parts, clip_parts, tags_parts

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny shapes

TILE = 32  # image and frame side: the tiny encoder at its cheapest
BATCH, TEXT, SCORED = 2, 20, 6
IGNORE = -100


# ----------------------------------------------------------------------------------------------------------------
# What autograd keeps: every tensor saved for backward, counted once by storage (parameters and buffers aside).


def saved_bytes(fn, *args, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while ``fn(*args)`` runs."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def kept_after_forward(fn) -> int:
    """Bytes a forward leaves allocated (what backward will use), the returned loss aside; sees checkpoint inputs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = fn()
    return sum(e.self_cpu_memory_usage for e in prof.key_averages()) - loss.untyped_storage().nbytes()


def stage_loss(mm, batch):
    """train/adapter.py's loss of a batch (only the target tokens are projected and scored)."""
    from train.adapter import batch_loss

    return batch_loss(mm, dict(batch), torch.device("cpu"))[0]


# ----------------------------------------------------------------------------------------------------------------
# Each block's formula against the block alone (fp32: a = 4). Returns (what to run, what not to count, planned).


def frozen_lm_layer():
    from lm.attention import build_mask

    lm = tiny_lm()
    lm.requires_grad_(False)
    c, seq = lm.config, 64
    x = torch.randn(BATCH, seq, c.dim, requires_grad=True)
    rope, mask = lm.rope(torch.arange(seq)), build_mask("sdpa", batch=BATCH, q_len=seq, kv_len=seq, device=x.device)
    per_token = dm.frozen_lm_layer_bytes(c.dim, c.n_kv_heads * c.head_dim, c.ffn_hidden_dim, c.n_heads, 4)
    return lambda: lm.layers["0"](x, rope, mask), [*lm.parameters(), rope], BATCH * seq * per_token


def cross_attention_block():
    from adapters.vision import CrossAttentionBlock, MediaAttentionMask, VisionAdapterConfig

    cfg = VisionAdapterConfig(vision_dim=64, dim=128, n_heads=4, n_kv_heads=2, ffn_hidden_dim=352, layers=(0,))
    block, text, keys = CrossAttentionBlock(cfg), 24, 40
    x, media = torch.randn(BATCH, text, 128, requires_grad=True), torch.randn(BATCH, keys, 128, requires_grad=True)
    mask = MediaAttentionMask(torch.rand(BATCH, 1, text, keys) > 0.3, torch.ones(BATCH, 1, text, 1))
    planned = BATCH * text * dm.cross_attention_block_bytes(128, 352, 4, keys, 4)
    planned += BATCH * keys * dm.cross_attention_kv_bytes(64, 2, 4)
    planned += BATCH * keys * 4 * 128  # the media tokens wk and wv keep (a stage plans them with what makes them)
    return lambda: block(x, block.media_kv(media), mask), [*block.parameters(), *vars(mask).values()], planned


def vit_block(gated: bool):
    from encoders.vision import VisionEncoder, VisionEncoderConfig

    cfg = VisionEncoderConfig.from_preset("tiny")
    encoder, tiles = VisionEncoder(cfg), 4
    block = (encoder.global_transformer if gated else encoder.transformer).resblocks[0]
    length = tiles * 72  # 65 tokens per tile padded to 72
    x = torch.randn(BATCH, length, cfg.width, requires_grad=True)
    padding = torch.arange(length) % 72 >= cfg.num_tokens  # the encoder's rule: padding never attends to padding
    mask = ~(padding[:, None] & padding[None, :]).expand(BATCH, 1, length, length)
    planned = BATCH * length * dm.vit_block_bytes(cfg.width, cfg.heads, length, 4, gated)
    return lambda: block(x, mask), [*block.parameters()], planned


def conformer_block():
    from encoders.speech import ConformerBlock, SpeechEncoderConfig, lengths_to_mask

    cfg, steps = SpeechEncoderConfig(dim=64, layers=1, heads=4, ffn_dim=96, conv_kernel=7), 48
    block = ConformerBlock(cfg)
    x = torch.randn(BATCH, steps, 64, requires_grad=True)
    mask = lengths_to_mask(torch.tensor([steps, 30]), steps)
    planned = BATCH * steps * dm.conformer_block_bytes(64, 96, 4, 4) + dm.rotary_table_bytes(16, steps, 4)
    return lambda: block(x, mask[:, None, None, :], mask[..., None].float()), [*block.parameters()], planned


def speech_adapter():
    from adapters.speech import SpeechAdapter, SpeechAdapterConfig

    adapter, steps = SpeechAdapter(SpeechAdapterConfig(encoder_dim=64, lm_dim=80, dim=96, heads=4, ffn_dim=112)), 48
    x = torch.randn(BATCH, steps, 64, requires_grad=True)
    planned = BATCH * dm.speech_adapter_bytes(64, 96, 112, 4, steps, 4) + dm.rotary_table_bytes(24, steps // 2, 4)
    return lambda: adapter(x, torch.tensor([steps, steps])), [*adapter.parameters()], planned


def perceiver_layer():
    from adapters.video import PerceiverLayer, VideoAdapterConfig

    cfg = VideoAdapterConfig(dim=64, n_heads=4, n_kv_heads=2, ffn_hidden_dim=96, layers=(0,), aggregator_heads=4)
    layer, media_tokens, latents = PerceiverLayer(cfg), 68, 8
    media = torch.randn(BATCH, media_tokens, 64, requires_grad=True)
    queries = torch.randn(BATCH, latents, 64, requires_grad=True)
    valid = torch.ones(BATCH, media_tokens, dtype=torch.bool)
    planned = BATCH * dm.perceiver_layer_bytes(64, 4, media_tokens, latents, 4)
    planned += BATCH * media_tokens * 4 * 64  # the media the norm keeps, shared by every layer (the stage's once)
    return lambda: layer(media, queries, valid), [*layer.parameters()], planned


BLOCKS = {
    "frozen LM layer": frozen_lm_layer,
    "cross-attention block and its keys and values": cross_attention_block,
    "ViT block": lambda: vit_block(gated=False),
    "gated ViT block": lambda: vit_block(gated=True),
    "Conformer block": conformer_block,
    "speech adapter": speech_adapter,
    "perceiver layer": perceiver_layer,
}


@pytest.mark.parametrize("block", list(BLOCKS))
def test_block_formulas_are_what_autograd_keeps(block):
    """Each formula of train.dryrun_media against its block alone, tensor by tensor (the gates' scalars aside)."""
    torch.manual_seed(0)
    run, exclude, planned = BLOCKS[block]()
    assert planned == pytest.approx(saved_bytes(run, exclude=exclude), rel=2e-3, abs=16)


# ----------------------------------------------------------------------------------------------------------------
# Tiny models of each adapter stage, with a batch of the sizes the plan describes.


def tiny_lm():
    from lm.config import LMConfig
    from lm.model import Transformer

    config = LMConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=512)
    lm = Transformer(config)
    lm.init_weights()
    return lm


def with_labels(batch: dict) -> dict:
    """Labels scoring the last SCORED tokens of every row, as the collator scores a target."""
    labels = torch.full_like(batch["tokens"], IGNORE)
    labels[:, -SCORED - 1 : -1] = batch["tokens"][:, -SCORED:]
    return {**batch, "labels": labels}


def vision_case(train_encoder: bool = True, tiles: int = 2):
    from adapters.vision import VisionAdapter, VisionAdapterConfig
    from encoders.tiling import aspect_ratio_id
    from encoders.vision import VisionEncoder, VisionEncoderConfig
    from llama3mm import Llama3MM

    lm = tiny_lm()
    encoder = VisionEncoder(VisionEncoderConfig.from_preset("tiny", image_size=TILE, max_num_tiles=4))
    adapter = VisionAdapter(VisionAdapterConfig.from_lm(lm.config, encoder.cfg.output_dim, num_layers=2))
    encoder.requires_grad_(train_encoder)
    mm = Llama3MM(lm, vision_encoder=encoder, vision_adapter=adapter)
    tokens = torch.randint(0, 256, (BATCH, TEXT + 1))
    tokens[:, 1] = mm.image_token_id
    batch = {
        "tokens": tokens,
        "images": torch.rand(BATCH, 1, tiles, 3, TILE, TILE),
        "aspect_ratio_ids": torch.full((BATCH, 1), aspect_ratio_id((1, tiles), 4)),
    }
    return mm, with_labels(batch), SimpleNamespace(text_tokens=TEXT, target_tokens=SCORED, tiles=tiles)


def video_case(frames: int = 8):
    from adapters.video import VideoAdapter, VideoAdapterConfig

    mm, _, _ = vision_case()
    mm.requires_grad_(False)
    enc = mm.vision_encoder.cfg
    shape = {"tokens_per_frame": enc.num_tokens, "motion_grid": enc.grid, "frames_per_group": 4}
    video = VideoAdapterConfig.from_vision(mm.vision_adapter.cfg, num_latents=4, aggregator_heads=4, **shape)
    mm.video_adapter = VideoAdapter(video)
    clips = [torch.randint(0, 256, (frames, 3, TILE, TILE), dtype=torch.uint8) for _ in range(BATCH)]
    batch = {"tokens": torch.randint(0, 256, (BATCH, TEXT)), "video": clips}
    return mm, with_labels(batch), SimpleNamespace(text_tokens=TEXT, target_tokens=SCORED, frames=frames)


def speech_case(seconds: float = 0.6):
    from adapters.speech import SpeechAdapter, SpeechAdapterConfig
    from encoders.speech import SpeechEncoder, SpeechEncoderConfig
    from llama3mm import Llama3MM

    lm = tiny_lm()
    encoder = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny"))
    adapter = SpeechAdapter(SpeechAdapterConfig(encoder_dim=encoder.cfg.dim, lm_dim=64, dim=96, heads=4, ffn_dim=128))
    mm = Llama3MM(lm, speech_encoder=encoder, speech_adapter=adapter)
    clips = [0.1 * torch.randn(int(seconds * 16000)) for _ in range(BATCH)]
    rows = [[1, mm.audio_token_id, *range(5, 4 + TEXT)] for _ in range(BATCH)]
    inputs = mm.processor(rows, audio=clips, pad_id=0)
    batch = {k: inputs[k] for k in ("tokens", "audio", "audio_lengths")}
    return mm, with_labels(batch), SimpleNamespace(text_tokens=TEXT, target_tokens=SCORED, audio_seconds=seconds)


CASES = {
    "vision": vision_case,
    "vision, encoder frozen": lambda: vision_case(train_encoder=False),
    "video": video_case,
    "speech": speech_case,
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapter_activation_formulas_are_what_autograd_keeps(case):
    """One fp32 micro-batch of each stage: the planned activations equal the bytes autograd saves, to 2%."""
    torch.manual_seed(0)
    mm, batch, sample = CASES[case]()
    exclude = [*mm.parameters(), *mm.buffers()]
    kept = saved_bytes(lambda: stage_loss(mm, batch), exclude=exclude)
    planned = activation_bytes(adapter_parts(mm, case.split(",")[0], sample, BATCH, 4, 4), "none")
    assert sum(planned.values()) == pytest.approx(kept, rel=0.02), planned


@pytest.mark.parametrize("case", ["vision", "speech"])
def test_full_checkpointing_keeps_the_block_inputs(case):
    """train.ac = full on the stage's FSDP blocks (fsdp_blocks): what the forward leaves allocated is the plan's
    (block inputs, plus what the frozen LM and the unwrapped parts keep), to 3%."""
    from train.adapter import fsdp_blocks
    from train.parallel.fsdp import apply_ac

    torch.manual_seed(0)
    mm, batch, sample = CASES[case]()
    apply_ac(fsdp_blocks(mm), "full")
    kept = kept_after_forward(lambda: stage_loss(mm, batch))
    planned = activation_bytes(adapter_parts(mm, case, sample, BATCH, 4, 4), "full")
    recompute = planned.pop("recompute of one block")  # backward's peak, not the forward's
    assert 0 < recompute < sum(planned.values())
    assert sum(planned.values()) == pytest.approx(kept, rel=0.03), planned


def test_encoder_activation_formulas_are_what_autograd_keeps():
    """CLIP (ViT, text tower, contrastive loss) and BEST-RQ (Conformer, head) on fp32 micro-batches, to 2%."""
    from encoders.objectives import BEST_RQ_PRESETS, BestRQ, CLIPModel, TagClassifier, TextTowerConfig, clip_loss
    from encoders.speech import SpeechEncoderConfig, log_mel, num_feature_frames
    from encoders.vision import VisionEncoderConfig

    torch.manual_seed(0)
    batch = 8
    vision, text = VisionEncoderConfig.from_preset("tiny"), TextTowerConfig.from_preset("tiny")
    clip = CLIPModel(vision, text)
    images = torch.randn(batch, 3, vision.image_size, vision.image_size)
    tokens = torch.randint(1, 100, (batch, text.context_length))
    criterion = clip_loss()

    def clip_step():
        img, txt, scale = clip(images, tokens)
        return criterion(img.float(), txt.float(), scale.float())

    kept = saved_bytes(clip_step, exclude=[*clip.parameters(), *clip.buffers()])
    assert sum(activation_bytes(clip_parts(clip, batch, 1, 4), "none").values()) == pytest.approx(kept, rel=0.02)

    tagger = TagClassifier(vision, 36)
    targets = (torch.rand(batch, 36) < 0.2).float()
    kept = saved_bytes(
        lambda: F.binary_cross_entropy_with_logits(tagger(images).float(), targets), exclude=[*tagger.parameters()]
    )
    assert sum(activation_bytes(tags_parts(tagger, batch, 4), "none").values()) == pytest.approx(kept, rel=0.02)

    bestrq = BestRQ(SpeechEncoderConfig.from_preset("tiny"), **BEST_RQ_PRESETS["tiny"])
    seconds = 2.0
    samples = int(seconds * 16000)
    features = torch.stack([log_mel(0.1 * torch.randn(samples)) for _ in range(batch)])
    lengths = torch.full((batch,), num_feature_frames(samples))
    generator = torch.Generator().manual_seed(0)
    kept = saved_bytes(lambda: bestrq(features, lengths, generator).loss, exclude=[*bestrq.parameters()])
    planned = activation_bytes(bestrq_parts(bestrq, seconds, batch, 4), "none")
    assert sum(planned.values()) == pytest.approx(kept, rel=0.02)


# ----------------------------------------------------------------------------------------------------------------
# Parameter bytes: the plan against a real build.


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny LM in HF layout and tiny vision and speech encoders on disk, as the real stages load them."""
    from encoders.speech import SpeechEncoder, SpeechEncoderConfig
    from encoders.vision import VisionEncoder, VisionEncoderConfig
    from lm.checkpoint import save_pretrained

    root = tmp_path_factory.mktemp("dryrun")
    torch.manual_seed(0)
    save_pretrained(tiny_lm(), root / "lm", format="hf")
    VisionEncoder(VisionEncoderConfig.from_preset("tiny")).save_pretrained(root / "vision")
    SpeechEncoder(SpeechEncoderConfig.from_preset("tiny")).save_pretrained(root / "speech")
    return root


@pytest.mark.parametrize("modality", ["vision", "speech"])
def test_planned_bytes_are_a_real_one_rank_build(modality, checkpoints):
    """The real stage model (bf16 frozen LM, trained encoder): frozen bytes, trainable parameters and AdamW bytes
    exactly as planned on a fake world of one; what trains is fp32 and gets gradients, the LM none."""
    from train.adapter import MODALITY_TABLE, AdapterJobConfig, batch_loss, plan
    from train.config import load_config
    from train.optim import build_optimizer

    overrides = [
        f"--model.lm={checkpoints / 'lm'}",
        f"--model.vision_encoder={checkpoints / 'vision'}",
        f"--model.speech_encoder={checkpoints / 'speech'}",
        "--model.lm_dtype=bfloat16",
        "--model.train_encoder=true",
        "--model.vision_layers=2",
        "--eval.generate_sharded=false",  # rank 0's evaluation copy, planned below (the tiny configs generate batched)
    ]
    cfg = load_config(AdapterJobConfig, f"configs/adapter/{modality}_tiny.toml", overrides)
    build = next(m for m in MODALITY_TABLE if m.name == modality).build_model
    real = build(cfg.model, torch.device("cpu"))
    frozen = [p for p in real.parameters() if not p.requires_grad]
    trained = [p for p in real.parameters() if p.requires_grad]
    assert {p.dtype for p in real.lm.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in trained} == {torch.float32}
    optimizer = build_optimizer(real, cfg.optim)
    for p in trained:
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW allocates its moments on the first step

    report = plan(cfg, modality, 1)
    assert report["frozen"]["frozen_params"] == sum(p.numel() for p in frozen)
    assert report["frozen"]["frozen_bytes"] == sum(p.numel() * p.element_size() for p in frozen)
    assert report["trainable"]["params"] == sum(p.numel() for p in trained)
    assert (
        report["trainable"]["param_bytes"] == report["trainable"]["grad_bytes"] == 4 * sum(p.numel() for p in trained)
    )
    assert report["trainable"]["optimizer_bytes"] == optimizer_state_bytes(optimizer)
    # Rank 0's evaluation copy: everything but the LM.
    assert report["eval_copy_bytes"] == sum(
        p.numel() * p.element_size() for n, p in real.named_parameters() if n[:3] != "lm."
    )

    # The bf16 LM beside fp32 adapters trains: a step's gradients reach what trains, never the LM.
    optimizer.zero_grad(set_to_none=True)
    batch_loss(real, real_batch(real, modality), torch.device("cpu"))[0].backward()
    assert all(p.grad is not None for p in real.trainable_parameters())
    assert all(p.grad is None for p in real.lm.parameters())


def real_batch(mm, modality: str) -> dict:
    """A two-row batch for the real stage model: an image (one tile) or half a second of audio, then text."""
    if modality == "vision":
        size = mm.vision_encoder.cfg.image_size
        tokens = torch.randint(0, 256, (BATCH, TEXT + 1))
        tokens[:, 1] = mm.image_token_id
        media = {"images": torch.rand(BATCH, 1, 1, 3, size, size), "aspect_ratio_ids": torch.ones(BATCH, 1).long()}
        return with_labels({"tokens": tokens, **media})
    rows = [[1, mm.audio_token_id, *range(5, 4 + TEXT)] for _ in range(BATCH)]
    inputs = mm.processor(rows, audio=[0.1 * torch.randn(8000) for _ in range(BATCH)], pad_id=0)
    return with_labels({k: inputs[k] for k in ("tokens", "audio", "audio_lengths")})


@pytest.mark.parametrize("objective", ["clip", "tags"])
def test_vision_plan_gives_no_adamw_state_to_the_parts_pretraining_never_runs(objective):
    """Encoder pretraining (CLIP or tags) never runs the Llama 3.2 tile embeddings and global layers: a real step
    leaves them without gradients or AdamW moments, and the plan counts exactly the moments the real optimizer holds."""
    from encoders.objectives import clip_loss
    from train.config import load_config
    from train.dryrun_media import plan_stage
    from train.encoder import EncoderJobConfig, build_tagger, build_vision, planned_stage
    from train.optim import build_optimizer

    overrides = [f"--vision.objective={objective}", "--plan.tags=36"]
    cfg = load_config(EncoderJobConfig, "configs/encoder/vision_tiny.toml", overrides)
    torch.manual_seed(0)
    if objective == "clip":
        model, vision, text = build_vision(cfg)
        images = torch.rand(4, 3, vision.image_size, vision.image_size)
        img, txt, scale = model(images, torch.randint(1, 1000, (4, text.context_length)))
        clip_loss()(img, txt, scale).backward()
    else:
        model, vision = build_tagger(cfg, 36)
        logits = model(torch.rand(4, 3, vision.image_size, vision.image_size))
        F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits)).backward()
    optimizer = build_optimizer(model, cfg.optim)
    optimizer.step()
    assert model.vision.global_transformer.resblocks[0].gate_attn.grad is None

    report = plan_stage(cfg, 1, lambda: planned_stage(cfg, "vision"), title="vision encoder pretraining")
    assert report["trainable"]["optimizer_bytes"] == optimizer_state_bytes(optimizer)
    assert report["trainable"]["params"] == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# The paper-scale plans.


def test_8b_vision_stage_fits_8_ranks_of_80_gib(tmp_path, capsys):
    """configs/adapter/vision_llama3_8b.toml on a fake world of 8 (no checkpoint, no device): planned in seconds,
    it fits; the frozen 8B is replicated in bf16 and the trained encoder and adapter are sharded 8 ways."""
    from lm.config import LMConfig
    from train.adapter import main

    out = tmp_path / "plan.json"
    start = time.perf_counter()
    argv = ["--modality", "vision", "--config", "configs/adapter/vision_llama3_8b.toml", "--dry-run", "--world-size=8"]
    assert main([*argv, f"--dry-run-out={out}"]) == []
    assert time.perf_counter() - start < 20
    report = json.loads(out.read_text())
    assert report["fits"] and 20 * GIB < report["total_bytes"] < 80 * GIB
    assert f"FITS: the fullest rank (0) needs {report['worst_total_gb']:.2f} of 80 GiB" in capsys.readouterr().out
    lm_params = LMConfig.from_preset("llama3-8b").num_params()
    assert report["frozen"]["frozen_bytes"] == pytest.approx(2 * lm_params, rel=0.01)
    trainable = report["trainable"]
    assert trainable["params"] == pytest.approx(trainable["total_params"] / 8, rel=0.01)
    assert (report["micro_batch"], report["ac"]) == (16, "full")
    assert {"image encoder", "image cross-attention keys and values", "frozen LM layers"} <= set(report["activations"])


def test_70b_replicated_on_one_rank_does_not_fit(tmp_path, capsys):
    """The 70B vision stage on a single 80 GiB rank: DOES NOT FIT with the excess, reported (not raised)."""
    from train.adapter import main

    out = tmp_path / "plan.json"
    argv = ["--modality", "vision", "--config", "configs/adapter/vision_llama3_70b.toml", "--dry-run"]
    assert main([*argv, "--world-size=1", "--train.grad_accum=4096", f"--dry-run-out={out}"]) == []
    report = json.loads(out.read_text())
    excess = report["worst_total_gb"] - 80
    assert not report["fits"] and excess > 0
    assert (
        f"DOES NOT FIT: rank 0 needs {report['worst_total_gb']:.2f} GiB, {excess:.2f} GiB more"
        in capsys.readouterr().out
    )
    assert report["frozen"]["frozen_bytes"] > 80 * GIB  # the frozen 70B alone, in bf16


def test_encoder_plans_fit_8_ranks_and_dry_run_flags_need_dry_run(capsys):
    """The ViT-H/14 CLIP and Conformer-1B BEST-RQ configs fit 8 x 80 GiB; --world-size alone is refused."""
    from train.encoder import main

    for modality, config in (("vision", "vision_vit_h14"), ("speech", "speech_conformer_1b")):
        argv = ["--modality", modality, "--config", f"configs/encoder/{config}.toml", "--dry-run", "--world-size=8"]
        assert main(argv) == []
        assert "FITS: the fullest rank (0) needs" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--modality", "speech", "--config", "configs/encoder/speech_conformer_1b.toml", "--world-size=8"])
    assert "--world-size only applies with --dry-run" in capsys.readouterr().err

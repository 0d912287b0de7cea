"""CLIP against open_clip (model, tokenizer and loss), BEST-RQ quantizer/masking, learning signal."""

import pytest
import torch

from encoders.objectives import BestRQ, CLIPModel, TextTowerConfig, clip_loss, retrieval_accuracy
from encoders.speech import SpeechEncoderConfig
from encoders.vision import VisionEncoder, VisionEncoderConfig

VISION = dict(image_size=32, patch_size=8, width=64, layers=2, heads=4, embed_dim=24, intermediate_layers=(0,))
TEXT = dict(context_length=16, vocab_size=49408, width=32, heads=4, layers=1)


def _open_clip_pair():
    import open_clip

    torch.manual_seed(0)
    ref = open_clip.CLIP(
        embed_dim=24,
        vision_cfg={"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
        text_cfg=TEXT,
    ).eval()
    ours = CLIPModel(VisionEncoderConfig(**VISION, global_layers=1), TextTowerConfig(**TEXT)).eval()
    left = ours.load_open_clip(ref.state_dict())
    # Only the Llama 3.2 additions (tile embeddings, global layers) have nothing to load from open_clip.
    assert left and all(
        k.startswith("vision.") and k[len("vision.") :].startswith(VisionEncoder.OURS_ONLY) for k in left
    )
    return ref, ours


def test_open_clip_file_loads_whole_or_visual_only_and_refuses_a_misfit(tmp_path):
    """A saved open_clip CLIP file (DDP `module.` prefix included) loads into CLIPModel; a visual-only file leaves
    the text tower fresh; a text tower of another shape is an error naming its keys."""
    ref, _ = _open_clip_pair()
    sd = ref.state_dict()
    path = tmp_path / "clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    ours = CLIPModel(VisionEncoderConfig(**VISION, global_layers=1), TextTowerConfig(**TEXT))
    ours.load_open_clip(path)
    torch.testing.assert_close(ours.text.token_embedding.weight, ref.token_embedding.weight)
    torch.testing.assert_close(ours.logit_scale, ref.logit_scale)

    fresh = CLIPModel(VisionEncoderConfig(**VISION, global_layers=1), TextTowerConfig(**TEXT))
    before = fresh.text.token_embedding.weight.clone()
    left = fresh.load_open_clip({k: v for k, v in sd.items() if k.startswith("visual.")})
    assert "text.token_embedding.weight" in left and "logit_scale" in left
    assert torch.equal(fresh.text.token_embedding.weight, before)
    torch.testing.assert_close(fresh.vision.conv1.weight, ref.visual.conv1.weight)

    wider = CLIPModel(VisionEncoderConfig(**VISION, global_layers=1), TextTowerConfig(**{**TEXT, "width": 48}))
    with pytest.raises(RuntimeError, match="size mismatch"):
        wider.load_open_clip(sd)


def test_clip_model_and_loss_equal_open_clip():
    """Same weights: our embeddings, logit scale and ClipLoss equal open_clip's CLIP; tokenizer is open_clip's."""
    import open_clip

    ref, ours = _open_clip_pair()
    captions = ["a red circle on a blue background", "two green squares", "a small yellow triangle"]
    tokens = ours.tokenize(captions)
    assert torch.equal(tokens, open_clip.tokenizer.SimpleTokenizer(context_length=16)(captions))
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        img, txt, scale = ours(images, tokens)
        r_img, r_txt, r_scale = ref(images, tokens)
    torch.testing.assert_close(img, r_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(txt, r_txt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(clip_loss()(img, txt, scale), open_clip.ClipLoss()(r_img, r_txt, r_scale))
    assert retrieval_accuracy(txt, txt) == 1.0


def test_best_rq_quantizer_is_frozen_seeded_and_checkpointed():
    """Projections and codebooks are buffers (in the state dict, not parameters), equal for equal seeds."""
    cfg = SpeechEncoderConfig.from_preset("tiny")
    a, b, c = BestRQ.from_preset("tiny", cfg), BestRQ.from_preset("tiny", cfg), BestRQ.from_preset("tiny", cfg, seed=1)
    assert torch.equal(a.projection, b.projection) and torch.equal(a.codebooks, b.codebooks)
    assert not torch.equal(a.codebooks, c.codebooks)
    params = {n for n, _ in a.named_parameters()}
    assert "projection" not in params and "codebooks" not in params
    assert {"projection", "codebooks"} <= set(a.state_dict())
    torch.testing.assert_close(a.codebooks.norm(dim=-1), torch.ones(2, 64))
    # Targets are the cosine nearest neighbours, computed the slow way here.
    stacked = torch.randn(2, 7, 320)
    targets = a.targets(stacked)
    for k in range(a.num_codebooks):
        z = stacked @ a.projection[k]
        cos = torch.nn.functional.cosine_similarity(z[:, :, None], a.codebooks[k][None, None], dim=-1)
        assert torch.equal(targets[..., k], cos.argmax(-1))
    assert torch.equal(a.targets(stacked * 3.0), targets)  # scale-free: cosine


def test_best_rq_span_mask():
    """Spans lie within each utterance, every utterance has one, and spans are mask_span long."""
    model = BestRQ.from_preset("tiny", mask_prob=0.0)  # no random starts: exactly one forced span each
    lengths = torch.tensor([30, 12, 2])
    mask = model.span_mask(lengths, 30, torch.Generator().manual_seed(0))
    assert mask.any(dim=1).all()
    assert not mask[1, 12:].any() and not mask[2, 2:].any()
    assert mask[0].sum() <= 3 and mask[1].sum() <= 3
    dense = BestRQ.from_preset("tiny", mask_prob=0.2).span_mask(
        torch.tensor([400]), 400, torch.Generator().manual_seed(0)
    )
    assert 0.3 < dense.float().mean() < 0.7  # 1 - (1 - 0.2)^3 = 0.49 expected


@pytest.mark.timeout(60)
def test_few_steps_reduce_clip_and_best_rq_losses():
    """Tiny configs: a few Adam steps on one fixed batch lower both losses (the learning signal exists)."""
    # Tiny matrices: one thread avoids OpenMP spin-waits on a shared 2-core machine (5x faster there).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _few_steps()
    finally:
        torch.set_num_threads(threads)


def _few_steps() -> None:
    torch.manual_seed(0)
    clip = CLIPModel(VisionEncoderConfig.from_preset("tiny"), TextTowerConfig.from_preset("tiny"))
    images = torch.randn(8, 3, 64, 64)
    tokens = clip.tokenize([f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "star", "cross")])
    loss_fn = clip_loss()
    opt = torch.optim.AdamW(clip.parameters(), lr=5e-4)
    clip_losses = []
    for _ in range(10):
        loss = loss_fn(*clip(images, tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
        clip_losses.append(loss.item())
    assert clip_losses[-1] < 0.8 * clip_losses[0], clip_losses

    brq = BestRQ.from_preset("tiny")
    feats, lengths = torch.randn(4, 120, 80), torch.tensor([120, 100, 90, 60])
    opt = torch.optim.AdamW(brq.parameters(), lr=2e-3)
    rq_losses = []
    for step in range(15):
        out = brq(feats, lengths, torch.Generator().manual_seed(step % 3))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        rq_losses.append(out.loss.item())
    assert out.num_masked > 0
    assert rq_losses[-1] < 0.8 * rq_losses[0], rq_losses

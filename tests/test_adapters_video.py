"""The video adapter: placement, frame grouping, padded batches, fresh gates, gradients into video parameters only."""

import pytest
import torch
from conftest import tiny_model

from adapters.video import (
    TemporalAggregator,
    VideoAdapter,
    VideoAdapterConfig,
    encode_frames,
    feature_flow,
    video_layer_schedule,
)
from adapters.vision import VisionAdapter, VisionAdapterConfig, fusion_schedule
from encoders.vision import VisionEncoder, VisionEncoderConfig
from llama3mm import Llama3MM

DIM = 64


def _video_cfg(**overrides) -> VideoAdapterConfig:
    base = dict(dim=DIM, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, layers=(1,), num_latents=4, aggregator_heads=4)
    base.update(overrides)
    return VideoAdapterConfig(**base)


def test_video_blocks_sit_before_every_fourth_image_block():
    """32 LM layers, 8 image blocks (3, 7, ..., 31): video before image blocks 3 and 7; a small LM still gets one."""
    assert video_layer_schedule(fusion_schedule(32, 8)) == (15, 31)
    assert video_layer_schedule(fusion_schedule(80, 20)) == (15, 31, 47, 63, 79)
    assert video_layer_schedule((3,)) == (3,)
    vision = VisionAdapterConfig(vision_dim=32, dim=DIM, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128, layers=(3, 7))
    assert VideoAdapterConfig.from_vision(vision).layers == (7,)


def test_video_adapter_must_fit_the_lm():
    """A video adapter for another LM width, or for layers the LM lacks, is refused with both values named."""
    with pytest.raises(ValueError, match="video adapter width 64 != LM width 128"):
        Llama3MM(tiny_model(dim=128), video_adapter=VideoAdapter(_video_cfg()))
    with pytest.raises(ValueError, match=r"video adapter layers \(5,\) exceed the LM's 2"):
        Llama3MM(tiny_model(), video_adapter=VideoAdapter(_video_cfg(layers=(5,))))


def test_aggregator_merges_each_32_frames_and_masks_padding():
    """64 frames -> 2 groups of latents; 33 -> 2; 5 -> 1; padded frames never change the latents of real ones."""
    torch.manual_seed(0)
    aggregator = TemporalAggregator(_video_cfg()).eval()
    frames = torch.randn(1, 64, 3, DIM)
    for count, groups in ((64, 2), (33, 2), (5, 1)):
        latents, valid = aggregator(frames[:, :count], torch.tensor([count]))
        assert latents.shape == (1, groups, 4, DIM) and valid.tolist() == [[True] * groups]
    # 5 real frames followed by 59 frames of garbage: the same latents as the 5 alone, the second group masked.
    with torch.no_grad():
        alone, _ = aggregator(frames[:, :5], torch.tensor([5]))
        padded, valid = aggregator(frames, torch.tensor([5]))
    torch.testing.assert_close(padded[:, :1], alone, atol=1e-5, rtol=1e-5)
    assert valid.tolist() == [[True, False]]
    # A frame's place in its group matters (the frame embedding), so reversed clips give other latents.
    forward, _ = aggregator(frames[:, :8], torch.tensor([8]))
    backward, _ = aggregator(frames[:, :8].flip(1), torch.tensor([8]))
    assert not torch.allclose(forward, backward, atol=1e-3)


def test_place_embedding_tells_where_in_the_frame_a_token_was():
    """The perceiver's attention is blind to token order: without place embeddings, shuffling the tokens of every
    frame leaves the latents as they were (so an object moving left looks like one moving right); with
    tokens_per_frame they differ, and a frame of another token count is refused with both counts named."""
    torch.manual_seed(0)
    frames = torch.randn(1, 6, 5, DIM)
    shuffled = frames[:, :, torch.randperm(5)]
    count = torch.tensor([6])
    with torch.no_grad():
        blind = TemporalAggregator(_video_cfg()).eval()
        torch.testing.assert_close(blind(shuffled, count)[0], blind(frames, count)[0], atol=1e-5, rtol=1e-5)
        placed = TemporalAggregator(_video_cfg(tokens_per_frame=5)).eval()
        assert not torch.allclose(placed(shuffled, count)[0], placed(frames, count)[0], atol=1e-3)
        with pytest.raises(ValueError, match="frames have 4 tokens each but .* tokens_per_frame is 5"):
            placed(frames[:, :, :4], count)


MOVES = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}


def _moving_object(direction: str, frames: int = 4, grid: int = 8, dim: int = 16) -> torch.Tensor:
    """Patch features [1, F, grid, grid, dim]: a plain background (one random feature everywhere, as a plain wall's
    patches would have) and one object patch moving a patch a frame."""
    g = torch.Generator().manual_seed(1)
    background, thing = torch.randn(dim, generator=g).expand(grid, grid, dim), 3 * torch.randn(dim, generator=g)
    (dr, dc), out = MOVES[direction], []
    for f in range(frames):
        frame = background.clone()
        frame[4 + dr * f, 4 + dc * f] = thing
        out.append(frame)
    return torch.stack(out)[None]


@pytest.mark.parametrize("direction", sorted(MOVES))
def test_feature_flow_points_where_the_features_moved(direction):
    """An object patch moving one patch a frame over a still background: the summed flow points its way (x right,
    y down), the still background has none, and frames marked padding add nothing."""
    patches = _moving_object(direction)
    flow = feature_flow(patches, torch.ones(1, 4, dtype=torch.bool))
    total = flow.sum(dim=(0, 1, 2, 3))
    dr, dc = MOVES[direction]
    along, across = (total[0], total[1]) if dc else (total[1], total[0])
    assert float(along) * (dc or dr) > 0 and abs(float(across)) < 0.2 * abs(float(along))
    assert flow[0, 0].abs().max() == 0  # the first frame has no predecessor
    near = torch.zeros(8, 8, dtype=torch.bool)  # patches next to the object's path
    for f in range(4):
        near[3 + dr * f : 6 + dr * f, 3 + dc * f : 6 + dc * f] = True
    assert flow[0, :, ~near].abs().max() < 1e-6  # elsewhere a still background has no flow
    clipped = feature_flow(patches, torch.tensor([[True, True, True, False]]))
    torch.testing.assert_close(clipped[:, :3], flow[:, :3])
    assert clipped[:, 3:].abs().max() == 0


def test_motion_tokens_tell_a_clip_from_its_reverse():
    """The perceiver can tell frame order only through learned frame embeddings; the motion tokens carry the
    direction from the first step: rightwards for a clip, leftwards for its reverse. A frame with fewer tokens than
    the motion grid is refused."""
    torch.manual_seed(0)
    cfg = _video_cfg(motion_grid=8, tokens_per_frame=65)
    aggregator = TemporalAggregator(cfg).eval()
    project = torch.nn.Linear(16, DIM, bias=False)
    with torch.no_grad():
        patches = project(_moving_object("right")).flatten(2, 3)  # [1, 4, 64, DIM]
        frames = torch.cat([torch.zeros(1, 4, 1, DIM), patches], dim=2)  # a class token first, as the ViT's
        forward, _ = aggregator(frames, torch.tensor([4]))
        backward, _ = aggregator(frames.flip(1), torch.tensor([4]))
    assert cfg.tokens_per_group == 4 + 64 and forward.shape == (1, 1, 68, DIM)
    # Read the flow back out of the motion tokens (the projection is 2 -> DIM): rightwards, and leftwards reversed.
    place, proj = aggregator.motion.place_embedding, aggregator.motion.proj.weight
    flow_forward, flow_backward = (
        (tokens[0, 0, 4:] - place) @ torch.linalg.pinv(proj).T for tokens in (forward, backward)
    )
    (x_forward, y_forward), (x_backward, y_backward) = flow_forward.sum(0).tolist(), flow_backward.sum(0).tolist()
    assert x_forward > 1 and x_backward < -1 and max(abs(y_forward), abs(y_backward)) < 0.2 * abs(x_forward)
    with pytest.raises(ValueError, match="frames have 65 tokens each, fewer than the motion grid's 9x9"):
        TemporalAggregator(_video_cfg(motion_grid=9))(frames, torch.tensor([4]))


@pytest.mark.parametrize("motion_grid", [0, 2])
def test_padded_video_batch_equals_each_clip_alone(motion_grid):
    """Clips of 6 and 40 frames in one batch: each row's block output equals the clip alone (gates opened), with
    and without motion tokens."""
    torch.manual_seed(0)
    adapter = VideoAdapter(_video_cfg(motion_grid=motion_grid)).eval()
    block = adapter.cross_attention_layers[0]
    block.gate_attn.data.fill_(0.7)
    block.gate_ffwd.data.fill_(-0.4)
    frames = torch.randn(2, 40, 5, DIM)
    counts = torch.tensor([6, 40])
    text = torch.randn(2, 5, DIM)
    with torch.no_grad():
        latents, mask = adapter(frames, counts)
        batched = block(text, block.media_kv(latents), mask)
        for i, n in enumerate(counts.tolist()):
            one_latents, one_mask = adapter(frames[i : i + 1, :n], counts[i : i + 1])
            alone = block(text[i : i + 1], block.media_kv(one_latents), one_mask)
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched, text, atol=1e-3)  # the opened gates do act


def test_encode_frames_through_frozen_image_encoder_and_projection():
    """uint8 clips [F, 3, H, W] of different lengths -> projected tokens [B, F_max, N, dim]; a None clip is empty."""
    torch.manual_seed(0)
    enc_cfg = VisionEncoderConfig.from_preset("tiny", max_num_tiles=1)
    encoder = VisionEncoder(enc_cfg).eval()
    vision = VisionAdapter(
        VisionAdapterConfig(vision_dim=enc_cfg.output_dim, dim=DIM, n_heads=4, n_kv_heads=2, ffn_hidden_dim=128)
    )
    clips = [
        torch.randint(0, 256, (3, 3, 48, 80), dtype=torch.uint8),
        None,
        torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),
    ]
    tokens, counts = encode_frames(encoder, vision, clips)
    assert counts.tolist() == [3, 0, 2]
    assert tokens.shape[:2] == (3, 3) and tokens.shape[-1] == DIM and tokens.shape[2] >= enc_cfg.num_tokens
    assert not tokens[1].any() and not tokens[2, 2:].any() and not tokens.requires_grad
    alone, _ = encode_frames(encoder, vision, clips[2:])
    torch.testing.assert_close(tokens[2, :2], alone[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"video clip 0 has shape \(3, 48, 80\)"):
        encode_frames(encoder, vision, [clips[0][0]])


@pytest.fixture(scope="module")
def composed() -> Llama3MM:
    """A 4-layer tiny LM with a tiny image encoder, an image adapter whose gates are open (as if trained), and a
    fresh video adapter (groups of 4 frames, so short clips span groups); the image parts are frozen."""
    lm = tiny_model(n_layers=4)
    torch.manual_seed(1)
    enc_cfg = VisionEncoderConfig.from_preset("tiny", max_num_tiles=1)
    vision = VisionAdapter(VisionAdapterConfig.from_lm(lm.config, enc_cfg.output_dim))
    for block in vision.cross_attention_layers:
        block.gate_attn.data.fill_(0.5)
        block.gate_ffwd.data.fill_(0.5)
    video = VideoAdapter(
        VideoAdapterConfig.from_vision(vision.cfg, frames_per_group=4, num_latents=4, aggregator_heads=4)
    )
    mm = Llama3MM(lm, vision_encoder=VisionEncoder(enc_cfg), vision_adapter=vision, video_adapter=video).eval()
    mm.vision_encoder.requires_grad_(False)
    mm.vision_adapter.requires_grad_(False)
    return mm


def _frames(*counts: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g) for n in counts]


def _open_gates(adapter: VideoAdapter, value: float) -> None:
    for block in adapter.cross_attention_layers:
        block.gate_attn.data.fill_(value)
        block.gate_ffwd.data.fill_(value)


def test_fresh_video_gates_leave_logits_unchanged(composed):
    """Gates at 0: logits with a clip equal the frozen LM's on text, and the image-only logits with an image."""
    assert composed.video_adapter.cfg.layers == (3,) == composed.vision_adapter.cfg.layers
    _open_gates(composed.video_adapter, 0.0)
    tokens = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text_only = composed.lm(tokens)
        with_video = composed(tokens, video=_frames(3, 5))
        torch.testing.assert_close(with_video, text_only, rtol=0, atol=0)
        tokens[:, 2] = composed.image_token_id
        images = torch.rand(2, 1, 1, 3, 64, 64)
        ids = torch.ones(2, 1, dtype=torch.long)
        image_only = composed(tokens, images=images, aspect_ratio_ids=ids)
        both = composed(tokens, images=images, aspect_ratio_ids=ids, video=_frames(3, 5))
        torch.testing.assert_close(both, image_only, rtol=0, atol=0)
        assert not torch.allclose(image_only, composed.lm(tokens.clamp(max=511)), atol=1e-3)  # images do act


def test_padded_clip_batch_equals_each_row_alone(composed):
    """Opened gates: clips of 3 and 6 frames (1 and 2 groups; and a row without a clip) batched give each row's
    logits alone."""
    _open_gates(composed.video_adapter, 0.8)
    tokens = torch.randint(0, 500, (3, 10), generator=torch.Generator().manual_seed(1))
    clips = _frames(3, 6)
    with torch.no_grad():
        batched = composed(tokens, video=[clips[0], clips[1], None])
        for i, clip in enumerate(clips):
            torch.testing.assert_close(batched[i], composed(tokens[i : i + 1], video=[clip])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[2], composed.lm(tokens[2:])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], composed.lm(tokens[:1])[0], atol=1e-3)


def test_gradients_reach_video_parameters_only(composed):
    """A loss through a clip trains the aggregator and video blocks; the LM and the frozen image parts get none."""
    _open_gates(composed.video_adapter, 0.8)
    composed.zero_grad(set_to_none=True)
    tokens = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(2))
    composed(tokens, video=_frames(4)).logsumexp(-1).mean().backward()
    for name, param in composed.video_adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    others = [composed.lm, composed.vision_encoder, composed.vision_adapter]
    assert all(p.grad is None for part in others for p in part.parameters())
    trainable = {id(p) for p in composed.trainable_parameters()}
    assert {id(p) for p in composed.video_adapter.parameters()} <= trainable
    assert not trainable & {id(p) for part in others for p in part.parameters()}
    composed.zero_grad(set_to_none=True)


def test_generate_with_video_file_matches_full_forward(composed, tmp_path):
    """Greedy decoding from a video file (keys/values of its latents cached) equals the argmax of full forwards."""
    import av

    from encoders.video import load_video

    _open_gates(composed.video_adapter, 0.8)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for frame in _frames(6)[0]:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.permute(1, 2, 0).numpy(), format="rgb24")))
        container.mux(stream.encode())
    prompt = [1, 5, 9, 42, 7]
    new = list(composed.generate_tokens(prompt, video=path, max_new_tokens=4, temperature=0.0, stop_tokens=[]))
    assert len(new) == 4
    clip = load_video(path).permute(0, 3, 1, 2)
    assert clip.shape == (6, 3, 64, 64)
    with torch.no_grad():
        logits = composed(torch.tensor([prompt + new[:-1]]), video=[clip])[0]
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == new


def test_video_adapter_survives_save_and_load(composed, tmp_path):
    """save_pretrained / from_pretrained keep the video adapter (config and weights): the same logits."""
    _open_gates(composed.video_adapter, 0.3)
    composed.save_pretrained(tmp_path / "mm")
    loaded = Llama3MM.from_pretrained(tmp_path / "mm", device="cpu").eval()
    assert loaded.video_adapter.cfg == composed.video_adapter.cfg
    tokens, clips = torch.tensor([[1, 5, 9, 42]]), _frames(2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens, video=clips), composed(tokens, video=clips), rtol=0, atol=0)

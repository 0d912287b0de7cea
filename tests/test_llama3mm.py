"""Llama3MM with the image adapter: a frozen LM, Llama 3.2 cross-attention masks, cached generation, checkpoints."""

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from adapters.speech import SpeechAdapter, SpeechAdapterConfig
from adapters.vision import VisionAdapter, VisionAdapterConfig, cross_attention_mask, image_spans
from encoders.speech import SpeechEncoder, SpeechEncoderConfig
from encoders.tiling import tile_images
from encoders.vision import VisionEncoder, VisionEncoderConfig
from llama3mm import Llama3MM
from llama3mm.compose import compose
from lm.checkpoint import save_pretrained
from lm.config import LMConfig
from lm.model import Transformer

VOCAB = 256
IMG = VOCAB  # <|image|>: the first id past the text vocabulary
TILE = 32


pytestmark = pytest.mark.usefixtures("single_thread")


def _build(vocab: int = VOCAB, seed: int = 0) -> Llama3MM:
    torch.manual_seed(seed)
    cfg = LMConfig(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=vocab, multiple_of=32, ffn_dim_multiplier=None
    )
    cfg.max_seq_len = 64
    lm = Transformer(cfg)
    lm.init_weights()
    encoder = VisionEncoder(VisionEncoderConfig.from_preset("tiny", image_size=TILE))
    adapter = VisionAdapter(VisionAdapterConfig.from_lm(cfg, encoder.cfg.output_dim, num_layers=2))
    return Llama3MM(lm, vision_encoder=encoder, vision_adapter=adapter)


def _open_gates(mm: Llama3MM) -> Llama3MM:
    gated = copy.deepcopy(mm)
    with torch.no_grad():
        for block in gated.vision_adapter.cross_attention_layers:
            block.gate_attn.fill_(0.8)
            block.gate_ffwd.fill_(0.6)
    return gated


def _images(*sizes, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _tiles(images):
    pixels, ids, mask = tile_images(images, TILE, 4)
    return pixels[None], ids[None], mask[None]


@pytest.fixture(scope="module")
def fresh():
    return _build().eval()


@pytest.fixture(scope="module")
def gated(fresh):
    return _open_gates(fresh)


# Text, then image 0 (opened at position 3), more text, then image 1 (position 7), then text.
TOKENS = torch.tensor([[1, 40, 41, IMG, 42, 43, 44, IMG, 45, 46, 47, 48]])


def test_fresh_adapters_give_the_frozen_lm_logits(fresh):
    """Gates at 0: exactly the frozen LM's logits on text, and on text with images (same input embeddings)."""
    text = torch.tensor([[1, 10, 20, 30, 40, 50]])
    with torch.no_grad():
        assert torch.equal(fresh(text), fresh.lm(text))
        with_images = fresh(TOKENS, *_tiles(_images((40, 70), (64, 30))))
        lm_alone = fresh.lm(TOKENS.clamp(max=VOCAB - 1), embeddings=fresh.embed(TOKENS))
    assert torch.equal(with_images, lm_alone)


def test_image_masks_follow_llama32(gated):
    """Text before any image is untouched (exactly), each image reaches only the text after its token, no NaN."""
    images = _images((40, 70), (64, 30))
    with torch.no_grad():
        out = gated(TOKENS, *_tiles(images))
        lm_alone = gated.lm(TOKENS.clamp(max=VOCAB - 1), embeddings=gated.embed(TOKENS))
        other_second = gated(TOKENS, *_tiles([images[0], _images((50, 50), seed=9)[0]]))
        other_first = gated(TOKENS, *_tiles([_images((50, 50), seed=9)[0], images[1]]))
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, :3], lm_alone[:, :3])  # before the first <|image|>
    assert (out[:, 3:] - lm_alone[:, 3:]).abs().amax(-1).min() > 1e-3  # the gates are open: images matter
    # Image 1 is opened at position 7: nothing before it changes with image 1; everything from it does.
    assert torch.equal(other_second[:, :7], out[:, :7])
    assert (other_second[:, 7:] - out[:, 7:]).abs().amax(-1).min() > 1e-4
    assert (other_first[:, 3:7] - out[:, 3:7]).abs().amax(-1).min() > 1e-4

    # Directly: which text row sees which image (a run of image tokens stays open for the text after the run).
    tiles = torch.ones(1, 2, 4, dtype=torch.bool)
    seen = cross_attention_mask(TOKENS, IMG, tiles)[0, :, :, 0]
    assert seen[:, 0].nonzero().flatten().tolist() == list(range(3, 7))
    assert seen[:, 1].nonzero().flatten().tolist() == list(range(7, 12))
    assert image_spans([IMG, IMG, 5, 6, IMG, 7], IMG) == [(0, 4), (1, 4), (4, 6)]


def test_batch_with_fewer_images_in_a_row_equals_that_row_alone(gated):
    """A row with one image in a batch padded to two images (id 0) computes what it computes alone, NaN-free."""
    images = _images((40, 70), (64, 30), (30, 90))
    short = torch.tensor([[1, IMG, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59]])
    pixels, ids, mask = tile_images(images, TILE, 4)
    batch_pixels = torch.zeros(2, 2, *pixels.shape[1:])
    batch_pixels[0], batch_pixels[1, 0] = pixels[:2], pixels[2]
    batch_ids = torch.tensor([[ids[0], ids[1]], [ids[2], 0]])
    with torch.no_grad():
        both = gated(torch.cat([TOKENS, short]), batch_pixels, batch_ids)
        alone = gated(short, *_tiles(images[2:]))
    assert torch.isfinite(both).all()
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=0)


def test_lm_stays_frozen(gated):
    """Training touches only the adapters: no LM grads, no optimizer state for LM params, LM weights unchanged."""
    mm = copy.deepcopy(gated).train()
    assert not mm.lm.training and all(not p.requires_grad for p in mm.lm.parameters())
    lm_ids = {id(p) for p in mm.lm.parameters()}
    trainable = mm.trainable_parameters()
    assert trainable and not lm_ids & {id(p) for p in trainable}
    assert {id(p) for p in mm.vision_adapter.parameters()} <= {id(p) for p in trainable}
    before = {k: v.clone() for k, v in mm.lm.state_dict().items()}

    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    logits = mm(TOKENS, *_tiles(_images((40, 70), (64, 30))))
    targets = TOKENS[0, 1:].masked_fill(TOKENS[0, 1:] >= VOCAB, -100)  # no loss on the image tokens
    torch.nn.functional.cross_entropy(logits[0, :-1], targets).backward()
    assert all(p.grad is None for p in mm.lm.parameters())
    assert mm.extra_embeddings.grad is not None and mm.extra_embeddings.grad[0].abs().sum() > 0  # <|image|>
    gates = [b.gate_attn.grad for b in mm.vision_adapter.cross_attention_layers]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in gates)
    optimizer.step()
    # State for exactly the trainable parameters (each got a gradient), none for the LM's.
    assert {id(p) for p in optimizer.state} == {id(p) for p in trainable}
    assert all(torch.equal(before[k], v) for k, v in mm.lm.state_dict().items())


def test_cached_generation_equals_full_recompute(gated):
    """Greedy decoding with cached text KV and cached image K/V equals recomputing everything every step."""
    image = _images((40, 70), seed=4)
    prompt = [1, IMG, 60, 61, 62]
    new = list(gated.generate_tokens(prompt, images=image, max_new_tokens=6, temperature=0, stop_tokens=()))
    tokens, tiles = list(prompt), _tiles(image)
    with torch.no_grad():
        for _ in range(6):
            tokens.append(int(gated(torch.tensor([tokens]), *tiles)[0, -1].argmax()))
    assert new == tokens[len(prompt) :]
    with pytest.raises(ValueError, match="1 <|image|> tokens but 2 images"):
        list(gated.generate_tokens(prompt, images=image * 2, max_new_tokens=1, stop_tokens=()))


def test_chat_puts_the_image_token_past_the_vocabulary():
    """chat(): the Llama 3 chat format with <|image|> as id 128256 (the learnable table), decoded to text."""
    mm = _build(vocab=128256, seed=1).eval()  # fresh gates: this test is about ids and text, not images
    image = _images((40, 70), seed=5)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    ids, _ = mm.processor.encode_chat(messages)
    assert ids.count(128256) == 1 and 128011 not in ids  # never the text tokenizer's own <|image|>
    reply = mm.chat(messages, images=image, max_new_tokens=5, temperature=0)
    expected = list(mm.generate_tokens(ids, images=image, max_new_tokens=5, temperature=0))
    assert isinstance(reply, str) and reply == mm.tokenizer.decode(expected)

    # A model whose adapters were trained with completion prompts (the quickstart's) says so, once.
    mm.prompts = {"image": "Describe the image."}
    with pytest.warns(UserWarning, match="completion prompts"):
        mm.chat(messages, images=image, max_new_tokens=2, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mm.chat(messages, images=image, max_new_tokens=2, temperature=0)


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    """LLAMA3MM_CACHE, else $XDG_CACHE_HOME/llama3-herd, else ~/.cache/llama3-herd."""
    from llama3mm.checkpoint import cache_dir

    monkeypatch.delenv("LLAMA3MM_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == tmp_path / "home" / ".cache" / "llama3-herd"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "llama3-herd"
    monkeypatch.setenv("LLAMA3MM_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_save_and_load_round_trip_and_refuse_another_lm(gated, tmp_path, monkeypatch):
    """save_pretrained writes small part files + a manifest; from_pretrained restores the same logits; an LM
    whose weights differ from the recorded sha256 (another directory, or the same one rewritten) is refused with
    an error naming both."""
    monkeypatch.setenv("LLAMA3MM_CACHE", str(tmp_path / "cache"))
    lm_dir = save_pretrained(gated.lm, tmp_path / "lm", format="hf")
    mm = copy.deepcopy(gated)
    mm.lm_path = str(lm_dir)
    with torch.no_grad():
        mm.extra_embeddings.normal_()
    mm.save_pretrained(tmp_path / "mm")
    manifest = json.loads((tmp_path / "mm" / "llama3mm.json").read_text())
    assert manifest["lm"]["path"] == "../lm" and len(manifest["lm"]["sha256"]) == 64  # beside: relative
    assert not (tmp_path / "mm" / "lm").exists()  # the LM is referenced, not copied

    loaded = Llama3MM.from_pretrained(tmp_path / "mm", device="cpu")
    tiles = _tiles(_images((40, 70), (64, 30)))
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS, *tiles), mm(TOKENS, *tiles))

    other = copy.deepcopy(gated.lm)
    with torch.no_grad():
        other.norm.weight[0] += 1e-3  # one weight off: another LM
    other_dir = save_pretrained(other, tmp_path / "other_lm", format="hf")
    with pytest.raises(ValueError, match=f"{other_dir}.*sha256.*{manifest['lm']['sha256']}"):
        Llama3MM.from_pretrained(tmp_path / "mm", lm_path=other_dir)
    assert (tmp_path / "cache" / "file_sha256.json").is_file()  # digests cached, so a large LM hashes once
    save_pretrained(other, lm_dir, format="hf")  # rewritten in place: the cached digest must not be trusted
    with pytest.raises(ValueError, match="refusing"):
        Llama3MM.from_pretrained(tmp_path / "mm")


def test_compose_joins_stages_on_one_lm_with_their_prompts_and_refuses_conflicts(gated, tmp_path, monkeypatch):
    """A vision-stage and a speech-stage checkpoint of one LM compose into one model: each part, the extra-token
    row its adapter trained and its training prompt come from its own stage; the LM is shared, never copied; two
    stages whose copies of one part differ are refused, naming the part."""
    monkeypatch.setenv("LLAMA3MM_CACHE", str(tmp_path / "cache"))
    lm_dir = save_pretrained(gated.lm, tmp_path / "lm", format="hf")
    vision = copy.deepcopy(gated)
    vision.lm_path, vision.prompts = str(lm_dir), {"image": "Describe the image."}
    torch.manual_seed(3)
    speech_encoder = SpeechEncoder(SpeechEncoderConfig.from_preset("tiny"))
    shape = SpeechAdapterConfig(encoder_dim=speech_encoder.cfg.dim, lm_dim=64, dim=48, heads=4, ffn_dim=96)
    adapter = SpeechAdapter(shape)
    speech = Llama3MM(
        gated.lm, speech_encoder=speech_encoder, speech_adapter=adapter, lm_path=lm_dir, prompts={"audio": "Hear:"}
    )
    vision.save_pretrained(tmp_path / "vision")
    speech.save_pretrained(tmp_path / "speech")

    compose([tmp_path / "vision", tmp_path / "speech"], tmp_path / "mm")
    composed = Llama3MM.from_pretrained(tmp_path / "mm")
    assert composed.prompts == {"image": "Describe the image.", "audio": "Hear:"}
    assert not (tmp_path / "mm" / "lm").exists()
    for name, source in [("vision_encoder", vision), ("vision_adapter", vision), ("speech_adapter", speech)]:
        ours, theirs = getattr(composed, name).state_dict(), getattr(source, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    rows = composed.extra_embeddings
    assert torch.equal(rows[composed.image_token_id - VOCAB], vision.extra_embeddings[composed.image_token_id - VOCAB])
    assert torch.equal(rows[composed.audio_token_id - VOCAB], speech.extra_embeddings[composed.audio_token_id - VOCAB])
    with torch.no_grad():
        tiles = _tiles(_images((40, 70), (64, 30)))
        assert torch.equal(composed(TOKENS, *tiles), vision(TOKENS, *tiles))  # the image path is the vision stage's

    with torch.no_grad():
        vision.vision_adapter.cross_attention_layers[0].gate_attn.add_(0.1)
    vision.save_pretrained(tmp_path / "vision2")
    with pytest.raises(ValueError, match="vision_adapter differs between .*vision.* and .*vision2"):
        compose([tmp_path / "vision", tmp_path / "vision2"], tmp_path / "bad")

    compose([tmp_path / "speech"], tmp_path / "mm")  # over the composed model: only the speech stage's parts stay
    assert sorted(p.name for p in (tmp_path / "mm").iterdir()) == [
        "extra_embeddings",
        "llama3mm.json",
        "speech_adapter",
        "speech_encoder",
    ]

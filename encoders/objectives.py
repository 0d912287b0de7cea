"""Encoder pretraining objectives: CLIP (image-text contrastive), image tags (multi-label classification) and
BEST-RQ (speech masked prediction).

CLIP: our VisionEncoder's pooled embedding against a small open_clip TextTransformer (causal, EOT pooling,
open_clip's BPE tokenizer shipped in its package), a learned temperature, and open_clip's ClipLoss, which
gathers features across data-parallel ranks (`rank`, `world_size`, `local_loss`, `gather_with_grad`).

Tags: the ViT trained to say which of a fixed vocabulary of tags each image carries (binary cross-entropy per
tag), as ViT was pretrained on JFT's multi-label classes. The logits read the largest value of each feature over
the patch tokens: on the embedded scenes a shape fills a few patches, and a maximum keeps it where a class token or
a mean learns it several times slower (bench/RESULTS.md, issue 22).

BEST-RQ (Chiu et al. 2022): a frozen random-projection quantizer turns each normalised 40 ms stacked step into
one discrete target per codebook (project to 16 dims, l2-normalise, nearest neighbour by cosine in a frozen,
l2-normalised random codebook). Spans of input steps are replaced by Gaussian noise (std 0.1); the Conformer
predicts the targets of the masked steps with one softmax per codebook. Projections and codebooks are buffers:
saved in the checkpoint, never trained, and drawn from a seed so that every rank and every resume agrees.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from encoders.speech import SpeechEncoder, SpeechEncoderConfig, lengths_to_mask
from encoders.vision import VisionEncoder, VisionEncoderConfig, read_weight_file

# ---------------------------------------------------------------- CLIP


@dataclass
class TextTowerConfig:
    """Shape of the CLIP text tower (open_clip TextTransformer)."""

    context_length: int = 77
    vocab_size: int = 49408  # open_clip's BPE vocabulary
    width: int = 1024
    heads: int = 16
    layers: int = 24

    @classmethod
    def from_preset(cls, name: str, **overrides) -> TextTowerConfig:
        """'vit-h-14' (open_clip ViT-H-14's text tower) or 'tiny'."""
        presets = {"vit-h-14": cls(), "tiny": cls(context_length=32, width=64, heads=4, layers=2)}
        if name not in presets:
            raise ValueError(f"unknown text tower preset {name!r}; choose from {sorted(presets)}")
        return replace(presets[name], **overrides)

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return asdict(self)


class CLIPModel(nn.Module):
    """VisionEncoder pooled embedding + open_clip text tower + learned temperature."""

    def __init__(self, vision_cfg: VisionEncoderConfig, text_cfg: TextTowerConfig, init_logit_scale: float = 1 / 0.07):
        super().__init__()
        from open_clip.transformer import TextTransformer

        self.vision = VisionEncoder(vision_cfg)
        self.text = TextTransformer(
            context_length=text_cfg.context_length,
            vocab_size=text_cfg.vocab_size,
            width=text_cfg.width,
            heads=text_cfg.heads,
            layers=text_cfg.layers,
            output_dim=vision_cfg.embed_dim,
        )
        self.text_cfg = text_cfg
        self.logit_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self._tokenizer = None

    def tokenize(self, texts: str | list[str]) -> torch.Tensor:
        """Captions -> token ids [N, context_length] with open_clip's BPE tokenizer (no download)."""
        if self._tokenizer is None:
            from open_clip.tokenizer import SimpleTokenizer

            self._tokenizer = SimpleTokenizer(context_length=self.text_cfg.context_length)
        return self._tokenizer(texts)

    def load_open_clip(self, source: str | Path | dict) -> list[str]:
        """Load an open_clip CLIP checkpoint (file or state dict): the ViT trunk always, the text tower and the
        temperature when the checkpoint has them; returns the keys left at their initial values.

        A checkpoint of the visual tower alone leaves the text tower fresh; a text tower whose shapes differ from
        this model's is an error naming the keys, never a silent partial load.
        """
        sd = read_weight_file(source) if not isinstance(source, dict) else source
        # Checkpoints saved from DistributedDataParallel carry a `module.` prefix (open_clip strips it too).
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        left = [f"vision.{k}" for k in self.vision.load_open_clip(sd)]
        text = {k: v for k, v in sd.items() if not k.startswith("visual.") and k not in ("logit_scale", "attn_mask")}
        if text:
            missing, unexpected = self.text.load_state_dict(text, strict=False)
            missing = [k for k in missing if k != "attn_mask"]  # a buffer open_clip rebuilds, not a weight
            if missing or unexpected:
                raise ValueError(f"open_clip text tower does not fit: missing {missing}, unexpected {unexpected}")
        else:
            left += [f"text.{k}" for k, _ in self.text.named_parameters()]
        if "logit_scale" in sd:
            self.logit_scale.data.copy_(sd["logit_scale"].reshape(self.logit_scale.shape))
        else:
            left.append("logit_scale")
        return left

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Square images [B, 3, S, S] (CLIP-normalised) -> unit-norm embeddings [B, embed_dim]."""
        return F.normalize(self.vision.encode_pooled(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids [B, context_length] -> unit-norm embeddings [B, embed_dim]."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (image embeddings, text embeddings, logit scale): the arguments of open_clip's ClipLoss."""
        # Clamped at 100 as in CLIP, so the temperature cannot run away.
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp().clamp(max=100)


def clip_loss(rank: int = 0, world_size: int = 1, local_loss: bool = False, gather_with_grad: bool = True) -> nn.Module:
    """open_clip's ClipLoss; with world_size > 1 it all-gathers features over the default process group."""
    from open_clip.loss import ClipLoss

    return ClipLoss(
        local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True, rank=rank, world_size=world_size
    )


@torch.no_grad()
def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Top-1 image-to-text retrieval: fraction of images whose own caption (same index) scores highest."""
    best = (image_emb @ text_emb.T).argmax(dim=1)
    return (best == torch.arange(image_emb.shape[0], device=best.device)).float().mean().item()


# ---------------------------------------------------------------- tags


class TagClassifier(nn.Module):
    """VisionEncoder trunk + a linear head over the patch tokens' per-feature maximum: one logit per tag."""

    def __init__(self, vision_cfg: VisionEncoderConfig, num_tags: int):
        super().__init__()
        self.vision = VisionEncoder(vision_cfg)
        self.head = nn.Linear(vision_cfg.width, num_tags)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Square images [B, 3, S, S] (CLIP-normalised) -> tag logits [B, num_tags]."""
        return self.head(self.vision.encode_tokens(images)[:, 1:].amax(dim=1))


# ---------------------------------------------------------------- BEST-RQ


class BestRQOutput(NamedTuple):
    """Loss (mean CE over codebooks on masked steps), masked-prediction accuracy, number of masked steps."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    num_masked: int


BEST_RQ_PRESETS = {
    # BEST-RQ at full scale: 16 codebooks of 8192, spans of 400 ms (10 steps of 40 ms) started with p = 0.01.
    "conformer-1b": dict(num_codebooks=16, codebook_size=8192, mask_prob=0.01, mask_span=10),
    # Short utterances of a tiny CPU run: denser, shorter spans and a small codebook.
    "tiny": dict(num_codebooks=2, codebook_size=64, mask_prob=0.06, mask_span=3),
}


class BestRQ(nn.Module):
    """SpeechEncoder + frozen random-projection quantizer + per-codebook prediction heads."""

    def __init__(
        self,
        speech_cfg: SpeechEncoderConfig,
        num_codebooks: int = 16,
        codebook_size: int = 8192,
        code_dim: int = 16,
        mask_prob: float = 0.01,
        mask_span: int = 10,
        noise_std: float = 0.1,
        seed: int = 0,
    ):
        super().__init__()
        self.encoder = SpeechEncoder(speech_cfg)
        self.num_codebooks, self.codebook_size = num_codebooks, codebook_size
        self.mask_prob, self.mask_span, self.noise_std = mask_prob, mask_span, noise_std
        self.head = nn.Linear(speech_cfg.dim, num_codebooks * codebook_size)
        # Frozen quantizer, reproducible from the seed alone (buffers: checkpointed, not optimised).
        g = torch.Generator().manual_seed(seed)
        projection = torch.empty(num_codebooks, speech_cfg.stacked_dim, code_dim)
        bound = math.sqrt(6 / (speech_cfg.stacked_dim + code_dim))  # Xavier-uniform, as in BEST-RQ
        projection.uniform_(-bound, bound, generator=g)
        codebooks = F.normalize(torch.randn(num_codebooks, codebook_size, code_dim, generator=g), dim=-1)
        self.register_buffer("projection", projection)
        self.register_buffer("codebooks", codebooks)

    @classmethod
    def from_preset(cls, name: str, speech_cfg: SpeechEncoderConfig | None = None, **overrides) -> BestRQ:
        """BEST-RQ sized for a speech preset ('conformer-1b' or 'tiny')."""
        speech_cfg = speech_cfg or SpeechEncoderConfig.from_preset(name)
        return cls(speech_cfg, **{**BEST_RQ_PRESETS[name], **overrides})

    @torch.no_grad()
    def targets(self, stacked: torch.Tensor) -> torch.Tensor:
        """Normalised stacked steps [B, T, 320] -> code ids [B, T, num_codebooks] (cosine nearest neighbour)."""
        z = F.normalize(torch.einsum("btd,cde->btce", stacked.float(), self.projection), dim=-1)
        return torch.einsum("btce,cke->btck", z, self.codebooks).argmax(dim=-1)

    def span_mask(self, lengths: torch.Tensor, max_len: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, max_len] bool: spans of mask_span steps started with mask_prob; at least one span per utterance."""
        valid = lengths_to_mask(lengths, max_len)
        starts = (torch.rand(valid.shape, generator=generator, device=lengths.device) < self.mask_prob) & valid
        # An utterance that drew no start gets one at a random real step, so every item contributes to the loss.
        forced = torch.rand(valid.shape, generator=generator, device=lengths.device).masked_fill(~valid, -1)
        no_start = ~starts.any(dim=1)
        starts[no_start, forced[no_start].argmax(dim=1)] = True
        # Step t is masked when a span started in (t - span, t].
        spans = F.max_pool1d(F.pad(starts.float()[:, None], (self.mask_span - 1, 0)), self.mask_span, stride=1)
        return spans[:, 0].bool() & valid

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None
    ) -> BestRQOutput:
        """Log-mel [B, T, 80] with lengths [B] -> BEST-RQ loss and accuracy on the masked 40 ms steps."""
        stacked, step_lengths = self.encoder.stack_frames(features, lengths)
        target = self.targets(stacked)
        mask = self.span_mask(step_lengths, stacked.shape[1], generator)
        noise = torch.randn(stacked.shape, generator=generator, device=stacked.device) * self.noise_std
        corrupted = torch.where(mask[..., None], noise.to(stacked.dtype), stacked)
        hidden = self.encoder.encode_stacked(corrupted, step_lengths)
        logits = self.head(hidden[mask]).view(-1, self.num_codebooks, self.codebook_size)
        target = target[mask]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())
        accuracy = (logits.argmax(-1) == target).float().mean()
        return BestRQOutput(loss, accuracy.detach(), int(mask.sum()))

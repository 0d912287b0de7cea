"""Adapter training on a frozen LM: image (vision), video or speech, with the shared training machinery.

    torchrun --nproc-per-node N train/adapter.py --modality vision|video|speech \
        --config configs/adapter/vision_tiny.toml [--train.steps N] [--run.dir DIR] [--section.key=value ...]
    python train/adapter.py --modality vision --config configs/adapter/vision_llama3_8b.toml --dry-run --world-size 8

The paper's compositional recipe (Sections 7-8): the language model never changes. The vision stage trains the
image adapter (cross-attention blocks, the projection, the extra token embeddings) together with the image
encoder; the video stage starts from a vision-stage Llama3MM (``model.base``) and trains only the video adapter;
the speech stage trains the speech encoder and adapter, whose outputs replace ``<|audio|>`` placeholders.

Each sample becomes ``prompt + media placeholder(s) + target`` (caption, motion caption or transcript) built by the
model's own processor exactly as ``Llama3MM.generate`` builds its prompt, and the loss counts the target tokens
(and the stop token after them) only. Parallelism: FSDP2 shards every trainable part; frozen parameters (the LM,
and the image parts in the video stage) are left out of FSDP (``ignored_params``) and replicated on every rank, or
with ``parallel.shard_frozen`` FSDP-sharded too (``frozen_units``: one unit per LM layer, its token table, the LM
itself); either way they stay out of the DCP checkpoints, which hold trainable weights, optimizer state, data
position and RNG (exact resume), and are read again from their own files on resume.

Held-out evaluation, every ``train.eval_interval`` steps and at the end: the teacher-forced loss on held-out
samples (all ranks), and accuracy by greedy GENERATION on rank 0 with an unsharded copy of the model (or, with
``eval.generate_sharded``, on every rank for its share with the sharded model itself: ``train.sharded_generation``,
for a model whose copy would not fit a device): vision, the first colour + shape named; video, the direction of
motion; speech, the exact transcript. ``eval/chance`` is what always answering the most frequent held-out answer
scores. Those graders read answers about the embedded
synthetic data only: on other held-out data (``train.adapter_eval.is_embedded_data``) the stage reports instead
``eval/loss_shuffled_media`` (the held-out loss with the media shuffled across the samples, the control beside
``eval/loss``) and the greedy answers' ``eval/bleu4`` and ``eval/wer`` (``train.adapter_eval``). At the end rank 0
writes the Llama3MM checkpoint to RUN_DIR/final (``Llama3MM.from_pretrained`` loads it) and RUN_DIR/final/eval.json,
from its copy or, under ``eval.generate_sharded``, from the tensors gathered to its host (the same files).

``--dry-run --world-size W`` plans the run instead (``train.dryrun_media``): per-rank bytes of the frozen LM, the
trainable parts with their gradients and AdamW state, and the activations of a micro-batch of the ``[plan]``
section's sample sizes, against ``--dry-run-device-gb``; shapes come from the checkpoints' config files, or the
``model.*_preset`` keys where the checkpoints are not on this machine.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `torchrun train/adapter.py` puts train/ first on sys.path, where its modules would shadow top-level packages
    # (train/lm.py vs lm/): drop it and put the repository root first.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Annotated, Any, Literal  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from common.atomic import atomic_write_text  # noqa: E402
from data.grading import accepted_keys, is_correct, majority_rate, normalize_text  # noqa: E402
from llama3mm.processor import DEFAULT_PROMPTS  # noqa: E402
from train import dryrun_media  # noqa: E402
from train.adapter_eval import (  # noqa: E402
    CAPTION_KEYS,
    caption_metrics,
    is_embedded_data,
    loss_sum,
    media_losses,
    rank_share,
    shuffled_media,
)
from train.config import JobConfig, NonNegativeInt, PositiveInt, Range  # noqa: E402
from train.loop import RunContext  # noqa: E402
from train.media import MEDIA_KINDS, MediaDataConfig  # noqa: E402
from train.parallel.mesh import exit_rank, world_size  # noqa: E402
from train.sharded_generation import (  # noqa: E402
    gather_answers,
    gathered_tensors,
    greedy_batch,
    padded_share,
)
from train.stage import Recipe, Stage  # noqa: E402
from train.stage import main as stage_main  # noqa: E402

if TYPE_CHECKING:
    from data.media import MediaSamples
    from llama3mm import Llama3MM

log = logging.getLogger("train.adapter")

TASK = "adapter training"
IGNORE = -100
# Frames a clip is sampled to when decoded for training and evaluation: what generate() reads of a video file
# (encoders.video.load_video) and the demo keeps, so a real clip of minutes is never held whole.
VIDEO_FRAMES = 64


@dataclass
class AdapterModelConfig:
    """The frozen LM, the pretrained encoders, the base of the video stage, and adapter shape overrides."""

    # A Meta or HF LM checkpoint directory (lm.load_pretrained); frozen throughout.
    lm: str = "runs/lm/debug/hf"
    # Encoders written by train/encoder.py (RUN_DIR/final/encoder).
    vision_encoder: str = "runs/encoder/vision_tiny/final/encoder"
    speech_encoder: str = "runs/encoder/speech_tiny/final/encoder"
    # The video stage builds on a vision-stage Llama3MM checkpoint (its image encoder and adapter stay frozen).
    base: str = "runs/adapter/vision_tiny/final"
    # Train the encoder with the adapter (vision: the paper does; speech: the Conformer learns with its adapter).
    train_encoder: bool = True
    # Cross-attention blocks of the image adapter (0 = one per 4 LM layers, Meta's schedule).
    vision_layers: NonNegativeInt = 0
    # Keyword overrides of VideoAdapterConfig.from_vision (every, num_latents, ...) and SpeechAdapterConfig fields.
    video_adapter: dict[str, Any] = field(default_factory=dict)
    speech_adapter: dict[str, Any] = field(default_factory=dict)
    # The frozen LM's dtype. float32 keeps CPU runs exact; bfloat16 halves a replicated 8B/70B (what trains stays
    # fp32 either way, and each adapter block runs in its own dtype beside the LM).
    lm_dtype: Literal["float32", "bfloat16"] = "float32"
    # Shapes without weights: what --dry-run plans when model.lm / the encoders are not on this machine (an
    # lm.LMConfig preset, a VisionEncoderConfig / SpeechEncoderConfig preset). A real run checks that what it
    # loads has these shapes.
    lm_preset: str = ""
    vision_preset: str = ""
    speech_preset: str = ""


@dataclass
class AdapterDataConfig(MediaDataConfig):
    """Media shards (train.media.MediaDataConfig: the embedded synthetic set, generated into ``dir`` when missing,
    or ``shards`` streamed) and the prompt."""

    # The text before the target; empty = the media kind's default (llama3mm.processor.DEFAULT_PROMPTS).
    prompt: str = ""
    # Written after each target, before the stop token. The frozen LM ends documents after a sentence's full stop
    # (the 80-step debug LM gave <|end_of_text|> 0.12 after "A small red circle." and under 0.001 without the "."),
    # so a target that ends as a sentence gives the adapter a stop it can learn (bench/RESULTS.md, issue 22).
    target_end: str = "."


@dataclass
class AdapterEvalConfig:
    """Held-out evaluation: generation accuracy on rank 0 and the teacher-forced loss on every rank."""

    # Held-out samples rank 0 generates for (greedy).
    samples: PositiveInt = 100
    max_new_tokens: PositiveInt = 24
    # Held-out samples per rank for the teacher-forced loss.
    loss_samples: PositiveInt = 32
    # Samples per evaluation batch: of the loss, and with generate_sharded of each rank's generation.
    batch_size: PositiveInt = 16
    # Every rank generates for its share of the samples with the sharded model itself, in batches of batch_size,
    # and the export gathers the weights it writes one tensor at a time (train.sharded_generation), instead of
    # rank 0 generating and exporting with an unsharded copy of the model: that copy (the 18B trained parts of the
    # 70B vision stage, and its LM too under parallel.shard_frozen) does not fit a device beside the training state.
    # Off by default: the copy generates one sample at a time, exactly as Llama3MM.generate answers a user.
    generate_sharded: bool = False


@dataclass
class AdapterPlanConfig:
    """The sample ``--dry-run`` plans for (a real run takes every size from its data)."""

    # Text tokens of a row (prompt, target, full stop and stop token), the media placeholders not counted.
    text_tokens: PositiveInt = 64
    # Of those, the target tokens the loss scores.
    target_tokens: PositiveInt = 16
    # Tiles per image; 0 = the image encoder's max_num_tiles.
    tiles: NonNegativeInt = 0
    # Frames per clip (the processor samples up to 64).
    frames: PositiveInt = 64
    # Seconds per utterance.
    audio_seconds: Annotated[float, Range(min=0.05)] = 30.0


@dataclass
class AdapterJobConfig(JobConfig):
    """Root config of ``train/adapter.py``."""

    model: AdapterModelConfig = field(default_factory=AdapterModelConfig)
    data: AdapterDataConfig = field(default_factory=AdapterDataConfig)
    eval: AdapterEvalConfig = field(default_factory=AdapterEvalConfig)
    plan: AdapterPlanConfig = field(default_factory=AdapterPlanConfig)


# ----------------------------------------------------------------------------------------------------------------
# Model.


LM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The LM's tensor shapes, which model.lm_preset names.
LM_SHAPE = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "ffn_hidden_dim")


def vision_model(mc: AdapterModelConfig, device: torch.device) -> Llama3MM:
    """Frozen LM + the image encoder (trained or frozen, ``train_encoder``) + a new image adapter."""
    from encoders.vision import VisionEncoder

    lm = _load_lm(mc, device)
    encoder = _load_encoder(VisionEncoder, mc.vision_encoder, "model.vision_encoder")
    check_encoder_shape(encoder.cfg, mc.vision_preset, "model.vision_encoder", "model.vision_preset")
    return trainables_in_fp32(assemble_vision(mc, lm, encoder)).to(device)


def assemble_vision(mc: AdapterModelConfig, lm: nn.Module, encoder: nn.Module) -> Llama3MM:
    """The vision stage's model from its LM and image encoder: a new image adapter (the run's model, and the dry
    run's on the meta device)."""
    from adapters.vision import VisionAdapter, VisionAdapterConfig
    from llama3mm import Llama3MM

    acfg = VisionAdapterConfig.from_lm(lm.config, encoder.cfg.output_dim, num_layers=mc.vision_layers or None)
    adapter = VisionAdapter(acfg)
    encoder.requires_grad_(mc.train_encoder)
    return Llama3MM(lm, vision_encoder=encoder, vision_adapter=adapter, lm_path=mc.lm)


def video_model(mc: AdapterModelConfig, device: torch.device) -> Llama3MM:
    """A vision-stage Llama3MM (``model.base``), all frozen, + a new video adapter."""
    from llama3mm import Llama3MM

    _check_exists(mc, "lm", "base")
    # Resolved here: from_pretrained reads a relative lm_path against the checkpoint directory.
    lm_path = Path(mc.lm).resolve()
    mm = Llama3MM.from_pretrained(mc.base, lm_path=lm_path, device=device, dtype=torch.float32)
    if mm.vision_encoder is None or mm.vision_adapter is None:
        raise ValueError(f"model.base = {mc.base!r} holds no image encoder/adapter: run the vision stage first")
    check_lm_shape(mm.lm.config, mc.lm_preset)
    check_encoder_shape(mm.vision_encoder.cfg, mc.vision_preset, "model.base's image encoder", "model.vision_preset")
    mm.lm.to(LM_DTYPES[mc.lm_dtype])
    return add_video_adapter(mc, mm).to(device)


def add_video_adapter(mc: AdapterModelConfig, mm: Llama3MM) -> Llama3MM:
    """The video stage's model from a vision-stage one: all of it frozen, and a new video adapter."""
    from adapters.video import VideoAdapter, VideoAdapterConfig

    mm.requires_grad_(False)  # the image stage's parts are reused frozen; only the video adapter learns
    # Each token of a frame gets a learned place embedding, and each patch a motion token (VideoAdapterConfig).
    encoder_cfg = mm.vision_encoder.cfg
    shape = {"tokens_per_frame": encoder_cfg.num_tokens, "motion_grid": encoder_cfg.grid, **mc.video_adapter}
    mm.video_adapter = VideoAdapter(VideoAdapterConfig.from_vision(mm.vision_adapter.cfg, **shape))
    return mm


def speech_model(mc: AdapterModelConfig, device: torch.device) -> Llama3MM:
    """Frozen LM + the speech encoder (trained or frozen, ``train_encoder``) + a new speech adapter."""
    from encoders.speech import SpeechEncoder

    lm = _load_lm(mc, device)
    encoder = _load_encoder(SpeechEncoder, mc.speech_encoder, "model.speech_encoder")
    check_encoder_shape(encoder.cfg, mc.speech_preset, "model.speech_encoder", "model.speech_preset")
    return trainables_in_fp32(assemble_speech(mc, lm, encoder)).to(device)


def assemble_speech(mc: AdapterModelConfig, lm: nn.Module, encoder: nn.Module) -> Llama3MM:
    """The speech stage's model from its LM and speech encoder: a new speech adapter, as wide as the LM unless
    ``model.speech_adapter`` says otherwise."""
    from adapters.speech import SpeechAdapter, SpeechAdapterConfig
    from llama3mm import Llama3MM

    scfg = {"encoder_dim": encoder.cfg.dim, "lm_dim": lm.config.dim, "dim": lm.config.dim}
    scfg.update(heads=lm.config.n_heads, ffn_dim=lm.config.ffn_hidden_dim)
    adapter = SpeechAdapter(SpeechAdapterConfig(**{**scfg, **mc.speech_adapter}))
    encoder.requires_grad_(mc.train_encoder)
    return Llama3MM(lm, speech_encoder=encoder, speech_adapter=adapter, lm_path=mc.lm)


def trainables_in_fp32(mm: Llama3MM) -> Llama3MM:
    """What trains stays fp32 beside a bf16 LM (Llama3MM makes its extra token table in the LM's dtype)."""
    for p in mm.trainable_parameters():
        if p.dtype != torch.float32:
            p.data = p.data.float()
    return mm


def check_lm_shape(config: Any, preset: str) -> None:
    """A loaded LM must have the shape ``model.lm_preset`` names (what a dry run of this config planned)."""
    from lm.config import LMConfig

    if not preset:
        return
    want = LMConfig.from_preset(preset)
    clash = [
        f"{k} {getattr(config, k)} (preset: {getattr(want, k)})"
        for k in LM_SHAPE
        if getattr(config, k) != getattr(want, k)
    ]
    if clash:
        raise ValueError(f"model.lm does not have the shape of model.lm_preset = {preset!r}: {', '.join(clash)}")


def check_encoder_shape(config: Any, preset: str, what: str, key: str) -> None:
    """A loaded encoder must have the shape its preset key names (what a dry run of this config planned)."""
    if preset and config.to_dict() != type(config).from_preset(preset).to_dict():
        raise ValueError(f"{what} ({config}) does not have the shape of {key} = {preset!r}")


def _check_exists(mc: AdapterModelConfig, *keys: str) -> None:
    for key in keys:
        if not Path(getattr(mc, key)).exists():
            raise FileNotFoundError(f"model.{key} = {getattr(mc, key)!r} does not exist")


def _load_lm(mc: AdapterModelConfig, device: torch.device) -> nn.Module:
    from lm import load_pretrained

    _check_exists(mc, "lm")
    lm = load_pretrained(mc.lm).to(device=device, dtype=LM_DTYPES[mc.lm_dtype])
    check_lm_shape(lm.config, mc.lm_preset)
    return lm


def _load_encoder(cls: type, directory: str, key: str) -> nn.Module:
    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(
            f"{key} = {directory!r} holds no encoder (config.json + model.safetensors): train it first with "
            f"train/encoder.py, or point {key} at one"
        )
    return cls.from_pretrained(directory)


def media_blocks(mm: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the encoders and adapters (encoder layers, cross-attention blocks, aggregator)."""
    candidates: list[Any] = []
    if mm.vision_encoder is not None:
        candidates += [mm.vision_encoder.transformer.resblocks, mm.vision_encoder.global_transformer.resblocks]
    for adapter in (mm.vision_adapter, mm.video_adapter):
        if adapter is not None:
            candidates.append(adapter.cross_attention_layers)
    if mm.video_adapter is not None:
        candidates.append(mm.video_adapter.aggregator.layers)
    if mm.speech_encoder is not None:
        candidates.append(mm.speech_encoder.layers)
    return [b for c in candidates for b in (c.values() if isinstance(c, nn.ModuleDict) else c)]


def fsdp_blocks(mm: nn.Module) -> list[nn.Module]:
    """The trainable repeated blocks FSDP shards one by one (encoder layers, cross-attention blocks)."""
    return [b for b in media_blocks(mm) if any(p.requires_grad for p in b.parameters())]


def frozen_units(mm: nn.Module) -> list[nn.Module]:
    """The frozen modules FSDP shards one by one under ``parallel.shard_frozen``, in the order they run: the LM's
    token table, the frozen media blocks (the video stage's image encoder and adapter), the LM's layers, then the
    LM itself (its final norm and output).

    ``Llama3MM.embed`` looks tokens up before the LM's forward, and the loss takes ``output.weight`` inside it: the
    token table is a unit of its own (its own call gathers it) and the output is the LM's (gathered for its
    forward). Tied embeddings cannot be split so: the table, norm and output then shard with the root, gathered
    for the model's whole forward.
    """
    frozen_blocks = [b for b in media_blocks(mm) if not any(p.requires_grad for p in b.parameters())]
    layers = list(mm.lm.layers.values())
    if mm.lm.config.tie_word_embeddings:
        return [*frozen_blocks, *layers]
    return [mm.lm.tok_embeddings, *frozen_blocks, *layers, mm.lm]


# ----------------------------------------------------------------------------------------------------------------
# Data: samples -> prompt + target rows, batched with the media.


MediaArgs = Callable[[dict], dict[str, Any]]


def image_media(sample: dict) -> dict[str, Any]:
    """generate()'s media arguments for an image sample."""
    return {"images": [sample["image"]]}


def video_media(sample: dict) -> dict[str, Any]:
    """generate()'s media arguments for a clip."""
    return {"video": sample["video"]}


def audio_media(sample: dict) -> dict[str, Any]:
    """generate()'s media arguments for an utterance."""
    return {"audio": sample["audio"]}


def split_samples(batch: dict) -> list[dict]:
    """collate_samples' lists back into per-sample dicts (the processor works sample by sample)."""
    n = len(batch["text"])
    out = [{"text": batch["text"][i], "meta": batch["meta"][i]} for i in range(n)]
    for key in ("image", "video"):
        if key in batch:
            for i in range(n):
                out[i][key] = batch[key][i]
    if "audio" in batch:
        for i in range(n):
            out[i]["audio"] = batch["audio"][i, : int(batch["audio_lengths"][i])]
    return out


class PromptCollator:
    """Collates samples into prompt + target rows with the model's processor (the path generate takes)."""

    def __init__(self, mm: Llama3MM, prompt: str, media: MediaArgs, target_end: str = "") -> None:
        self.mm, self.prompt, self.media, self.target_end = mm, prompt, media, target_end
        tok = mm.tokenizer
        # <|end_of_text|> closes every document the LM was pretrained on: a stop it already predicts.
        self.tokenizer, self.stop_id, self.pad_id = tok, tok.eos_id, tok.pad_id

    def target(self, sample: dict) -> str:
        """The text the model learns to produce."""
        return sample["text"]

    def prompt_inputs(self, sample: dict) -> dict[str, Any]:
        """generate()'s own inputs for this sample's prompt: tokens [1, S] and media tensors, on the host."""
        # On the host: streamed batches are built in forked DataLoader workers, which must not touch CUDA
        # (batch_loss moves the batch to the device).
        return self.mm.processor.prompt_inputs(self.prompt, device="cpu", **self.media(sample))

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        """A batch: tokens [B, S] (prompt + target + stop, right-padded), labels [B, S] and the media inputs."""
        rows, labels, media = [], [], []
        for sample in samples:
            inputs = self.prompt_inputs(sample)
            prompt = inputs.pop("tokens")[0].tolist()
            text = " " + self.target(sample).strip() + self.target_end
            target = self.tokenizer.encode(text, bos=False, eos=False) + [self.stop_id]
            row = prompt + target
            # Position t predicts token t + 1: only the target's tokens (and the stop token) are scored.
            label = [IGNORE] * (len(prompt) - 1) + target + [IGNORE]
            rows.append(row)
            labels.append(label)
            media.append(inputs)
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for b, (row, label) in enumerate(zip(rows, labels, strict=True)):
            tokens[b, : len(row)] = torch.tensor(row)
            targets[b, : len(label)] = torch.tensor(label)
        return {"tokens": tokens, "labels": targets, **collate_media(media)}


def collate_media(per_sample: list[dict[str, Any]]) -> dict[str, Any]:
    """Join the per-sample media inputs of prompt_inputs along the batch: tensors concatenated, clip lists chained."""
    out: dict[str, Any] = {}
    for key in per_sample[0]:
        values = [m[key] for m in per_sample]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.cat(values)
        elif isinstance(values[0], (list, tuple)):
            out[key] = [item for v in values for item in v]
        else:
            raise TypeError(f"cannot batch the media input {key!r} of type {type(values[0]).__name__}")
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its tensors on ``device``."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_loss(mm: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the target tokens of a batch (fused chunked projection) and their count."""
    from lm.loss import linear_cross_entropy

    batch = to_device(batch, device)
    labels = batch.pop("labels")
    tokens = batch.pop("tokens")
    scored = labels != IGNORE

    def output_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Only the target positions are projected onto the vocabulary: most of a row is prompt and media.
        return linear_cross_entropy(hidden[scored], weight, labels[scored])

    return mm(tokens, **batch, output=output_fn), scored.sum()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def heldout_split(cfg: AdapterJobConfig, modality: AdapterModality) -> MediaSamples:
    """The held-out split of ``data.dir``, once, in shard order (indexed when built: ``num_samples`` is known)."""
    from data.media import MediaSamples

    return MediaSamples(
        cfg.data.dir, kind=MEDIA_KINDS[modality.name], split="heldout", shuffle=False, epochs=1, **modality.decode
    )


def heldout_samples(cfg: AdapterJobConfig, modality: AdapterModality, count: int, skip: int = 0) -> list[dict]:
    """The first ``count`` held-out samples (after ``skip``), in shard order."""
    out = []
    for i, sample in enumerate(heldout_split(cfg, modality)):
        if i >= skip + count:
            break
        if i >= skip:
            out.append(sample)
    return out


GRADED_KEYS = ("eval/accuracy", "eval/chance", "eval/exact_match")


def greedy_answers(mm: Llama3MM, collator: PromptCollator, samples: list[dict], max_new_tokens: int) -> list[str]:
    """The greedy answer to each sample's prompt and media, generated as generate() answers a user."""
    return [
        mm.generate(collator.prompt, max_new_tokens=max_new_tokens, temperature=0.0, **collator.media(sample))
        for sample in samples
    ]


def generation_accuracy(modality: str, collator: PromptCollator, samples: list[dict], answers: list[str]) -> dict:
    """The greedy answers to the samples graded: the share the reference accepts, chance, exact matches."""
    hits, exact, accepted, shown = 0, 0, [], []
    for sample, text in zip(samples, answers, strict=True):
        accepted.append(accepted_keys(modality, collator.target(sample)))
        hits += int(is_correct(modality, text, collator.target(sample)))
        exact += int(normalize_text(text) == normalize_text(collator.target(sample)))
        if len(shown) < 3:
            shown.append(f"{collator.target(sample)!r} -> {text.strip()!r}")
    n = max(len(samples), 1)
    log.info("held-out generations: %s", "; ".join(shown))
    return {"eval/accuracy": hits / n, "eval/chance": majority_rate(accepted), "eval/exact_match": exact / n}


class Evaluator:
    """Held-out loss on every rank; generation accuracy (embedded data) or caption metrics (any other data, beside
    the held-out loss with shuffled media), generated on rank 0 with an unsharded copy (``shadow``) or, under
    ``eval.generate_sharded``, by every rank with the sharded model and graded on rank 0."""

    def __init__(
        self,
        cfg: AdapterJobConfig,
        modality: AdapterModality,
        ctx: RunContext,
        shadow: Llama3MM | None,
        collator: PromptCollator,
    ) -> None:
        self.cfg, self.modality, self.ctx, self.shadow, self.collator = cfg, modality.name, ctx, shadow, collator
        ec = cfg.eval
        self.embedded = is_embedded_data(cfg.data.dir, MEDIA_KINDS[modality.name])
        # Loss samples are disjoint per rank and as many on each (train.adapter_eval.rank_share); the generation set
        # is the first eval.samples of the split.
        total = heldout_split(cfg, modality).num_samples
        skip, count = rank_share(total, ec.loss_samples, ctx.dp_rank, ctx.dp_size)
        read = heldout_samples(cfg, modality, count + 1, skip=skip)
        mine, following = read[:count], (read[count:] or heldout_samples(cfg, modality, 1))[0]
        self.loss_batches = [collator(mine[i : i + ec.batch_size]) for i in range(0, len(mine), ec.batch_size)]
        # The control off the embedded data: the same targets, each with the next held-out sample's media.
        control = [] if self.embedded or count * ctx.dp_size < 2 else shuffled_media(mine, following)
        self.control_batches = [collator(control[i : i + ec.batch_size]) for i in range(0, len(control), ec.batch_size)]
        # Sharded generation: every rank answers its share, and rank 0 grades them all.
        generates = ctx.rank == 0 or ec.generate_sharded
        self.gen_samples = heldout_samples(cfg, modality, ec.samples) if generates else []

    def sync_shadow(self, model: nn.Module) -> None:
        """Copy the trained (sharded) weights into rank 0's unsharded model; a collective."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        state = get_model_state_dict(model, options=options)
        if self.shadow is not None:
            missing, unexpected = self.shadow.load_state_dict(state, strict=False)
            trained = {n for n, p in self.shadow.named_parameters() if p.requires_grad}
            if unexpected or trained & set(missing):
                raise RuntimeError(
                    f"trained weights do not fit the model: {unexpected or sorted(trained & set(missing))}"
                )

    def __call__(self, model: nn.Module, step: int) -> dict:
        """eval/loss and, on the embedded data, eval/accuracy, eval/chance, eval/exact_match; on other data
        eval/loss_shuffled_media, eval/bleu4, eval/wer. A collective (every rank calls it)."""

        def loss_of(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
            return batch_loss(model, batch, self.ctx.device)

        sums = torch.stack([loss_sum(self.loss_batches, loss_of), loss_sum(self.control_batches, loss_of)])
        if world_size() > 1:
            dist.all_reduce(sums)
        out = media_losses(sums)
        keys = GRADED_KEYS if self.embedded else CAPTION_KEYS
        scores = torch.zeros(len(keys), dtype=torch.float64)
        answers = self.answers(model)
        if answers is not None:
            result = self.generation_scores(answers)
            scores = torch.tensor([result[k] for k in keys], dtype=torch.float64)
        if world_size() > 1:
            scores = scores.to(self.ctx.device)
            dist.broadcast(scores, src=0)  # the others wait here while rank 0 generates or grades
        out.update(zip(keys, scores.tolist(), strict=True))
        return out

    def answers(self, model: nn.Module) -> list[str] | None:
        """The greedy answers to the generation set on rank 0 (None on the others): a collective."""
        max_new = self.cfg.eval.max_new_tokens
        if self.cfg.eval.generate_sharded:
            return self.sharded_answers(model)
        self.sync_shadow(model)
        if self.shadow is None:
            return None
        self.shadow.eval()
        return greedy_answers(self.shadow, self.collator, self.gen_samples, max_new)

    def sharded_answers(self, model: nn.Module) -> list[str] | None:
        """Every rank's greedy answers to its share of the generation set (train.sharded_generation), gathered on
        rank 0 in sample order (None on the others)."""
        ec, device = self.cfg.eval, self.ctx.device
        share, real = padded_share(len(self.gen_samples), self.ctx.rank, world_size())
        answers: list[str] = []
        for i in range(0, len(share), ec.batch_size):
            inputs = [self.collator.prompt_inputs(self.gen_samples[j]) for j in share[i : i + ec.batch_size]]
            rows = [x.pop("tokens")[0].tolist() for x in inputs]
            answers += greedy_batch(model, rows, to_device(collate_media(inputs), device), ec.max_new_tokens, device)
        return gather_answers(answers[:real])

    def generation_scores(self, answers: list[str]) -> dict:
        """Rank 0's greedy answers to the generation set, graded (embedded data) or scored as captions."""
        if self.embedded:
            return generation_accuracy(self.modality, self.collator, self.gen_samples, answers)
        references = [self.collator.target(sample) for sample in self.gen_samples]
        shown = [f"{r!r} -> {a.strip()!r}" for r, a in zip(references[:3], answers[:3], strict=True)]
        log.info("held-out generations: %s", "; ".join(shown))
        return caption_metrics(answers, references)


@dataclass(frozen=True)
class ExportLayout:
    """What RUN_DIR/final holds of the stage's model, read before FSDP wraps it: each part's class and config, the
    shape of every tensor outside the LM (what ``Llama3MM.save_pretrained`` writes) and the LM's path."""

    parts: dict[str, tuple[type, Any]]
    shapes: dict[str, torch.Size]
    lm_path: str | None


def export_layout(mm: Llama3MM) -> ExportLayout:
    """The export layout of an unsharded Llama3MM (FSDP replaces its parameters and the classes of its units)."""
    from llama3mm.checkpoint import PARTS

    parts = {name: (type(m), m.cfg) for name in PARTS if (m := getattr(mm, name)) is not None}
    shapes = {name: t.shape for name, t in mm.state_dict().items() if not name.startswith("lm.")}
    return ExportLayout(parts, shapes, mm.lm_path)


def save_gathered(
    directory: Path, layout: ExportLayout, tensors: dict[str, torch.Tensor], prompts: dict[str, str]
) -> None:
    """RUN_DIR/final from the gathered tensors (train.sharded_generation.gathered_tensors): the files
    ``save_pretrained`` writes of the unsharded model."""
    from llama3mm.checkpoint import save_parts

    if layout.lm_path is None:
        raise ValueError("the stage's LM has no path: its checkpoint would have to hold the LM itself")
    parts = {
        name: (cls, cfg, {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")})
        for name, (cls, cfg) in layout.parts.items()
    }
    save_parts(directory, layout.lm_path, prompts, tensors["extra_embeddings"], parts)


# ----------------------------------------------------------------------------------------------------------------
# Recipes: one per modality, run by train.stage.


@dataclass(frozen=True)
class AdapterModality:
    """What differs between the adapter stages: the model they train, a sample's media, how samples decode."""

    name: str
    build_model: Callable[[AdapterModelConfig, torch.device], Llama3MM]
    media: MediaArgs
    # MediaSamples decoding options: the processor tiles PIL images as generate() gets them.
    decode: Mapping[str, Any] = field(default_factory=dict)

    def build(self, cfg: AdapterJobConfig, ctx: RunContext) -> Stage:
        """The stage: this modality's Llama3MM with the collator, loss, eval and export every adapter stage shares."""
        sharded_lm = cfg.parallel.shard_frozen
        # A model whose LM FSDP shards is built on the host: fully_shard moves it to the device unit by unit.
        mm = self.build_model(cfg.model, torch.device("cpu") if sharded_lm else ctx.device)
        trainable = mm.trainable_parameters()
        counts = {
            "trainable_parameters": sum(p.numel() for p in trainable),
            "frozen_parameters": sum(p.numel() for p in mm.parameters() if not p.requires_grad),
        }
        shadow = None
        # eval.generate_sharded: no copy; every rank generates with the sharded model, the export gathers its tensors.
        copies = ctx.rank == 0 and not cfg.eval.generate_sharded
        if copies and sharded_lm:
            # Rank 0 generates with an unsharded copy. The LM about to be sharded never changes: a copy taken now
            # stays exact (sync_shadow copies only what trains), with no all-gather of it and no reread of its files.
            shadow = copy.deepcopy(mm).to(ctx.device)
        elif copies:
            # The replicated LM is shared with the copy (never sharded, so never copied).
            shadow = copy.deepcopy(mm, memo={id(mm.lm): mm.lm})
        prompt = cfg.data.prompt or DEFAULT_PROMPTS[MEDIA_KINDS[self.name]]
        collator = PromptCollator(mm, prompt, self.media, cfg.data.target_end)
        frozen = {p for p in mm.parameters() if not p.requires_grad}
        evaluator = Evaluator(cfg, self, ctx, shadow, collator)
        # Read before FSDP wraps the model: without a copy the export writes from the gathered sharded tensors.
        layout = export_layout(mm) if cfg.eval.generate_sharded else None

        def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
            loss, n = batch_loss(model, batch, ctx.device)
            return loss, {"target_tokens": n.float()}

        return Stage(
            model=mm,
            blocks=fsdp_blocks(mm),
            transform=lambda batch: collator(split_samples(batch)),
            loss_fn=loss_fn,
            eval_fn=evaluator,
            export=self.export(cfg, ctx, mm, evaluator, counts, layout),
            frozen=frozen,
            frozen_units=frozen_units(mm),
            decode=self.decode,
        )

    def export(
        self,
        cfg: AdapterJobConfig,
        ctx: RunContext,
        mm: nn.Module,
        evaluator: Evaluator,
        counts: dict[str, int],
        layout: ExportLayout | None,
    ) -> Callable[[list[dict], float], None]:
        """Writes RUN_DIR/final: the Llama3MM checkpoint (what trained, the LM by path) and eval.json."""

        def export(records: list[dict], seconds: float) -> None:
            # The composed model for inference: adapters and encoders in small files beside a manifest naming the LM.
            # The prompt goes with the checkpoint: an adapter on a base LM answers the prompt it was trained with.
            final = Path(cfg.run.dir) / "final"
            if layout is not None:  # eval.generate_sharded: no copy to write from
                tensors = gathered_tensors(mm, layout.shapes)  # a collective: rank 0 gets them whole
                if ctx.rank != 0:
                    return
                prompts = {**mm.prompts, MEDIA_KINDS[self.name]: evaluator.collator.prompt}
                save_gathered(final, layout, tensors, prompts)
            else:
                evaluator.sync_shadow(mm)
                if ctx.rank != 0:
                    return
                evaluator.shadow.prompts[MEDIA_KINDS[self.name]] = evaluator.collator.prompt
                evaluator.shadow.save_pretrained(final)
            last_eval = next((r for r in reversed(records) if "eval/loss" in r), {})
            summary = {
                "modality": self.name,
                "steps": cfg.train.steps,
                "train_seconds": round(seconds, 1),
                **counts,
                "eval_samples": cfg.eval.samples,
                **{k: v for k, v in last_eval.items() if k.startswith("eval/")},
            }
            atomic_write_text(final / "eval.json", json.dumps(summary, indent=2) + "\n")
            log.info("wrote %s: %s", final, summary)

        return export


MODALITY_TABLE = (
    AdapterModality("vision", vision_model, image_media, {"image_format": "pil"}),
    AdapterModality("video", video_model, video_media, {"video_frames": VIDEO_FRAMES}),
    AdapterModality("speech", speech_model, audio_media),
)
RECIPES = {m.name: Recipe(m.name, TASK, m.build) for m in MODALITY_TABLE}
MODALITIES = tuple(RECIPES)


# ----------------------------------------------------------------------------------------------------------------
# Dry run: the stage's model built on the meta device and sharded on a fake process group (train.dryrun_media).


def planned_lm_config(mc: AdapterModelConfig) -> Any:
    """The frozen LM's shape: its checkpoint's config where ``model.lm`` is on this machine, else the preset."""
    from lm.checkpoint import load_config
    from lm.config import LMConfig

    if Path(mc.lm).exists():
        config = load_config(mc.lm)
        check_lm_shape(config, mc.lm_preset)
        return config
    if mc.lm_preset:
        return LMConfig.from_preset(mc.lm_preset)
    raise FileNotFoundError(f"model.lm = {mc.lm!r} is not on this machine: name its shape with model.lm_preset")


def planned_encoder_config(config_cls: type, directory: str | Path, preset: str, key: str, preset_key: str) -> Any:
    """An encoder's shape: its checkpoint's config.json where it is on this machine, else the preset."""
    path = Path(directory) / "config.json"
    if path.is_file():
        config = config_cls.from_dict(json.loads(path.read_text()))
        check_encoder_shape(config, preset, key, preset_key)
        return config
    if preset:
        return config_cls.from_preset(preset)
    raise FileNotFoundError(f"{key} = {str(directory)!r} is not on this machine: name its shape with {preset_key}")


def planned_model(cfg: AdapterJobConfig, modality: str) -> Llama3MM:
    """The stage's model on the meta device, as the run builds it but with no weight read."""
    from encoders.speech import SpeechEncoder, SpeechEncoderConfig
    from encoders.vision import VisionEncoder, VisionEncoderConfig
    from lm.model import Transformer

    mc = cfg.model
    with torch.device("meta"):
        lm = Transformer(planned_lm_config(mc)).to(LM_DTYPES[mc.lm_dtype])
        if modality == "speech":
            shape = (mc.speech_encoder, mc.speech_preset, "model.speech_encoder", "model.speech_preset")
            speech = SpeechEncoder(planned_encoder_config(SpeechEncoderConfig, *shape))
            return trainables_in_fp32(dryrun_media.meta_llama3mm(lm, lambda lm: assemble_speech(mc, lm, speech)))
        # The video stage reuses the image encoder of its base (model.base), as the vision stage built it.
        directory = Path(mc.base) / "vision_encoder" if modality == "video" else mc.vision_encoder
        shape = (directory, mc.vision_preset, "model.vision_encoder", "model.vision_preset")
        image = VisionEncoder(planned_encoder_config(VisionEncoderConfig, *shape))
        mm = trainables_in_fp32(dryrun_media.meta_llama3mm(lm, lambda lm: assemble_vision(mc, lm, image)))
        return add_video_adapter(mc, mm) if modality == "video" else mm


def sample_description(cfg: AdapterJobConfig, modality: str, mm: Llama3MM) -> str:
    """The ``[plan]`` sample in words, with the media sizes it implies."""
    p = cfg.plan
    text = f"{p.text_tokens} text tokens ({p.target_tokens} scored)"
    if modality == "speech":
        steps = dryrun_media.speech_steps(mm.speech_encoder.cfg, p.audio_seconds)
        audio = -(-steps // mm.speech_adapter.cfg.conv_stride)
        return f"{text} and {p.audio_seconds:g} s of audio ({steps} encoder steps, {audio} <|audio|> tokens)"
    enc = mm.vision_encoder.cfg
    if modality == "video":
        groups = -(-p.frames // mm.video_adapter.cfg.frames_per_group)
        return f"{text} and a clip of {p.frames} frames of {enc.image_size} px ({groups} groups)"
    tiles = p.tiles or enc.max_num_tiles
    state = "trained" if cfg.model.train_encoder else "frozen"
    return (
        f"{text} and an image of {tiles} tiles of {enc.image_size} px ({tiles * enc.num_tokens} media tokens), "
        f"image encoder {state}"
    )


def plan(cfg: AdapterJobConfig, modality: str, world_size: int, *, rank: int = 0, device_gb: float = 80.0) -> dict:
    """The dry-run report of the ``modality`` stage of ``cfg`` on ``world_size`` ranks (``rank``'s bytes)."""
    from train.dryrun import DTYPE_BYTES

    lm_bytes = DTYPE_BYTES[cfg.model.lm_dtype]

    def build() -> dryrun_media.PlannedStage:
        mm = planned_model(cfg, modality)

        def parts(batch: int, compute_bytes: int, dp: int) -> list[dryrun_media.Part]:
            return dryrun_media.adapter_parts(mm, modality, cfg.plan, batch, compute_bytes, lm_bytes)

        frozen = {p for p in mm.parameters() if not p.requires_grad}
        sample = sample_description(cfg, modality, mm)
        # Rank 0's evaluation copy (AdapterModality.build), unsharded: everything but the replicated LM it shares,
        # or, the LM sharded (parallel.shard_frozen), everything. Under eval.generate_sharded there is none, and
        # every rank holds a generation batch's KV caches instead.
        sharded_lm, ec = cfg.parallel.shard_frozen, cfg.eval
        copy_bytes = sum(
            p.numel() * p.element_size() for n, p in mm.named_parameters() if sharded_lm or not n.startswith("lm.")
        )
        compute = DTYPE_BYTES[cfg.parallel.param_dtype]
        generation = dryrun_media.generation_bytes(
            mm, modality, cfg.plan, ec.batch_size, ec.max_new_tokens, compute, lm_bytes
        )
        return dryrun_media.PlannedStage(
            mm,
            fsdp_blocks(mm),
            frozen,
            parts,
            sample,
            rank0_bytes=0 if ec.generate_sharded else copy_bytes,
            generation_bytes=generation if ec.generate_sharded else 0,
            frozen_units=frozen_units(mm),
        )

    title = f"{modality} {TASK}"
    return dryrun_media.plan_stage(cfg, world_size, build, title=title, rank=rank, device_gb=device_gb)


def dry_run(cfg: AdapterJobConfig, modality: str, world_size: int, args: Any) -> dict:
    """``--dry-run``: print the plan (and write it as JSON with ``--dry-run-out``); returns the report."""
    report = plan(cfg, modality, world_size, rank=args.dry_run_rank or 0, device_gb=args.dry_run_device_gb)
    return dryrun_media.report_main(report, args)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse, set up the mesh, build the stage's model and data, train, write the Llama3MM checkpoint; or, with
    ``--dry-run``, plan the run on a fake process group."""
    description = __doc__.split("\n\n")[0]
    return stage_main(argv, AdapterJobConfig, RECIPES, dry_run, "train/adapter.py", description)


if __name__ == "__main__":
    main()
    exit_rank()

"""Encoder pretraining: CLIP or image tags (vision, ``vision.objective``) or BEST-RQ (speech) on media shards, with
the shared training machinery.

    torchrun --nproc-per-node N train/encoder.py --modality vision|speech --config configs/encoder/vision_tiny.toml \
        [--train.steps N] [--run.dir DIR] [--section.key=value ...]
    python train/encoder.py --modality vision --config configs/encoder/vision_vit_h14.toml --dry-run --world-size 8

Writes RUN_DIR/metrics.jsonl, RUN_DIR/checkpoints/step-N (DCP, exact resume) and, at the end, the encoder's full
weights as RUN_DIR/final/encoder/{config.json,model.safetensors} (``VisionEncoder.from_pretrained`` /
``SpeechEncoder.from_pretrained`` load it) for the adapter stage, beside final/pretraining.json.

``--dry-run --world-size W`` plans the run instead (``train.dryrun_media``): per-rank bytes of the sharded
parameters, gradients, AdamW state and activations of a micro-batch, against ``--dry-run-device-gb``.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # `torchrun train/encoder.py` puts train/ first on sys.path, where its modules would shadow top-level packages
    # (train/lm.py vs lm/): drop it and put the repository root first.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, os.path.dirname(_here))

import collections  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Annotated, Any, Literal  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common.atomic import atomic_write_text  # noqa: E402
from train import dryrun_media  # noqa: E402
from train.checkpoint import full_state_dict  # noqa: E402
from train.config import JobConfig, PositiveInt, Range  # noqa: E402
from train.loop import EvalFn, RunContext  # noqa: E402
from train.media import MediaDataConfig  # noqa: E402
from train.parallel.mesh import exit_rank, world_size  # noqa: E402
from train.stage import Recipe, Stage  # noqa: E402
from train.stage import main as stage_main  # noqa: E402

if TYPE_CHECKING:  # the encoders import open_clip, torchvision and torchaudio: loaded only where used
    from encoders.objectives import BestRQ, CLIPModel, TagClassifier, TextTowerConfig
    from encoders.speech import SpeechEncoderConfig
    from encoders.vision import VisionEncoderConfig

Tokenize = Callable[[list[str]], torch.Tensor]

log = logging.getLogger("train.encoder")

TASK = "encoder pretraining"


@dataclass
class EncoderModelConfig:
    """Encoder shapes: named presets plus per-field overrides (tables of the encoders' config dataclasses)."""

    vision_preset: str = "tiny"
    vision: dict = field(default_factory=dict)
    text_preset: str = "tiny"
    text: dict = field(default_factory=dict)
    speech_preset: str = "tiny"
    speech: dict = field(default_factory=dict)
    # BEST-RQ quantizer and masking (preset of encoders.objectives.BEST_RQ_PRESETS plus overrides).
    bestrq_preset: str = "tiny"
    bestrq: dict = field(default_factory=dict)


@dataclass
class EncoderDataConfig(MediaDataConfig):
    """Media shards (train.media.MediaDataConfig): the embedded synthetic set, generated into ``dir`` when it has
    none, or ``shards`` streamed."""


@dataclass
class EncoderEvalConfig:
    """Held-out evaluation: retrieval among groups (CLIP), tags right (tags) or masked-prediction accuracy (speech)."""

    group_size: Annotated[int, Range(min=2)] = 20
    # Held-out groups (CLIP) or batches (tags, speech) evaluated each time.
    batches: PositiveInt = 10
    batch_size: PositiveInt = 20


@dataclass
class EncoderVisionConfig:
    """How the ViT is pretrained, and where it starts: fresh weights, or an open_clip checkpoint on local disk."""

    # An open_clip CLIP (or visual-only) state dict, .pt/.bin/.safetensors: e.g. ViT-H-14 for the paper's encoder.
    pretrained: str = ""
    # "clip": image-text contrastive against a text tower, as the paper's encoder was. "tags": multi-label
    # classification of each image's json "tags" over the vocabulary of tags_file, as ViT was pretrained on JFT.
    # The embedded default takes tags: on its 4,000 scenes CLIP learns colour but not shape within the quickstart's
    # budget, however its captions are varied (bench/RESULTS.md, issue 22).
    objective: Literal["clip", "tags"] = "clip"
    # The tags, one per line; empty: tags.txt beside data.dir's training shards (data.synthetic writes it).
    tags_file: str = ""


@dataclass
class EncoderPlanConfig:
    """The sample ``--dry-run`` plans for (a real run takes its sizes from its data; images are always one tile of
    the encoder's size and captions the text tower's context)."""

    # Seconds per utterance (speech).
    audio_seconds: Annotated[float, Range(min=0.05)] = 30.0
    # Tags the head classifies (vision.objective = "tags"; a real run counts its tags file).
    tags: PositiveInt = 1000


@dataclass
class EncoderJobConfig(JobConfig):
    """Root config of ``train/encoder.py``."""

    model: EncoderModelConfig = field(default_factory=EncoderModelConfig)
    data: EncoderDataConfig = field(default_factory=EncoderDataConfig)
    eval: EncoderEvalConfig = field(default_factory=EncoderEvalConfig)
    vision: EncoderVisionConfig = field(default_factory=EncoderVisionConfig)
    plan: EncoderPlanConfig = field(default_factory=EncoderPlanConfig)


# ----------------------------------------------------------------------------------------------------------------
# Batches.


def image_pixels(model_cfg: VisionEncoderConfig) -> Callable[[torch.Tensor | list[torch.Tensor]], torch.Tensor]:
    """Decoded images (a stacked batch, or a list of mixed sizes) -> CLIP-normalised square tiles [B, 3, S, S]."""
    from encoders.tiling import CLIP_MEAN, CLIP_STD

    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    size = model_cfg.image_size

    def fn(images: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):  # mixed sizes: resize each
            images = torch.stack([F.interpolate(im[None], size=(size, size), mode="bilinear")[0] for im in images])
        elif images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        return (images - mean) / std

    return fn


def vision_transform(model_cfg: VisionEncoderConfig, tokenize: Tokenize) -> Callable[[dict], dict]:
    """Batch of decoded images/captions -> (normalised pixels [B,3,S,S], token ids, captions)."""
    pixels = image_pixels(model_cfg)

    def fn(batch: dict) -> dict:
        return {"images": pixels(batch["image"]), "tokens": tokenize(batch["text"]), "text": batch["text"]}

    return fn


def read_tags(cfg: EncoderJobConfig) -> list[str]:
    """The tags' vocabulary: ``vision.tags_file``, or tags.txt beside ``data.dir``'s training shards."""
    from data.media import find_shards
    from data.synthetic import TAGS_FILE

    if cfg.vision.tags_file:
        path = Path(cfg.vision.tags_file)
    elif cfg.data.shards:
        raise ValueError("vision.objective = 'tags' over data.shards needs vision.tags_file (one tag per line)")
    else:
        path = find_shards(cfg.data.dir, "image", "train")[0].parent / TAGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no tags file {path} (vision.tags_file: the tags, one per line)")
    tags = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not tags:
        raise ValueError(f"{path} lists no tags")
    repeated = sorted(t for t, n in collections.Counter(tags).items() if n > 1)  # one pass: vocabularies run to 10^4+
    if repeated:
        raise ValueError(f"{path} lists {repeated} more than once")
    return tags


def tags_transform(model_cfg: VisionEncoderConfig, tags: list[str]) -> Callable[[dict], dict]:
    """Batch of decoded images with json "tags" -> (normalised pixels [B,3,S,S], multi-hot targets [B, tags])."""
    pixels = image_pixels(model_cfg)
    index = {tag: i for i, tag in enumerate(tags)}

    def fn(batch: dict) -> dict:
        targets = torch.zeros(len(batch["meta"]), len(tags))
        for row, (key, meta) in enumerate(zip(batch["key"], batch["meta"], strict=True)):
            if not isinstance(meta.get("tags"), list):
                raise ValueError(f"image {key} has no \"tags\" list in its json (vision.objective = 'tags')")
            for tag in meta["tags"]:
                if tag not in index:
                    raise ValueError(f"tag {tag!r} of image {key} is not one of the {len(tags)} in the tags file")
                targets[row, index[tag]] = 1.0
        return {"images": pixels(batch["image"]), "targets": targets}

    return fn


def speech_transform(batch: dict) -> dict:
    """Batch of waveforms -> padded log-mel features [B, T, 80] with lengths [B]."""
    from encoders.speech import log_mel, num_feature_frames

    audio, lengths = batch["audio"], batch["audio_lengths"]
    feats = log_mel(audio, batch["sample_rate"])
    frames = torch.tensor([num_feature_frames(int(n)) for n in lengths])
    return {"features": feats, "lengths": frames.clamp(max=feats.shape[1])}


# ----------------------------------------------------------------------------------------------------------------
# Models, losses and evals.


def vision_config(cfg: EncoderJobConfig) -> VisionEncoderConfig:
    """The ViT's shape: the config's preset and overrides."""
    from encoders.vision import VisionEncoderConfig

    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.vision.items()}
    return VisionEncoderConfig.from_preset(cfg.model.vision_preset, **overrides)


def build_vision(cfg: EncoderJobConfig) -> tuple[CLIPModel, VisionEncoderConfig, TextTowerConfig]:
    """CLIPModel (our VisionEncoder + open_clip text tower) from the config's presets and overrides."""
    from encoders.objectives import CLIPModel, TextTowerConfig

    vcfg = vision_config(cfg)
    tcfg = TextTowerConfig.from_preset(cfg.model.text_preset, **cfg.model.text)
    model = CLIPModel(vcfg, tcfg)
    if cfg.vision.pretrained:
        left = model.load_open_clip(cfg.vision.pretrained)
        log.info("loaded %s; %d tensors start fresh (%s)", cfg.vision.pretrained, len(left), ", ".join(left[:4]))
    return model, vcfg, tcfg


def build_tagger(cfg: EncoderJobConfig, num_tags: int) -> tuple[TagClassifier, VisionEncoderConfig]:
    """TagClassifier (our VisionEncoder + a linear head of ``num_tags``) from the config's presets and overrides."""
    from encoders.objectives import TagClassifier

    vcfg = vision_config(cfg)
    model = TagClassifier(vcfg, num_tags)
    if cfg.vision.pretrained:
        left = model.vision.load_open_clip(cfg.vision.pretrained)
        log.info("loaded %s; %d tensors start fresh (%s)", cfg.vision.pretrained, len(left), ", ".join(left[:4]))
    return model, vcfg


def build_speech(cfg: EncoderJobConfig) -> tuple[BestRQ, SpeechEncoderConfig, dict[str, Any]]:
    """BestRQ (SpeechEncoder + frozen random-projection quantizer) from the config's presets and overrides."""
    from encoders.objectives import BEST_RQ_PRESETS, BestRQ
    from encoders.speech import SpeechEncoderConfig

    scfg = SpeechEncoderConfig.from_preset(cfg.model.speech_preset, **cfg.model.speech)
    kwargs = {**BEST_RQ_PRESETS[cfg.model.bestrq_preset], **cfg.model.bestrq}
    return BestRQ(scfg, seed=cfg.run.seed, **kwargs), scfg, kwargs


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def vision_eval(cfg: EncoderJobConfig, ctx: RunContext, tokenize: Tokenize, vcfg: VisionEncoderConfig) -> EvalFn:
    """Zero-shot retrieval on held-out images: top-1 image -> caption among groups of ``eval.group_size``."""
    from data.media import MediaSamples, collate_samples

    group = cfg.eval.group_size
    heldout = MediaSamples(cfg.data.dir, kind="image", split="heldout", shuffle=False, epochs=1)
    total_groups = min(cfg.eval.batches, heldout.num_samples // group)
    # Every rank runs the same number of forwards (FSDP all-gathers): groups split evenly over dp ranks.
    per_rank = total_groups // ctx.dp_size
    transform = vision_transform(vcfg, tokenize)
    stream = iter(heldout)
    mine = []
    for g in range(per_rank * ctx.dp_size):
        samples = [next(stream) for _ in range(group)]  # every rank reads every group to reach its own
        if g % ctx.dp_size == ctx.dp_rank:
            mine.append(transform(collate_samples(samples)))

    def fn(model: nn.Module, step: int) -> dict:
        correct = count = 0.0
        for b in mine:
            img, txt, _ = model(b["images"].to(ctx.device), b["tokens"].to(ctx.device))
            best = (img.float() @ txt.float().T).argmax(dim=1).tolist()
            # Identical captions in a group (one-object scenes repeat) count as a hit either way.
            correct += sum(b["text"][j] == b["text"][i] for i, j in enumerate(best))
            count += len(best)
        correct, count = _all_reduce_sum([correct, count], ctx.device)
        return {"eval/retrieval_top1": correct / max(count, 1), "eval/retrieval_chance": 1.0 / group}

    return fn


def heldout_batches(
    cfg: EncoderJobConfig, ctx: RunContext, kind: str, transform: Callable[[dict], dict]
) -> tuple[list[dict], list[dict]]:
    """The first ``eval.batches`` held-out batches of ``eval.batch_size`` samples, transformed (as many as split
    evenly over the data-parallel ranks), and this rank's share of them."""
    from data.media import MediaSamples, collate_samples

    heldout = MediaSamples(cfg.data.dir, kind=kind, split="heldout", shuffle=False, epochs=1)
    bs = cfg.eval.batch_size
    n = min(cfg.eval.batches, heldout.num_samples // bs) // ctx.dp_size * ctx.dp_size
    stream = iter(heldout)
    cached = [transform(collate_samples([next(stream) for _ in range(bs)])) for _ in range(n)]
    return cached, cached[ctx.dp_rank :: ctx.dp_size]


def tags_eval(cfg: EncoderJobConfig, ctx: RunContext, transform: Callable[[dict], dict]) -> EvalFn:
    """On held-out images: the share whose every tag is called right (``exact_tags``), the mean accuracy per tag
    beside what always calling each tag's commoner answer gets (``tag_majority``), and the loss."""
    cached, mine = heldout_batches(cfg, ctx, "image", transform)
    share = torch.cat([b["targets"] for b in cached]).mean(0) if cached else torch.zeros(0)
    majority = torch.maximum(share, 1 - share).mean().item()

    def fn(model: nn.Module, step: int) -> dict:
        exact = right = loss_sum = count = 0.0
        for b in mine:
            logits = model(b["images"].to(ctx.device)).float()
            targets = b["targets"].to(ctx.device)
            hits = (logits > 0) == targets.bool()
            exact += hits.all(1).sum().item()
            right += hits.float().mean(1).sum().item()
            loss_sum += F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum().item()
            count += len(targets)
        exact, right, loss_sum, count = _all_reduce_sum([exact, right, loss_sum, count], ctx.device)
        count = max(count, 1)
        return {
            "eval/exact_tags": exact / count,
            "eval/tag_accuracy": right / count,
            "eval/tag_majority": majority,
            "eval/loss": loss_sum / count,
        }

    return fn


def _target_baselines(model: nn.Module, batches: list[dict]) -> tuple[float, float]:
    """Majority-code accuracy and unigram entropy (nats) of the quantizer's targets: what a model that ignores
    the audio reaches, a fairer bar than 1/codebook_size when the codes are unevenly used."""
    from encoders.speech import lengths_to_mask

    counts = torch.zeros(model.num_codebooks, model.codebook_size, dtype=torch.float64)
    for b in batches:
        stacked, lengths = model.encoder.stack_frames(b["features"], b["lengths"])
        codes = model.targets(stacked)[lengths_to_mask(lengths, stacked.shape[1])]  # [N, codebooks]
        for c in range(model.num_codebooks):
            counts[c] += torch.bincount(codes[:, c].cpu(), minlength=model.codebook_size).double()
    p = counts / counts.sum(1, keepdim=True).clamp(min=1)
    entropy = -(p * p.clamp(min=1e-12).log()).sum(1)
    return p.max(1).values.mean().item(), entropy.mean().item()


def speech_eval(cfg: EncoderJobConfig, ctx: RunContext, model: nn.Module) -> EvalFn:
    """Masked-prediction accuracy on held-out utterances, with fixed masks (a seeded generator)."""
    cached, mine = heldout_batches(cfg, ctx, "audio", speech_transform)
    majority, entropy = _target_baselines(model, cached)

    def fn(model: nn.Module, step: int) -> dict:
        g = torch.Generator(device=ctx.device).manual_seed(1234 + ctx.dp_rank)
        hits = masked = loss_sum = 0.0
        for b in mine:
            out = model(b["features"].to(ctx.device), b["lengths"].to(ctx.device), g)
            hits += out.accuracy.item() * out.num_masked
            masked += out.num_masked
            loss_sum += out.loss.item() * out.num_masked
        hits, masked, loss_sum = _all_reduce_sum([hits, masked, loss_sum], ctx.device)
        return {
            "eval/accuracy": hits / max(masked, 1),
            "eval/loss": loss_sum / max(masked, 1),
            "eval/majority_accuracy": majority,
            "eval/unigram_entropy": entropy,
        }

    return fn


# ----------------------------------------------------------------------------------------------------------------
# Recipes: one per modality, run by train.stage.


def clip_blocks(model: CLIPModel) -> list[nn.Module]:
    """The units FSDP shards and checkpoints one by one: CLIP pretraining runs the ViT trunk only (the Llama 3.2
    global layers join in the adapter stage), and the text tower."""
    return list(model.vision.transformer.resblocks) + list(model.text.transformer.resblocks)


def clip_stage(cfg: EncoderJobConfig, ctx: RunContext) -> Stage:
    """CLIP pretraining of the vision encoder with a text tower; exports the vision encoder."""
    from encoders.objectives import clip_loss

    model, vcfg, tcfg = build_vision(cfg)
    objective = {"kind": "vision", "vision": vcfg.to_dict(), "text": tcfg.to_dict()}
    tokenize = model.tokenize
    # Contrastive loss over the whole data-parallel batch: features all-gathered with gradients.
    criterion = clip_loss(rank=ctx.dp_rank, world_size=ctx.dp_size, local_loss=False, gather_with_grad=True)

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        img, txt, scale = model(batch["images"].to(ctx.device), batch["tokens"].to(ctx.device))
        loss = criterion(img.float(), txt.float(), scale.float())
        with torch.no_grad():
            acc = ((img @ txt.T).argmax(1) == torch.arange(len(img), device=img.device)).float().mean()
        return loss, {"logit_scale": scale.detach(), "batch_top1": acc}

    return Stage(
        model=model,
        blocks=clip_blocks(model),
        transform=vision_transform(vcfg, tokenize),
        loss_fn=loss_fn,
        eval_fn=vision_eval(cfg, ctx, tokenize, vcfg),
        export=encoder_export(cfg, ctx, model, "vision.", objective),
    )


def tags_stage(cfg: EncoderJobConfig, ctx: RunContext) -> Stage:
    """Tag pretraining of the vision encoder (multi-label classification); exports the vision encoder."""
    tags = read_tags(cfg)
    model, vcfg = build_tagger(cfg, len(tags))
    objective = {"kind": "vision", "vision": vcfg.to_dict(), "tags": tags}
    transform = tags_transform(vcfg, tags)

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(batch["images"].to(ctx.device)).float()
        targets = batch["targets"].to(ctx.device)
        exact = ((logits > 0) == targets.bool()).all(1).float().mean()
        return F.binary_cross_entropy_with_logits(logits, targets), {"batch_exact_tags": exact.detach()}

    return Stage(
        model=model,
        blocks=list(model.vision.transformer.resblocks),
        transform=transform,
        loss_fn=loss_fn,
        eval_fn=tags_eval(cfg, ctx, transform),
        export=encoder_export(cfg, ctx, model, "vision.", objective),
    )


def vision_stage(cfg: EncoderJobConfig, ctx: RunContext) -> Stage:
    """The vision encoder's pretraining by ``vision.objective``: CLIP or tags."""
    return tags_stage(cfg, ctx) if cfg.vision.objective == "tags" else clip_stage(cfg, ctx)


def bestrq_blocks(model: BestRQ) -> list[nn.Module]:
    """The units FSDP shards and checkpoints one by one: the Conformer blocks."""
    return list(model.encoder.layers.values())


def bestrq_stage(cfg: EncoderJobConfig, ctx: RunContext) -> Stage:
    """BEST-RQ pretraining of the speech encoder against a frozen random-projection quantizer."""
    model, scfg, rq = build_speech(cfg)
    chance = 1.0 / rq["codebook_size"]

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        out = model(batch["features"].to(ctx.device), batch["lengths"].to(ctx.device))
        return out.loss, {"accuracy": out.accuracy, "chance": chance, "masked_steps": float(out.num_masked)}

    return Stage(
        model=model,
        blocks=bestrq_blocks(model),
        transform=speech_transform,
        loss_fn=loss_fn,
        # Built before the model moves to its device: the targets' baselines are counted on the host.
        eval_fn=speech_eval(cfg, ctx, model),
        export=encoder_export(cfg, ctx, model, "encoder.", {"kind": "speech", "speech": scfg.to_dict(), "bestrq": rq}),
    )


def encoder_export(
    cfg: EncoderJobConfig, ctx: RunContext, model: nn.Module, prefix: str, objective: dict[str, Any]
) -> Callable[[list[dict], float], None]:
    """Writes RUN_DIR/final: the encoder (weights under ``prefix``) and pretraining.json."""

    def export(records: list[dict], seconds: float) -> None:
        # The encoder's full weights for the adapter stage, in the encoders' own save_pretrained layout
        # (config.json + model.safetensors: VisionEncoder/SpeechEncoder.from_pretrained(RUN_DIR/final/encoder)
        # loads it). A collective: every rank takes part, rank 0 writes.
        final = Path(cfg.run.dir) / "final"
        state = full_state_dict(model)
        if ctx.rank == 0:
            from encoders.vision import save_encoder

            save_encoder(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
                objective[objective["kind"]],
                final / "encoder",
            )
            summary = {"objective": objective, "last": records[-1] if records else {}}
            atomic_write_text(final / "pretraining.json", json.dumps(summary, indent=2) + "\n")

    return export


RECIPES = {"vision": Recipe("vision", TASK, vision_stage), "speech": Recipe("speech", TASK, bestrq_stage)}
MODALITIES = tuple(RECIPES)


# ----------------------------------------------------------------------------------------------------------------
# Dry run: the stage's model built on the meta device and sharded on a fake process group (train.dryrun_media).


def planned_stage(cfg: EncoderJobConfig, modality: str) -> dryrun_media.PlannedStage:
    """The modality's model on the meta device (no checkpoint read), its FSDP blocks and activation parts."""
    planned = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained=""))
    with torch.device("meta"):
        if modality == "speech":
            model, scfg, _ = build_speech(planned)
            steps = dryrun_media.speech_steps(scfg, cfg.plan.audio_seconds)
            return dryrun_media.PlannedStage(
                model,
                bestrq_blocks(model),
                set(),
                lambda batch, a, dp: dryrun_media.bestrq_parts(model, cfg.plan.audio_seconds, batch, a),
                f"{cfg.plan.audio_seconds:g} s of audio ({steps} encoder steps)",
            )
        tags = cfg.vision.objective == "tags"
        if tags:
            model, vcfg = build_tagger(planned, cfg.plan.tags)
            blocks, sample = list(model.vision.transformer.resblocks), f"{cfg.plan.tags} tags"
        else:
            model, vcfg, tcfg = build_vision(planned)
            blocks, sample = clip_blocks(model), f"a caption of {tcfg.context_length} tokens"

    def parts(batch: int, a: int, dp: int) -> list[dryrun_media.Part]:
        if tags:
            return dryrun_media.tags_parts(model, batch, a)
        return dryrun_media.clip_parts(model, batch, dp, a)

    # The Llama 3.2 extensions (tile embeddings, global layers) never run in the encoder's pretraining: no gradient
    # and no AdamW state for them.
    idle = {f"vision.{name}" for name, _ in model.vision.named_parameters() if name.startswith(model.vision.OURS_ONLY)}
    if tags:  # nor the CLIP projection: the tag head reads the patch tokens
        idle.add("vision.proj")
    plan_sample = f"an image of {vcfg.image_size} px ({vcfg.num_tokens} tokens) and {sample}"
    return dryrun_media.PlannedStage(model, blocks, set(), parts, plan_sample, idle=idle)


def dry_run(cfg: EncoderJobConfig, modality: str, world_size: int, args: Any) -> dict:
    """``--dry-run``: plan the stage on a fake process group, print it (JSON too with ``--dry-run-out``)."""
    report = dryrun_media.plan_stage(
        cfg,
        world_size,
        lambda: planned_stage(cfg, modality),
        title=f"{modality} {TASK}",
        rank=args.dry_run_rank or 0,
        device_gb=args.dry_run_device_gb,
    )
    return dryrun_media.report_main(report, args)


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse, set up the mesh, build model/data/loss for the modality, train, export the encoder; or, with
    ``--dry-run``, plan the run on a fake process group."""
    description = __doc__.split("\n\n")[0]
    return stage_main(argv, EncoderJobConfig, RECIPES, dry_run, "train/encoder.py", description)


if __name__ == "__main__":
    main()
    exit_rank()

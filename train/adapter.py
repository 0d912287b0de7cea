"""Adapter training on a frozen LM: image (vision), video or speech, with the shared training machinery.

    torchrun --nproc-per-node N train/adapter.py --modality vision|video|speech \
        --config configs/adapter/vision_tiny.toml [--train.steps N] [--run.dir DIR] [--section.key=value ...]

The paper's compositional recipe (Sections 7-8): the language model never changes. The vision stage trains the
image adapter (cross-attention blocks, the projection, the extra token embeddings) together with the image
encoder; the video stage starts from a vision-stage Llama3MM (``model.base``) and trains only the video adapter;
the speech stage trains the speech encoder and adapter, whose outputs replace ``<|audio|>`` placeholders.

Each sample becomes ``prompt + media placeholder(s) + target`` (caption, motion caption or transcript) built by the
model's own processor exactly as ``Llama3MM.generate`` builds its prompt, and the loss counts the target tokens
(and the stop token after them) only. Parallelism: FSDP2 shards every trainable part; frozen parameters (the LM,
and the image parts in the video stage) are left out of FSDP (``ignored_params``), replicated on every rank, and
out of the DCP checkpoints, which hold trainable weights, optimizer state, data position and RNG (exact resume).

Held-out evaluation, every ``train.eval_interval`` steps and at the end: the teacher-forced loss on held-out
samples (all ranks), and accuracy by greedy GENERATION on rank 0 with an unsharded copy of the model: vision,
the first colour + shape named; video, the direction of motion; speech, the exact transcript. ``eval/chance`` is
what always answering the most frequent held-out answer scores. At the end rank 0 writes the Llama3MM checkpoint
to RUN_DIR/final (``Llama3MM.from_pretrained`` loads it) and RUN_DIR/final/eval.json.
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

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402

from llama3mm.processor import DEFAULT_PROMPTS  # noqa: E402
from lm.checkpoint import atomic_write_text  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.config import JobConfig, parse_cli  # noqa: E402
from train.encoder import MEDIA_KINDS, EncoderBatches, ensure_data  # noqa: E402
from train.loop import RunContext, compile_default, init_run, train  # noqa: E402
from train.optim import build_optimizer, build_scheduler  # noqa: E402
from train.parallel.fsdp import parallelize  # noqa: E402
from train.parallel.mesh import barrier, destroy_distributed, world_size  # noqa: E402

if TYPE_CHECKING:
    from llama3mm import Llama3MM

log = logging.getLogger("train.adapter")

MODALITIES = ("vision", "video", "speech")
IGNORE = -100


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
    vision_layers: int = 0
    # Keyword overrides of VideoAdapterConfig.from_vision (every, num_latents, ...) and SpeechAdapterConfig fields.
    video_adapter: dict[str, Any] = field(default_factory=dict)
    speech_adapter: dict[str, Any] = field(default_factory=dict)


@dataclass
class AdapterDataConfig:
    """Media shards (the embedded synthetic set is generated into ``dir`` when missing) and the prompt."""

    dir: str = "runs/data/media"
    generate: bool = True
    # Sizes of the generated sets (train, held-out); 0 = data.synthetic's defaults.
    train_count: int = 0
    heldout_count: int = 0
    seed: int = 0
    on_corrupt: str = "skip"
    # The text before the target; empty = the media kind's default (llama3mm.processor.DEFAULT_PROMPTS).
    prompt: str = ""


@dataclass
class AdapterEvalConfig:
    """Held-out evaluation: generation accuracy on rank 0 and the teacher-forced loss on every rank."""

    # Held-out samples rank 0 generates for (greedy).
    samples: int = 100
    max_new_tokens: int = 24
    # Held-out samples per rank for the teacher-forced loss.
    loss_samples: int = 32
    batch_size: int = 16


@dataclass
class AdapterJobConfig(JobConfig):
    """Root config of ``train/adapter.py``."""

    model: AdapterModelConfig = field(default_factory=AdapterModelConfig)
    data: AdapterDataConfig = field(default_factory=AdapterDataConfig)
    eval: AdapterEvalConfig = field(default_factory=AdapterEvalConfig)


# ----------------------------------------------------------------------------------------------------------------
# Answers: what a generated text says, what counts as right, and what chance is.


def _vocabulary() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    from data.scenes import COLOURS, DIRECTIONS, SHAPES

    return COLOURS, SHAPES, DIRECTIONS


def normalize_text(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: the form transcripts are compared in."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def _named_objects(text: str) -> list[str]:
    colours, shapes, _ = _vocabulary()
    pattern = r"\b(" + "|".join(colours) + r") (" + "|".join(shapes) + r")\b"
    return [f"{c} {s}" for c, s in re.findall(pattern, normalize_text(text))]


def answer_key(modality: str, text: str) -> str | None:
    """What a generated text answers: vision, the first 'colour shape' it names; video, the direction of motion
    ('moves up'); speech, the whole normalised transcript. None when it names none."""
    norm = normalize_text(text)
    if modality == "speech":
        return norm or None
    if modality == "video":
        directions = _vocabulary()[2]
        m = re.search(r"\bmoves (" + "|".join(re.escape(d) for d in directions) + r")\b", norm)
        return m.group(1) if m else None
    named = _named_objects(norm)
    return named[0] if named else None


def accepted_keys(modality: str, reference: str) -> set[str]:
    """The answers a reference caption or transcript accepts: vision, any object of the scene (a caption lists
    its objects in an order the image does not show); video and speech, the one answer."""
    if modality == "vision":
        return set(_named_objects(reference))
    key = answer_key(modality, reference)
    return {key} if key is not None else set()


def is_correct(modality: str, generated: str, reference: str) -> bool:
    """Whether a generation answers right: speech, its first words are the transcript (what follows is graded by
    eval/exact_match); vision and video, its answer is one the reference accepts."""
    if modality == "speech":
        want = normalize_text(reference).split()
        return bool(want) and normalize_text(generated).split()[: len(want)] == want
    return answer_key(modality, generated) in accepted_keys(modality, reference)


def majority_rate(accepted: list[set[str]]) -> float:
    """Accuracy of always giving the answer most often accepted: the chance level beside the accuracy."""
    counts = Counter(k for keys in accepted for k in keys)
    return counts.most_common(1)[0][1] / len(accepted) if counts else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Model.


def build_model(cfg: AdapterJobConfig, modality: str, device: torch.device) -> Llama3MM:
    """The Llama3MM of a stage: frozen LM + the encoder/adapter parts the modality trains (or reads frozen)."""
    from llama3mm import Llama3MM
    from lm import load_pretrained

    mc = cfg.model
    for key in ("lm",) + (("base",) if modality == "video" else ()):
        if not Path(getattr(mc, key)).exists():
            raise FileNotFoundError(f"model.{key} = {getattr(mc, key)!r} does not exist")
    if modality == "video":
        # Resolved here: from_pretrained reads a relative lm_path against the checkpoint directory.
        lm_path = Path(mc.lm).resolve()
        mm = Llama3MM.from_pretrained(mc.base, lm_path=lm_path, device=device, dtype=torch.float32)
        if mm.vision_encoder is None or mm.vision_adapter is None:
            raise ValueError(f"model.base = {mc.base!r} holds no image encoder/adapter: run the vision stage first")
        from adapters.video import VideoAdapter, VideoAdapterConfig

        mm.requires_grad_(False)  # the image stage's parts are reused frozen; only the video adapter learns
        # Each token of a frame gets a learned place embedding, and each patch a motion token (VideoAdapterConfig).
        encoder_cfg = mm.vision_encoder.cfg
        shape = {"tokens_per_frame": encoder_cfg.num_tokens, "motion_grid": encoder_cfg.grid, **mc.video_adapter}
        mm.video_adapter = VideoAdapter(VideoAdapterConfig.from_vision(mm.vision_adapter.cfg, **shape))
        return mm.to(device)
    lm = load_pretrained(mc.lm).to(device=device, dtype=torch.float32)
    if modality == "vision":
        from adapters.vision import VisionAdapter, VisionAdapterConfig
        from encoders.vision import VisionEncoder

        encoder = _load_encoder(VisionEncoder, mc.vision_encoder, "model.vision_encoder")
        acfg = VisionAdapterConfig.from_lm(lm.config, encoder.cfg.output_dim, num_layers=mc.vision_layers or None)
        adapter = VisionAdapter(acfg)
        encoder.requires_grad_(mc.train_encoder)
        mm = Llama3MM(lm, vision_encoder=encoder, vision_adapter=adapter, lm_path=mc.lm)
    else:
        from adapters.speech import SpeechAdapter, SpeechAdapterConfig
        from encoders.speech import SpeechEncoder

        encoder = _load_encoder(SpeechEncoder, mc.speech_encoder, "model.speech_encoder")
        scfg = {"encoder_dim": encoder.cfg.dim, "lm_dim": lm.config.dim, "dim": lm.config.dim}
        scfg.update(heads=lm.config.n_heads, ffn_dim=lm.config.ffn_hidden_dim)
        adapter = SpeechAdapter(SpeechAdapterConfig(**{**scfg, **mc.speech_adapter}))
        encoder.requires_grad_(mc.train_encoder)
        mm = Llama3MM(lm, speech_encoder=encoder, speech_adapter=adapter, lm_path=mc.lm)
    return mm.to(device)


def _load_encoder(cls: type, directory: str, key: str) -> nn.Module:
    if not (Path(directory) / "config.json").is_file():
        raise FileNotFoundError(
            f"{key} = {directory!r} holds no encoder (config.json + model.safetensors): train it first with "
            f"train/encoder.py, or point {key} at one"
        )
    return cls.from_pretrained(directory)


def fsdp_blocks(mm: nn.Module) -> list[nn.Module]:
    """The trainable repeated blocks FSDP shards one by one (encoder layers, cross-attention blocks)."""
    blocks: list[nn.Module] = []
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
    for container in candidates:
        for block in container.values() if isinstance(container, nn.ModuleDict) else container:
            if any(p.requires_grad for p in block.parameters()):
                blocks.append(block)
    return blocks


# ----------------------------------------------------------------------------------------------------------------
# Data: samples -> prompt + target rows, batched with the media.


class Examples:
    """Turns decoded samples into model inputs with the model's processor (the path generate takes)."""

    def __init__(self, mm: Llama3MM, modality: str, prompt: str) -> None:
        self.mm, self.modality, self.prompt = mm, modality, prompt
        tok = mm.tokenizer
        # <|end_of_text|> closes every document the LM was pretrained on: a stop it already predicts.
        self.tokenizer, self.stop_id, self.pad_id = tok, tok.eos_id, tok.pad_id

    def media(self, sample: dict) -> dict[str, Any]:
        """The generate() media arguments of one sample."""
        if self.modality == "vision":
            return {"images": [sample["image"]]}
        if self.modality == "video":
            return {"video": sample["video"]}
        return {"audio": sample["audio"]}

    def target(self, sample: dict) -> str:
        """The text the model learns to produce."""
        return sample["text"]

    def prompt_inputs(self, sample: dict) -> dict[str, Any]:
        """generate()'s own inputs for this sample's prompt: tokens [1, S] and media tensors."""
        return self.mm.processor.prompt_inputs(self.prompt, **self.media(sample))

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        """A batch: tokens [B, S] (prompt + target + stop, right-padded), labels [B, S] and the media inputs."""
        rows, labels, media = [], [], []
        for sample in samples:
            inputs = self.prompt_inputs(sample)
            prompt = inputs.pop("tokens")[0].tolist()
            target = self.tokenizer.encode(" " + self.target(sample).strip(), bos=False, eos=False) + [self.stop_id]
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


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_loss(mm: nn.Module, batch: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the target tokens of a batch (fused chunked projection) and their count."""
    from lm.loss import linear_cross_entropy

    batch = _to(batch, device)
    labels = batch.pop("labels")
    tokens = batch.pop("tokens")
    scored = labels != IGNORE

    def output_fn(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Only the target positions are projected onto the vocabulary: most of a row is prompt and media.
        return linear_cross_entropy(hidden[scored], weight, labels[scored])

    return mm(tokens, **batch, output_fn=output_fn), scored.sum()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation.


def heldout_samples(cfg: AdapterJobConfig, modality: str, count: int, skip: int = 0) -> list[dict]:
    """The first ``count`` held-out samples (after ``skip``), in shard order."""
    from data.media import MediaSamples

    heldout = MediaSamples(
        cfg.data.dir, kind=MEDIA_KINDS[modality], split="heldout", shuffle=False, epochs=1, **_decode(modality)
    )
    out = []
    for i, sample in enumerate(heldout):
        if i >= skip + count:
            break
        if i >= skip:
            out.append(sample)
    return out


def _decode(modality: str) -> dict[str, Any]:
    return {"image_format": "pil"} if modality == "vision" else {}


def generation_accuracy(mm: Llama3MM, examples: Examples, samples: list[dict], max_new_tokens: int) -> dict:
    """Greedy generation for each sample: the share whose answer the reference accepts, chance, exact matches."""
    modality = examples.modality
    hits, exact, accepted, shown = 0, 0, [], []
    for sample in samples:
        text = mm.generate(examples.prompt, max_new_tokens=max_new_tokens, temperature=0.0, **examples.media(sample))
        accepted.append(accepted_keys(modality, examples.target(sample)))
        hits += int(is_correct(modality, text, examples.target(sample)))
        exact += int(normalize_text(text) == normalize_text(examples.target(sample)))
        if len(shown) < 3:
            shown.append(f"{examples.target(sample)!r} -> {text.strip()!r}")
    n = max(len(samples), 1)
    log.info("held-out generations: %s", "; ".join(shown))
    return {"eval/accuracy": hits / n, "eval/chance": majority_rate(accepted), "eval/exact_match": exact / n}


class Evaluator:
    """Held-out loss on every rank; generation accuracy on rank 0 with an unsharded copy (``shadow``)."""

    def __init__(
        self, cfg: AdapterJobConfig, modality: str, ctx: RunContext, shadow: Llama3MM | None, examples: Examples
    ) -> None:
        self.cfg, self.modality, self.ctx, self.shadow, self.examples = cfg, modality, ctx, shadow, examples
        ec = cfg.eval
        # Loss samples are disjoint per rank; the generation set is the first eval.samples of the split.
        mine = heldout_samples(cfg, modality, ec.loss_samples, skip=ctx.dp_rank * ec.loss_samples)
        self.loss_batches = [examples(mine[i : i + ec.batch_size]) for i in range(0, len(mine), ec.batch_size)]
        self.gen_samples = heldout_samples(cfg, modality, ec.samples) if ctx.rank == 0 else []

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
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for batch in self.loss_batches:
            loss, n = batch_loss(model, batch, self.ctx.device)
            loss_sum += torch.tensor([loss.item() * n.item(), n.item()], dtype=torch.float64)
        if world_size() > 1:
            dist.all_reduce(loss_sum)
        out = {"eval/loss": (loss_sum[0] / loss_sum[1].clamp(min=1)).item()}
        self.sync_shadow(model)
        scores = torch.zeros(3, dtype=torch.float64)
        if self.shadow is not None:
            self.shadow.eval()
            result = generation_accuracy(self.shadow, self.examples, self.gen_samples, self.cfg.eval.max_new_tokens)
            scores = torch.tensor([result["eval/accuracy"], result["eval/chance"], result["eval/exact_match"]])
        if world_size() > 1:
            scores = scores.to(self.ctx.device)
            dist.broadcast(scores, src=0)  # the others wait here while rank 0 generates
        out.update(zip(("eval/accuracy", "eval/chance", "eval/exact_match"), scores.tolist(), strict=True))
        return out


# ----------------------------------------------------------------------------------------------------------------
# Entry.


def main(argv: list[str] | None = None) -> list[dict]:
    """Parse, set up the mesh, build the stage's model and data, train, write the Llama3MM checkpoint."""
    parser = argparse.ArgumentParser(prog="train/adapter.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--modality", choices=MODALITIES, required=True)
    cfg, args = parse_cli(AdapterJobConfig, argv, parser)
    ctx = init_run(cfg)
    try:
        return _run(cfg, args.modality, ctx)
    finally:
        destroy_distributed()


def _run(cfg: AdapterJobConfig, modality: str, ctx: RunContext) -> list[dict]:
    from data.media import MediaSamples

    if ctx.dims.tp > 1 or ctx.dims.pp > 1 or ctx.dims.cp > 1:
        raise ValueError("adapter training is data parallel only: set parallel.tp = pp = cp = 1")
    ensure_data(cfg, modality, ctx.rank)
    micro = ctx.micro_batch_size(cfg)
    mm = build_model(cfg, modality, ctx.device)
    trainable = mm.trainable_parameters()
    if not trainable:
        raise ValueError(f"the {modality} stage has nothing to train")
    n_frozen = sum(p.numel() for p in mm.parameters() if not p.requires_grad)
    n_train = sum(p.numel() for p in trainable)
    # Rank 0 generates with an unsharded copy that shares the frozen LM (never sharded, so never copied).
    shadow = copy.deepcopy(mm, memo={id(mm.lm): mm.lm}) if ctx.rank == 0 else None
    examples = Examples(mm, modality, cfg.data.prompt or DEFAULT_PROMPTS[MEDIA_KINDS[modality]])

    frozen = {p for p in mm.parameters() if not p.requires_grad}
    parallelize(
        mm,
        ctx.mesh,
        fsdp_blocks(mm),
        ac=cfg.train.ac,
        compile=compile_default(cfg),
        param_dtype=cfg.parallel.param_dtype,
        reduce_dtype=cfg.parallel.reduce_dtype,
        reshard_after_forward=cfg.parallel.reshard_after_forward,
        ignored_params=frozen,
    )
    from torch.distributed.fsdp import register_fsdp_forward_method

    for block in fsdp_blocks(mm):
        if hasattr(block, "media_kv"):
            # Llama3MM computes each block's media keys/values once, outside its forward: gather for it too.
            register_fsdp_forward_method(block, "media_kv")
    if ctx.rank == 0:
        log.info(
            "%s adapter training: %.2fM trainable, %.2fM frozen parameters, %d ranks",
            modality,
            n_train / 1e6,
            n_frozen / 1e6,
            ctx.world_size,
        )

    samples = MediaSamples(
        cfg.data.dir,
        kind=MEDIA_KINDS[modality],
        split="train",
        rank=ctx.dp_rank,
        world_size=ctx.dp_size,
        seed=cfg.data.seed,
        on_corrupt=cfg.data.on_corrupt,
        **_decode(modality),
    )
    data = EncoderBatches(samples, micro, lambda batch: examples(_uncollate(batch)))
    evaluator = Evaluator(cfg, modality, ctx, shadow, examples)

    def loss_fn(model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, n = batch_loss(model, batch, ctx.device)
        return loss, {"target_tokens": n.float()}

    def extra_metrics(step: int) -> dict:
        s = data.stats()
        return {"data/skipped": s["skipped"], "data/epoch": data.state_dict()["epoch"]}

    optimizer = build_optimizer(mm, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    # Checkpoints hold what trains: the frozen LM is read from model.lm, never copied into every checkpoint.
    checkpointer = Checkpointer(
        cfg.checkpoint, cfg.run.dir, mm, optimizer, scheduler, data, seed=cfg.run.seed, trainable_only=True
    )
    t0 = time.perf_counter()
    records = train(
        cfg,
        mm,
        loss_fn,
        data,
        optimizer=optimizer,
        scheduler=scheduler,
        checkpointer=checkpointer,
        eval_fn=evaluator,
        extra_metrics=extra_metrics,
    )
    seconds = time.perf_counter() - t0
    # The composed model for inference: adapters and encoders in small files beside a manifest naming the LM.
    evaluator.sync_shadow(mm)
    if ctx.rank == 0:
        final = Path(cfg.run.dir) / "final"
        # The prompt goes with the checkpoint: an adapter on a base LM answers the prompt it was trained with.
        shadow.prompts[MEDIA_KINDS[modality]] = examples.prompt
        shadow.save_pretrained(final)
        last_eval = next((r for r in reversed(records) if "eval/accuracy" in r), {})
        summary = {
            "modality": modality,
            "steps": cfg.train.steps,
            "train_seconds": round(seconds, 1),
            "trainable_parameters": n_train,
            "frozen_parameters": n_frozen,
            "eval_samples": cfg.eval.samples,
            **{k: v for k, v in last_eval.items() if k.startswith("eval/")},
        }
        atomic_write_text(final / "eval.json", json.dumps(summary, indent=2) + "\n")
        log.info("trained in %.1f s; wrote %s: %s", seconds, final, summary)
    barrier()
    return records


def _uncollate(batch: dict) -> list[dict]:
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


if __name__ == "__main__":
    main()

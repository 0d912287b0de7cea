"""Plans for the media stages: ``train/adapter.py --dry-run`` and ``train/encoder.py --dry-run``.

    python train/adapter.py --modality vision --config configs/adapter/vision_llama3_8b.toml --dry-run --world-size 8
    python train/encoder.py --modality speech --config configs/encoder/speech_conformer_1b.toml --dry-run --world-size 8

As ``train/lm.py --dry-run`` does for the LM (``train.dryrun``), the stage's real model is built on the meta device
(shapes from the config: the checkpoints' own config files where they are on this machine, the presets the config
names otherwise) and sharded by the real code (``train.stage.shard``: FSDP2 over the trainable blocks, frozen
parameters left out and replicated on every rank, or with ``parallel.shard_frozen`` sharded over their own units)
on a fake process group of the planned world size. Parameter,
gradient and AdamW bytes are read off that rank's parameters; activations come from the formulas below, each the
bytes autograd keeps for backward in this code, counted tensor by tensor (tests/test_adapter_dryrun.py checks them
against what autograd keeps in a tiny fp32 model of every stage). Nothing is read but the config and the config
files of checkpoints: no weights, no data, no devices.

The estimate is for a CUDA run: trainable parts computed in ``parallel.param_dtype`` (FSDP2 mixed precision) with
fp32 shards, gradients and AdamW moments; the frozen LM in ``model.lm_dtype``. Per rank:

* frozen parameters: replicated (``ignored_params``), or with ``parallel.shard_frozen`` this rank's shards plus what
  FSDP gathers of them at once: the largest frozen unit (an LM layer, the token table, the output) and the frozen
  parameters of the root unit (``frozen_gathered_bytes``);
* trainable parameters, gradients (fp32, sharded) and AdamW's two fp32 moments;
* FSDP buffers: two units all-gathered at a time with their unsharded gradients (``train.dryrun.fsdp_buffer_bytes``);
* on rank 0, train/adapter.py's unsharded copy for evaluation and export, unless ``eval.generate_sharded``: then every
  rank generates with the sharded model, and holds a batch's KV caches (``generation_bytes``) in place of the
  activations, which are freed between steps;
* activations of one micro-batch (``train.batch_size / dp / train.grad_accum`` samples of the ``[plan]`` section's
  sizes). ``train.ac = full`` keeps only the inputs of the trainable blocks it wraps (encoder layers, cross-attention
  blocks, the video aggregator's layers), plus one block's full set while backward recomputes it; the frozen LM's
  layers are never wrapped and keep what backward needs to reach the adapters below them. ``selective`` is planned
  as ``none`` (an upper bound).

Left out, as for the LM: the CUDA context and NCCL buffers (~1-3 GiB), allocator fragmentation, kernel workspaces,
the forward pass's transient peak (a frozen encoder's activations under ``no_grad``, a layer's intermediates before
they are freed), torch.compile's buffers and checkpoint staging; a layout that fits by less than a few GiB is a risk.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from train import dryrun
from train.dryrun import ADAM_STATES, DTYPE_BYTES, GIB, MASTER_BYTES, in_gib
from train.parallel.mesh import MeshError, ParallelDims

# LayerNorm and RMSNorm statistics (mean and rstd, or rstd) and attention's logsumexp are fp32 on CUDA.
STAT = 4


@dataclass(frozen=True)
class Part:
    """Activations of one kind of block for one micro-batch.

    ``count`` blocks each keep ``kept`` bytes for backward; a ``checkpointed`` block (a trainable FSDP block, which
    ``train.ac`` wraps) keeps only its ``inputs`` bytes under full checkpointing; ``once`` bytes are kept once per
    micro-batch whatever the mode (embeddings, masks, what the blocks share).
    """

    name: str
    count: int = 0
    kept: float = 0
    inputs: float = 0
    checkpointed: bool = False
    once: float = 0


def activation_bytes(parts: Iterable[Part], ac: str) -> dict[str, int]:
    """Bytes kept for backward, by part name; under full checkpointing also the largest block's recompute."""
    out: dict[str, int] = {}
    recompute = 0.0
    for part in parts:
        if part.checkpointed and ac == "full":
            total = part.count * part.inputs + part.once
            recompute = max(recompute, part.kept if part.count else 0)
        else:
            total = part.count * part.kept + part.once
        out[part.name] = out.get(part.name, 0) + int(total)
    if recompute:
        out["recompute of one block"] = int(recompute)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Formulas: bytes one block keeps for backward, summed over the tensors autograd saves (a = compute bytes).


def frozen_lm_layer_bytes(dim: int, kv_dim: int, ffn_dim: int, n_heads: int, a: int) -> float:
    """Per token, one frozen ``lm.model.TransformerBlock`` whose input needs a gradient (it reaches the adapters).

    Frozen weights need no input to be kept, so only what the input's gradient needs stays: each RMSNorm's fp32
    input (its fp32 copy in bf16) and rstd, ``2 (4h + 4)``; the rotated queries and the keys and values SDPA keeps,
    ``a (h + 2 kv)``, its output ``a h`` and fp32 logsumexp ``4 n_heads``; w1's and w3's outputs and silu's output
    ``3 a f``. (A trainable layer would also keep every matmul's input: ``train.dryrun.activation_bytes_per_layer``.)
    """
    return 2 * (4 * dim + STAT) + a * (2 * dim + 2 * kv_dim) + STAT * n_heads + 3 * a * ffn_dim


def lm_output_bytes(dim: int, tokens: int, scored: int, a: int) -> float:
    """The frozen final norm over every token (fp32 input and rstd) and, per scored token, the gradient of its
    hidden state that ``lm.loss.linear_cross_entropy`` computes in forward (``a h``) and its index (int64)."""
    return tokens * (4 * dim + STAT) + scored * (a * dim + 8)


def cross_attention_block_bytes(dim: int, ffn_dim: int, n_heads: int, keys: int, a: int) -> float:
    """Per text token, one trainable ``adapters.vision.CrossAttentionBlock`` reading ``keys`` media tokens.

    Two RMSNorms with trainable weights (fp32 input and rstd, the normalised and the scaled output: ``4h + 4 + 2ah``
    each); the per-head query norm (fp32 input, rstd per head, normalised ``a h``); SDPA's query, output and
    logsumexp and the float mask it makes of the boolean one (``a`` per key); wo's input and output (the gate's
    operand); w1's, w3's and silu's outputs and w2's input (``4 a f``); the gated feed-forward output.
    """
    return (12 + 10 * a) * dim + 4 * a * ffn_dim + 2 * STAT * n_heads + a * keys + 2 * STAT


def cross_attention_kv_bytes(kv_dim: int, n_kv_heads: int, a: int) -> float:
    """Per media token, one block's ``media_kv``: the key norm's fp32 input, rstd and normalised keys, and the keys
    and values the block's SDPA keeps (``4 kv + 4 n_kv + 3 a kv``). Not wrapped by checkpointing: it runs outside
    the block's forward."""
    return 4 * kv_dim + STAT * n_kv_heads + 3 * a * kv_dim


def vit_block_bytes(width: int, heads: int, keys: int, a: int, gated: bool) -> float:
    """Per token, one trainable ``encoders.vision`` block (open_clip's ``ResidualAttentionBlock``).

    Two LayerNorms (input, fp32 mean and rstd, output), the packed q/k/v SDPA keeps (``3 a w``), its output (also
    out_proj's input: laid out [B, L, H, D]) and logsumexp, the float mask it makes of a boolean one (``a`` per key;
    0 keys: no mask), fc's output and GELU's output (``8 a w``): ``16 a w``. A gated (global) block also keeps
    both branches' outputs for its gates (``2 a w``).
    """
    return (16 + 2 * gated) * a * width + 2 * 2 * STAT + STAT * heads + a * keys


def conformer_block_bytes(dim: int, ffn_dim: int, heads: int, a: int) -> float:
    """Per 40 ms step, one trainable ``encoders.speech.ConformerBlock`` (rotary tables aside, see below).

    Two macaron FFNs (LayerNorm input and output, w1's and silu's outputs: ``2 a d + 2 a f`` each), attention
    (LayerNorm input and output, the packed q/k/v, the rotated queries and keys, SDPA's output and logsumexp and
    its float key mask, wo's input: ``9 a d``), the convolution module (LayerNorm input and output, GLU's input,
    the depthwise conv's input, the second LayerNorm's input and output, silu's output: ``8 a d``) and the final
    LayerNorm's input: ``22 a d + 4 a f``, and 6 LayerNorms' statistics.
    """
    return 22 * a * dim + 4 * a * ffn_dim + 6 * 2 * STAT + STAT * heads + a


def rotary_table_bytes(head_dim: int, steps: int, a: int) -> float:
    """The cos and sin tables ``encoders.speech.rotary`` keeps for queries and keys: once per attention call (they
    depend on the positions only, and broadcast over the batch)."""
    return 4 * (head_dim // 2) * steps * a


def speech_adapter_bytes(
    encoder_dim: int, dim: int, ffn_dim: int, heads: int, steps: int, a: int, stride: int = 2
) -> float:
    """One utterance through ``adapters.speech.SpeechAdapter`` (trainable, never checkpointed), rotary tables aside.

    Per encoder step the padding mask and the convolution's input (``a + a E``); per 80 ms token its output's
    masks, one rotary transformer layer (LayerNorms, q/k/v, rotated q and k, SDPA, wo's input, the FFN) and the
    output projection's input: ``13 a D + 2 a F``.
    """
    tokens = -(-steps // stride)
    per_token = 13 * a * dim + 2 * a * ffn_dim + 3 * 2 * STAT + 3 * a + STAT * heads
    return steps * (a + a * encoder_dim) + tokens * per_token


def perceiver_layer_bytes(dim: int, heads: int, media: int, latents: int, a: int) -> float:
    """One group through one ``adapters.video.PerceiverLayer``: per media token the media norm's statistics, the
    [media; latents] input of wkv, its packed keys and values and SDPA's float key mask (``3 a d + a``); per latent
    the same plus the latents' norms, query, SDPA output and logsumexp, wo's input and the GELU FFN (``14 a d``)."""
    keys = media + latents
    return keys * (3 * a * dim + a) + 2 * STAT * media + latents * (14 * a * dim + 4 * STAT + STAT * heads)


# ----------------------------------------------------------------------------------------------------------------
# The parts of each stage's micro-batch.


def frozen_lm_parts(lm_config: Any, tokens: int, scored: int, first_layer: int, batch: int, a: int) -> list[Part]:
    """The frozen LM from the first layer whose input carries a gradient, and its output and loss."""
    kv = lm_config.n_kv_heads * lm_config.head_dim
    layer = frozen_lm_layer_bytes(lm_config.dim, kv, lm_config.ffn_hidden_dim, lm_config.n_heads, a)
    return [
        Part("frozen LM layers", lm_config.n_layers - first_layer, batch * tokens * layer),
        Part("LM output and loss", once=batch * lm_output_bytes(lm_config.dim, tokens, scored, a)),
    ]


def cross_attention_parts(name: str, cfg: Any, tokens: int, keys: int, batch: int, a: int) -> list[Part]:
    """Cross-attention blocks shaped by ``cfg`` (a VisionAdapterConfig or VideoAdapterConfig) over ``keys`` media
    tokens per sample, and their keys and values."""
    kv = cfg.n_kv_heads * (cfg.dim // cfg.n_heads)
    block = cross_attention_block_bytes(cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads, keys, a)
    media_kv = cross_attention_kv_bytes(kv, cfg.n_kv_heads, a)
    return [
        Part(name, len(cfg.layers), batch * tokens * block, batch * tokens * a * cfg.dim, checkpointed=True),
        Part(f"{name} keys and values", len(cfg.layers), batch * keys * media_kv),
    ]


def tiled_vit_parts(cfg: Any, tiles: int, batch: int, a: int) -> list[Part]:
    """A trainable Llama 3.2 image encoder on ``tiles`` tiles per image: trunk and global layers, the stem."""
    n = cfg.num_tokens
    length = tiles * (n + (-n) % 8)  # tokens padded to a multiple of 8 per tile
    keys = -(-length // 16) * 16  # CUDA's memory-efficient kernel pads the float mask's rows to 16
    inputs = batch * length * a * cfg.width
    stem = tiles * 3 * cfg.image_size**2 * a + tiles * n * (2 * a * cfg.width + 2 * STAT) + 2 * tiles * cfg.width * a
    stem += length * (a * cfg.width + 2 * STAT) + length * length  # ln_post; the boolean padding mask
    trunk = batch * length * vit_block_bytes(cfg.width, cfg.heads, keys, a, gated=False)
    global_ = batch * length * vit_block_bytes(cfg.width, cfg.heads, keys, a, gated=True)
    return [
        Part("image encoder", cfg.layers, trunk, inputs, checkpointed=True, once=batch * stem),
        Part("image encoder global layers", cfg.global_layers, global_, inputs, checkpointed=True),
    ]


def image_projection_part(encoder: Any, adapter: Any, tiles: int, batch: int, a: int) -> Part:
    """The trainable projection's input (the encoder's multi-layer features) and its output, the media tokens
    every block's keys and values are computed from."""
    tokens = tiles * encoder.num_tokens
    return Part("image projection", once=batch * tokens * a * (encoder.output_dim + adapter.dim))


def conformer_parts(cfg: Any, steps: int, batch: int, a: int) -> list[Part]:
    """A trainable Conformer over ``steps`` 40 ms steps per utterance, and its input projection."""
    block = batch * steps * conformer_block_bytes(cfg.dim, cfg.ffn_dim, cfg.heads, a)
    block += rotary_table_bytes(cfg.dim // cfg.heads, steps, a)
    stem = steps * (a * cfg.stacked_dim + 2 * a)  # input_proj's input; the step masks
    return [Part("speech encoder", cfg.layers, block, batch * steps * a * cfg.dim, True, batch * stem)]


def speech_steps(cfg: Any, seconds: float) -> int:
    """40 ms encoder steps of an utterance of ``seconds`` at 16 kHz (``adapters.speech.num_audio_tokens``'s)."""
    from encoders.speech import SAMPLE_RATE, num_feature_frames

    return -(-num_feature_frames(int(seconds * SAMPLE_RATE)) // cfg.stride)


def aggregator_parts(cfg: Any, frames: int, tokens_per_frame: int, batch: int, a: int) -> list[Part]:
    """The trainable temporal aggregator on clips of ``frames`` frames of ``tokens_per_frame`` tokens each."""
    groups = -(-frames // cfg.frames_per_group)
    media = cfg.frames_per_group * tokens_per_frame
    layer = batch * groups * perceiver_layer_bytes(cfg.dim, cfg.aggregator_heads, media, cfg.num_latents, a)
    inputs = batch * groups * cfg.num_latents * a * cfg.dim
    # Per clip: the frame norm's input and statistics, the embedded media the layers share, the final norm, the
    # motion tokens' flow.
    once = groups * media * (2 * a * cfg.dim + 2 * STAT) + groups * cfg.num_latents * (a * cfg.dim + 2 * STAT)
    once += groups * cfg.motion_grid**2 * 2 * a
    return [Part("video aggregator", cfg.aggregator_layers, layer, inputs, checkpointed=True, once=batch * once)]


def adapter_parts(mm: nn.Module, modality: str, plan: Any, batch: int, a: int, a_lm: int) -> list[Part]:
    """Every part of an adapter stage's micro-batch of ``batch`` samples of the ``[plan]`` section's sizes."""
    lm = mm.lm.config
    if modality == "vision":
        enc, adapter = mm.vision_encoder.cfg, mm.vision_adapter.cfg
        tiles = plan.tiles or enc.max_num_tiles
        tokens = plan.text_tokens + 1  # the <|image|> placeholder
        trained = any(p.requires_grad for p in mm.vision_encoder.parameters())
        parts = tiled_vit_parts(enc, tiles, batch, a) if trained else []
        parts.append(image_projection_part(enc, adapter, tiles, batch, a))
        parts += cross_attention_parts("image cross-attention", adapter, tokens, tiles * enc.num_tokens, batch, a)
        # The trainable <|image|> embedding feeds every layer's input a gradient.
        return parts + frozen_lm_parts(lm, tokens, plan.target_tokens, 0, batch, a_lm)
    if modality == "video":
        video = mm.video_adapter.cfg
        groups = -(-plan.frames // video.frames_per_group)
        parts = aggregator_parts(video, plan.frames, mm.vision_encoder.cfg.num_tokens, batch, a)
        keys = groups * video.tokens_per_group
        parts += cross_attention_parts("video cross-attention", video, plan.text_tokens, keys, batch, a)
        # Below the first video block nothing that trains has touched the hidden states yet.
        return parts + frozen_lm_parts(lm, plan.text_tokens, plan.target_tokens, min(video.layers), batch, a_lm)
    if modality == "speech":
        enc, adapter = mm.speech_encoder.cfg, mm.speech_adapter.cfg
        steps = speech_steps(enc, plan.audio_seconds)
        trained = any(p.requires_grad for p in mm.speech_encoder.parameters())
        parts = conformer_parts(enc, steps, batch, a) if trained else []
        audio_tokens = -(-steps // adapter.conv_stride)
        shape = (adapter.encoder_dim, adapter.dim, adapter.ffn_dim, adapter.heads, steps, a, adapter.conv_stride)
        once = batch * speech_adapter_bytes(*shape) + rotary_table_bytes(adapter.dim // adapter.heads, audio_tokens, a)
        parts.append(Part("speech adapter", once=once))
        tokens = plan.text_tokens + audio_tokens  # the text and the <|audio|> placeholders
        return parts + frozen_lm_parts(lm, tokens, plan.target_tokens, 0, batch, a_lm)
    raise ValueError(f"no activation model for the {modality!r} adapter stage")


def generation_bytes(mm: nn.Module, modality: str, plan: Any, rows: int, new_tokens: int, a: int, a_lm: int) -> int:
    """What every rank holds while it generates for ``rows`` held-out samples with the sharded model
    (``eval.generate_sharded``): the LM's KV cache of the prompt and ``new_tokens`` answer tokens, and each
    cross-attention block's keys and values of the media, kept for every decode step. The training activations are
    freed by then; the units gathered one at a time are FSDP's buffers."""
    lm = mm.lm.config
    text, media_kv = plan.text_tokens + new_tokens, 0
    if modality in ("vision", "video"):
        adapter = mm.vision_adapter.cfg if modality == "vision" else mm.video_adapter.cfg
        if modality == "vision":
            text += 1  # the <|image|> placeholder
            keys = (plan.tiles or mm.vision_encoder.cfg.max_num_tiles) * mm.vision_encoder.cfg.num_tokens
        else:
            keys = -(-plan.frames // adapter.frames_per_group) * adapter.tokens_per_group
        kv = adapter.n_kv_heads * (adapter.dim // adapter.n_heads)
        media_kv = len(adapter.layers) * rows * keys * 2 * kv * a
    elif modality == "speech":
        text += -(-speech_steps(mm.speech_encoder.cfg, plan.audio_seconds) // mm.speech_adapter.cfg.conv_stride)
    cache = lm.n_layers * rows * text * 2 * lm.n_kv_heads * lm.head_dim * a_lm
    return int(cache + media_kv)


def clip_parts(model: nn.Module, batch: int, dp: int, a: int) -> list[Part]:
    """CLIP pretraining (``encoders.objectives.CLIPModel``): the ViT on one square tile, the text tower, the loss."""
    vision, text = model.vision.cfg, model.text_cfg
    n = vision.num_tokens
    image = n * vit_block_bytes(vision.width, vision.heads, 0, a, gated=False)
    caption = text.context_length * vit_block_bytes(text.width, text.heads, 0, a, gated=False)
    # Stems: pixels, ln_pre (input and output), the class token's ln_post; token embeddings and ln_final.
    once = 3 * vision.image_size**2 * a + n * (2 * a * vision.width + 2 * STAT) + 2 * a * vision.width
    once += text.context_length * (2 * a * text.width + 2 * STAT)
    # open_clip's ClipLoss: fp32 logits both ways against the gathered batch, their log-softmax kept.
    loss = 2 * batch * batch * dp * 2 * 4
    return [
        Part("image encoder", vision.layers, batch * image, batch * n * a * vision.width, True, batch * once),
        Part("text encoder", text.layers, batch * caption, batch * text.context_length * a * text.width, True),
        Part("contrastive loss", once=loss),
    ]


def tags_parts(model: nn.Module, batch: int, a: int) -> list[Part]:
    """Tag pretraining (``encoders.objectives.TagClassifier``): the ViT on one square tile, its ln_post over every
    token and their maximum, the head's logits and the fp32 loss."""
    vision = model.vision.cfg
    n = vision.num_tokens
    image = n * vit_block_bytes(vision.width, vision.heads, 0, a, gated=False)
    # Stems: pixels, ln_pre and ln_post (input, output and statistics of each token), the pooled features.
    once = 3 * vision.image_size**2 * a + n * (4 * a * vision.width + 4 * STAT) + a * vision.width
    head = model.head.out_features * (a + 2 * 4)
    return [
        Part("image encoder", vision.layers, batch * image, batch * n * a * vision.width, True, batch * once),
        Part("tag head and loss", once=batch * head),
    ]


def bestrq_parts(model: nn.Module, seconds: float, batch: int, a: int) -> list[Part]:
    """BEST-RQ pretraining: the Conformer on the corrupted steps, the head and its fp32 log-softmax on the masked
    steps (the expected share ``1 - (1 - p)^span`` of them)."""
    enc = model.encoder.cfg
    steps = speech_steps(enc, seconds)
    masked = steps * (1 - (1 - model.mask_prob) ** model.mask_span)
    classes = model.num_codebooks * model.codebook_size
    head = masked * (a * enc.dim + 4 * classes + 8 * model.num_codebooks)
    return [*conformer_parts(enc, steps, batch, a), Part("prediction head and loss", once=batch * math.ceil(head))]


# ----------------------------------------------------------------------------------------------------------------
# A stage built on a fake process group.


@dataclass
class PlannedStage:
    """What a recipe builds for a plan: the model on the meta device, its FSDP blocks, what stays frozen (left out
    of FSDP, replicated), its activations (``parts(batch, a, dp)``: a micro-batch of ``batch`` samples computed in
    ``a`` bytes on one of ``dp`` data-parallel ranks), the planned sample in words, and what trains without ever
    getting a gradient (no AdamW state)."""

    model: nn.Module
    blocks: list[nn.Module]
    frozen: set[nn.Parameter]
    parts: Callable[[int, int, int], list[Part]]
    sample: str
    # Names of trainable parameters that never get a gradient (FSDP replaces the parameter objects, not the names).
    idle: set[str] = field(default_factory=set)
    # Bytes rank 0 alone holds: train/adapter.py's unsharded copy (everything but a replicated LM, which it
    # shares), which generates for the held-out evaluation and writes the checkpoint; none under
    # eval.generate_sharded.
    rank0_bytes: int = 0
    # Under eval.generate_sharded, what every rank holds while it generates (generation_bytes), in place of the
    # training activations.
    generation_bytes: int = 0
    # The frozen FSDP units under parallel.shard_frozen (train.stage.Stage.frozen_units).
    frozen_units: list[nn.Module] = field(default_factory=list)


def meta_llama3mm(lm: nn.Module, assemble: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """``assemble(lm)`` for an LM on the meta device: ``Llama3MM`` draws its extra token embeddings at the spread
    of the LM's table, a value a meta tensor does not have, so a one-row stand-in lends it one meanwhile."""
    table = lm.tok_embeddings.weight
    stand_in = torch.zeros(1, table.shape[1], dtype=table.dtype, device="cpu")
    lm.tok_embeddings.weight = nn.Parameter(stand_in, requires_grad=False)
    try:
        mm = assemble(lm)
    finally:
        lm.tok_embeddings.weight = table
    table.requires_grad_(False)  # as Llama3MM froze the stand-in
    return mm.to("meta")


def rank_sizes(cfg: Any, dims: ParallelDims, rank: int, build: Callable[[], PlannedStage]) -> dict[str, Any]:
    """Build the stage for ``rank`` on a fake process group, shard it as ``train.stage.shard`` does, and read off
    its frozen and trainable bytes and its largest FSDP units; returns them with the built stage."""
    from train.parallel.mesh import build_mesh
    from train.stage import shard

    dryrun.init_fake_process_group(rank, dims.world_size)
    try:
        mesh = build_mesh(dims, "cpu")
        stage = build()
        frozen_names = {name for name, p in stage.model.named_parameters() if p in stage.frozen}
        frozen_elements = sum(p.numel() for p in {id(p): p for p in stage.frozen}.values())
        shard(cfg, SimpleNamespace(mesh=mesh), stage)
        # By name: fully_shard replaces the parameter objects. Frozen ones are plain tensors (replicated) or, under
        # parallel.shard_frozen, DTensors like those that train.
        named = list(stage.model.named_parameters())
        frozen = [_local(p) for name, p in named if name in frozen_names]
        trained = [(name, p) for name, p in named if isinstance(p, DTensor) and name not in frozen_names]
        frozen_ids = {id(p) for name, p in named if name in frozen_names}
        learning = [p.to_local() for name, p in trained if name not in stage.idle]
        fsdp = dims.fsdp
        units = (stage.model, stage.frozen_units, frozen_ids, fsdp)
        sizes = {
            "frozen_params": frozen_elements,
            "frozen_bytes": sum(p.untyped_storage().nbytes() for p in frozen),
            "frozen_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in frozen}),
            "frozen_sharded": any(isinstance(p, DTensor) for name, p in named if name in frozen_names),
            **dict(zip(("frozen_unit_bytes", "frozen_root_bytes"), frozen_unit_bytes(*units), strict=True)),
            "params": sum(p.to_local().numel() for _, p in trained),
            "param_bytes": sum(p.to_local().untyped_storage().nbytes() for _, p in trained),
            "grad_bytes": sum(p.untyped_storage().nbytes() for p in learning),
            "learning_params": sum(p.numel() for p in learning),
            "largest_group": largest_trained_unit(stage.model, stage.blocks, frozen_ids, fsdp),
            "unsharded": gathered_bytes(stage.model, frozen_ids, fsdp, trained=True) // MASTER_BYTES,
        }
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return sizes | {"stage": stage}


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def gathered_bytes(module: nn.Module, frozen_ids: set[int], fsdp: int, trained: bool = False) -> int:
    """Bytes of ``module``'s FSDP parameters all-gathered (padding included, in their stored dtype): the frozen
    ones, or with ``trained`` those that train."""
    own = [p for p in module.parameters() if isinstance(p, DTensor) and (id(p) in frozen_ids) != trained]
    return sum(p.to_local().untyped_storage().nbytes() for p in own) * fsdp


def frozen_unit_bytes(model: nn.Module, units: list[nn.Module], frozen_ids: set[int], fsdp: int) -> tuple[int, int]:
    """All-gathered bytes of the largest frozen FSDP unit's own parameters (the units come children first, as they
    are sharded), and of the frozen parameters the root holds; (0, 0) when the frozen parameters are replicated."""
    claimed: set[int] = set()
    largest = 0
    for unit in units:
        own = [p for p in unit.parameters() if id(p) in frozen_ids and id(p) not in claimed]
        claimed |= {id(p) for p in own}
        largest = max(largest, sum(p.to_local().untyped_storage().nbytes() for p in own if isinstance(p, DTensor)))
    root = [p for p in model.parameters() if id(p) in frozen_ids and id(p) not in claimed and isinstance(p, DTensor)]
    return largest * fsdp, sum(p.to_local().untyped_storage().nbytes() for p in root) * fsdp


def frozen_gathered_bytes(sizes: dict[str, Any], trained_buffers: int) -> int:
    """Frozen bytes gathered beside the shards under ``parallel.shard_frozen``: the root's frozen parameters (held
    for the whole forward and backward) and one frozen unit, or more where two frozen units gathered at once (the
    running one and the prefetched one) outweigh the two trained units ``trained_buffers`` already counts."""
    unit = sizes["frozen_unit_bytes"]
    return sizes["frozen_root_bytes"] + max(unit, 2 * unit - trained_buffers)


def largest_trained_unit(model: nn.Module, blocks: list[nn.Module], frozen_ids: set[int], fsdp: int) -> float:
    """Unsharded elements (fp32 masters) of the largest trainable FSDP unit: a block, or the root's rest."""
    per_block = [gathered_bytes(b, frozen_ids, fsdp, trained=True) // MASTER_BYTES for b in blocks]
    rest = gathered_bytes(model, frozen_ids, fsdp, trained=True) // MASTER_BYTES - sum(per_block)
    return float(max([*per_block, rest]))


def plan_stage(
    cfg: Any,
    world_size: int,
    build: Callable[[], PlannedStage],
    *,
    title: str,
    rank: int = 0,
    device_gb: float = 80.0,
) -> dict:
    """The dry-run report (a JSON-able dict) of one media stage on ``world_size`` ranks, for ``rank``."""
    from train.loop import micro_batch_size

    dims = ParallelDims.from_config(cfg.parallel, world_size)
    if dims.tp > 1 or dims.pp > 1 or dims.cp > 1:
        raise MeshError(f"{title} is data parallel only: set parallel.tp = pp = cp = 1")
    if not 0 <= rank < world_size:
        raise MeshError(f"--dry-run-rank={rank} is outside the world of {world_size} ranks")
    micro = micro_batch_size(cfg.train.batch_size, dims.dp, cfg.train.grad_accum)
    sizes = rank_sizes(cfg, dims, rank, build)
    compute = DTYPE_BYTES[cfg.parallel.param_dtype]
    activations = activation_bytes(sizes["stage"].parts(micro, compute, dims.dp), cfg.train.ac)
    buffers = dryrun.fsdp_buffer_bytes(sizes, 1, compute, DTYPE_BYTES[cfg.parallel.reduce_dtype])
    optimizer = ADAM_STATES * MASTER_BYTES * sizes["learning_params"]
    eval_copy = sizes["stage"].rank0_bytes if rank == 0 else 0
    gathered = frozen_gathered_bytes(sizes, buffers) if sizes["frozen_sharded"] else 0
    generation = sizes["stage"].generation_bytes
    # Evaluation runs between steps: its generation and a step's activations are never held together.
    transient = max(sum(activations.values()), generation)
    held = sizes["param_bytes"] + sizes["grad_bytes"] + optimizer + buffers + transient + eval_copy
    total = sizes["frozen_bytes"] + gathered + held
    device = int(device_gb * GIB)
    return {
        "stage": title,
        "sample": sizes["stage"].sample,
        "world_size": world_size,
        "layout": {"dp_replicate": dims.dp_replicate, "dp_shard": dims.dp_shard},
        "batch_size": cfg.train.batch_size,
        "micro_batch": micro,
        "grad_accum": cfg.train.grad_accum,
        "ac": cfg.train.ac,
        "param_dtype": cfg.parallel.param_dtype,
        "rank": rank,
        "frozen": {
            **{k: sizes[k] for k in ("frozen_params", "frozen_bytes", "frozen_dtypes", "frozen_sharded")},
            "gathered_bytes": gathered,
        },
        "trainable": {
            "total_params": int(sizes["unsharded"]),
            "params": sizes["params"],
            "param_bytes": sizes["param_bytes"],
            "grad_bytes": sizes["grad_bytes"],
            "optimizer_bytes": optimizer,
        },
        "buffer_bytes": buffers,
        "eval_copy_bytes": eval_copy,
        "eval_generation_bytes": generation,
        "activations": activations,
        "total_bytes": total,
        "device_gb": device_gb,
        "fits": total <= device,
        "worst_rank": rank,
        "worst_total_gb": total / GIB,
    }


def format_stage_report(report: dict) -> str:
    """The report as lines: the layout, each kind of bytes in GiB, the activations by part, then the verdict."""
    lay, frozen, trainable = report["layout"], report["frozen"], report["trainable"]
    ranks = report["world_size"]

    def row(label: str, nbytes: float) -> str:
        return f"  {label:<66} {in_gib(nbytes):>8}"

    lines = [
        f"dry run: {report['stage']} on {ranks} ranks (dp_replicate {lay['dp_replicate']} x dp_shard "
        f"{lay['dp_shard']}), rank {report['rank']}",
        f"global batch {report['batch_size']}, micro-batch {report['micro_batch']} x {report['grad_accum']} "
        f"accumulation steps, ac {report['ac']}, compute in {report['param_dtype']}",
        f"per sample: {report['sample']}",
        "memory per rank in GiB:",
    ]
    if frozen["frozen_params"]:
        dtypes = "/".join(frozen["frozen_dtypes"])
        how = f"sharded over {lay['dp_shard']}" if frozen["frozen_sharded"] else "replicated"
        label = f"frozen parameters, {how}: {frozen['frozen_params'] / 1e9:.2f}B in {dtypes}"
        lines.append(row(label, frozen["frozen_bytes"]))
    if frozen["gathered_bytes"]:
        lines.append(row("frozen FSDP units gathered: the largest, the root's share", frozen["gathered_bytes"]))
    shards = (
        f"{trainable['total_params'] / 1e9:.2f}B sharded over {lay['dp_shard']} ({trainable['params'] / 1e9:.3f}B here)"
    )
    lines += [
        row(f"trainable parameters, fp32: {shards}", trainable["param_bytes"]),
        row("their gradients, fp32", trainable["grad_bytes"]),
        row("AdamW moments, fp32", trainable["optimizer_bytes"]),
        row("FSDP buffers: two units gathered, with their gradients", report["buffer_bytes"]),
    ]
    if report["eval_copy_bytes"]:
        lines.append(row("rank 0's unsharded copy for evaluation and export", report["eval_copy_bytes"]))
    lines.append(row("activations of one micro-batch", sum(report["activations"].values())))
    lines += [row(f"  {name}", nbytes) for name, nbytes in report["activations"].items()]
    if report["eval_generation_bytes"]:
        lines.append(
            row("held-out generation's KV caches (in place of the activations)", report["eval_generation_bytes"])
        )
    lines += [row("total", report["total_bytes"]), dryrun.verdict(report)]
    if not report["fits"] and frozen["frozen_bytes"] and not frozen["frozen_sharded"] and lay["dp_shard"] > 1:
        lines.append(
            f"(the frozen parameters are replicated on every rank: --parallel.shard_frozen=true shards them over "
            f"{lay['dp_shard']} ranks; plan that too)"
        )
    return "\n".join(lines)


def report_main(report: dict, args: argparse.Namespace) -> dict:
    """Print the report, write it as JSON when asked (``--dry-run-out``); returns it."""
    print(format_stage_report(report), flush=True)
    if args.dry_run_out:
        from common.atomic import atomic_write_text

        atomic_write_text(Path(args.dry_run_out), json.dumps(report, indent=2) + "\n")
    return report

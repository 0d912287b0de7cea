"""Where does a scene's colour and shape get lost on its way to the caption? Linear probes (issue 22).

    python bench/probe_vision.py --model runs/adapter/vision_tiny/final [--train 1500] [--heldout 300]
    python bench/probe_vision.py --encoder runs/encoder/vision_tiny/final/encoder   # the encoder alone

For the synthetic scenes of the embedded default, each probe is a logistic regression fitted on training images and
scored on held-out ones, predicting which shapes, colours and sizes the scene contains (one yes/no label per value,
so the caption's object order does not matter). It reads four places:
  encoder    the frozen ViT's features (what the adapter's cross-attention sees), averaged over patches (mean)
             or their largest value per channel (max)
  projected  the same after the adapter's projection into the LM's width
  lm/<k>     the LM's hidden state after layer k at the prompt's last position (the one that predicts the first
             caption word), the cross-attention blocks at work
  text only  the same LM position with no image: what a probe finds with nothing to see (the floor)
Each figure is the mean held-out accuracy over a group's labels beside the majority guess of those labels.
A second table asks the encoder about each object alone: from the one patch feature under the object's centre,
which shape, colour and size is it (a softmax regression per group, beside the commonest class).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.media import MediaSamples  # noqa: E402
from data.scenes import COLOURS, SHAPES, SIZES  # noqa: E402
from llama3mm import Llama3MM  # noqa: E402
from llama3mm.processor import DEFAULT_PROMPTS  # noqa: E402

GROUPS = {"shape": SHAPES, "colour": COLOURS, "size": SIZES}


def scene_labels(meta: dict) -> torch.Tensor:
    """One 0/1 label per shape, colour and size value: does the scene have an object with it."""
    present = {(group, obj[group]) for obj in meta["objects"] for group in GROUPS}
    return torch.tensor([float((group, value) in present) for group, values in GROUPS.items() for value in values])


def object_labels(samples: list[dict]) -> torch.Tensor:
    """[objects, groups]: each object's shape, colour and size as class indices, objects in sample order."""
    return torch.tensor(
        [[values.index(obj[g]) for g, values in GROUPS.items()] for s in samples for obj in s["meta"]["objects"]]
    )


@torch.no_grad()
def encoder_features(encoder: nn.Module, samples: list[dict], batch: int = 64) -> dict[str, torch.Tensor]:
    """The encoder's patch features [N, width], averaged (mean) or maxed over the patches of each image, and
    ("object patch") the feature of the patch under each object's centre [objects, width]."""
    from encoders.tiling import tile_images

    out: dict[str, list[torch.Tensor]] = {}
    grid = encoder.cfg.grid
    for start in range(0, len(samples), batch):
        chunk = samples[start : start + batch]
        pixels, ratios, tile_mask = tile_images([s["image"] for s in chunk], encoder.cfg.image_size, 1)
        encoded = encoder(pixels, ratios, tile_mask).float()[:, 0]  # [B, tokens, width] of the one tile
        out.setdefault("encoder (mean)", []).append(encoded.mean(1))
        out.setdefault("encoder (max)", []).append(encoded.amax(1))
        for row, sample in enumerate(chunk):
            for obj in sample["meta"]["objects"]:
                patch = 1 + min(int(obj["y"] * grid), grid - 1) * grid + min(int(obj["x"] * grid), grid - 1)
                out.setdefault("object patch", []).append(encoded[row, patch][None])
    return {name: torch.cat(parts) for name, parts in out.items()}


@torch.no_grad()
def features(mm: Llama3MM, samples: list[dict], prompt: str, batch: int = 32) -> dict[str, torch.Tensor]:
    """Each probed representation, [N, width], for the samples' images."""
    out: dict[str, list[torch.Tensor]] = {}
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, o, k=k: captured.__setitem__(f"lm/{k}", o))
        for k, layer in mm.lm.layers.items()
    ]
    processor = mm.processor
    try:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            inputs = [processor.prompt_inputs(prompt, images=[s["image"]]) for s in chunk]
            tokens = torch.cat([i.pop("tokens") for i in inputs])
            media = {k: torch.cat([i[k] for i in inputs]) for k in inputs[0]}
            encoded = mm.vision_encoder(media["images"].flatten(0, 1), media["aspect_ratio_ids"].flatten(), None)
            out.setdefault("projected", []).append(mm.vision_adapter.project(encoded[:, None]).float().mean(dim=1))
            mm(tokens, **media, output="hidden")
            for name, h in captured.items():
                out.setdefault(name, []).append(h[:, -1].float())
            text_only = torch.cat([tokens[:, :1], tokens[:, 2:]], dim=1)  # <|image|> follows <|begin_of_text|>
            mm.lm(text_only, output="hidden")
            out.setdefault("text only", []).append(captured[f"lm/{len(mm.lm.layers) - 1}"][:, -1].float())
    finally:
        for hook in hooks:
            hook.remove()
    return encoder_features(mm.vision_encoder, samples) | {name: torch.cat(parts) for name, parts in out.items()}


def fit_probe(x: torch.Tensor, outputs: int, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> nn.Linear:
    """A linear map of ``x`` [N, width] to ``outputs`` values fitted by L-BFGS to ``loss_of(logits)`` + L2."""
    torch.manual_seed(0)
    probe = nn.Linear(x.shape[1], outputs)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_of(probe(x)) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return probe.requires_grad_(False)


def standardised(train_x: torch.Tensor, test_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets scaled by the training set's per-channel mean and deviation."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> torch.Tensor:
    """Held-out accuracy [labels] of a logistic regression per 0/1 label."""
    train_x, test_x = standardised(train_x, test_x)
    probe = fit_probe(train_x, train_y.shape[1], lambda z: F.binary_cross_entropy_with_logits(z, train_y))
    return ((probe(test_x) > 0).float() == test_y).float().mean(0)


def class_probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> list[float]:
    """Held-out accuracy per group of a softmax regression per group (``*_y`` [N, groups] class indices)."""
    train_x, test_x = standardised(train_x, test_x)
    accuracies = []
    for g, values in enumerate(GROUPS.values()):
        probe = fit_probe(train_x, len(values), lambda z, g=g: F.cross_entropy(z, train_y[:, g]))
        accuracies.append((probe(test_x).argmax(-1) == test_y[:, g]).float().mean().item())
    return accuracies


def main() -> None:
    """Fit and score the probes; print one row per representation."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="runs/adapter/vision_tiny/final", help="a Llama3MM with a vision adapter")
    source.add_argument("--encoder", help="a vision encoder directory: probe its features alone")
    parser.add_argument("--data", default="runs/data/media")
    parser.add_argument("--train", type=int, default=1500)
    parser.add_argument("--heldout", type=int, default=300)
    args = parser.parse_args()

    if args.encoder:
        from encoders.vision import VisionEncoder

        encoder = VisionEncoder.from_pretrained(args.encoder).eval()
        represent = lambda samples: encoder_features(encoder, samples)  # noqa: E731
    else:
        mm = Llama3MM.from_pretrained(args.model).eval()
        prompt = mm.prompts.get("image", DEFAULT_PROMPTS["image"])
        represent = lambda samples: features(mm, samples, prompt)  # noqa: E731
    splits = {}
    for split, count in (("train", args.train), ("heldout", args.heldout)):
        stream = MediaSamples(args.data, kind="image", split=split, shuffle=False, epochs=1, image_format="pil")
        samples = [s for _, s in zip(range(count), stream, strict=False)]
        labels = torch.stack([scene_labels(s["meta"]) for s in samples])
        splits[split] = (represent(samples), labels, object_labels(samples))
        print(f"{split}: {len(samples)} scenes encoded", flush=True)
    (train_feats, train_y, train_objects), (test_feats, test_y, test_objects) = splits["train"], splits["heldout"]
    object_train, object_test = train_feats.pop("object patch"), test_feats.pop("object patch")
    bounds, start = {}, 0
    for group, values in GROUPS.items():
        bounds[group] = slice(start, start + len(values))
        start += len(values)
    majority = torch.maximum(test_y.mean(0), 1 - test_y.mean(0))
    print(f"\n| representation | width | {' | '.join(GROUPS)} |")
    print(f"|---|---|{'---|' * len(GROUPS)}")
    cells = " | ".join(f"{majority[b].mean():.3f}" for b in bounds.values())
    print(f"| majority guess | | {cells} |")
    for name, train_x in train_feats.items():
        acc = probe_accuracy(train_x, train_y, test_feats[name], test_y)
        cells = " | ".join(f"{acc[b].mean():.3f}" for b in bounds.values())
        print(f"| {name} | {train_x.shape[1]} | {cells} |", flush=True)
    print("\n| each object, from the patch under its centre | shape | colour | size |\n|---|---|---|---|")
    commonest = [test_objects[:, g].bincount().max().item() / len(test_objects) for g in range(len(GROUPS))]
    print("| commonest class | " + " | ".join(f"{a:.3f}" for a in commonest) + " |")
    accuracies = class_probe_accuracy(object_train, train_objects, object_test, test_objects)
    print("| linear probe | " + " | ".join(f"{a:.3f}" for a in accuracies) + " |")


if __name__ == "__main__":
    main()

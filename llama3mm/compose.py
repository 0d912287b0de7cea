"""Join Llama3MM checkpoints trained on the same frozen LM into one model (e.g. the vision, video and speech stages).

    python -m llama3mm.compose runs/adapter/video_tiny/final runs/adapter/speech_tiny/final --out runs/llama3mm/tiny

Each stage of train/adapter.py writes its own checkpoint; the demo serves one model that has them all. The LM is
never copied: every input must name an LM with the same sha256. A part present in several inputs must be the same
weights in each (the video stage carries the vision stage's frozen parts; anything else is a conflict, refused
with the part and the two directories named). Each extra-token embedding row (<|image|>, <|audio|>) is taken from
the input whose adapter trained it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from llama3mm.checkpoint import MANIFEST, PARTS
from llama3mm.model import Llama3MM

# The parts whose training gives each extra token's embedding its meaning.
_TOKEN_OWNERS = {"image_token_id": ("vision_adapter", "video_adapter"), "audio_token_id": ("speech_adapter",)}


def compose(directories: list[str | Path], out: str | Path) -> Path:
    """Load each Llama3MM checkpoint, merge their parts onto the first one's LM and save the result to `out`."""
    if not directories:
        raise ValueError("compose needs at least one Llama3MM checkpoint directory")
    sources = [Path(d) for d in directories]
    for source in sources:
        if not (source / MANIFEST).is_file():
            raise FileNotFoundError(f"{source} has no {MANIFEST}: not a Llama3MM checkpoint")
    hashes = {source: json.loads((source / MANIFEST).read_text())["lm"]["sha256"] for source in sources}
    if len(set(hashes.values())) > 1:
        listing = ", ".join(f"{s} ({h[:12]})" for s, h in hashes.items())
        raise ValueError(f"the checkpoints were trained on different LMs: {listing}")

    models = [Llama3MM.from_pretrained(source, device="cpu") for source in sources]
    base = models[0]
    owner: dict[str, Path] = {name: sources[0] for name in PARTS if getattr(base, name) is not None}
    for source, mm in zip(sources[1:], models[1:], strict=True):
        for name in PARTS:
            part = getattr(mm, name)
            if part is None:
                continue
            if getattr(base, name) is None:
                setattr(base, name, part)
                owner[name] = source
            elif not _same_weights(getattr(base, name), part):
                raise ValueError(f"{name} differs between {owner[name]} and {source}: refusing to pick one")
        with torch.no_grad():
            for token, parts in _TOKEN_OWNERS.items():
                if any(getattr(mm, p) is not None and owner.get(p) == source for p in parts):
                    row = getattr(mm, token) - mm.config.vocab_size
                    base.extra_embeddings[row] = mm.extra_embeddings[row]
        base.prompts.update(mm.prompts)
    return base.save_pretrained(out)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m llama3mm.compose DIR [DIR ...] --out OUT."""
    parser = argparse.ArgumentParser(prog="python -m llama3mm.compose", description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", help="Llama3MM checkpoints (train/adapter.py's RUN_DIR/final)")
    parser.add_argument("--out", required=True, help="where the composed checkpoint is written")
    args = parser.parse_args(argv)
    out = compose(args.directories, args.out)
    mm = Llama3MM.from_pretrained(out, device="cpu")
    parts = [name for name in PARTS if getattr(mm, name) is not None]
    print(f"wrote {out}: {', '.join(parts) or 'no parts'}; prompts {mm.prompts}")


if __name__ == "__main__":
    main()

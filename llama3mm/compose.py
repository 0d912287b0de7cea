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
from pathlib import Path

import torch

from llama3mm.checkpoint import MANIFEST, PARTS, load_parts, read_manifest
from llama3mm.model import Llama3MM

# The parts whose training gives each extra token's embedding its meaning.
_TOKEN_OWNERS = {"image_token_id": ("vision_adapter", "video_adapter"), "audio_token_id": ("speech_adapter",)}


def compose(directories: list[str | Path], out: str | Path) -> Llama3MM:
    """Merge the parts of Llama3MM checkpoints of one LM onto the first one's, save the result to `out`, return it.

    The LM is loaded once, through the first checkpoint; the others contribute their parts only."""
    if not directories:
        raise ValueError("compose needs at least one Llama3MM checkpoint directory")
    sources = [Path(d) for d in directories]
    others = [(source, *load_parts(source)) for source in sources[1:]]
    first_sha = read_manifest(sources[0] / MANIFEST)["lm"]["sha256"] if others else None
    mismatched = [(s, m["lm"]["sha256"]) for s, m, _, _ in others if m["lm"]["sha256"] != first_sha]
    if mismatched:
        listing = ", ".join(f"{s} ({h[:12]})" for s, h in [(sources[0], first_sha), *mismatched])
        raise ValueError(f"the checkpoints were trained on different LMs: {listing}")

    base = Llama3MM.from_pretrained(sources[0], device="cpu")
    owner: dict[str, Path] = {name: sources[0] for name in PARTS if getattr(base, name) is not None}
    vocab = base.config.vocab_size
    for source, manifest, parts, extra in others:
        for name, part in parts.items():
            if getattr(base, name) is None:
                setattr(base, name, part)
                owner[name] = source
            elif not _same_weights(getattr(base, name), part):
                raise ValueError(f"{name} differs between {owner[name]} and {source}: refusing to pick one")
        with torch.no_grad():
            for token, trained_by in _TOKEN_OWNERS.items():
                if any(owner.get(name) == source for name in trained_by):
                    row = getattr(base, token) - vocab
                    base.extra_embeddings[row] = extra[row]
        base.prompts.update(manifest.get("prompts", {}))
    base.save_pretrained(out)
    return base


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def main(argv: list[str] | None = None) -> None:
    """CLI: python -m llama3mm.compose DIR [DIR ...] --out OUT."""
    parser = argparse.ArgumentParser(prog="python -m llama3mm.compose", description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", help="Llama3MM checkpoints (train/adapter.py's RUN_DIR/final)")
    parser.add_argument("--out", required=True, help="where the composed checkpoint is written")
    args = parser.parse_args(argv)
    mm = compose(args.directories, args.out)
    parts = [name for name in PARTS if getattr(mm, name) is not None]
    print(f"wrote {args.out}: {', '.join(parts) or 'no parts'}; prompts {mm.prompts}")


if __name__ == "__main__":
    main()

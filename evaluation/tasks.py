"""The embedded default's own lm-eval tasks, written offline from the scenes' tables (data.scenes).

    python -m evaluation.tasks [--out evaluation/tasks]

``scene_colour``: a described scene, then "The <shape> is"; the answer is the object's colour among the six (a
multiple choice scored by log-likelihood, chance 1/6). A model pretrained on the default corpus has read such
descriptions; the task asks whether it can say back the colour it was just told.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data.scenes import COLOURS, caption, random_scene

TASKS_DIR = Path(__file__).with_name("tasks")


def scene_colour_rows(count: int, seed: int = 0) -> list[dict]:
    """``count`` questions: a one-object scene's description, its shape, and the index of its colour."""
    rng = random.Random(f"scene_colour:{seed}")
    rows = []
    for _ in range(count):
        scene = random_scene(rng, max_objects=1)
        obj = scene.objects[0]
        rows.append(
            {"text": f"The picture shows {caption(scene)}.", "shape": obj.shape, "gold": COLOURS.index(obj.colour)}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    """Write the tasks' JSONL files beside their YAML files."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(TASKS_DIR))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scene_colour.jsonl", "w", encoding="utf-8") as f:
        for row in scene_colour_rows(200):
            f.write(json.dumps(row) + "\n")
    print(f"wrote {out / 'scene_colour.jsonl'}")


if __name__ == "__main__":
    main()

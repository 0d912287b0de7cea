"""The embedded default text corpus, made offline: `python -m data.default --out DIR [--seed 0] [--scale 1.0]`.

Four sources, each prepared as token shards under DIR/<source>/ (see data/prepare.py):
  general       scene descriptions in varied English sentences, the vocabulary of data/scenes.py, so the
                words a vision or speech adapter must ground are words the LM already knows; half the
                documents are one caption sentence alone (see SHORT_DOCUMENTS)
  math          arithmetic and word problems with worked answers
  code          the Python standard library's own .py files of the running interpreter (a deterministic
                subset: files ordered by a hash of their relative path, taken up to a byte budget)
  multilingual  the scene captions in French, German, Spanish and Italian, from the word tables, some
                paired with their English caption
DIR/mixture.json, written last, records the weights and marks the corpus complete. At scale 1.0 the text is
about 10 MB (about 3M tokens). Same seed, scale and interpreter give byte-identical shards.

Default mixture (the paper's final pretraining mix): general 50%, math 25%, code 17%, multilingual 8%.
Annealing mixture (last 10% of steps; the paper anneals on upsampled high-quality math and code):
general 30%, math 40%, code 25%, multilingual 5%.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

from common.atomic import commit_directory
from data import scenes
from data.mixture import Mixture
from data.prepare import prepare_text
from data.shards import DataError, read_manifest

__all__ = [
    "ANNEAL_FRACTION",
    "ANNEAL_WEIGHTS",
    "DEFAULT_WEIGHTS",
    "build_default_corpus",
    "ensure_default_corpus",
    "load_default_mixture",
    "write_raw_corpus",
]

DEFAULT_WEIGHTS = {"general": 0.5, "math": 0.25, "code": 0.17, "multilingual": 0.08}
ANNEAL_WEIGHTS = {"general": 0.3, "math": 0.4, "code": 0.25, "multilingual": 0.05}
ANNEAL_FRACTION = 0.1
# Text bytes per source at scale 1.0.
BUDGET = {"general": 3_000_000, "math": 2_000_000, "code": 4_000_000, "multilingual": 1_000_000}
MIXTURE_FILE = "mixture.json"
LANGUAGES = ("fr", "de", "es", "it")
LANGUAGE_NAMES = {"en": "English", "fr": "Français", "de": "Deutsch", "es": "Español", "it": "Italiano"}


def sentence(text: str) -> str:
    """The text with a capital first letter and a full stop: how the corpus writes a caption."""
    return text[0].upper() + text[1:] + "."


# ---------------------------------------------------------------- general: scenes in English


def _describe(rng: random.Random) -> str:
    scene = scenes.random_scene(rng)
    cap = scenes.caption(scene)
    objs = scene.objects
    count = scenes.DIGITS[len(objs)]
    openers = (
        f"the picture shows {cap}",
        f"on a {scene.background} background there is {cap}",
        f"in this image we see {cap}",
        f"here is {cap} on {scene.background}",
        f"the scene has {count} {'shape' if len(objs) == 1 else 'shapes'}: {cap}",
        f"look at {cap}",
    )
    sentences = [sentence(rng.choice(openers))]
    for obj in rng.sample(objs, len(objs)):
        facts = (
            f"the {obj.shape} is {obj.colour}",
            f"the {obj.colour} {obj.shape} is {obj.size}",
            f"there is a {obj.size} {obj.shape}",
            f"one of the shapes is a {obj.colour} {obj.shape}",
        )
        sentences.append(sentence(rng.choice(facts)))
    if len(objs) > 1 and rng.random() < 0.5:
        a, b = objs[1], objs[0]
        sentences.append(sentence(f"{a.phrase()} is {scenes.relation(a, b)} {b.phrase()}"))
    if rng.random() < 0.3:
        sentences.append(sentence(f"the background is {scene.background}"))
    return " ".join(sentences)


# Share of general documents that are one caption sentence alone, like an image's alt text. A document of one
# sentence teaches the LM that text can end right after a short description, which the adapters' targets do
# ("a small red circle." then <|end_of_text|>); without such documents the debug LM continues every caption.
SHORT_DOCUMENTS = 0.5


def _general(rng: random.Random) -> str:
    if rng.random() < SHORT_DOCUMENTS:
        return sentence(scenes.caption(scenes.random_scene(rng)))
    return "\n\n".join(_describe(rng) for _ in range(rng.randint(2, 6)))


# ---------------------------------------------------------------- math: worked problems

NAMES = ("Anna", "Ben", "Carla", "David", "Eva", "Farid", "Grace", "Hugo", "Ines", "Jonas")


def arithmetic_problem(rng: random.Random, small: bool = False) -> str:
    """One worked arithmetic problem of the default corpus's math source; ``small``: one-digit operands and
    quotients (the instruction data's, sized for a tiny LM: a number is one token, so each sum is a fact to learn)."""
    op = rng.choice("+-*/")
    top = 9 if small else 999
    if op == "+":
        a, b = rng.randint(0, top), rng.randint(0, top)
        return f"Question: What is {a} + {b}?\nAnswer: {a} + {b} = {a + b}. The answer is {a + b}."
    if op == "-":
        a, b = sorted((rng.randint(0, top), rng.randint(0, top)), reverse=True)
        return f"Question: What is {a} - {b}?\nAnswer: {a} - {b} = {a - b}. The answer is {a - b}."
    if op == "*":
        a, b = rng.randint(2, 9 if small else 99), rng.randint(2, 9 if small else 19)
        tens, ones = b // 10 * 10, b % 10
        steps = f"{a} * {b} = {a} * {tens} + {a} * {ones} = {a * tens} + {a * ones} = {a * b}" if tens and ones else ""
        steps = steps or f"{a} * {b} = {a * b}"
        return f"Question: What is {a} * {b}?\nAnswer: {steps}. The answer is {a * b}."
    b, q = rng.randint(2, 9 if small else 12), rng.randint(2, 9 if small else 99)
    a = b * q
    return f"Question: What is {a} / {b}?\nAnswer: {b} * {q} = {a}, so {a} / {b} = {q}. The answer is {q}."


def word_problem(rng: random.Random, small: bool = False) -> str:
    """One worked word problem about the scenes' objects; ``small``: numbers below 20 (the instruction data's)."""
    who, other = rng.sample(NAMES, 2)
    colour, shape = rng.choice(scenes.COLOURS), rng.choice(scenes.SHAPES)
    things = f"{colour} {shape}s"
    kind = rng.randrange(4)
    if kind == 0:
        a = rng.randint(2, 18) if small else rng.randint(5, 60)
        b = min(rng.randint(1, 9) if small else rng.randint(1, 4) * rng.randint(1, 5), a)
        return (
            f"Question: {who} has {a} {things} and gives {b} to {other}. How many {things} does {who} have left?\n"
            f"Answer: {who} starts with {a} and gives away {b}, so {a} - {b} = {a - b}. The answer is {a - b}."
        )
    if kind == 1:
        boxes, per = rng.randint(2, 9 if small else 12), rng.randint(2, 9 if small else 15)
        return (
            f"Question: {who} has {boxes} boxes with {per} {things} in each box. How many {things} are there?\n"
            f"Answer: {boxes} boxes of {per} make {boxes} * {per} = {boxes * per}. The answer is {boxes * per}."
        )
    if kind == 2:
        friends, each = rng.randint(2, 9), rng.randint(2, 9 if small else 12)
        total = friends * each
        return (
            f"Question: {who} shares {total} {things} equally among {friends} friends. How many does each get?\n"
            f"Answer: {total} / {friends} = {each}, because {friends} * {each} = {total}. The answer is {each}."
        )
    high, low = (9, 1) if small else (40, 3)
    a, b, c = rng.randint(low, high), rng.randint(low, high), rng.randint(1, 9 if small else 20)
    c = min(c, a + b)
    return (
        f"Question: {who} draws {a} {things} and {other} draws {b} more. Then {c} are erased. "
        f"How many {things} are left?\n"
        f"Answer: First {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}. The answer is {a + b - c}."
    )


def _math(rng: random.Random) -> str:
    problems = (word_problem if rng.random() < 0.5 else arithmetic_problem for _ in range(rng.randint(3, 8)))
    return "\n\n".join(problem(rng) for problem in problems)


# ---------------------------------------------------------------- multilingual: translated captions


def _multilingual(rng: random.Random, language: str | None = None) -> str:
    language = language or rng.choice(LANGUAGES)
    lines = []
    for _ in range(rng.randint(3, 8)):
        scene = scenes.random_scene(rng)
        text = sentence(scenes.translate_caption(scene, language))
        if rng.random() < 0.3:
            # Parallel pairs tie the word tables to the English the general source teaches.
            text = f"English: {sentence(scenes.caption(scene))}\n{LANGUAGE_NAMES[language]}: {text}"
        lines.append(text)
    return "\n".join(lines)


# ---------------------------------------------------------------- code: the standard library


def stdlib_files(budget: int) -> list[Path]:
    """A deterministic subset of the running interpreter's standard library .py files, up to `budget` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts[:-1])]
    # Ordering by a hash of the relative path mixes packages instead of taking the alphabet's first ones.
    files.sort(key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).hexdigest())
    chosen, used = [], 0
    for path in files:
        size = path.stat().st_size
        if size == 0 or size > budget // 4:
            continue
        if used + size > budget:
            break
        chosen.append(path)
        used += size
    if not chosen:
        raise DataError(f"{root}: no standard library .py files found for the code source")
    return sorted(chosen)


# ---------------------------------------------------------------- building

_GENERATORS = {"general": _general, "math": _math, "multilingual": _multilingual}


def source_document(source: str, rng: random.Random) -> str:
    """One document of a generated source (general, math or multilingual), drawn with ``rng``."""
    return _GENERATORS[source](rng)


def _documents(name: str, seed: int, budget: int) -> Iterator[str]:
    rng = random.Random(f"{name}:{seed}")
    used = 0
    while used < budget:
        text = _GENERATORS[name](rng)
        used += len(text.encode())
        yield text


def write_raw_corpus(raw: str | os.PathLike[str], *, seed: int = 0, scale: float = 1.0) -> dict[str, list[Path]]:
    """Generate the text sources as JSONL files under `raw`; returns each source's input files (code: stdlib)."""
    raw = Path(raw)
    raw.mkdir(parents=True, exist_ok=True)
    inputs: dict[str, list[Path]] = {}
    for name in DEFAULT_WEIGHTS:
        budget = max(1, int(BUDGET[name] * scale))
        if name == "code":
            inputs[name] = stdlib_files(budget)
            continue
        path = raw / f"{name}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for text in _documents(name, seed, budget):
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        inputs[name] = [path]
    return inputs


def build_default_corpus(
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    scale: float = 1.0,
    tokenizer_path: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> Mixture:
    """Generate and prepare the default corpus under `out` (built aside, then renamed into place); `overwrite`
    replaces a default corpus built there before, and never a directory holding anything else."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (overwrite and (out / MIXTURE_FILE).is_file()):
        made_here = (out / MIXTURE_FILE).is_file()
        raise DataError(
            f"{out}: "
            + (
                "holds a default corpus (--overwrite rebuilds it)"
                if made_here
                else "exists, is not empty and holds no default corpus (mixture.json)"
            )
        )
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    raw = staging / "raw"
    try:
        for name, inputs in write_raw_corpus(raw, seed=seed, scale=scale).items():
            prepare_text(inputs, staging / name, tokenizer_path=tokenizer_path, workers=workers, progress=progress)
        shutil.rmtree(raw)
        record = {
            "sources": list(DEFAULT_WEIGHTS),
            "weights": DEFAULT_WEIGHTS,
            "anneal_weights": ANNEAL_WEIGHTS,
            "anneal_fraction": ANNEAL_FRACTION,
            "seed": seed,
            "scale": scale,
            "python": sys.version.split()[0],
        }
        (staging / MIXTURE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        commit_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_default_mixture(out)


def built_with(directory: str | os.PathLike[str]) -> dict | None:
    """The seed and scale a complete default corpus at `directory` was built with; None where there is none."""
    try:
        record = json.loads((Path(directory) / MIXTURE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return {"seed": record.get("seed"), "scale": record.get("scale")}


def load_default_mixture(directory: str | os.PathLike[str]) -> Mixture:
    """The Mixture of a built default corpus, from its mixture.json."""
    directory = Path(directory)
    path = directory / MIXTURE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not a built default corpus ({e})") from None
    return Mixture(
        {name: directory / name for name in record["sources"]},
        record["weights"],
        record["anneal_weights"],
        record["anneal_fraction"],
    )


def ensure_default_corpus(
    directory: str | os.PathLike[str], *, seed: int = 0, scale: float = 1.0, timeout: float = 1800.0
) -> Mixture:
    """Return the default corpus Mixture at `directory`, building it first if missing; safe from many ranks."""
    directory = Path(directory)
    if (directory / MIXTURE_FILE).is_file():
        return load_default_mixture(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # One process builds while the others block on the lock; the renamed-in directory is complete or absent.
    # On a multi-node filesystem without working flock, build on node-local disk: the build is deterministic.
    lock_path = directory.with_name(f".{directory.name}.lock")
    deadline = time.monotonic() + timeout
    with open(lock_path, "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock_path}: waited {timeout:.0f} s for another process to build") from None
                time.sleep(0.2)
        try:
            if not (directory / MIXTURE_FILE).is_file():
                build_default_corpus(directory, seed=seed, scale=scale)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        lock_path.unlink()
    return load_default_mixture(directory)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m data.default", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="directory to create (absent, empty, or a corpus made here)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild a corpus already at --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="size multiplier (1.0: about 10 MB of text)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the Llama 3 tokenizer)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    built = built_with(args.out)
    if built is not None and not args.overwrite:
        if built == {"seed": args.seed, "scale": args.scale}:
            print(f"default corpus in {args.out} is up to date (seed {args.seed}, scale {args.scale})")
            return 0
        print(f"error: {args.out} holds a default corpus built with {built}; --overwrite rebuilds it", file=sys.stderr)
        return 2
    try:
        mixture = build_default_corpus(
            args.out,
            seed=args.seed,
            scale=args.scale,
            tokenizer_path=args.tokenizer,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, path in mixture.sources.items():
        manifest = read_manifest(path)
        print(f"{name:13s} {manifest['documents']:7d} documents {manifest['tokens']:9d} tokens  -> {path}")
    print(f"default corpus in {args.out} ({time.perf_counter() - started:.1f} s); mixture {mixture.weights}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

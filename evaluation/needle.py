"""Needle in a haystack, as the Llama 3 paper measures long context: facts hidden at chosen depths of long filler
text, at chosen lengths, scored by whether the model retrieves them.

    python -m evaluation.needle --checkpoint DIR --lengths 256,512,1024 --depths 0,0.25,0.5,0.75,1 --trials 4 \
        [--needles 1 [--ask K]] [--batch-size 8] [--dtype float32] --out DIR

The paper's setting for a Llama 3.1 checkpoint (128K context) on a GPU, single needle, then its multi-needle
variant (four needles hidden, two asked for):

    python -m evaluation.needle --checkpoint Meta-Llama-3.1-8B --dtype bfloat16 --batch-size 1 \
        --lengths 2048,8192,16384,32768,65536,98304,131072 --depths 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1 \
        --trials 4 --out runs/needle
    python -m evaluation.needle ... --needles 4 --ask 2 --out runs/needle-multi

The haystack is real English prose shipped with the interpreter (never downloaded): the Python language reference
topics of ``pydoc_data`` and the docstrings of a fixed list of standard library modules, split into sentences and
ordered by the seed. A needle is "The special magic number for KEY is NNNNNNN." inserted at the sentence boundary
nearest the requested depth (the fraction of the haystack's tokens before it; with several needles the first sits
there and the others are spread evenly after it). The question follows the haystack in a form a base model
completes: "What is the special magic number for KEY? The special magic number for KEY is". A request is an
lm-eval ``generate_until`` Instance (greedy, a few tokens, cut at "." or a newline), so any lm-eval LM can be
scored; its score is the share of the asked numbers that appear in its completion.

Lengths count Llama 3 tokens (lm.tokenizer.Tokenizer) of the whole sequence: the prompt, <|begin_of_text|>
included, is ``length - max_gen_toks`` tokens, so that prompt and answer fit in ``length`` and ``length`` may be
the model's whole context. Writes OUT/needle.json (settings, every cell and trial) and OUT/needle.png (a depth x
length heat map) and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import random
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from tqdm import tqdm

from lm.tokenizer import Tokenizer

NEEDLE = "The special magic number for {key} is {number}."
STOPS = [".", "\n"]
DEFAULT_LENGTHS = [256, 512, 1024]  # a tiny model on a CPU; see the module docstring for the paper's
DEFAULT_DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]

# Pure-Python modules whose docstrings are prose; importing them has no side effects worth the name.
FILLER_MODULES = (
    "argparse", "ast", "bdb", "bisect", "calendar", "cmd", "codecs", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "difflib", "dis", "doctest", "email.message", "enum", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "http.client",
    "http.cookiejar", "http.server", "imaplib", "inspect", "ipaddress", "json", "locale", "logging", "mailbox",
    "mimetypes", "numbers", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "pprint", "pydoc", "queue", "quopri", "random", "re", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace", "traceback", "typing",
    "unittest.case", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref", "zipfile",
    "_pydecimal",
)  # fmt: skip

_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen", "lucky",
    "misty", "noble", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upbeat", "vivid", "witty", "young",
)  # fmt: skip
_NOUNS = (
    "anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jungle", "kettle",
    "lantern", "meadow", "needle", "orchard", "pebble", "quarry", "river", "saddle", "tunnel", "valley", "walrus",
    "willow", "zephyr",
)  # fmt: skip
KEYS = tuple(f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_MIN_SENTENCE_TOKENS, _MAX_SENTENCE_TOKENS = 4, 80  # long sentences would make depths coarse


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    return Tokenizer()


def _prose_paragraphs(text: str) -> list[str]:
    """The prose paragraphs of reStructuredText-like documentation, each on one line (code, headings dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        lines = [line for line in para.split("\n") if line.strip()]
        if not lines or any(line.startswith((" ", "\t", ">>>")) for line in lines):
            continue  # indented blocks are code, grammar or tables
        if len(lines) > 1 and set(lines[-1].strip()) <= set("*=-~^"):
            continue  # a heading with its underline
        joined = " ".join(line.strip() for line in lines)
        if joined.count(" ") >= 4:
            out.append(joined)
    return out


def _documents() -> list[str]:
    """The interpreter's own documentation: language reference topics, then module, class and function docstrings."""
    import pydoc_data.topics

    docs = [pydoc_data.topics.topics[name] for name in sorted(pydoc_data.topics.topics)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules warn on import
        for name in FILLER_MODULES:
            try:
                module = importlib.import_module(name)
            except ImportError:  # a trimmed interpreter: the filler is smaller, still deterministic
                continue
            docs.append(inspect.getdoc(module) or "")
            for attr, obj in sorted(vars(module).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    docs.append(inspect.getdoc(obj) or "")
    return docs


@functools.lru_cache(maxsize=4)
def filler_sentences(seed: int = 0) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The filler's sentences (documents in an order set by ``seed``, each sentence once) and their token counts."""
    docs = _documents()
    random.Random(f"needle-filler:{seed}").shuffle(docs)
    tok, seen, sentences, lengths = _tokenizer(), set(), [], []
    for doc in docs:
        for para in _prose_paragraphs(doc):
            for sentence in _SENTENCE_END.split(para):
                sentence = sentence.strip()
                if sentence in seen or "magic number" in sentence:
                    continue
                if sentence[-1] not in ".!?:":  # one-line docstrings often lack the full stop
                    sentence += "."
                n = len(tok.encode(" " + sentence, bos=False, eos=False))
                if _MIN_SENTENCE_TOKENS <= n <= _MAX_SENTENCE_TOKENS:
                    seen.add(sentence)
                    sentences.append(sentence)
                    lengths.append(n)
    return tuple(sentences), tuple(lengths)


@dataclass
class NeedlePrompt:
    """One trial: the prompt, its needles (keys, numbers, realized depths), which of them the question asks for."""

    text: str
    keys: list[str]
    numbers: list[str]
    asked: list[int]  # indices into keys/numbers
    depths: list[float]  # each needle's share of the haystack's tokens before it
    prompt_tokens: int  # <|begin_of_text|> included
    haystack_tokens: int  # the filler's tokens, needles excluded


def question(keys: list[str]) -> str:
    """The question for ``keys``, ending where the answer begins, so a base model completes it."""
    if len(keys) == 1:
        return f"What is the special magic number for {keys[0]}? The special magic number for {keys[0]} is"
    names = ", ".join(keys[:-1]) + f" and {keys[-1]}"
    return f"What are the special magic numbers for {names}? The special magic numbers for {names} are"


def default_max_gen_toks(ask: int) -> int:
    """Enough tokens for ``ask`` seven-digit numbers (four tokens each with the space) and their separators."""
    return 6 * ask + 4


def needle_depths(depth: float, needles: int) -> list[float]:
    """The first needle at ``depth``, the others spread evenly over the rest of the haystack (as Kamradt's
    multi-needle test spreads them)."""
    return [depth + i * (1.0 - depth) / needles for i in range(needles)]


def _assemble(
    sentences: tuple[str, ...],
    lengths: tuple[int, ...],
    start: int,
    budget: int,
    needle_texts: list[str],
    depths: list[float],
) -> tuple[str, list[float]]:
    """Haystack text of about ``budget`` tokens from sentence ``start`` on (cyclically; the last one cut at a token),
    with each needle at the sentence boundary nearest its depth; also the realized depths."""
    tok, pieces, offsets, used, i = _tokenizer(), [], [0], 0, start
    while used < budget:
        sentence, n = sentences[i % len(sentences)], lengths[i % len(sentences)]
        if used + n > budget:  # the haystack is cut at a token, as the standard test cuts its essays
            sentence = tok.decode(tok.encode(" " + sentence, bos=False, eos=False)[: budget - used]).strip()
            n = budget - used
        pieces.append(sentence)
        used += n
        offsets.append(used)
        i += 1
    at = [min(range(len(offsets)), key=lambda k, d=d: (abs(offsets[k] - d * used), k)) for d in depths]
    # Insert from the back so earlier boundaries keep their place; needles sharing one stay first-needle-first.
    for k, _, text in sorted(zip(at, range(len(at)), needle_texts, strict=True), reverse=True):
        pieces.insert(k, text)
    return " ".join(pieces), [offsets[k] / used if used else 0.0 for k in at]


def build_prompt(
    length: int,
    depth: float,
    needles: int = 1,
    ask: int | None = None,
    *,
    max_gen_toks: int,
    rng: random.Random,
    seed: int = 0,
) -> NeedlePrompt:
    """A haystack prompt whose tokens (with <|begin_of_text|>) number ``length - max_gen_toks``, needles hidden
    from ``depth`` on, ending in the question for ``ask`` of them (all by default)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is not in [0, 1]")
    ask = needles if ask is None else ask
    if not 1 <= ask <= needles:
        raise ValueError(f"ask={ask}: ask for between 1 and needles={needles} of the needles")
    tok = _tokenizer()
    sentences, lengths = filler_sentences(seed)
    keys = rng.sample(KEYS, needles)
    numbers = [str(n) for n in rng.sample(range(1_000_000, 10_000_000), needles)]
    asked = sorted(rng.sample(range(needles), ask))
    start = rng.randrange(len(sentences))
    needle_texts = [NEEDLE.format(key=k, number=n) for k, n in zip(keys, numbers, strict=True)]
    tail = "\n\n" + question([keys[i] for i in asked])
    target = length - max_gen_toks
    fixed = 1 + sum(len(tok.encode(" " + t, bos=False, eos=False)) for t in needle_texts)
    fixed += len(tok.encode(tail, bos=False, eos=False))
    budget = target - fixed
    if budget < 1:
        raise ValueError(
            f"length {length} is too short: the question, {needles} needle(s) and {max_gen_toks} answer tokens "
            f"take {fixed + max_gen_toks} tokens before any haystack"
        )
    # Sentences tokenized alone and joined can differ by a token or two from the joined text: measure and adjust,
    # keeping the longest prompt that does not pass the target (one token over would cut the sequence's start).
    best, tried = None, set()
    while budget >= 1 and budget not in tried and len(tried) < 8:
        tried.add(budget)
        haystack, realized = _assemble(sentences, lengths, start, budget, needle_texts, needle_depths(depth, needles))
        text = haystack + tail
        n = len(tok.encode(text, bos=True, eos=False))
        if n <= target and (best is None or n > best[0]):
            best = (n, budget, text, realized)
        if n == target:
            break
        step = target - n
        budget += step if budget + step not in tried else (1 if step > 0 else -1)
    if best is None:
        raise ValueError(f"length {length}: could not fit the haystack under {target} prompt tokens")
    n, budget, text, realized = best
    return NeedlePrompt(text, keys, numbers, asked, realized, n, budget)


def score(completion: str, numbers: list[str]) -> float:
    """The share of ``numbers`` that appear in ``completion``."""
    return sum(number in completion for number in numbers) / len(numbers)


def model_max_length(lm: LM) -> int | None:
    """The context of an lm-eval LM in tokens, where it says (``max_length``, as lm-eval's own backends do)."""
    value = getattr(lm, "max_length", None)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _complete(lm: LM, requests: list[Instance], chunk_size: int | None, progress: bool) -> list[str]:
    """The LM's completions of ``requests``, asked in chunks of its batch size."""
    # Chunks of the LM's batch size keep one length per batch (the requests go in length order) and feed our bar.
    chunk = chunk_size or (lm.batch_size if isinstance(getattr(lm, "batch_size", None), int) else 8)
    quiet = "disable_tqdm" in inspect.signature(lm.generate_until).parameters
    completions: list[str] = []
    with tqdm(total=len(requests), desc="needle", disable=not progress) as bar:
        for begin in range(0, len(requests), chunk):
            part = requests[begin : begin + chunk]
            completions += lm.generate_until(part, disable_tqdm=True) if quiet else lm.generate_until(part)
            bar.update(len(part))
    return completions


def run_needle(
    lm: LM,
    lengths: list[int],
    depths: list[float],
    trials: int = 4,
    needles: int = 1,
    seed: int = 0,
    *,
    ask: int | None = None,
    max_gen_toks: int | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Accuracy of ``lm`` per (length, depth) over ``trials`` haystacks each: ``result["accuracy"][length][depth]``,
    with the settings and every trial; written to ``out`` (needle.json, needle.png) when given."""
    ask = needles if ask is None else ask
    max_gen_toks = max_gen_toks or default_max_gen_toks(ask)
    limit = model_max_length(lm)
    for length in lengths:
        if limit is not None and length > limit:
            raise ValueError(f"length {length} exceeds the model's context: max_length={limit} tokens")
    if trials < 1 or needles < 1:
        raise ValueError(f"trials={trials}, needles={needles}: give at least one of each")
    rng = random.Random(f"needle:{seed}")
    prompts = [
        (length, depth, trial, build_prompt(length, depth, needles, ask, max_gen_toks=max_gen_toks, rng=rng, seed=seed))
        for length in lengths
        for depth in depths
        for trial in range(trials)
    ]
    settings = {"until": STOPS, "max_gen_toks": max_gen_toks, "do_sample": False}
    requests = [
        Instance(
            request_type="generate_until",
            doc={"length": length, "depth": depth, "trial": trial, "keys": p.keys, "numbers": p.numbers},
            arguments=(p.text, dict(settings)),
            idx=0,
        )
        for length, depth, trial, p in prompts
    ]
    completions = _complete(lm, requests, chunk_size, progress)
    cells: dict[tuple[int, float], list[dict]] = {}
    for (length, depth, trial, p), completion in zip(prompts, completions, strict=True):
        record = asdict(p)
        del record["text"]  # up to 128K tokens each: the settings and seed rebuild it
        record.update(trial=trial, completion=completion, score=score(completion, [p.numbers[i] for i in p.asked]))
        cells.setdefault((length, depth), []).append(record)
    accuracy = {
        length: {depth: sum(r["score"] for r in cells[length, depth]) / trials for depth in depths}
        for length in lengths
    }
    result = {
        "settings": {
            "lengths": list(lengths),
            "depths": list(depths),
            "trials": trials,
            "needles": needles,
            "ask": ask,
            "seed": seed,
            "max_gen_toks": max_gen_toks,
            "until": STOPS,
            "model": type(lm).__name__,
            "model_max_length": limit,
            "filler": f"pydoc_data topics and stdlib docstrings of Python {sys.version.split()[0]}",
        },
        "accuracy": accuracy,
        "mean": sum(sum(row.values()) for row in accuracy.values()) / (len(lengths) * len(depths)),
        "cells": [
            {"length": length, "depth": depth, "accuracy": accuracy[length][depth], "trials": cells[length, depth]}
            for length in lengths
            for depth in depths
        ],
    }
    if out is not None:
        write_report(result, out)
    return result


def table(result: dict[str, Any]) -> str:
    """The accuracy as a markdown table: a row per depth, a column per length, and the mean of each column."""
    lengths, depths = result["settings"]["lengths"], result["settings"]["depths"]
    accuracy = result["accuracy"]
    lines = [
        "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for depth in depths:
        lines.append(f"| {depth:.2f} | " + " | ".join(f"{accuracy[n][depth]:.2f}" for n in lengths) + " |")
    means = [sum(accuracy[n].values()) / len(depths) for n in lengths]
    lines.append("| mean | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """The accuracy heat map: depth down the y axis, length along x, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = result["settings"]
    lengths, depths = settings["lengths"], settings["depths"]
    grid = [[result["accuracy"][n][d] for n in lengths] for d in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 3, 0.5 * len(depths) + 2))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 and n >= 8192 else str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("length (tokens)")
    ax.set_ylabel("needle depth")
    asked = f", {settings['ask']} asked" if settings["ask"] != settings["needles"] else ""
    ax.set_title(f"Needle in a haystack: {settings['needles']} needle(s){asked}, {settings['trials']} trial(s)")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_report(result: dict[str, Any], out: str | Path) -> str:
    """Write ``out``/needle.json and ``out``/needle.png; return the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = table(result)
    (out / "needle.json").write_text(json.dumps({**result, "table": text}, indent=1) + "\n")
    plot(result, out / "needle.png")
    return text


def _numbers(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    """Command line entry."""
    parser = argparse.ArgumentParser(
        prog="python -m evaluation.needle", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="any checkpoint evaluation.harness.load_lm reads")
    parser.add_argument("--lengths", default=None, help="comma-separated tokens (default 256,512,1024 that fit)")
    parser.add_argument("--depths", default=",".join(str(d) for d in DEFAULT_DEPTHS))
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--needles", type=int, default=1)
    parser.add_argument("--ask", type=int, default=None, help="how many needles the question asks for (all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--out", required=True, help="directory for needle.json and needle.png")
    args = parser.parse_args(argv)

    from evaluation.harness import Llama3HerdLM

    lm = Llama3HerdLM(checkpoint=args.checkpoint, batch_size=args.batch_size, dtype=args.dtype, device=args.device)
    if args.lengths is None:
        lengths = [n for n in DEFAULT_LENGTHS if n <= lm.max_length] or [lm.max_length]
    else:
        lengths = _numbers(args.lengths, int)
    result = run_needle(
        lm, lengths, _numbers(args.depths, float), args.trials, args.needles, args.seed, ask=args.ask, progress=True
    )
    print(write_report(result, args.out))
    print(
        f"mean accuracy {result['mean']:.3f}; wrote {Path(args.out) / 'needle.json'}, {Path(args.out) / 'needle.png'}"
    )


if __name__ == "__main__":
    main()

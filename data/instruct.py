"""Embedded instruction data for SFT, made offline from the default corpus's world, with a grader.

Dialogs in the field's format (``{"messages": [{role, content}], "kind", "answer"}``, one JSON object a line):
questions about a described scene (the colour of a shape, the shape of a colour, how many shapes, where one shape
lies relative to another), some of them two turns long; the default corpus's arithmetic and word problems with
one-digit numbers; and a scene's sentence to translate into one of the corpus's other languages. ``answer`` is the
checkable key `grade` compares a generation with. The held-out prompts never occur in the training file.

    python -m data.instruct --out runs/data/instruct
"""

from __future__ import annotations

import argparse
import json
import random
import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from common.atomic import atomic_write_text
from data import scenes
from data.default import LANGUAGE_NAMES, LANGUAGES, NAMES, arithmetic_problem, sentence, word_problem
from data.grading import casefold_words, normalize_text

TRAIN_FILE, HELDOUT_FILE = "train.jsonl", "heldout.jsonl"
# The embedded data's version, recorded beside them: files an earlier version wrote (2: no relations or translations;
# 1: 2,000 dialogs, three-digit sums) are written again instead of trained on.
DATA_VERSION, VERSION_FILE = 3, "version.json"
KINDS = ("colour", "shape", "count", "relation", "math", "translation")
# The relation a reader gives when the two objects are named the other way round.
INVERSE_RELATION = {
    "above": "below",
    "below": "above",
    "to the left of": "to the right of",
    "to the right of": "to the left of",
}
# Enough that the tiny SFT run (2,400 steps of 4 packed rows) sees each dialog about once rather than learning
# 2,000 of them by heart (bench/RESULTS.md).
TRAIN_DIALOGS = 20_000
SYSTEM = "You answer questions about scenes of coloured shapes, translate them and solve small arithmetic problems."


def _scene_question(scene: scenes.Scene, rng: random.Random) -> tuple[str, str, str, str]:
    """(kind, question, answer text, answer key) about one scene."""
    objs = scene.objects
    unique_shapes = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    unique_colours = [o for o in objs if sum(p.colour == o.colour for p in objs) == 1]
    # The first two objects are the ones the caption relates; a phrase two objects share could not be asked about.
    phrases = [o.phrase() for o in objs]
    related = len(objs) > 1 and phrases.count(phrases[0]) == phrases.count(phrases[1]) == 1
    kinds = ["count"] + ["colour"] * bool(unique_shapes) + ["shape"] * bool(unique_colours) + ["relation"] * related
    kind = rng.choice(kinds)
    if kind == "relation":
        # Half the questions name the objects in the caption's order (a copy), half the other way (the inverse).
        first, second = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])
        where = scenes.relation(first, second)
        the_first, the_second = (o.phrase().replace("a ", "the ", 1) for o in (first, second))
        question = f"Where is {the_first} relative to {the_second}?"
        return kind, question, sentence(f"{the_first} is {where} {the_second}"), where
    if kind == "colour":
        obj = rng.choice(unique_shapes)
        return kind, f"What colour is the {obj.shape}?", f"The {obj.shape} is {obj.colour}.", obj.colour
    if kind == "shape":
        obj = rng.choice(unique_colours)
        return kind, f"What shape is {obj.colour}?", f"The {obj.colour} shape is a {obj.shape}.", obj.shape
    count = scenes.DIGITS[len(objs)]
    return kind, "How many shapes are there?", f"There {'is' if len(objs) == 1 else 'are'} {count}.", count


def scene_dialog(rng: random.Random) -> dict[str, Any]:
    """A question about a described scene, sometimes followed by a second one (graded on the last answer)."""
    scene = scenes.random_scene(rng)
    kind, question, answer, key = _scene_question(scene, rng)
    messages = [{"role": "user", "content": f"Scene: {scenes.caption(scene)} on {scene.background}. {question}"}]
    messages.append({"role": "assistant", "content": answer})
    if rng.random() < 0.3:
        kind, question, answer, key = _scene_question(scene, rng)
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "kind": kind, "answer": key}


def math_dialog(rng: random.Random) -> dict[str, Any]:
    """An arithmetic question or word problem of the default corpus, answered with its worked steps.

    Its numbers are small (one-digit operands, results below 100): the Llama 3 tokenizer writes every number below
    1,000 as one token, so a sum is a fact to learn, not digits to add, and the corpus's three-digit sums (a million
    facts) stay out of reach of the tiny LM whatever the post-training (3-6% held out, bench/RESULTS.md).
    """
    text = (word_problem if rng.random() < 0.5 else arithmetic_problem)(rng, small=True)
    question, answer = text.removeprefix("Question: ").split("\nAnswer: ")
    key = answer.rsplit("The answer is ", 1)[1].rstrip(".")
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "kind": "math", "answer": key}


def translation_dialog(rng: random.Random) -> dict[str, Any]:
    """A scene's English sentence to translate into French, German, Spanish or Italian (the corpus's word tables)."""
    scene, language = scenes.random_scene(rng), rng.choice(LANGUAGES)
    target = sentence(scenes.translate_caption(scene, language))
    question = f"Translate into {LANGUAGE_NAMES[language]}: {sentence(scenes.caption(scene))}"
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": target}]
    return {"messages": messages, "kind": "translation", "answer": target}


def make_dialogs(count: int, seed: int) -> list[dict[str, Any]]:
    """``count`` dialogs: half about scenes, three in ten sums, two in ten translations; a system prompt on some."""
    rng = random.Random(seed)
    dialogs = []
    for _ in range(count):
        draw = rng.random()
        dialog = scene_dialog(rng) if draw < 0.5 else math_dialog(rng) if draw < 0.8 else translation_dialog(rng)
        if rng.random() < 0.25:
            dialog["messages"].insert(0, {"role": "system", "content": SYSTEM})
        dialogs.append(dialog)
    return dialogs


def prompt_of(dialog: dict[str, Any]) -> list[dict[str, str]]:
    """The messages before the last (graded) assistant answer."""
    return dialog["messages"][:-1]


def _prompt_key(dialog: dict[str, Any]) -> str:
    return json.dumps(prompt_of(dialog), sort_keys=True)


def write_instruct_data(out: str | Path, *, train: int = TRAIN_DIALOGS, heldout: int = 200, seed: int = 0) -> Path:
    """Write ``train.jsonl`` and ``heldout.jsonl`` under ``out`` (atomically); no held-out prompt is trained on."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    held = make_dialogs(heldout, seed + 1_000_003)
    held_prompts = {_prompt_key(d) for d in held}
    train_dialogs = [d for d in make_dialogs(train, seed) if _prompt_key(d) not in held_prompts]
    for name, dialogs in ((HELDOUT_FILE, held), (TRAIN_FILE, train_dialogs)):
        atomic_write_text(out / name, "".join(json.dumps(d) + "\n" for d in dialogs))
    # A new instruction set invalidates pairs made from the old one: only this entry is kept.
    atomic_write_text(out / VERSION_FILE, json.dumps({"instruct": DATA_VERSION}) + "\n")
    return out


def data_versions(out: str | Path) -> dict[str, int]:
    """The versions of the embedded files under ``out`` (``{}`` when none is recorded: an earlier version's)."""
    try:
        versions = json.loads((Path(out) / VERSION_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return versions if isinstance(versions, dict) else {}


def ensure_instruct_data(out: str | Path, *, seed: int = 0) -> Path:
    """The embedded instruction data under ``out``, written unless both files exist in the current version (every
    rank may call it)."""
    out = Path(out)
    current = data_versions(out).get("instruct") == DATA_VERSION
    if not (current and (out / TRAIN_FILE).is_file() and (out / HELDOUT_FILE).is_file()):
        write_instruct_data(out, seed=seed)
    return out


# Bump when grade() judges any answer differently, so gradings stored by an older one are not reused (train.rounds).
GRADER_VERSION = 2  # 2: a worked answer must keep to its question's people and numbers
_NUMBER = re.compile(r"-?\d+")
_RELATION = re.compile(r"\b(" + "|".join(scenes.RELATIONS) + r")\b")
_NAME = re.compile(r"\b(" + "|".join(NAMES) + r")\b")
# A worked step: arithmetic expressions joined by "=" ("7 * 23 = 7 * 20 + 7 * 3 = 140 + 21 = 161").
_TERM = r"\d+(?:\s*[-+*/]\s*\d+)*"
_CHAIN = re.compile(rf"{_TERM}(?:\s*=\s*{_TERM})+")


def _value(expression: str) -> Fraction | None:
    """The value of numbers joined by + - * / (the usual precedence); None on a division by zero."""
    tokens = re.findall(r"\d+|[-+*/]", expression)
    total, term, op = Fraction(0), Fraction(int(tokens[0])), "+"
    for symbol, number in zip(tokens[1::2], tokens[2::2], strict=True):
        if symbol in "*/":
            if symbol == "/" and int(number) == 0:
                return None
            term = term * int(number) if symbol == "*" else term / int(number)
            continue
        total, term, op = total + term if op == "+" else total - term, Fraction(int(number)), symbol
    return total + term if op == "+" else total - term


def keeps_to_question(text: str, question: str) -> bool:
    """Whether a worked answer keeps to its word problem: it names only the question's people, and the numbers its
    steps start from, and those it writes outside its steps, are the question's or what one of its steps reaches."""
    if set(_NAME.findall(text)) - set(_NAME.findall(question)):
        return False
    text = text.replace(",", "")
    chains = _CHAIN.findall(text)
    reached = {str(abs(value)) for value in (_value(chain.split("=")[-1]) for chain in chains) if value is not None}
    starts = [n for chain in chains for n in re.findall(r"\d+", chain.split("=")[0])]
    used = set(starts + re.findall(r"\d+", _CHAIN.sub(" ", text)))
    return used <= set(re.findall(r"\d+", question.replace(",", ""))) | reached


def steps_hold(text: str) -> bool:
    """Whether every worked step of ``text`` (each "a op b = c", or a longer chain of "=") is true."""
    for chain in _CHAIN.findall(text.replace(",", "")):
        values = [_value(side) for side in chain.split("=")]
        if None in values or len(set(values)) > 1:
            return False
    return True


def grade(kind: str, generated: str, answer: str, question: str | None = None) -> bool:
    """Whether a generated answer gives the key: the first colour, shape, number word or relation it names; the
    translation word for word (case and punctuation aside); or its number (after "the answer is" when it says so,
    else the last one it writes) reached by worked steps that all hold and, given the question, keep to it.

    A right number after a false step ("3 * 3 = 12. The answer is 12.") is wrong, as the paper filters reasoning
    traces whose intermediate steps are incorrect (section 4.3.3): a policy's samples are a quarter of the time
    right for the wrong reason, and chosen as right they would teach the false step. So is a right number about
    the wrong person or from numbers the question does not give ("Ben starts with 10 and gives away 3, so 7 - 3 =
    4" when Anna had 7): one right sum in twenty of the round's samples was.
    """
    if kind == "translation":
        return casefold_words(generated) == casefold_words(answer)
    if kind == "relation":
        named = _RELATION.search(normalize_text(generated))
        return named is not None and named.group(0) == answer
    words = normalize_text(generated).split()
    if kind == "math":
        text = generated.lower()
        tail = text.rsplit("the answer is", 1)[1] if "the answer is" in text else text
        numbers = _NUMBER.findall(tail.replace(",", ""))
        if not numbers or numbers[0 if "the answer is" in text else -1] != answer or not steps_hold(text):
            return False
        return question is None or keeps_to_question(generated, question)
    vocabulary = {"colour": scenes.COLOURS, "shape": scenes.SHAPES, "count": scenes.DIGITS}[kind]
    named = [w.removesuffix("s") if kind == "shape" else w for w in words]
    first = next((w for w in named if w in vocabulary), None)
    return first == answer


def main(argv: list[str] | None = None) -> int:
    """Command line: write the embedded instruction data."""
    parser = argparse.ArgumentParser(prog="python -m data.instruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/data/instruct")
    parser.add_argument("--train", type=int, default=TRAIN_DIALOGS)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = write_instruct_data(args.out, train=args.train, heldout=args.heldout, seed=args.seed)
    print(f"wrote {out / TRAIN_FILE} and {out / HELDOUT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Grading of answers about the embedded synthetic data: what a generated text says, what counts as right, and
what chance is. Beside the scenes' vocabulary so that training evals and post-training tools grade alike.

``modality`` names what was asked about: ``vision`` (a scene: the first 'colour shape' named), ``video`` (a
clip: the direction of motion) or ``speech`` (spoken words: the transcript).
"""

from __future__ import annotations

import re
from collections import Counter

from data.scenes import COLOURS, DIRECTIONS, SHAPES

_OBJECT = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")
_MOTION = re.compile(r"\bmoves (" + "|".join(re.escape(d) for d in DIRECTIONS) + r")\b")


def normalize_text(text: str) -> str:
    """Lower case, punctuation dropped, single spaces: the form transcripts are compared in."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def casefold_words(text: str) -> list[str]:
    """The words of a text in any of the corpus's languages, case and punctuation aside (ü, é and ß kept)."""
    return re.sub(r"[^\w ]+", " ", text.casefold()).split()


def named_objects(text: str) -> list[str]:
    """The 'colour shape' objects a text names, in order."""
    return [f"{c} {s}" for c, s in _OBJECT.findall(normalize_text(text))]


def answer_key(modality: str, text: str) -> str | None:
    """What a generated text answers (None when it names nothing the modality asks about).

    vision: the first 'colour shape' it names; video: the direction of motion ('moves up' -> 'up'); speech: the
    whole normalised transcript.
    """
    norm = normalize_text(text)
    if modality == "speech":
        return norm or None
    if modality == "video":
        m = _MOTION.search(norm)
        return m.group(1) if m else None
    named = named_objects(norm)
    return named[0] if named else None


def accepted_keys(modality: str, reference: str) -> set[str]:
    """The answers a reference caption or transcript accepts.

    vision: any object of the scene (a caption lists its objects in an order the image does not show); video and
    speech: the one answer.
    """
    if modality == "vision":
        return set(named_objects(reference))
    key = answer_key(modality, reference)
    return {key} if key is not None else set()


def is_correct(modality: str, generated: str, reference: str) -> bool:
    """Whether a generation answers right.

    speech: its first words are the transcript (what follows is graded by an exact match); vision and video: its
    answer is one the reference accepts.
    """
    if modality == "speech":
        want = normalize_text(reference).split()
        return bool(want) and normalize_text(generated).split()[: len(want)] == want
    return answer_key(modality, generated) in accepted_keys(modality, reference)


def majority_rate(accepted: list[set[str]]) -> float:
    """Accuracy of always giving the answer most often accepted: the chance level beside an accuracy."""
    counts = Counter(k for keys in accepted for k in keys)
    return counts.most_common(1)[0][1] / len(accepted) if counts else 0.0

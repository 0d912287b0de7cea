"""The vocabulary of the embedded default data: scenes of coloured shapes, their captions and translations.

Text corpus, synthetic images, clips and spoken words all draw from these tables, so that a tiny LM pretrained
on the default corpus already knows every word an adapter must learn to ground.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
BACKGROUNDS = ("white", "gray", "black")
# Relation of the first object to the second, read off their centres.
RELATIONS = ("above", "below", "to the left of", "to the right of")
DIRECTIONS = ("to the right", "to the left", "up", "down")
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COMMANDS = ("stop", "go", "left", "right", "up", "down", "yes", "no")

# RGB values the image generator paints with; kept here so a caption's colour word and its pixels agree.
RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "black": (0, 0, 0),
}

# Word tables for the multilingual part of the default corpus. Adjective placement follows each language
# (after the noun in French, Spanish and Italian); gender agreement is kept simple on purpose.
TRANSLATIONS: dict[str, dict[str, str]] = {
    "fr": {
        "a": "un",
        "circle": "cercle",
        "square": "carré",
        "triangle": "triangle",
        "star": "étoile",
        "red": "rouge",
        "green": "vert",
        "blue": "bleu",
        "yellow": "jaune",
        "purple": "violet",
        "orange": "orange",
        "small": "petit",
        "large": "grand",
        "above": "au-dessus d'",
        "below": "en dessous d'",
        "to the left of": "à gauche d'",
        "to the right of": "à droite d'",
        "and": "et",
    },
    "de": {
        "a": "ein",
        "circle": "Kreis",
        "square": "Quadrat",
        "triangle": "Dreieck",
        "star": "Stern",
        "red": "roter",
        "green": "grüner",
        "blue": "blauer",
        "yellow": "gelber",
        "purple": "violetter",
        "orange": "oranger",
        "small": "kleiner",
        "large": "großer",
        "above": "über",
        "below": "unter",
        "to the left of": "links von",
        "to the right of": "rechts von",
        "and": "und",
    },
    "es": {
        "a": "un",
        "circle": "círculo",
        "square": "cuadrado",
        "triangle": "triángulo",
        "star": "estrella",
        "red": "rojo",
        "green": "verde",
        "blue": "azul",
        "yellow": "amarillo",
        "purple": "morado",
        "orange": "naranja",
        "small": "pequeño",
        "large": "grande",
        "above": "encima de",
        "below": "debajo de",
        "to the left of": "a la izquierda de",
        "to the right of": "a la derecha de",
        "and": "y",
    },
    "it": {
        "a": "un",
        "circle": "cerchio",
        "square": "quadrato",
        "triangle": "triangolo",
        "star": "stella",
        "red": "rosso",
        "green": "verde",
        "blue": "blu",
        "yellow": "giallo",
        "purple": "viola",
        "orange": "arancione",
        "small": "piccolo",
        "large": "grande",
        "above": "sopra",
        "below": "sotto",
        "to the left of": "a sinistra di",
        "to the right of": "a destra di",
        "and": "e",
    },
}
ADJECTIVE_AFTER_NOUN = {"fr", "es", "it"}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; centre and size in units of the image side."""

    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def radius(self) -> float:
        """Half the drawn extent, as a fraction of the image side."""
        return 0.16 if self.size == "large" else 0.09

    def phrase(self) -> str:
        """English noun phrase: 'a small red circle'."""
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Up to three shapes on a plain background."""

    objects: tuple[SceneObject, ...]
    background: str = "white"


def relation(first: SceneObject, second: SceneObject) -> str:
    """Where `first` lies relative to `second`, by the larger of the two centre offsets (y grows downwards)."""
    dx, dy = first.x - second.x, first.y - second.y
    if abs(dx) >= abs(dy):
        return "to the right of" if dx > 0 else "to the left of"
    return "below" if dy > 0 else "above"


def random_scene(rng: random.Random, max_objects: int = 3) -> Scene:
    """A scene of 1..max_objects distinct shapes placed in distinct cells of a 3x3 grid, so none overlap."""
    count = rng.randint(1, max_objects)
    cells = rng.sample(range(9), count)
    background = rng.choice(BACKGROUNDS)
    colours = [c for c in COLOURS if c != background]
    objects = []
    for cell in cells:
        row, col = divmod(cell, 3)
        jitter_x, jitter_y = rng.uniform(-0.03, 0.03), rng.uniform(-0.03, 0.03)
        objects.append(
            SceneObject(
                shape=rng.choice(SHAPES),
                colour=rng.choice(colours),
                size=rng.choice(SIZES),
                x=(col + 0.5) / 3 + jitter_x,
                y=(row + 0.5) / 3 + jitter_y,
            )
        )
    return Scene(objects=tuple(objects), background=background)


def caption(scene: Scene) -> str:
    """English caption: the first object related to the second, any third joined with 'and'."""
    objs = scene.objects
    if len(objs) == 1:
        return objs[0].phrase()
    text = f"{objs[0].phrase()} {relation(objs[0], objs[1])} {objs[1].phrase()}"
    for extra in objs[2:]:
        text += f" and {extra.phrase()}"
    return text


def translate_phrase(obj: SceneObject, language: str) -> str:
    """The noun phrase of one object in `language`, from the word tables."""
    words = TRANSLATIONS[language]
    noun, colour, size = words[obj.shape], words[obj.colour], words[obj.size]
    if language in ADJECTIVE_AFTER_NOUN:
        return f"{words['a']} {noun} {size} {colour}" if language != "fr" else f"{words['a']} {size} {noun} {colour}"
    return f"{words['a']} {size} {colour} {noun}"


def translate_caption(scene: Scene, language: str) -> str:
    """The caption of `scene` written from the word tables of `language` (fr, de, es, it)."""
    if language not in TRANSLATIONS:
        raise ValueError(f"no word table for language {language!r}; have {sorted(TRANSLATIONS)}")
    words = TRANSLATIONS[language]
    objs = scene.objects
    text = translate_phrase(objs[0], language)
    if len(objs) > 1:
        text += f" {words[relation(objs[0], objs[1])]} {translate_phrase(objs[1], language)}"
    for extra in objs[2:]:
        text += f" {words['and']} {translate_phrase(extra, language)}"
    return text.replace("' ", "'")


# Image tags of the embedded default (what `train/encoder.py --vision.objective=tags` classifies): each object's
# shape, colour and size, and its colour bound to its shape, so that a caption's "a red circle" is one label.
TAGS = SHAPES + COLOURS + SIZES + tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def scene_tags(scene: Scene) -> list[str]:
    """The scene's tags (a subset of TAGS, in TAGS order)."""
    present = set()
    for obj in scene.objects:
        present.update((obj.shape, obj.colour, obj.size, f"{obj.colour} {obj.shape}"))
    return [tag for tag in TAGS if tag in present]


def motion_caption(obj: SceneObject, direction: str) -> str:
    """Caption of a clip: 'a red circle moves to the right'."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; have {DIRECTIONS}")
    article = "an" if obj.colour[0] in "aeiou" else "a"
    return f"{article} {obj.colour} {obj.shape} moves {direction}"

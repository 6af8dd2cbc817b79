"""Captions of a scene: the true ones in their accepted variants, and the wrong ones of each kind.

Shared by the grounding scorer's hard negatives (`shapescap.clip`), the ranking checks of every scorer
(CLIP, the latent mapper) and the tests, so that "a colour swap" means the same thing everywhere.
"""

from __future__ import annotations

import random
from dataclasses import asdict

from shapescap.scenes import COLOURS, SHAPES, SIZES, Scene, ShapeObject
from shapescap.scenes import describe_objects as caption

KINDS = ("colour", "shape", "drop", "add", "repeat", "runon")
RANKING_KINDS = (*KINDS, "other")  # "other": another scene's true caption


def _swap(o: ShapeObject, rng: random.Random, attr: str) -> ShapeObject:
    pool = list(COLOURS) if attr == "colour" else list(SHAPES)
    new = rng.choice([v for v in pool if v != getattr(o, attr)])
    return ShapeObject(**{**asdict(o), attr: new})


def negative(scene: Scene, kind: str, rng: random.Random, sizes: bool) -> str:
    """A wrong caption of one kind: colour, shape, drop, add, repeat or runon."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    if kind in ("colour", "shape"):
        objs[i] = _swap(objs[i], rng, kind)
    elif kind == "drop" and len(objs) > 1:
        objs.pop(i)
    elif kind in ("add", "drop"):  # a single-object scene cannot drop: add instead
        o = ShapeObject(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES)), 0.5, 0.5)
        objs.insert(rng.randrange(len(objs) + 1), o)
    elif kind == "repeat":
        objs.insert(rng.randrange(len(objs) + 1), objs[i])
    elif kind == "runon":
        text = caption(objs, sizes)
        phrase = caption([objs[i]], sizes)[2:]  # "red square" without the article
        return text + " " + phrase
    return caption(objs, sizes)


def positive(scene: Scene, rng: random.Random) -> tuple[str, bool]:
    sizes = rng.random() < 0.5
    objs = list(scene.objects)
    if rng.random() < 0.3:
        rng.shuffle(objs)
    return caption(objs, sizes), sizes


def with_prefix(text: str, rng: random.Random) -> str:
    return f"A photo depicts {text}" if rng.random() < 0.5 else text


def ranking_pairs(scenes: list[Scene], kind: str) -> tuple[list[str], list[str]]:
    """(true caption, wrong caption of one kind) per scene, without sizes, seeded by the scene's index: the
    fixed test of how often a scorer prefers the truth."""
    true, wrong = [], []
    for i, scene in enumerate(scenes):
        true.append(caption(scene.objects, False))
        other = scenes[(i + 1) % len(scenes)]
        wrong.append(
            caption(other.objects, False) if kind == "other" else negative(scene, kind, random.Random(i), False)
        )
    return true, wrong

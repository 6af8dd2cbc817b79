"""Caption accuracy on synthetic shapes, where the scene content is known (in the spirit of CHAIR).

A caption is parsed into the colours and shapes it names and its objects: a shape word takes the colour
words said since the previous shape word ("a large red circle" -> (red, circle); "red and blue squares" ->
two objects). Hallucination = the caption names a colour or a shape that is not in the image.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from shapescap.scenes import COLOURS, SHAPES, Scene

_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Mentions:
    colours: frozenset[str]
    shapes: frozenset[str]
    objects: tuple[tuple[str, str], ...]  # (colour, shape) in caption order, repeats kept
    empty: bool


def parse_caption(text: str) -> Mentions:
    colours, shapes, objects, pending = set(), set(), [], []
    words = _WORD.findall(text.lower())
    for word in words:
        if word in COLOURS:
            colours.add(word)
            pending.append(word)
        elif word in _SHAPE_WORDS:
            shape = _SHAPE_WORDS[word]
            shapes.add(shape)
            objects.extend((c, shape) for c in dict.fromkeys(pending))
            pending = []
    return Mentions(frozenset(colours), frozenset(shapes), tuple(objects), empty=not text.strip())


def caption_scores(text: str, scene: Scene | str) -> dict[str, float]:
    """Per-caption counts and flags; `shapes_metrics` aggregates them."""
    scene = Scene.from_json(scene) if isinstance(scene, str) else scene
    m = parse_caption(text)
    true_colours = {o.colour for o in scene.objects}
    true_shapes = {o.shape for o in scene.objects}
    true_objects = {(o.colour, o.shape) for o in scene.objects}
    named_objects = set(m.objects)
    wrong_colour, wrong_shape = bool(m.colours - true_colours), bool(m.shapes - true_shapes)
    stray = (m.colours - {c for c, _ in m.objects}) or (m.shapes - {s for _, s in m.objects})
    return {
        "colours_named": len(m.colours),
        "colours_right": len(m.colours & true_colours),
        "colours_true": len(true_colours),
        "shapes_named": len(m.shapes),
        "shapes_right": len(m.shapes & true_shapes),
        "shapes_true": len(true_shapes),
        "objects_found": len(named_objects & true_objects),
        "objects_true": len(true_objects),
        "hallucination": float(wrong_colour or wrong_shape),
        "colour_hallucination": float(wrong_colour),
        "shape_hallucination": float(wrong_shape),
        "object_hallucination": float(bool(named_objects - true_objects)),
        "exact_match": float(Counter(m.objects) == Counter(true_objects) and not stray),
        "duplicate_object": float(len(m.objects) > len(named_objects)),
        "empty": float(m.empty),
    }


# Rates where a drop is the improvement (`make eval` marks them so).
LOWER_IS_BETTER = (
    "shapes/hallucination",
    "shapes/colour_hallucination",
    "shapes/shape_hallucination",
    "shapes/object_hallucination",
    "shapes/duplicate_object",
    "shapes/empty",
)
RATES = (
    "hallucination",
    "colour_hallucination",
    "shape_hallucination",
    "object_hallucination",
    "exact_match",
    "duplicate_object",
    "empty",
)


def shapes_metrics(captions: Sequence[str], scenes: Sequence[Scene | str]) -> tuple[dict, list[dict]]:
    """Corpus metrics (precision/recall pooled over captions; rates = share of captions) and per-caption ones.

    A precision is None when no caption names a colour (or shape) at all: there is nothing to be precise about.
    """
    each = [caption_scores(c, s) for c, s in zip(captions, scenes, strict=True)]
    total = {k: sum(e[k] for e in each) for k in each[0]} if each else {}

    def ratio(num: str, den: str) -> float | None:
        return total[num] / total[den] if total.get(den) else None

    corpus = {
        "shapes/colour_precision": ratio("colours_right", "colours_named"),
        "shapes/colour_recall": ratio("colours_right", "colours_true"),
        "shapes/shape_precision": ratio("shapes_right", "shapes_named"),
        "shapes/shape_recall": ratio("shapes_right", "shapes_true"),
        "shapes/object_recall": ratio("objects_found", "objects_true"),
        **{f"shapes/{k}": total[k] / len(each) if each else None for k in RATES},
    }
    per_caption = [
        {
            "shapes/hallucination": e["hallucination"],
            "shapes/object_recall": e["objects_found"] / e["objects_true"] if e["objects_true"] else 0.0,
        }
        for e in each
    ]
    return corpus, per_caption

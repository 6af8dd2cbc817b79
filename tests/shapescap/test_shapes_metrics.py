"""Shapes caption parser and CHAIR-style metrics on hand-made cases."""

import pytest

from shapescap.metrics import caption_scores, parse_caption, shapes_metrics
from shapescap.scenes import Scene, ShapeObject

SCENE = Scene((ShapeObject("red", "circle", "large", 0.2, 0.5), ShapeObject("blue", "square", "small", 0.7, 0.5)))


def test_parser_binds_colours_to_the_next_shape():
    m = parse_caption("A large red circle and a small Blue square.")
    assert m.objects == (("red", "circle"), ("blue", "square"))
    assert m.colours == {"red", "blue"} and m.shapes == {"circle", "square"} and not m.empty
    assert parse_caption("red and green triangles").objects == (("red", "triangle"), ("green", "triangle"))
    assert parse_caption("a circle").objects == () and parse_caption("a circle").shapes == {"circle"}
    assert parse_caption("  ").empty


@pytest.mark.parametrize(
    "caption, expected",
    [
        (
            "a large red circle and a small blue square",
            dict(
                hallucination=0,
                colour_hallucination=0,
                shape_hallucination=0,
                object_hallucination=0,
                exact_match=1,
                duplicate_object=0,
                empty=0,
            ),
        ),
        ("a red circle", dict(hallucination=0, exact_match=0, objects_found=1, colours_right=1, colours_true=2)),
        (
            "a green circle",
            dict(hallucination=1, colour_hallucination=1, shape_hallucination=0, object_hallucination=1),
        ),
        ("a red triangle", dict(hallucination=1, colour_hallucination=0, shape_hallucination=1)),
        # both words exist in the scene, their pairing does not: an object hallucination only
        (
            "a blue circle and a red square",
            dict(hallucination=0, object_hallucination=1, objects_found=0, exact_match=0),
        ),
        ("a red circle and a red circle and a blue square", dict(duplicate_object=1, exact_match=0, hallucination=0)),
        (
            "a red circle, a blue square and something yellow",
            dict(hallucination=1, colour_hallucination=1, exact_match=0),
        ),
        ("", dict(empty=1, hallucination=0, exact_match=0, colours_named=0)),
    ],
)
def test_caption_scores_on_hand_made_cases(caption, expected):
    scores = caption_scores(caption, SCENE.to_json())
    assert {k: scores[k] for k in expected} == expected


def test_corpus_metrics_are_exact():
    captions = [
        "a large red circle and a small blue square",  # exact
        "a green circle",  # colour hallucination
        "a red triangle and a blue square",  # shape hallucination
        "",
    ]  # empty
    corpus, each = shapes_metrics(captions, [SCENE] * 4)
    assert corpus["shapes/hallucination"] == 0.5
    assert corpus["shapes/colour_hallucination"] == 0.25 and corpus["shapes/shape_hallucination"] == 0.25
    assert corpus["shapes/exact_match"] == 0.25 and corpus["shapes/empty"] == 0.25
    # colours named: {red, blue}, {green}, {red, blue} -> 4 right of 5; true colours 2 per scene -> 4 of 8
    assert corpus["shapes/colour_precision"] == pytest.approx(4 / 5)
    assert corpus["shapes/colour_recall"] == pytest.approx(4 / 8)
    # shapes named: {circle, square}, {circle}, {triangle, square} -> 4 right of 5
    assert corpus["shapes/shape_precision"] == pytest.approx(4 / 5)
    assert corpus["shapes/object_recall"] == pytest.approx(3 / 8)  # 2 + 0 + 1 (blue square) + 0
    assert [e["shapes/hallucination"] for e in each] == [0.0, 1.0, 1.0, 0.0]


def test_precision_is_undefined_when_nothing_is_named():
    corpus, _ = shapes_metrics(["nothing here", "a photo"], [SCENE, SCENE])
    assert corpus["shapes/colour_precision"] is None and corpus["shapes/shape_precision"] is None
    assert corpus["shapes/colour_recall"] == 0.0 and corpus["shapes/hallucination"] == 0.0

"""The ShapesCap grounding scorer prefers the true caption to every kind of perturbation, repetition included."""

import pytest

from shapescap.clip import evaluate, shapes_clip_path

# Measured on 200 held-out scenes: colour 0.99-1.0, shape ~0.90, dropped 0.94, added ~0.98,
# repeated 0.96-0.98, run-on 0.96-0.99, another scene's caption 0.99. Shape swaps are the weakest.
# shape: 0.845 on this machine, 0.89 where the scorer was first built (training is deterministic per CPU only).
# On the v2 scenes with centres 0.1 apart across: colour 1.0, shape 0.855, drop 0.94, add 0.96, run-on 0.865 (a
# run-on is then also the repetition guard's to catch); 0.15 apart: colour 0.99, shape 0.885, drop 0.93, add 0.975,
# repeat 0.955, run-on 0.965, other 0.99.
FLOORS = {"colour": 0.95, "shape": 0.82, "drop": 0.9, "add": 0.9, "repeat": 0.9, "runon": 0.84, "other": 0.95}


@pytest.fixture(scope="module")
def ranking() -> dict[str, float]:
    return evaluate(shapes_clip_path(), n=200)


@pytest.mark.parametrize("kind", list(FLOORS))
def test_true_caption_outscores_perturbation(ranking, kind):
    assert ranking[kind] >= FLOORS[kind], ranking

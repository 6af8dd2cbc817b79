"""The diagnostic truth penalty counts exactly what the symbolic metrics count as wrong."""

from shapescap.oracle import truth_penalty
from shapescap.scenes import Scene, ShapeObject

SCENE = Scene((ShapeObject("red", "square", "small", 0.3, 0.3), ShapeObject("orange", "circle", "large", 0.7, 0.7)))


def test_truth_penalty_counts_wrong_bindings_and_repeats():
    captions = [
        "a small red square and a large orange circle",  # right
        "a small red square",  # incomplete, not wrong
        "a small red circle and a red square",  # red bound to the circle
        "a red square and a red square",  # repeat
        "",
    ]
    out = truth_penalty()(
        prompts=None,
        completions=[[{"role": "assistant", "content": c}] for c in captions],
        completion_ids=None,
        truth=[SCENE.to_json()] * len(captions),
    )
    assert out == [0.0, 0.0, -1.0, -1.0, 0.0]


def test_monitor_check_counts_duplicates_as_the_metrics_do():
    from shapescap.monitor_check import duplicate_rate, moving_mean

    captions = ["a red square and a red square", "a large red circle and a small red circle", "a red square", ""]
    assert duplicate_rate(captions) == 0.5
    assert moving_mean([0.0, 1.0, 2.0, 3.0], 2) == [0.5, 1.5, 2.5]

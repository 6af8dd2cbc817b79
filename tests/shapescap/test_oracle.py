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


def test_monitor_check_reads_the_canary_against_the_truth_of_its_pictures(tmp_path):
    import json

    from shapescap.monitor_check import canary_table, scene_of
    from shapescap.scenes import describe, shapes_scenes

    scenes = shapes_scenes("test", 3)
    assert [scene_of(f"shapes/test/{i}") for i in range(3)] == scenes  # the source's own scenes
    wrong = "a small yellow triangle"  # colour and shape absent from every scene below
    assert all("yellow" not in describe(s) and "triangle" not in describe(s) for s in scenes)
    steps = [
        (0, [wrong] * 3, 1.0),
        (10, [describe(scenes[0]), wrong, wrong], 1.2),
        (20, [describe(s) for s in scenes], 1.5),
    ]
    with (tmp_path / "canary.jsonl").open("w") as f:
        for step, captions, score in steps:
            images = [{"image_id": f"shapes/test/{i}", "caption": c, "clip_s": score} for i, c in enumerate(captions)]
            f.write(json.dumps({"step": step, "images": images}) + "\n")
    row = canary_table([tmp_path])[2].split(" | ")
    # recall 0 -> 1/3 of the objects -> 1 rises with the score; object hallucination 1 -> 2/3 -> 0 falls
    assert float(row[4]) > 0.9 and float(row[5]) < -0.9, row
    assert row[-1].startswith("0.000 → 1.000"), row

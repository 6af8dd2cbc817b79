"""Caption health on hand-written captions: each number is what a reader would count."""

import pytest

from vizer.eval.health import caption_health, names_twice


def test_length_and_distinct_ngrams_count_words_across_all_captions():
    health = caption_health(["a red square", "a red circle"])
    assert health["health/mean_words"] == 3.0
    # words: a red square a red circle -> 4 distinct of 6; bigrams: a-red, red-square, red-circle -> 3 of 4
    assert health["health/distinct_1"] == pytest.approx(4 / 6)
    assert health["health/distinct_2"] == pytest.approx(3 / 4)


@pytest.mark.parametrize(
    "text, twice",
    [
        ("a red square and a red square", True),  # the same object again
        ("a red square red square", True),  # a run-on
        ("a dog, a cat and a dog", True),  # one object phrase twice, apart
        ("two dogs and a dog", False),  # "two dog" and "dog" are different phrases
        ("a large red circle and a small red circle", False),  # shared words, different things
        ("a man riding a horse on a beach", False),
    ],
)
def test_repeated_counts_a_caption_that_names_the_same_thing_twice(text, twice):
    assert names_twice(text) is twice


def test_repeated_is_the_share_of_captions():
    health = caption_health(["a red square and a red square", "a blue circle", "a cat", "a dog and a dog"])
    assert health["health/repeated"] == 0.5


def test_agreement_compares_captions_of_the_same_image_only():
    texts = ["a red square and a blue circle", "a red square", "a green triangle", "a red square"]
    health = caption_health(texts, groups=["a", "a", "b", "b"])
    # image a: 1/2 of the first caption's objects named by the second, 1/1 of the second's;
    # image b: nothing shared (the red square of image a does not count)
    assert health["health/agreement"] == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)


def test_agreement_is_left_out_without_groups_of_two():
    assert "health/agreement" not in caption_health(["a cat", "a dog"], groups=["a", "b"])
    assert "health/agreement" not in caption_health(["a cat", "a dog"])


def test_truncated_share_and_reward_shares_of_the_weighted_magnitude():
    health = caption_health(
        ["a cat", "a dog"],
        truncated=[True, False],
        rewards={"grounding": [0.5, 0.5], "length": [-1.0, float("nan")]},
        weights={"grounding": 1.0, "length": 2.0},
    )
    assert health["health/truncated"] == 0.5
    # |1*0.5| + |1*0.5| = 1 against |2*-1| = 2 (the NaN is a skipped caption)
    assert health["health/reward_share/grounding"] == pytest.approx(1 / 3)
    assert health["health/reward_share/length"] == pytest.approx(2 / 3)


def test_empty_or_missing_captions_do_not_fail():
    assert caption_health([]) == {}
    health = caption_health([None, ""], groups=[0, 0])
    assert health["health/mean_words"] == 0.0 and health["health/repeated"] == 0.0

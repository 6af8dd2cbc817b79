"""Counterfactual phrase grounding: a phrase is trusted when the caption scores worse with that phrase made
wrong. Real-style captions with a scorer whose truth is known; ShapesCap with the trained scorer (slow)."""

import pytest

from rewards import build_reward
from rewards.counterfactual import CounterfactualGroundingReward, phrase_variants, word_swaps
from rewards.phrases import STOPWORDS, words


class KnownScorer:
    """An image is the set of words true of it; a text scores one point per distinct true word it uses and
    loses one per word that is not true (stop words aside), as a grounding scorer would, only exactly."""

    def __init__(self) -> None:
        self.calls = 0

    def score(self, texts, image, image_id=None, **kwargs):
        self.calls += 1
        out = []
        for text, truth in zip(texts, image):
            named = {w.rstrip("s") for w in words(text) if w not in STOPWORDS}
            out.append(len(named & truth) - len(named - truth))
        return out


PARK = frozenset({"two", "dog", "red", "ball", "wooden", "bench"})


def call(reward, captions, truth=PARK, ids=None):
    return reward(
        prompts=None,
        completions=[[{"role": "assistant", "content": c}] for c in captions],
        completion_ids=None,
        image=[truth] * len(captions),
        image_id=ids or ["park"] * len(captions),
        log_metric=lambda *a: None,
    )


def reward(mode="sum", **options):
    return CounterfactualGroundingReward(KnownScorer(), mode=mode, **options)


def test_variants_swap_one_word_of_one_phrase_in_place():
    variants = dict(phrase_variants("Two dogs playing with a red ball next to a wooden bench."))
    assert list(variants) == ["two dogs", "red ball", "wooden bench"]
    assert "two dogs playing with a blue ball next to a wooden bench." in variants["red ball"]
    assert "two cats playing with a red ball next to a wooden bench." in variants["two dogs"]
    assert "three dogs playing with a red ball next to a wooden bench." in variants["two dogs"]
    bench = variants["wooden bench"]  # "wooden" is in no list: only the noun changes, to furniture
    assert "two dogs playing with a red ball next to a wooden chair." in bench
    assert all(v.startswith("two dogs playing with a red ball next to a wooden ") and "bench" not in v for v in bench)
    # the second of two identical phrases is changed where it stands, not at the first mention
    second = phrase_variants("a red circle and a red circle")[1][1]
    assert "a red circle and a blue circle" in second and "a blue circle and a red circle" not in second


def test_word_lists_are_generic_and_keep_plurals():
    assert "purple" in word_swaps("red") and "red" not in word_swaps("red")
    assert word_swaps("small") == ["large"]
    assert word_swaps("dogs")[0] == "cats" and "men" not in word_swaps("dogs")
    assert word_swaps("women") and all(w.endswith(("men", "s", "people", "children")) for w in word_swaps("women"))
    assert word_swaps("wooden") == []  # not in any list: no verdict, not a guess


@pytest.mark.parametrize(
    "right, wrong",
    [
        ("Two dogs with a red ball.", "Two dogs with a blue ball."),  # wrong colour
        ("A dog on a wooden bench.", "A dog on a wooden chair."),  # wrong noun of the same kind
        ("Two dogs with a red ball.", "Three dogs with a red ball."),  # wrong count
        ("A dog with a red ball.", "A dog with a red ball and a dog."),  # the same object twice
        ("A dog with a red ball.", "A dog with a red ball and a cat."),  # an object that is not there
    ],
)
@pytest.mark.parametrize("mode", ["sum", "penalty", "precision"])
def test_a_wrong_phrase_ranks_below_the_right_caption(right, wrong, mode):
    r = reward(mode)
    assert call(r, [right])[0] > call(r, [wrong])[0]


def test_modes_score_by_hand():
    captions = ["A dog with a red ball.", "A dog with a blue ball and a dog."]
    # First caption, S = 3: "dog" against its best variant ("cat": 1) -> margin 2; "red ball" against "orange
    # ball" (1) -> 2. Second, S = 1: "dog" against "a cat ... and a dog" (0) -> 1; "blue ball" against "red ball"
    # (3) -> -2, refuted; the second "dog" (margin 1) is a repeat. The scale is the median positive margin, 1.5
    # (2, 2, 1, 1); relative margins are capped to [-1, 1].
    assert call(reward("precision"), captions) == [1.0, pytest.approx(1 / 3)]
    assert call(reward("coverage"), captions) == [2.0, 1.0]
    assert call(reward("sum"), captions) == [2.0, pytest.approx(1 / 1.5 - 1.0 - 1.0)]
    assert call(reward("penalty"), captions) == [0.0, -2.0]


def test_mask_long_takes_coverage_from_a_long_caption_with_a_refuted_phrase():
    group = ["A dog.", "A dog with a red ball.", "Two dogs with a red ball and a blue bench."]
    plain = call(reward("coverage"), group)
    masked = call(reward("coverage", mask_long=True), group)
    assert plain[2] >= 2 and masked[2] == 0.0  # three phrases > median two, "blue bench" refuted
    assert masked[:2] == plain[:2]
    right_long = "Two dogs with a red ball and a wooden chair."  # "chair" refuted too: still masked
    assert call(reward("coverage", mask_long=True), [*group[:2], right_long])[2] == 0.0


def test_a_phrase_the_lists_cannot_change_gets_no_verdict():
    assert call(reward("sum"), ["A wooden thing."]) == [0.0]
    assert call(reward("precision"), ["A wooden thing."]) == [0.0]


def test_builds_by_name_and_refuses_a_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        build_reward({"name": "counterfactual_grounding", "mode": "recall"})


@pytest.mark.slow
def test_ranks_shapescap_errors_with_the_trained_scorer():
    from shapescap.ranking import reward_ranking

    entry = {"name": "counterfactual_grounding", "model": "tiny:shapes-clip", "mode": "sum"}
    wins = reward_ranking([entry], n=100)
    assert wins["colour"] > 0.8 and wins["shape"] > 0.7 and wins["repeat"] > 0.8

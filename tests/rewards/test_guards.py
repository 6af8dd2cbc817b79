"""Guards: length window, repetition (n-grams and repeated content phrases), degenerate text, robustness."""

import math

import pytest

from data.images import to_rgb
from rewards import build_reward
from rewards.common import completion_text
from rewards.guards import phrases, repeated_phrases, words


def call(func, captions, **columns):
    completions = [[{"role": "assistant", "content": c}] for c in captions]
    metrics = {}
    out = func(
        prompts=columns.pop("prompts", None),
        completions=completions,
        completion_ids=None,
        log_metric=metrics.__setitem__,
        **columns,
    )
    return out, metrics


def test_length_window_is_soft():
    f = build_reward({"name": "length", "min_words": 4, "max_words": 8})
    out, _ = call(
        f,
        [
            "a red circle",
            "a large red circle",
            "one two three four five six seven eight",
            " ".join(["word"] * 12),
            " ".join(["word"] * 100),
        ],
    )
    assert out[1] == out[2] == 0.0
    assert out[0] == pytest.approx(-0.25)
    assert out[3] == pytest.approx(-0.5)
    assert out[4] == -1.0  # capped


@pytest.mark.parametrize(
    "hacked, clean",
    [
        ("a red square and a red square", "a red square"),  # repeated object
        ("a red square red square", "a red square"),  # run-on: no repeated word trigram
        ("a red triangle and a yellow triangle red triangle", "a red triangle and a yellow triangle"),
        ("a purple circle and a red square purple circle", "a purple circle and a red square"),
        ("a small blue circle, a red square and a small blue circle", "a small blue circle and a red square"),
        ("a square and a square", "a square"),
        ("a cat on the the sofa", "a cat on the sofa"),
        ("a red square red square red square", "a red square red square"),  # more repetition costs more
        # spelled to slip past string matching: the guard reads what a person reads
        ("a red square and one more red square", "a red square and a blue circle"),
        ("a red square and a second red square", "a red square and a blue circle"),
        ("a red-square and a red-square", "a red-square"),
        ("a red square and a red\u200bsquare", "a red square"),
        ("a red square and a r\u0435d square", "a red square"),  # Cyrillic е
        ("a red square and a ｒｅｄ square", "a red square"),  # full-width letters
    ],
)
def test_repetition_penalises_repeated_content_phrases(hacked, clean):
    f = build_reward({"name": "repetition"})
    (h, c), _ = call(f, [hacked, clean])
    assert h <= c - 0.9, (h, c)


def test_repetition_is_bounded_so_one_degenerate_sample_cannot_flatten_its_group():
    f = build_reward({"name": "repetition"})
    group = [
        "a red square",
        "a red square and a blue circle",
        "a red square and a red square",
        "a blue circle and a blue circle and a blue circle",
        " ".join(["a red square"] * 20),
    ]
    scores, _ = call(f, group)
    assert min(scores) == -3.0 and scores[-1] == -3.0
    assert scores[0] == scores[1] == 0.0 and -3.0 < scores[2] < scores[1]
    # GRPO's group-normalised advantages: the honest captions stay clearly apart from the one repeat
    mean = sum(scores) / len(scores)
    std = (sum((x - mean) ** 2 for x in scores) / (len(scores) - 1)) ** 0.5
    advantages = [(x - mean) / std for x in scores]
    assert advantages[1] - advantages[2] > 0.5, advantages
    assert f(completions=[""])[0] == -3.0  # an empty caption never out-scores a repetitive one


def test_distinct_ngram_term():
    f = build_reward({"name": "repetition"})
    (looped, plain), _ = call(f, ["it is what it is what it is what it is", "it is what it is"])
    assert looped < plain <= 0.0 and looped > -1.0  # no content phrase here: only the n-gram term


def test_trigram_penalty_alone_misses_the_run_on():
    """Why the phrase rule exists: TRL's distinct-trigram penalty does not see "red square red square"."""
    from trl.rewards import get_repetition_penalty_reward

    tokens = words("a red square red square")
    ids = [[tokens.index(t) for t in tokens]]
    assert get_repetition_penalty_reward(ngram_size=3)(completion_ids=ids) == [0.0]
    assert repeated_phrases("a red square red square") >= 1
    assert phrases("a large red circle, next to a small square") == [("large", "red", "circle"), ("small", "square")]


@pytest.mark.parametrize(
    "caption",
    [
        "a red square and a blue square",
        "a red square, a red circle and a red triangle",
        "a large red circle next to a small red circle",  # sizes tell the two circles apart
        "a red circle and a small red circle",
        "A man in a red shirt talks to a man in a blue shirt.",
        "two dogs play on the grass near a tree",
    ],
)
def test_repetition_leaves_honest_captions_alone(caption):
    f = build_reward({"name": "repetition"})
    (score,), _ = call(f, [caption])
    assert score > -0.3, score


def test_degenerate_text():
    f = build_reward({"name": "degenerate"}, prompt="Describe this image.")
    captions = {
        "a red circle on a white background": 0.0,
        "!!! ... 123 ???": -1.0,  # no letters
        "1 2 3 4 5 a": -1.0,  # almost no letters
        "Describe this image.": -1.0,  # prompt echo
        "describe this image: a red circle": -1.0,
        "Describe the image": -1.0,  # near echo
        "a red circle<|im_end|>": -1.0,
        "a red circle<end_of_utterance>": -1.0,
        "a red circle\nUser: and now?": -1.0,
        "Assistant: a red circle": -1.0,
        "<row_1_col_1> a red circle": -1.0,
        "a red circle </s>": -1.0,
    }
    out, metrics = call(f, list(captions))
    assert out == list(captions.values())
    assert metrics["rewards/degenerate/echo"] == pytest.approx(3 / 12)
    assert metrics["rewards/degenerate/template"] == pytest.approx(6 / 12)
    assert metrics["rewards/degenerate/no_letters"] == pytest.approx(2 / 12)


def test_degenerate_uses_the_prompt_of_the_call():
    f = build_reward({"name": "degenerate"})  # no prompt at build time
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    out, _ = call(f, ["What is in the picture?", "a dog"], prompts=[prompt, prompt])
    assert out == [-1.0, 0.0]


@pytest.mark.parametrize(("name", "floor"), [("length", -1.0), ("repetition", -3.0), ("degenerate", -1.0)])
def test_empty_and_non_string_completions_score_the_floor(name, floor):
    f = build_reward({"name": name})
    completions = [[{"role": "assistant", "content": c}] for c in ["", "   \n\t", None, 42]]
    completions += ["", "a plain string completion is fine too", {"content": None}]
    out = f(completions=completions)
    assert out[:4] == [floor] * 4 and out[4] == floor and out[6] == floor
    assert math.isfinite(out[5])
    assert f(completions=[]) == []


def test_nonfinite_scores_are_replaced_and_counted():
    f = build_reward({"name": "length"})
    f.score = lambda texts, **kw: [float("nan"), float("inf"), -float("inf"), 0.5]
    out, metrics = call(f, ["a", "b", "c", "d"])
    assert out == [-1.0, -1.0, -1.0, 0.5]
    assert metrics["rewards/length/nonfinite"] == 3.0


def test_completion_text_forms():
    assert completion_text("  hi ") == "hi"
    assert completion_text([{"role": "assistant", "content": "a dog"}]) == "a dog"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]) == "a cat"
    assert completion_text([{"role": "assistant", "content": ""}]) is None
    assert completion_text(None) is None and completion_text(3.5) is None


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "1", "P", "CMYK", "I;16", "I", "F", "YCbCr", "RGB"])
def test_images_in_any_mode_become_rgb(mode):
    import numpy as np
    from PIL import Image

    base = Image.new("RGB", (16, 12), (200, 30, 30))
    if mode == "I;16":
        image = Image.fromarray((np.arange(16 * 12).reshape(12, 16) * 300).astype(np.uint16))
        assert image.mode == "I;16"
    elif mode == "P":
        image = base.convert("P")
        image.info["transparency"] = 0
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (16, 12)
    if mode == "I;16":  # 16-bit range is stretched, not clipped to white
        assert len(set(rgb.getdata())) > 10

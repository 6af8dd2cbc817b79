"""Reference metrics (CIDEr-D, BLEU-4, ROUGE-L) and text statistics."""

import math

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from vizer.metrics import reference_scores, text_stats, tokenize, tokenized

# CIDEr's idf needs a corpus: with one image every n-gram has idf log(1/1) = 0.
REFS = {
    "a": ["a large red circle on the left and a small blue square"],
    "b": ["two dogs play with a frisbee in a sunny park"],
    "c": ["a man rides a bicycle down a busy city street"],
    "d": ["a plate of pasta with tomato sauce on a wooden table"],
}


def test_tokenizer_lowercases_and_drops_punctuation_like_ptb():
    assert tokenize("A dog's ball, (red).") == ["a", "dog", "'s", "ball", "red"]
    assert tokenize("Don't stop -- it's a T-shirt!") == ["do", "n't", "stop", "it", "'s", "a", "t-shirt"]
    assert tokenize("  ") == [] and tokenized("Hello,   World!") == "hello world"


def test_identical_candidates_score_the_maximum():
    corpus, each = reference_scores({k: v[0].upper() + "." for k, v in REFS.items()}, REFS)
    assert corpus["cider_d"] == pytest.approx(10.0)  # pycocoevalcap scales CIDEr-D by 10
    assert corpus["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert corpus["rouge_l"] == pytest.approx(1.0)
    assert all(s["cider_d"] == pytest.approx(10.0) for s in each.values())


def test_unrelated_candidates_score_near_zero():
    unrelated = {
        "a": "bananas ripen slowly in autumn",
        "b": "quantum computers factor numbers",
        "c": "violins sound sweet tonight",
        "d": "snowflakes melt over warm rooftops",
    }
    corpus, _ = reference_scores(unrelated, REFS)
    assert corpus["cider_d"] < 0.01 and corpus["bleu_4"] < 0.01 and corpus["rouge_l"] < 0.01


def test_partial_overlap_lies_between_and_empty_captions_score_zero():
    candidates = {"a": "a red circle and a blue square", "b": "", "c": "a man rides a bicycle", "d": "pasta"}
    corpus, each = reference_scores(candidates, REFS)
    assert 0.0 < corpus["cider_d"] < 10.0 and 0.0 < corpus["rouge_l"] < 1.0
    assert each["b"] == {"cider_d": 0.0, "bleu_4": pytest.approx(0.0, abs=1e-6), "rouge_l": 0.0}


def test_agrees_with_pycocoevalcap_on_the_same_tokenised_input():
    candidates = {
        "a": "A red circle, left; a blue square.",
        "b": "Dogs playing in the park!",
        "c": "A man on a bike.",
        "d": "Pasta on a table with sauce",
    }
    refs = {**REFS, "c": REFS["c"] + ["a cyclist on a street full of cars"]}
    corpus, each = reference_scores(candidates, refs)
    gts = {k: [tokenized(r) for r in v] for k, v in refs.items()}
    res = {k: [tokenized(v)] for k, v in candidates.items()}
    cider, cider_each = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    assert corpus == {
        "cider_d": pytest.approx(cider),
        "bleu_4": pytest.approx(bleu[3]),
        "rouge_l": pytest.approx(rouge),
    }
    assert [each[k]["cider_d"] for k in gts] == pytest.approx(list(cider_each))


def test_only_keys_with_references_are_scored():
    corpus, each = reference_scores({"a": "x", "b": "y", "z": "no refs"}, {"a": ["x"], "b": ["y"], "z": []})
    assert set(each) == {"a", "b"}
    assert reference_scores({"z": "no refs"}, {}) == ({}, {})


def test_text_stats():
    stats = text_stats(["A red circle.", "a red square", ""])
    assert stats["length_words"] == pytest.approx(2.0)
    assert stats["distinct_1"] == pytest.approx(4 / 6)  # a, red, circle, square of six words
    assert stats["distinct_2"] == pytest.approx(3 / 4)  # (a red) twice
    assert stats["vocab_size"] == 4.0
    assert text_stats([""]) == {"length_words": 0.0, "distinct_1": 0.0, "distinct_2": 0.0, "vocab_size": 0.0}
    assert not any(math.isnan(v) for v in stats.values())

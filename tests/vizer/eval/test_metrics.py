"""Reference metrics (CIDEr-D, BLEU-4, ROUGE-L) and text statistics."""

import math
import shutil

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from vizer.eval.metrics import reference_scores, text_stats, tokenize, tokenized

# CIDEr's idf needs a corpus: with one image every n-gram has idf log(1/1) = 0.
REFS = {
    "a": ["a large red circle on the left and a small blue square"],
    "b": ["two dogs play with a frisbee in a sunny park"],
    "c": ["a man rides a bicycle down a busy city street"],
    "d": ["a plate of pasta with tomato sauce on a wooden table"],
}


# What pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1, run here with Java 17) returns for these captions.
PTB = {
    "A man's dog, running (fast) across the field.": "a man 's dog running -lrb- fast -rrb- across the field",
    "Don't you SEE the two red-squares?": "do n't you see the two red-squares",
    "It's a \"big\" cat; it's sleeping...": "it 's a big cat it 's sleeping",
    "Two kids can't play -- they're tired!": "two kids ca n't play they 're tired",
    "A 3.5-inch screen & a U.S. flag.": "a 3.5-inch screen & a u.s. flag",
    "The dog's owner isn't here: he'd left at 5 p.m.": "the dog 's owner is n't here he 'd left at 5 p.m.",
    "Cats' toys [new] and {old}": "cats toys -lsb- new -rsb- and -lcb- old -rcb-",
    "I'm sure we'll go, won't we?": "i 'm sure we 'll go wo n't we",
    "A sign reads 'STOP' at the corner.": "a sign reads stop at the corner",
    "Mr. Smith's car is 4x4": "mr. smith 's car is 4x4",
    "e.g. a tree, i.e. an oak": "e.g. a tree i.e. an oak",
    "A  dog\nand a cat": "a dog and a cat",
    "The 'red' ball's color": "the red ball 's color",
    "3 o'clock; 50% off!": "3 o'clock 50 % off",
}
# The one difference left: PTB splits rock'n'roll into "rock 'n' roll"; ours keeps "rock'n'roll".


@pytest.mark.parametrize("text", list(PTB))
def test_tokenizer_matches_pycocoevalcaps_ptb_tokenizer(text):
    assert tokenized(text) == PTB[text]


@pytest.mark.skipif(shutil.which("java") is None, reason="the real PTBTokenizer needs Java")
def test_recorded_ptb_outputs_are_what_the_real_tokenizer_says():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(PTB)})
    assert [out[i][0] for i in range(len(PTB))] == list(PTB.values())


def test_tokenizer_edge_cases():
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


def test_per_image_scores_stay_with_their_image():
    # Every image gets a caption of a different quality (its own reference whole or cut short, another
    # image's text), so any mis-keying moves a score to the wrong key; the ids sort differently as strings and
    # as numbers, and an image without references sits between the others.
    ids = ["img2", "img10", "norefs", "img1", "img33"]
    refs = {"img2": REFS["a"], "img10": REFS["b"], "norefs": [], "img1": REFS["c"], "img33": REFS["d"]}
    words = {k: refs[k][0].split() for k in ids if refs[k]}
    candidates = {
        "img2": " ".join(words["img2"]),
        "img10": REFS["d"][0],  # img33's text, not its own
        "norefs": "a large red circle on the left and a small blue square",
        "img1": " ".join(words["img1"][:7]),
        "img33": " ".join(words["img33"][:4]),
    }
    _, each = reference_scores(candidates, refs)
    assert list(each) == ["img2", "img10", "img1", "img33"]
    # ROUGE-L and BLEU-4 of one caption do not depend on the rest of the set: score each image alone
    alone = {k: reference_scores({k: candidates[k]}, {k: refs[k]})[1][k] for k in each}
    rouge = [alone[k]["rouge_l"] for k in each]
    assert min(abs(a - b) for i, a in enumerate(rouge) for b in rouge[i + 1 :]) > 0.05, "scores must differ"
    for k in each:
        assert each[k]["rouge_l"] == pytest.approx(alone[k]["rouge_l"]), k
        assert each[k]["bleu_4"] == pytest.approx(alone[k]["bleu_4"], abs=1e-6), k
    assert each["img2"]["cider_d"] > each["img1"]["cider_d"] > each["img10"]["cider_d"]


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

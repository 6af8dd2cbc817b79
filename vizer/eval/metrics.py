"""Caption metrics: reference-free text statistics and reference metrics (CIDEr-D, BLEU-4, ROUGE-L).

The reference scorers are pycocoevalcap's own pure-Python classes. Only their PTB tokenizer needs Java,
so `tokenize` stands in for it: lowercase, contractions split the PTB way, brackets as PTB's -lrb- tokens,
punctuation dropped (pycocoevalcap's PUNCTUATIONS list). tests/vizer/test_metrics.py checks it against the
real PTBTokenizer where Java is installed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

_DROP = set(PUNCTUATIONS) | set('"')
# PTB writes brackets as tokens that pycocoevalcap keeps (its punctuation list has them only in upper case).
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_CONTRACTIONS = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Kept whole as PTB keeps them: abbreviations with their dots (u.s., p.m., mr.), numbers and hyphenated words
# (3.5-inch, red-square), words with an inner apostrophe (o'clock). A quote mark is its own (dropped) token.
_TOKENS = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b|(?:[a-z]\.){2,}|\b(?:mr|mrs|ms|dr|prof|jr|sr|st|vs)\.|\w+(?:[-.']\w+)*|\.\.\.|--|[^\w\s]"
)


def tokenize(text: str) -> list[str]:
    """PTB tokenisation as pycocoevalcap runs it (Stanford PTBTokenizer, lower-cased, punctuation dropped),
    without Java: 'A dog's ball, (red).' -> ['a', 'dog', "'s", 'ball', '-lrb-', 'red', '-rrb-']."""
    text = _CONTRACTIONS.sub(r"\1 \2", text.lower().replace("\n", " "))
    return [_BRACKETS.get(t, t) for t in _TOKENS.findall(text) if t not in _DROP]


def tokenized(text: str) -> str:
    return " ".join(tokenize(text))


def distinct_ngrams(tokens: Sequence[Sequence[str]], n: int) -> float:
    """Corpus distinct-n: unique word n-grams over all word n-grams of all captions (0 when there are none)."""
    grams = [tuple(t[i : i + n]) for t in tokens for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def text_stats(captions: Sequence[str]) -> dict[str, float]:
    """Mean length in words, corpus distinct-1/2 (unique n-grams / all n-grams), vocabulary size."""
    tokens = [tokenize(c) for c in captions]
    stats = {"length_words": sum(map(len, tokens)) / max(len(tokens), 1)}
    for n in (1, 2):
        stats[f"distinct_{n}"] = distinct_ngrams(tokens, n)
    stats["vocab_size"] = float(len({w for t in tokens for w in t}))
    return stats


def reference_scores(
    candidates: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Corpus CIDEr-D, BLEU-4, ROUGE-L and per-key scores, for the keys that have references.

    CIDEr's idf comes from the references of the whole set: score a set, not single captions.
    """
    keys = [k for k in candidates if references.get(k)]
    if not keys:
        return {}, {}
    res = {k: [tokenized(candidates[k])] for k in keys}
    gts = {k: [tokenized(r) for r in references[k]] for k in keys}
    return score_tokenized(gts, res)


def score_tokenized(
    gts: dict[str, list[str]], res: dict[str, list[str]]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """pycocoevalcap's scorers on already tokenised text (space-joined tokens)."""
    cider, cider_each = Cider().compute_score(gts, res)
    bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    corpus = {"cider_d": float(cider), "bleu_4": float(bleu[3]), "rouge_l": float(rouge)}
    per_key = {
        k: {"cider_d": float(c), "bleu_4": float(b), "rouge_l": float(r)}
        for k, c, b, r in zip(gts, cider_each, bleu_each[3], rouge_each)
    }
    return corpus, per_key


def clip_scores(
    scorer,
    images: Sequence,
    captions: Sequence[str],
    references: Sequence[Sequence[str]],
    image_ids: Sequence[str] | None = None,
) -> tuple[list[float], list[float | None]]:
    """CLIP-S and RefCLIP-S (Hessel et al. 2021) per caption, with the `grounding` reward plugin as scorer.

    CLIP-S = w * max(cos(image, prefix + caption), 0) is the plugin's own `clip_s` score. RefCLIP-S is the
    harmonic mean of CLIP-S and max(max over references of cos(caption, reference), 0), both texts embedded
    the same way (prefixed), as in the reference implementation; None where an image has no references.
    """
    clip_s = scorer(
        completions=[[{"role": "assistant", "content": c}] for c in captions],
        image=list(images),
        image_id=list(image_ids) if image_ids is not None else None,
    )
    ref_s: list[float | None] = [None] * len(captions)
    rows = [i for i, refs in enumerate(references) if refs]
    if rows:
        candidates = scorer.encode_texts([captions[i] for i in rows])
        flat = [r for i in rows for r in references[i]]
        refs = scorer.encode_texts(flat)
        start = 0
        for k, i in enumerate(rows):
            n = len(references[i])
            best = max(float((refs[start : start + n] @ candidates[k]).max()), 0.0)
            start += n
            ref_s[i] = 2 * clip_s[i] * best / (clip_s[i] + best) if clip_s[i] + best > 0 else 0.0
    return clip_s, ref_s

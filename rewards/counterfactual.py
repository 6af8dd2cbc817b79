"""Counterfactual phrase grounding: a phrase is trusted when the caption scores worse with that phrase made wrong.

A whole-caption similarity rises when a wrong object is added to a correct caption, and leaving a phrase out
(leave-one-out) often changes the score too little to tell a true phrase from a wrong one. Here each object
phrase is changed into wrong variants of itself — a colour, size or count word swapped, or its noun swapped for
one of the same kind (a dog for a cat, a square for a circle) — and the caption is scored with each variant by
the grounding scorer. A true phrase beats all its variants; a wrong one ("a red circle" where the circle is
orange) loses to the variant that names the truth; a repeated phrase gains little over its variants because its
first mention still stands. The margin of phrase k is S(caption) - max over its variants S(variant).

The word lists are generic English (colours, sizes, counts, common nouns by kind), not any dataset's vocabulary;
a phrase without a word from them gets no verdict.

Modes (one reward each; combine them as separate rewards, e.g. with TRL's `normalize_then_sum`):
- `penalty`: each refuted phrase costs its margin (relative to the typical margin of a verified phrase, at most 1).
- `sum`: each phrase adds its relative margin, capped to [-1, 1]: verified objects earn, refuted ones cost.
- `precision`: the share of the caption's phrases that are verified (a repeat counts as not verified).
- `coverage`: how many distinct phrases are verified. With `mask_long`, a caption naming more phrases than
  its group's median earns no coverage unless every phrase is verified (length-conditional masking, BalCapRL).
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from typing import Any, Literal

from .common import Reward, call_images, group_ids
from .grounding import GroundingReward, grounding
from .phrases import normalise, object_phrases, phrase_key
from .registry import checks_options

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey")
SIZES = {"small": "large", "large": "small", "big": "small", "little": "big", "tiny": "huge", "huge": "tiny"}
SIZES |= {"tall": "short", "short": "tall", "long": "short", "wide": "narrow", "narrow": "wide"}
COUNTS = ("one", "two", "three", "four", "five", "six")
NOUN_KINDS = (
    ("circle", "square", "triangle", "rectangle", "star", "heart", "oval", "diamond"),
    ("dog", "cat", "horse", "cow", "sheep", "bird", "bear", "elephant", "zebra", "giraffe"),
    ("man", "woman", "boy", "girl", "child", "person"),
    ("car", "bus", "truck", "train", "bicycle", "motorcycle", "boat", "airplane"),
    ("chair", "table", "sofa", "bed", "bench", "desk"),
    ("pizza", "sandwich", "cake", "apple", "banana", "donut"),
    ("tree", "flower", "bush", "plant"),
    ("cup", "bowl", "plate", "bottle", "glass", "vase"),
)
NOUNS = {noun: kind for kind in NOUN_KINDS for noun in kind}
MODES = ("penalty", "sum", "precision", "coverage")


IRREGULAR = {"man": "men", "woman": "women", "child": "children", "person": "people", "sheep": "sheep"}
SINGULAR = {plural: noun for noun, plural in IRREGULAR.items()} | {"buses": "bus", "glasses": "glass"}


def _plural(noun: str) -> str:
    return IRREGULAR.get(noun) or noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def word_swaps(word: str, limit: int = 8) -> list[str]:
    """Wrong variants of one word: other colours, the opposite size, neighbouring counts, nouns of the same kind
    (a plural stays plural). Empty for a word the lists do not know."""
    if word in COLOURS or word == "gray":
        return [c for c in COLOURS if c not in (word, "grey" if word == "gray" else "")][:limit]
    if word in SIZES:
        return [SIZES[word]]
    if word in COUNTS:
        i = COUNTS.index(word)
        return [COUNTS[j] for j in (i - 1, i + 1) if 0 <= j < len(COUNTS)]
    singular, plural = word, False
    if word not in NOUNS:
        singular = SINGULAR.get(word) or phrase_key(word)
        plural = singular in NOUNS
    if singular in NOUNS:
        others = [n for n in NOUNS[singular] if n != singular][:limit]
        return [_plural(n) for n in others] if plural else others
    return []


def phrase_variants(text: str, limit: int = 8) -> list[tuple[str, list[str]]]:
    """For each object phrase of `text`, in order: (phrase, the caption with that phrase made wrong in each way).

    Variants change one word of the phrase where it stands in the caption (lower-cased), so the scorer reads a
    caption of the same form. A phrase the word lists cannot change has no variants."""
    lowered = normalise(text).lower()
    out, cursor = [], 0
    for phrase in object_phrases(text):
        words = phrase.split()
        pattern = r"\b" + r"[\s\-]+".join(map(re.escape, words)) + r"\b"
        found = re.compile(pattern).search(lowered, cursor)
        if found is None:  # the phrase reads differently in the text: judge it on its own words
            start, end, base = 0, len(phrase), phrase
        else:
            start, end, base = found.start(), found.end(), lowered
            cursor = end
        variants = []
        for i, word in enumerate(words):
            for swap in word_swaps(word, limit):
                changed = " ".join(words[:i] + [swap] + words[i + 1 :])
                variants.append(base[:start] + changed + base[end:])
        out.append((phrase, variants[:limit] if found is None else variants))
    return out


def check_counterfactual(mode: str = "penalty", max_variants: int = 8, max_phrases: int = 12, **_: Any) -> None:
    if mode not in MODES:
        raise ValueError(f"counterfactual_grounding: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if max_variants < 1 or max_phrases < 1:
        raise ValueError("counterfactual_grounding: max_variants and max_phrases must be at least 1")


class CounterfactualGroundingReward(Reward):
    __name__ = "counterfactual_grounding"
    floor = 0.0  # an empty caption names nothing wrong; the length and degenerate guards judge emptiness

    def __init__(
        self,
        scorer: GroundingReward,
        *,
        mode: str = "penalty",
        mask_long: bool = False,
        max_variants: int = 8,
        max_phrases: int = 12,
        group_column: str = "image_id",
    ) -> None:
        check_counterfactual(mode, max_variants, max_phrases)
        self.scorer, self.mode, self.mask_long = scorer, mode, bool(mask_long)
        self.max_variants, self.max_phrases, self.group_column = int(max_variants), int(max_phrases), group_column
        self.scale: float | None = None  # the typical margin of a verified phrase, carried across calls

    def margins(
        self, texts: list[str | None], images: list[Any], ids: list[Any] | None
    ) -> list[list[tuple[str, float | None]]]:
        """Per caption, per object phrase: (its phrase_key, S(caption) - max S(variant)), the margin None for a
        phrase without variants."""
        queries, owner, layout, keys = [], [], [], []
        for i, text in enumerate(texts):
            phrases = phrase_variants(text, self.max_variants)[: self.max_phrases] if text else []
            keys.append([phrase_key(p) for p, _ in phrases])
            layout.append([len(v) for _, v in phrases])
            if any(layout[-1]):
                queries.append(text)
                owner.append(i)
                for _, variants in phrases:
                    queries += variants
                    owner += [i] * len(variants)
        if not queries:
            return [[(k, None) for k in row] for row in keys]
        scores = self.scorer.score(
            queries, image=[images[i] for i in owner], image_id=[ids[i] for i in owner] if ids else None
        )
        out, pos = [], 0
        for sizes, row_keys in zip(layout, keys, strict=True):
            if not any(sizes):
                out.append([(k, None) for k in row_keys])
                continue
            full, pos = scores[pos], pos + 1
            row: list[tuple[str, float | None]] = []
            for n, key in zip(sizes, row_keys, strict=True):
                row.append((key, full - max(scores[pos : pos + n]) if n else None))
                pos += n
            out.append(row)
        return out

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        images, ids = call_images(kwargs, self.__name__)
        margins = self.margins(texts, images, ids)
        positive = [m for row in margins for _, m in row if m is not None and m > 0]
        if positive:
            self.scale = statistics.median(positive)
        scale = self.scale or 1.0
        # per caption, per judged phrase: its margin relative to a verified phrase's, capped to [-1, 1]; a repeat
        # of an earlier phrase is never evidence (its first mention still stands), so it counts as refuted
        judged = []
        for row in margins:
            seen, rel = set(), []
            for key, margin in row:
                if margin is not None:
                    rel.append(-1.0 if key in seen else max(min(margin / scale, 1.0), -1.0))
                seen.add(key)
            judged.append((rel, len(row)))
        if self.mode == "penalty":
            scores = [sum(min(r, 0.0) for r in rel) for rel, _ in judged]
        elif self.mode == "sum":
            scores = [sum(rel) for rel, _ in judged]
        elif self.mode == "precision":
            scores = [sum(r > 0 for r in rel) / len(rel) if rel else 0.0 for rel, _ in judged]
        else:
            scores = [float(sum(r > 0 for r in rel)) for rel, _ in judged]
            if self.mask_long:
                scores = self._mask_long(scores, judged, kwargs)
        log_metric = kwargs.get("log_metric")
        total = sum(len(rel) for rel, _ in judged)
        if log_metric is not None and total:
            log_metric(f"rewards/{self.__name__}/verified", sum(r > 0 for rel, _ in judged for r in rel) / total)
        return scores

    def _mask_long(self, scores: list[float], judged: list[tuple[list[float], int]], kwargs: dict) -> list[float]:
        """No coverage for a caption naming more phrases than its group's median unless all are verified."""
        groups = group_ids(len(scores), kwargs, self.group_column)
        named: dict[Any, list[int]] = defaultdict(list)
        for g, (_, n) in zip(groups, judged):
            named[g].append(n)
        medians = {g: statistics.median(ns) for g, ns in named.items()}
        return [
            0.0 if n > medians[g] and any(r <= 0 for r in rel) else s
            for s, g, (rel, n) in zip(scores, groups, judged, strict=True)
        ]


@checks_options(check_counterfactual)
def counterfactual_grounding(
    model: str = "openai/clip-vit-base-patch32",
    mode: Literal["penalty", "sum", "precision", "coverage"] = "penalty",
    mask_long: bool = False,
    max_variants: int = 8,
    max_phrases: int = 12,
    group_column: str = "image_id",
    prefix: str = "A photo depicts",
    batch_size: int = 16,
    cache_size: int = 4096,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    device: str = "cpu",
) -> CounterfactualGroundingReward:
    """Judges each object phrase against wrong variants of itself (a swapped colour, size, count or noun).

    Args:
        model: the CLIP/SigLIP-style scorer (as for `grounding`; the same checkpoint is loaded once).
        mode: `penalty`, `sum`, `precision` or `coverage` (see the module docstring).
        mask_long: with `coverage`, a caption naming more phrases than its group's median earns nothing unless
            every judged phrase is verified.
        max_variants: wrong variants per word (colours have up to ten).
        max_phrases: phrases judged per caption (the rest are ignored).
        group_column: the dataset column that says which completions belong together (for `mask_long`).
        prefix: prepended to every scored text.
        batch_size: encoder batch size.
        cache_size: image embeddings kept across steps.
        dtype: scorer precision.
        device: where the scorer runs.
    """
    scorer = grounding(
        model=model, prefix=prefix, batch_size=batch_size, cache_size=cache_size, dtype=dtype, device=device
    )
    return CounterfactualGroundingReward(
        scorer,
        mode=mode,
        mask_long=mask_long,
        max_variants=max_variants,
        max_phrases=max_phrases,
        group_column=group_column,
    )

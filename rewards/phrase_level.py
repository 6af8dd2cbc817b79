"""Phrase-level rewards: judge each object a caption names, not only the caption as a whole.

A whole-caption similarity rewards naming more objects and cannot see which one is wrong: under GRPO the
captions grow, and some of the added objects are duplicates or wrongly bound ("a red circle" when the circle
is orange and the square red).

- `phrase_grounding`: the grounding scorer's verdict on each object phrase, by leave-one-out. A phrase's
  contribution is S(all phrases) - S(all phrases but this one), where S is the scorer's CLIP-S for the image.
  A true object raises S; a wrong or duplicated one adds about nothing or lowers it. Each phrase whose
  contribution falls below `margin` times the typical contribution costs; supported phrases cost nothing,
  so the reward never pays for length and leaves recall to the grounding reward.
- `phrase_agreement`: self-agreement per phrase. A phrase is supported by the other captions sampled for the
  same image that name a phrase close to it (sentence-embedding cosine >= `threshold`); a phrase only one
  sample names is likely invented. A near-duplicate phrase inside one caption counts once and costs
  `repeat_penalty`.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any, Literal

import torch

from .common import Reward, call_images, group_ids, torch_device
from .consistency import encode_sentences
from .grounding import GroundingReward, grounding
from .phrases import object_phrases
from .registry import checks_options


def check_phrase_grounding(margin: float = 0.5, mode: str = "penalty", max_phrases: int = 12, **_: Any) -> None:
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"option 'margin' must be within [0, 1], got {margin}")
    if mode not in ("penalty", "sum"):
        raise ValueError(f"option 'mode' must be penalty or sum, got {mode!r}")
    if max_phrases < 1:
        raise ValueError(f"option 'max_phrases' must be at least 1, got {max_phrases}")


def check_phrase_agreement(
    threshold: float = 0.8, tau: float = 0.5, mode: str = "penalty", repeat_penalty: float = 1.0, **_: Any
) -> None:
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"option 'threshold' is a cosine, within [-1, 1], got {threshold}")
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"option 'tau' is a share of the other captions, within [0, 1], got {tau}")
    if mode not in ("penalty", "sum", "f1"):
        raise ValueError(f"option 'mode' must be penalty, sum or f1, got {mode!r}")
    if repeat_penalty < 0:
        raise ValueError(f"option 'repeat_penalty' must be >= 0, got {repeat_penalty}")


class PhraseGroundingReward(Reward):
    __name__ = "phrase_grounding"
    floor = 0.0  # an empty caption names nothing wrong; the length and degenerate guards judge emptiness

    def __init__(
        self, scorer: GroundingReward, *, margin: float = 0.5, mode: str = "penalty", max_phrases: int = 12
    ) -> None:
        check_phrase_grounding(margin, mode, max_phrases)
        self.scorer, self.margin, self.mode, self.max_phrases = scorer, float(margin), mode, int(max_phrases)
        self.scale: float | None = None  # the typical contribution of a phrase, carried across calls

    def contributions(self, texts: list[str | None], images: list[Any], ids: list[Any] | None) -> list[list[float]]:
        """For each caption, S(all its phrases) - S(all but phrase k), for every phrase k (repeats kept)."""
        variants, owner = [], []
        per_caption = [object_phrases(t)[: self.max_phrases] if t else [] for t in texts]
        for i, found in enumerate(per_caption):
            if not found:
                continue
            variants.append(", ".join(found))
            variants += [", ".join(found[:k] + found[k + 1 :]) for k in range(len(found))]
            owner += [i] * (len(found) + 1)
        if not variants:
            return [[] for _ in texts]
        scores = self.scorer.score(
            variants,
            image=[images[i] for i in owner],
            image_id=[ids[i] for i in owner] if ids else None,
        )
        out, pos = [], 0
        for found in per_caption:
            if not found:
                out.append([])
                continue
            full, rest = scores[pos], scores[pos + 1 : pos + 1 + len(found)]
            out.append([full - s for s in rest])
            pos += len(found) + 1
        return out

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        images, ids = call_images(kwargs, "phrase_grounding")
        deltas = self.contributions(texts, images, ids)
        # The scale of "a phrase that helps" is the scorer's, not ours: measure it on captions of two or more
        # phrases (a lone phrase's contribution is against an empty caption, far larger than any other).
        positive = [d for ds in deltas if len(ds) > 1 for d in ds if d > 0]
        if positive:
            self.scale = statistics.median(positive)
        scale = self.scale or 1.0
        scores, unsupported, total = [], 0, 0
        for ds in deltas:
            # relative contribution, bounded below so one very wrong phrase cannot dominate its group; a lone
            # phrase is left to the whole-caption grounding reward
            if self.mode == "sum":  # every phrase counts, its credit capped: supported ones earn, others cost
                rel = [min(max(d / scale, -1.0), 1.0) for d in ds]
                scores.append(sum(r - self.margin for r in rel))
            else:
                rel = [max(d / scale, -1.0) for d in ds] if len(ds) > 1 else []
                scores.append(sum(min(r - self.margin, 0.0) for r in rel))
            unsupported += sum(r < self.margin for r in rel)
            total += len(rel)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/unsupported", unsupported / total if total else 0.0)
            log_metric(f"rewards/{self.__name__}/phrases", total / len(texts))
        return scores


@checks_options(check_phrase_grounding)
def phrase_grounding(
    model: str = "openai/clip-vit-base-patch32",
    margin: float = 0.5,
    mode: Literal["penalty", "sum"] = "penalty",
    max_phrases: int = 12,
    prefix: str = "A photo depicts",
    batch_size: int = 16,
    cache_size: int = 4096,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    device: str = "cpu",
) -> PhraseGroundingReward:
    """Penalises each object phrase the grounding scorer does not support (leave-one-out).

    Args:
        model: the CLIP/SigLIP-style scorer (as for `grounding`; the same checkpoint is loaded once).
        margin: a phrase costs when its contribution is below `margin` times the median contribution of the
            phrases that help; the cost is the shortfall, at most 1 + margin per phrase.
        mode: `penalty` (only phrases below the margin cost; a lone phrase is left to `grounding`) or `sum`
            (each phrase adds its capped relative contribution minus the margin: supported objects earn up to
            1 - margin, a wrong or repeated one costs).
        max_phrases: phrases judged per caption (the rest are ignored).
        prefix: prepended to every scored text.
        batch_size: encoder batch size.
        cache_size: image embeddings kept across steps.
        dtype: scorer precision.
        device: where the scorer runs.
    """
    scorer = grounding(
        model=model, prefix=prefix, batch_size=batch_size, cache_size=cache_size, dtype=dtype, device=device
    )
    return PhraseGroundingReward(scorer, margin=margin, mode=mode, max_phrases=max_phrases)


class PhraseAgreementReward(Reward):
    __name__ = "phrase_agreement"
    floor = 0.0  # an empty caption names nothing unsupported; the length and degenerate guards judge emptiness

    def __init__(
        self,
        encoder: Any,
        *,
        threshold: float = 0.8,
        tau: float = 0.5,
        mode: str = "penalty",
        repeat_penalty: float = 1.0,
        group_column: str = "image_id",
        batch_size: int = 64,
    ) -> None:
        check_phrase_agreement(threshold, tau, mode, repeat_penalty)
        self.encoder = encoder.eval() if hasattr(encoder, "eval") else encoder
        self.threshold, self.tau, self.mode = float(threshold), float(tau), mode
        self.repeat_penalty, self.group_column, self.batch_size = float(repeat_penalty), group_column, int(batch_size)

    def embed(self, phrases: list[str]) -> dict[str, torch.Tensor]:
        unique = list(dict.fromkeys(phrases))
        return dict(zip(unique, encode_sentences(self.encoder, unique, self.batch_size))) if unique else {}

    def same(self, p: str, q: str, emb: dict[str, torch.Tensor]) -> bool:
        """Whether two phrases name the same thing: embedding cosine at least `threshold`."""
        return float(emb[p] @ emb[q]) >= self.threshold

    def distinct(self, found: list[str], emb: dict[str, torch.Tensor]) -> tuple[list[str], int]:
        """The caption's phrases with near-duplicates merged (first mention kept), and how many were merged."""
        kept: list[str] = []
        for p in found:
            if not any(self.same(p, q, emb) for q in kept):
                kept.append(p)
        return kept, len(found) - len(kept)

    def consensus_f1(self, mine: list[str], others: list[list[str]], emb: dict[str, torch.Tensor]) -> float:
        """F1 of a caption's phrases against the consensus of the other captions: the phrases that at least
        `tau` of them name (near-duplicates merged). Naming a consensus object earns, missing one or naming
        another costs."""
        if not others:
            return 0.0
        consensus: list[str] = []
        for candidate in dict.fromkeys(p for o in others for p in o):
            support = sum(any(self.same(candidate, q, emb) for q in o) for o in others) / len(others)
            if support >= self.tau and not any(self.same(candidate, c, emb) for c in consensus):
                consensus.append(candidate)
        if not mine or not consensus:
            return 0.0
        precision = sum(any(self.same(p, c, emb) for c in consensus) for p in mine) / len(mine)
        recall = sum(any(self.same(c, p, emb) for p in mine) for c in consensus) / len(consensus)
        return 2 * precision * recall / (precision + recall) if precision + recall else 0.0

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        groups = group_ids(len(texts), kwargs, self.group_column)
        found = [object_phrases(t) if t else [] for t in texts]
        emb = self.embed([p for ps in found for p in ps])
        merged = [self.distinct(ps, emb) for ps in found]
        members: dict[Any, list[int]] = defaultdict(list)
        for i, g in enumerate(groups):
            members[g].append(i)
        scores = [0.0] * len(texts)
        supports = []
        for rows in members.values():
            for i in rows:
                others = [merged[j][0] for j in rows if j != i and texts[j] is not None]
                if self.mode == "f1":
                    scores[i] = self.consensus_f1(merged[i][0], others, emb) - self.repeat_penalty * merged[i][1]
                    continue
                total = 0.0
                for p in merged[i][0]:
                    if others:
                        support = sum(any(self.same(p, q, emb) for q in o) for o in others)
                        support /= len(others)
                    else:  # no peer to agree with: no verdict
                        support = self.tau
                    supports.append(support)
                    total += support - self.tau if self.mode == "sum" else min(support - self.tau, 0.0)
                scores[i] = total - self.repeat_penalty * merged[i][1]
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/support", statistics.fmean(supports) if supports else 0.0)
        return scores


@checks_options(check_phrase_agreement)
def phrase_agreement(
    model: str = "sentence-transformers/all-MiniLM-L6-v2",
    threshold: float = 0.8,
    tau: float = 0.5,
    mode: Literal["penalty", "sum", "f1"] = "penalty",
    repeat_penalty: float = 1.0,
    group_column: str = "image_id",
    batch_size: int = 64,
    device: str = "cpu",
) -> PhraseAgreementReward:
    """Agreement of each object phrase with the other captions sampled for the same image.

    Args:
        model: a sentence-transformers model (all-MiniLM-L6-v2 works offline in a recipe, as for `consistency`).
        threshold: cosine from which two phrases name the same thing ("small red circle" ~ "large red circle"
            0.89; "red circle" ~ "orange circle" 0.72 with all-MiniLM-L6-v2).
        tau: the share of the other captions a phrase needs to be trusted.
        mode: `penalty` (only phrases below tau cost: support - tau), `sum` (every phrase adds support - tau,
            so agreed extra objects earn) or `f1` (F1 of the caption's phrases against the consensus of the
            others, the phrases at least tau of them name: missing a consensus object costs too).
        repeat_penalty: cost of each near-duplicate phrase inside one caption.
        group_column: the dataset column that says which completions belong together.
        batch_size: encoder batch size.
        device: where the encoder runs.
    """
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(model, device=torch_device(device))
    return PhraseAgreementReward(
        encoder,
        threshold=threshold,
        tau=tau,
        mode=mode,
        repeat_penalty=repeat_penalty,
        group_column=group_column,
        batch_size=batch_size,
    )

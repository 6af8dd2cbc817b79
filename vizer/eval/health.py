"""Caption health: what a step's sampled captions look like, beyond their reward.

A reward can keep rising while the text degrades (longer captions, the same object named twice, captions that
stop agreeing with each other about the picture). These statistics read only the text, with the project's one
phrase splitter (`rewards.phrases`), so they mean the same on real images, where no truth is known:

- `health/mean_words`: mean caption length in words.
- `health/distinct_1`, `health/distinct_2`: unique word uni-/bigrams over all of them, across the captions.
- `health/repeated`: share of captions that name something twice (`rewards.guards.repeated_phrases`: a
  repeated phrase, a run-on, a doubled word; or the same object phrase twice, by `phrase_key`).
- `health/agreement`: per caption, the share of its object phrases that another caption of the same image
  also names; mean over captions that name any (absent when no image has two captions).
- `health/truncated`: share of captions cut at the length limit (given by the caller).
- `health/reward_share/<name>`: each reward's share of the weighted reward's magnitude, sum |w·r| / all.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Hashable, Mapping, Sequence

from rewards.guards import repeated_phrases
from rewards.phrases import object_phrases, phrase_key, words
from vizer.eval.metrics import distinct_ngrams

PREFIX = "health/"


def names_twice(text: str) -> bool:
    """Whether a caption names the same thing twice: a repeated phrase or run-on, or one object phrase again."""
    if repeated_phrases(text) > 0:
        return True
    keys = Counter(phrase_key(p) for p in object_phrases(text))
    return any(n > 1 for n in keys.values())


def agreement(texts: Sequence[str], groups: Sequence[Hashable]) -> float | None:
    """Mean over captions naming any object of the share of their objects another caption of the group names;
    None when no group has two captions or no caption names anything."""
    keys = [{phrase_key(p) for p in object_phrases(t)} for t in texts]
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    shares = []
    for rows in members.values():
        if len(rows) < 2:
            continue
        for i in rows:
            if not keys[i]:
                continue
            others = set().union(*(keys[j] for j in rows if j != i))
            shares.append(len(keys[i] & others) / len(keys[i]))
    return sum(shares) / len(shares) if shares else None


def reward_shares(rewards: Mapping[str, Sequence[float]], weights: Mapping[str, float]) -> dict[str, float]:
    """Each reward's share of sum |weight * reward| over the captions (a reward may be negative: a guard's
    penalty counts as much as a bonus of the same size). NaN (a reward that skipped a caption) counts as 0."""
    totals = {name: sum(abs(weights.get(name, 1.0) * v) for v in values if v == v) for name, values in rewards.items()}
    whole = sum(totals.values())
    return {name: (t / whole if whole > 0 else 0.0) for name, t in totals.items()}


def caption_health(
    texts: Sequence[str | None],
    groups: Sequence[Hashable] | None = None,
    truncated: Sequence[bool] | None = None,
    rewards: Mapping[str, Sequence[float]] | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The `health/*` metrics of one set of captions; a metric whose input is not given is left out.
    `groups` gives each caption's image (captions of one image are compared for agreement)."""
    if not texts:
        return {}
    texts = [t or "" for t in texts]
    tokens = [words(t) for t in texts]
    out = {
        "mean_words": sum(map(len, tokens)) / len(tokens),
        "distinct_1": distinct_ngrams(tokens, 1),
        "distinct_2": distinct_ngrams(tokens, 2),
        "repeated": sum(map(names_twice, texts)) / len(texts),
    }
    if groups is not None:
        agree = agreement(texts, groups)
        if agree is not None:
            out["agreement"] = agree
    if truncated is not None:
        out["truncated"] = sum(map(bool, truncated)) / len(truncated)
    if rewards:
        for name, share in reward_shares(rewards, weights or {}).items():
            out[f"reward_share/{name}"] = share
    return {PREFIX + k: float(v) for k, v in out.items()}

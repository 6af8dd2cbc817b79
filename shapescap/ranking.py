"""How well a ViZer mapper ranks captions: the fixed test of `shapescap.captions.ranking_pairs`, scored by
cos(F_image, mapper(h_caption)) as the `latent` reward scores it, for comparison with the shapes CLIP's."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from rewards.latent import Mapper, caption_states, image_features, load_vlm
from shapescap.captions import RANKING_KINDS, ranking_pairs
from shapescap.scenes import render, shapes_scenes


@torch.no_grad()
def mapper_ranking(folder: str | Path, n: int = 200, split: str = "test") -> dict[str, float]:
    """Share of held-out scenes where the true caption outscores a wrong one, per kind of error."""
    mapper = Mapper.load(folder)
    model, tokenizer, image_processor = load_vlm(mapper.meta["base_model"], image_options={"do_image_splitting": False})
    scenes = shapes_scenes(split, n)
    target = image_features(model, image_processor, [render(s) for s in scenes])
    wins = {}
    for kind in RANKING_KINDS:
        true, wrong = (mapper(caption_states(model, tokenizer, texts)) for texts in ranking_pairs(scenes, kind))
        wins[kind] = (F.cosine_similarity(true, target) > F.cosine_similarity(wrong, target)).float().mean().item()
    return wins

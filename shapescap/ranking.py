"""How well a scorer ranks captions: the fixed test of `shapescap.captions.ranking_pairs`, scored by a ViZer
mapper (cos(F_image, mapper(h_caption)), as the `latent` reward scores it) or by reward plugins as a recipe
weighs them, for comparison with the shapes CLIP's."""

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


def reward_ranking(entries: list[dict], n: int = 200, split: str = "test") -> dict[str, float]:
    """Share of held-out scenes where the weighted sum of reward `entries` (recipe reward entries) scores the
    true caption above a wrong one, per kind of error; a tie counts half (a penalty-only reward scores many
    pairs alike)."""
    from rewards import build_reward
    from vizer.model_ids import resolve_reward_entry

    funcs = [(build_reward(resolve_reward_entry(e)), float(e.get("weight", 1.0))) for e in entries]
    scenes = shapes_scenes(split, n)
    images = [render(s) for s in scenes]
    ids = [f"{split}/{i}" for i in range(n)]

    def total(texts: list[str]) -> list[float]:
        sums = [0.0] * len(texts)
        for func, weight in funcs:
            values = func(
                prompts=None,
                completions=[[{"role": "assistant", "content": t}] for t in texts],
                completion_ids=None,
                image=images,
                image_id=ids,
            )
            sums = [s + weight * v for s, v in zip(sums, values)]
        return sums

    wins = {}
    for kind in RANKING_KINDS:
        true, wrong = (total(texts) for texts in ranking_pairs(scenes, kind))
        wins[kind] = sum(1.0 if t > w else 0.5 if t == w else 0.0 for t, w in zip(true, wrong)) / n
    return wins

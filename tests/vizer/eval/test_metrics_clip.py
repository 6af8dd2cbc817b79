"""CLIP-S and RefCLIP-S follow Hessel et al. (2021), computed here by hand from the same tiny CLIP."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

from rewards import build_reward
from shapescap.scenes import describe, render, shapes_scenes
from vizer.eval.metrics import clip_scores
from vizer.model_ids import resolve_model_id, resolve_reward_entry


@torch.inference_mode()
def by_hand(path: str, images, captions: list[str], references: list[list[str]]):
    model, tok = CLIPModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    pixels = CLIPProcessor.from_pretrained(path).image_processor(images=images, return_tensors="pt")["pixel_values"]

    def text(texts):
        enc = tok([f"A photo depicts {t}" for t in texts], padding=True, return_tensors="pt")
        return F.normalize(
            model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output,
            dim=-1,
        )

    img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    cand = text(captions)
    clip_s = [2.5 * max(float(c @ v), 0.0) for c, v in zip(cand, img)]
    ref_s = []
    for c, s, refs in zip(cand, clip_s, references):
        best = max(float((text(refs) @ c).max()), 0.0)
        ref_s.append(2 * s * best / (s + best) if s + best > 0 else 0.0)
    return clip_s, ref_s


def test_clip_s_and_refclip_s_match_the_definition():
    path = resolve_model_id("tiny:clip")
    scenes = shapes_scenes("test", 4)
    images = [render(s) for s in scenes]
    captions = ["a red circle", "a small blue square and a green triangle", "nothing to see", describe(scenes[3])]
    references = [[describe(s), "some shapes"] for s in scenes]
    scorer = build_reward(resolve_reward_entry({"name": "grounding", "model": "tiny:clip"}))
    clip_s, ref_s = clip_scores(scorer, images, captions, references, [f"t/{i}" for i in range(4)])
    want_clip, want_ref = by_hand(path, images, captions, references)
    assert clip_s == pytest.approx(want_clip, abs=1e-5)
    assert ref_s == pytest.approx(want_ref, abs=1e-5)
    assert any(v > 0 for v in clip_s)


def test_refclip_s_is_undefined_without_references_and_zero_for_empty_captions():
    images = [render(s) for s in shapes_scenes("test", 2)]
    scorer = build_reward(resolve_reward_entry({"name": "grounding", "model": "tiny:clip"}))
    clip_s, ref_s = clip_scores(scorer, images, ["", "a red circle"], [["a red circle"], []])
    assert clip_s[0] == 0.0 and ref_s == [0.0, None]

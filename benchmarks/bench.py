"""Reward benchmarks, one `name: value` line each.

    python -m benchmarks.bench

- grounding_cache_speedup: captions/s of the grounding reward encoding each distinct image once per call
  (with its embedding cache) over the same reward encoding the image once per completion, as TRL repeats
  it, at G=8. Same scorer, measured side by side, fresh images every call (the cache never hits, so this
  is the per-group saving alone). The scorer has CLIP ViT-B/32's dimensions with random weights.
- grounding_captions_per_s, grounding_naive_captions_per_s: the two sides of that ratio.
- grounding_cached_captions_per_s, grounding_cache_speedup_warm: the same calls again, every image embedding
  cached (images seen before: a second epoch, an eval pass). What is left is the text tower.
- grounding_{naive,shared}_{text,image}_encode_s: seconds each side spent in the text and image towers during
  the timed calls: the ratio's ceiling is set by the text tower, which runs for every caption on both sides.
- consistency_captions_per_s: the consistency reward with all-MiniLM-L6-v2 at G=8.
"""

from __future__ import annotations

import argparse
import os
import random
import time

import torch

from rewards import build_reward
from rewards.grounding import GroundingReward
from shapescap.clip import build_tokenizer
from shapescap.scenes import describe, render, shapes_scenes
from vizer.model_ids import resolve_reward_entry

G = 8
OPENERS = ("a photo of", "an image showing", "a picture of", "there is", "a simple drawing of")
TAILS = ("on a white background", "in the middle of the frame", "next to each other", "", "on a plain wall")


def captions_for(scene, rng: random.Random) -> list[str]:
    """G varied captions for one image, about the length of a real one-sentence caption."""
    return [f"{rng.choice(OPENERS)} {describe(scene)} {rng.choice(TAILS)}".strip() for _ in range(G)]


def vit_b32_scorer():
    """A random CLIP with ViT-B/32's dimensions (CLIPConfig defaults), built in-process: no download."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer()
    config = CLIPConfig(
        text_config={
            "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    return model, tokenizer, processor


def grounding_calls(n_calls: int, images_per_call: int, seed: int = 0, tag: str = "bench") -> list[dict]:
    """Reward calls as TRL makes them; ids carry `tag` so that calls built for different purposes never share
    an id (a shared id would be a cache hit)."""
    rng = random.Random(seed)
    scenes = shapes_scenes("validation", n_calls * images_per_call)
    calls = []
    for c in range(n_calls):
        chunk = scenes[c * images_per_call : (c + 1) * images_per_call]
        images, ids, completions = [], [], []
        for k, scene in enumerate(chunk):
            image = render(scene, 256)
            for text in captions_for(scene, rng):
                images.append(image.copy())  # TRL hands each completion its own decoded copy
                ids.append(f"{tag}-{c}-{k}")
                completions.append([{"role": "assistant", "content": text}])
        calls.append({"completions": completions, "image": images, "image_id": ids})
    return calls


def bench_grounding(n_calls: int = 3, images_per_call: int = 4) -> dict[str, float]:
    model, tokenizer, processor = vit_b32_scorer()
    shared = GroundingReward(model, tokenizer, processor, cache_size=4096)
    naive = GroundingReward(model, tokenizer, processor, cache_size=0, share_images=False)
    warm = grounding_calls(1, 2, seed=99, tag="warmup")[0]
    shared(**warm), naive(**warm)  # first-call overheads out of the timings; other ids than the timed calls
    calls = grounding_calls(n_calls, images_per_call)
    times = {"shared": 0.0, "naive": 0.0, "cached": 0.0}
    encode = {"shared_text": 0.0, "shared_image": 0.0, "naive_text": 0.0, "naive_image": 0.0}
    for name, func in (("shared", shared), ("naive", naive)):  # where each side's time goes
        for part in ("text", "image"):
            method = getattr(func, f"encode_{part}s")

            def timed(batch, method=method, key=f"{name}_{part}"):
                t = time.perf_counter()
                out = method(batch)
                encode[key] += time.perf_counter() - t
                return out

            setattr(func, f"encode_{part}s", timed)
    encodes_before = shared.image_encodes
    for call in calls:  # alternate the two so a noisy machine slows both alike
        for name, func in (("naive", naive), ("shared", shared)):
            t = time.perf_counter()
            func(**call)
            times[name] += time.perf_counter() - t
    assert shared.image_encodes - encodes_before == n_calls * images_per_call, "each timed image encoded once"
    split = dict(encode)  # the timed calls' split; the cached pass below encodes the texts once more
    for call in calls:  # every image of these calls is now cached
        t = time.perf_counter()
        shared(**call)
        times["cached"] += time.perf_counter() - t
    n = sum(len(c["completions"]) for c in calls)
    return {
        "grounding_cache_speedup": times["naive"] / times["shared"],
        "grounding_captions_per_s": n / times["shared"],
        "grounding_naive_captions_per_s": n / times["naive"],
        "grounding_cached_captions_per_s": n / times["cached"],
        "grounding_cache_speedup_warm": times["naive"] / times["cached"],
        # the split that explains the ratio: the text tower runs for every caption on both sides
        "grounding_naive_text_encode_s": split["naive_text"],
        "grounding_naive_image_encode_s": split["naive_image"],
        "grounding_shared_text_encode_s": split["shared_text"],
        "grounding_shared_image_encode_s": split["shared_image"],
    }


def bench_consistency(n_calls: int = 4, groups_per_call: int = 8) -> dict[str, float]:
    reward = build_reward(resolve_reward_entry({"name": "consistency"}))
    rng = random.Random(1)
    scenes = shapes_scenes("validation", n_calls * groups_per_call)
    calls = []
    for c in range(n_calls):
        texts, ids = [], []
        for k in range(groups_per_call):
            texts += captions_for(scenes[c * groups_per_call + k], rng)
            ids += [f"{c}-{k}"] * G
        calls.append({"completions": texts, "image_id": ids})
    reward(**calls[0])  # warm-up
    t = time.perf_counter()
    for call in calls:
        reward(**call)
    return {"consistency_captions_per_s": n_calls * groups_per_call * G / (time.perf_counter() - t)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3, help="reward calls per measurement")
    parser.add_argument("--images", type=int, default=4, help="images per call (each with G=8 captions)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built in-process or shipped offline
    results = {**bench_grounding(args.calls, args.images), **bench_consistency()}
    for name, value in results.items():
        print(f"{name}: {value:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The rewards together, as GRPO sees them: every callable on one batch, weighted and summed per completion.

With the recommended weights, a caption that repeats an object or runs words on never totals more than the
same caption without the repetition, and an empty caption totals below every clean one.
"""

import random

import pytest
import torch

from rewards import build_reward
from shapescap.captions import caption, negative
from shapescap.scenes import render, shapes_scenes
from vizer.model_ids import resolve_reward_entry

WEIGHTS = {"grounding": 1.0, "consistency": 0.5, "length": 0.2, "repetition": 0.5, "degenerate": 1.0}
PROMPT = "Describe this image."
G = 8


def hacks(objs: list, sizes: bool, rng: random.Random) -> list[str]:
    """Repetition hacks of one caption: repeated objects and run-ons."""
    i = rng.randrange(len(objs))
    phrase = caption([objs[i]], sizes)[2:]  # "red square" without the article
    text = caption(objs, sizes)
    return [
        caption(objs[: i + 1] + [objs[i]] + objs[i + 1 :], sizes),  # "a red square and a red square"
        caption(objs + [objs[i]], sizes),  # the object again at the end
        f"{text} {phrase}",  # run-on: "a red square red square"
        f"{text} {phrase} {phrase}",
        f"{text} and {text}",
        caption(objs + objs, sizes),
    ]


def batch(scenes: list) -> tuple[list[str], list[int | None], dict]:
    """G captions per image; `clean_of[k]` is the index of the clean caption that completion k repeats."""
    texts, clean_of, images, ids = [], [], [], []
    for n, scene in enumerate(scenes):
        rng = random.Random(n)
        objs = list(scene.objects)
        sizes = n % 2 == 0
        wrong = negative(scene, rng.choice(["colour", "shape"]), rng, sizes)
        start = len(texts)
        right_hacks, group = hacks(objs, sizes, rng), [caption(objs, sizes), wrong]
        group += rng.sample(right_hacks, 4) + [f"{wrong} {wrong.split(' ', 1)[1]}", ""]
        texts += group
        clean_of += [None, None, start, start, start, start, start + 1, None]
        images += [render(scene)] * G
        ids += [f"combo-{n}"] * G
    columns = {"image": images, "image_id": ids, "truth": [s.to_json() for s in scenes for _ in range(G)]}
    return texts, clean_of, columns


def build(grounding_model: str) -> list:
    entries = [
        {"name": "grounding", "model": grounding_model},
        {"name": "consistency"},
        {"name": "length"},
        {"name": "repetition"},
        {"name": "degenerate"},
    ]
    return [build_reward(resolve_reward_entry({**e, "weight": WEIGHTS[e["name"]]}), prompt=PROMPT) for e in entries]


@pytest.fixture(scope="module")
def funcs():
    return build("tiny:shapes-clip")


def totals(funcs, texts, columns):
    """TRL's `sum_then_normalize`: rewards_per_func weighted by reward_weights and nansum'd per row."""
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]] * len(texts)
    completions = [[{"role": "assistant", "content": t}] for t in texts]
    per_func = torch.tensor(
        [
            f(
                prompts=prompts,
                completions=completions,
                completion_ids=[[0]] * len(texts),
                trainer_state=None,
                log_extra=lambda *a: None,
                log_metric=lambda *a: None,
                **columns,
            )
            for f in funcs
        ]
    ).T
    weights = torch.tensor([WEIGHTS[f.__name__] for f in funcs])
    return (per_func * weights).nansum(dim=1), per_func


def margins(funcs, n_scenes: int = 40) -> tuple[list[float], list[float], list[tuple[str, str]]]:
    """Total(clean) - total(hacked), and the grounding gain of hacking, for every (hacked, clean) pair."""
    texts, clean_of, columns = batch(shapes_scenes("test", n_scenes))
    total, per_func = totals(funcs, texts, columns)
    assert torch.isfinite(per_func).all()
    pairs = [(k, c) for k, c in enumerate(clean_of) if c is not None]
    # and within each group, GRPO's advantage of the hacked caption must be lower than the clean one's
    grouped = total.view(-1, G)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    assert all(advantages[c] > advantages[k] for k, c in pairs)
    return (
        [float(total[c] - total[k]) for k, c in pairs],
        [float(per_func[k, 0] - per_func[c, 0]) for k, c in pairs],
        [(texts[k], texts[c]) for k, c in pairs],
    )


def test_repetition_never_pays(funcs):
    margin, _, pairs = margins(funcs)
    worst = min(range(len(margin)), key=margin.__getitem__)
    print(f"smallest margin clean - hacked: {margin[worst]:.3f} over {len(margin)} pairs")
    assert margin[worst] > 0, pairs[worst]


@pytest.mark.slow
def test_repetition_never_pays_even_when_the_scorer_rewards_it():
    """A shapes CLIP trained without repetition and run-on negatives is gamed by them, as a plain CLIP was;
    the guards still keep every hack below its clean caption."""
    from shapescap.clip import shapes_clip_path

    funcs = build(shapes_clip_path(extra_negatives=("shape", "drop", "add")))
    margin, gain, pairs = margins(funcs)
    assert max(gain) > 0.1  # the scorer alone prefers some hacks
    worst = min(range(len(margin)), key=margin.__getitem__)
    assert margin[worst] > 0, pairs[worst]


def test_empty_caption_totals_below_every_clean_one(funcs):
    texts, clean_of, columns = batch(shapes_scenes("test", 8))
    total, _ = totals(funcs, texts, columns)
    for g in range(0, len(texts), G):
        empty = total[g + G - 1]
        assert texts[g + G - 1] == ""
        assert empty < total[g] and empty < total[g + 1]  # the correct and the wrong clean captions

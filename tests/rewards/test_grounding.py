"""grounding with a tiny CLIP trained by the project on synthetic shapes (cached), plus its mechanics."""

import math
import random

import pytest
import torch

from rewards import build_reward
from shapescap.captions import caption, negative
from shapescap.scenes import COLOURS, SHAPES, render, shapes_scenes
from vizer.model_ids import resolve_reward_entry

N_TEST = 120


@pytest.fixture(scope="module")
def clip_s():
    return build_reward(resolve_reward_entry({"name": "grounding", "model": "tiny:shapes-clip"}))


@pytest.fixture(scope="module")
def contrastive():
    return build_reward(
        resolve_reward_entry(
            {"name": "grounding", "id": "grounding_contrastive", "model": "tiny:shapes-clip", "score": "contrastive"}
        )
    )


def call(func, captions, images, ids=None, **extra):
    metrics = {}
    out = func(
        prompts=None,
        completions=[[{"role": "assistant", "content": c}] for c in captions],
        completion_ids=None,
        image=images,
        image_id=ids,
        log_metric=metrics.__setitem__,
        **extra,
    )
    return out, metrics


def both_swapped(scene, rng):
    """'a red circle' -> 'a blue square': one object with another colour and another shape."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    o = objs[i]
    objs[i] = type(o)(
        rng.choice([c for c in COLOURS if c != o.colour]),
        rng.choice([s for s in SHAPES if s != o.shape]),
        o.size,
        o.x,
        o.y,
    )
    return caption(objs, sizes=False)


def test_correct_captions_outscore_wrong_ones_on_held_out_images(clip_s):
    scenes = shapes_scenes("test", N_TEST)
    kinds = ("both", "colour", "shape", "other")
    wins = {k: 0 for k in kinds}
    for i, scene in enumerate(scenes):
        rng = random.Random(i)
        correct = caption(scene.objects, sizes=False)
        wrong = [
            both_swapped(scene, rng),
            negative(scene, "colour", rng, False),
            negative(scene, "shape", rng, False),
            caption(scenes[(i + 1) % N_TEST].objects, sizes=False),
        ]
        image = render(scene)
        out, _ = call(clip_s, [correct] + wrong, [image] * 5, [f"test-{i}"] * 5)
        for kind, score in zip(kinds, out[1:]):
            wins[kind] += out[0] > score
    accuracy = {k: v / N_TEST for k, v in wins.items()}
    overall = sum(wins.values()) / (N_TEST * len(kinds))
    print(f"ranking accuracy {overall:.3f} {accuracy}")
    assert overall >= 0.9, accuracy
    assert min(accuracy.values()) >= 0.75, accuracy


def test_contrastive_ranks_a_generic_caption_below_a_specific_one(contrastive):
    scenes = shapes_scenes("test", 48)
    generic = "some shapes"
    images = [render(s) for s in scenes for _ in range(2)]
    ids = [f"c-{i}" for i in range(len(scenes)) for _ in range(2)]
    texts = [t for s in scenes for t in (caption(s.objects, sizes=False), generic)]
    out, _ = call(contrastive, texts, images, ids)
    wins = sum(out[2 * i] > out[2 * i + 1] for i in range(len(scenes)))
    assert wins / len(scenes) >= 0.9, wins
    generic_scores = out[1::2]
    assert abs(sum(generic_scores) / len(generic_scores)) < 0.25  # fits everything: about zero


def test_contrastive_borrows_recent_images_when_a_call_has_one_image():
    shared = build_reward(
        resolve_reward_entry({"name": "grounding", "model": "tiny:shapes-clip", "score": "contrastive"})
    )
    # a cache of its own, empty: the scorer's shared one already holds the images of earlier tests
    func = type(shared)(shared.model, shared.tokenizer, shared.image_processor, score="contrastive")
    scenes = shapes_scenes("test", 17)
    image = render(scenes[0])
    specific, generic = caption(scenes[0].objects, sizes=False), "some shapes"
    cold, _ = call(func, [specific, generic], [image] * 2, ["x0"] * 2)
    assert cold[0] > 0 and cold[1] >= 0  # nothing to contrast with yet: plain CLIP-S
    call(func, ["a shape"] * 16, [render(s) for s in scenes[1:]], [f"x{i}" for i in range(1, 17)])
    warm, _ = call(func, [specific, generic], [image] * 2, ["x0"] * 2)
    assert warm[0] > 0.5 and abs(warm[1]) < 0.5 and warm[0] - warm[1] > 0.5


def test_each_distinct_image_is_encoded_once_and_cached():
    shared = build_reward(resolve_reward_entry({"name": "grounding", "model": "tiny:shapes-clip"}))
    # a bounded cache of its own: the scorer's shared one is as large as its largest user asks
    func = type(shared)(shared.model, shared.tokenizer, shared.image_processor, cache_size=3)
    scenes = shapes_scenes("test", 4)
    images = [render(s) for s in scenes]
    texts = [caption(s.objects) for s in scenes]
    # interleaved groups, each image repeated G=4 times as separate copies (as TRL decodes them)
    rows = [k for _ in range(4) for k in range(2)]
    out, _ = call(func, [texts[k] for k in rows], [images[k].copy() for k in rows], [f"id{k}" for k in rows])
    assert func.image_encodes == 2
    assert out[0] == pytest.approx(out[2]) and out[1] == pytest.approx(out[3])  # group by id, not position
    call(func, [texts[0]], [images[0]], ["id0"])
    assert func.image_encodes == 2  # cache hit across calls
    call(func, texts, images, [f"id{k}" for k in range(4)])
    assert func.image_encodes == 4 and len(func.cache) == 3  # bounded
    # without ids the key is the pixels: equal copies share one encoding
    func2 = build_reward(resolve_reward_entry({"name": "grounding", "model": "tiny:shapes-clip"}))
    call(func2, texts[:1] * 4, [images[0].copy() for _ in range(4)])
    assert func2.image_encodes == 1


def test_batching_and_cache_do_not_change_scores(clip_s):
    scenes = shapes_scenes("test", 6)
    images = [render(s) for s in scenes]
    texts = [caption(s.objects) for s in scenes]
    small = build_reward(
        resolve_reward_entry({"name": "grounding", "model": "tiny:shapes-clip", "batch_size": 2, "cache_size": 0})
    )
    a, _ = call(clip_s, texts, images)
    b, _ = call(small, texts, images)
    assert a == pytest.approx(b, abs=1e-5)
    naive = type(clip_s)(clip_s.model, clip_s.tokenizer, clip_s.image_processor, share_images=False)
    c, _ = call(naive, texts, images)
    assert a == pytest.approx(c, abs=1e-5) and naive.image_encodes == len(images)


@pytest.mark.parametrize("with_ids", [True, False])
def test_mixed_cached_and_fresh_images_each_get_their_own_embedding(with_ids):
    """Cache hits and fresh encodes, in shuffled order, score exactly as a reward with no cache at all."""
    import random

    shared = build_reward(resolve_reward_entry({"name": "grounding", "model": "tiny:shapes-clip"}))
    cached = type(shared)(shared.model, shared.tokenizer, shared.image_processor)  # empty: earlier tests fill shared
    # the reference encodes every completion's own image, in order: no sharing, no cache, no row mapping
    uncached = type(cached)(cached.model, cached.tokenizer, cached.image_processor, share_images=False)
    scenes = shapes_scenes("test", 8)
    images = [render(s) for s in scenes]
    texts = [caption(s.objects) for s in scenes]
    ids = [f"img{k}" for k in range(8)]
    call(
        cached,
        [texts[k] for k in (1, 3, 5)],
        [images[k] for k in (1, 3, 5)],
        [ids[k] for k in (1, 3, 5)] if with_ids else None,
    )
    assert cached.image_encodes == 3
    rng = random.Random(0)
    rows = [k for k in range(8) for _ in range(2)]  # every image twice (G=2), old and new mixed
    rng.shuffle(rows)
    # each caption is scored against every image: a row that borrowed a neighbour's embedding would show
    for shift in (0, 1):
        captions = [texts[(k + shift) % 8] for k in rows]
        row_ids = [ids[k] for k in rows] if with_ids else None
        got, _ = call(cached, captions, [images[k].copy() for k in rows], row_ids)
        want, _ = call(uncached, captions, [images[k].copy() for k in rows], row_ids)
        assert got == pytest.approx(want, abs=1e-5)
    assert cached.image_encodes == 3 + 5, "the 3 images seen before came from the cache, the 5 new ones once each"
    assert uncached.image_encodes == 32  # every completion's image, both calls


def test_long_text_is_truncated_not_crashed(clip_s):
    image = render(shapes_scenes("test", 1)[0])
    long = " ".join(["a red circle and a blue square"] * 60)
    out, metrics = call(clip_s, [long, "a red circle"], [image, image])
    assert all(math.isfinite(v) for v in out)
    assert metrics["rewards/grounding/truncated"] == 0.5


def test_floors_and_nonfinite(clip_s):
    image = render(shapes_scenes("test", 1)[0])
    out, _ = call(clip_s, ["", "   ", "a red circle"], [image] * 3)
    assert out[:2] == [0.0, 0.0] and out[2] >= 0.0
    cosine = build_reward(resolve_reward_entry({"name": "grounding", "model": "tiny:shapes-clip", "score": "cosine"}))
    out, _ = call(cosine, [""], [image])
    assert out == [-1.0]
    broken = build_reward(resolve_reward_entry({"name": "grounding", "model": "tiny:shapes-clip"}))
    real = broken.encode_texts
    broken.encode_texts = lambda texts: torch.full_like(real(texts), float("nan"))
    out, metrics = call(broken, ["a red circle", "a blue square"], [image] * 2)
    assert out == [0.0, 0.0] and metrics["rewards/grounding/nonfinite"] == 2.0


def test_images_in_any_mode(clip_s):
    import numpy as np

    base = render(shapes_scenes("test", 1)[0])
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    p = base.convert("P")
    p.info["transparency"] = 0
    i16 = Image_from_uint16(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    images = [rgba, base.convert("L"), p, base.convert("CMYK"), i16, base.convert("1"), base.convert("LA")]
    out, _ = call(clip_s, ["a red circle"] * len(images), images)
    assert all(math.isfinite(v) for v in out)


def Image_from_uint16(array):
    from PIL import Image

    image = Image.fromarray(array)
    assert image.mode == "I;16"
    return image


def test_runs_without_grad_in_eval_mode(clip_s):
    image = render(shapes_scenes("test", 1)[0])
    clip_s.model.train()  # even if someone flipped it, scoring runs in eval mode and builds no graph
    out, _ = call(clip_s, ["a red circle"], [image])
    assert not clip_s.model.training and isinstance(out[0], float)
    assert not clip_s.encode_texts(["a red circle"]).requires_grad


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_any_clip_or_siglip_style_model(kind):
    pytest.importorskip("vizer.tiny")
    func = build_reward(resolve_reward_entry({"name": "grounding", "id": f"grounding_{kind}", "model": f"tiny:{kind}"}))
    assert func.__name__ == f"grounding_{kind}"
    image = render(shapes_scenes("test", 1)[0])
    out, metrics = call(func, ["a red circle", " ".join(["word"] * 300)], [image, image.convert("RGBA")])
    assert all(math.isfinite(v) for v in out) and metrics[f"rewards/grounding_{kind}/truncated"] == 0.5


def test_shapes_clip_training_is_deterministic_and_cached(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import shapescap.clip as sc

    monkeypatch.setenv("VIZER_CACHE", str(tmp_path))
    small = {"vision_steps": 4, "steps": 3, "n_scenes": 32}
    folder = sc.shapes_clip_path(**small)
    assert folder.startswith(str(tmp_path))
    monkeypatch.setattr(sc, "train", lambda *a, **k: pytest.fail("retrained a cached model"))
    assert sc.shapes_clip_path(**small) == folder
    monkeypatch.undo()
    again = tmp_path / "again"
    sc.train(sc.ShapesClipConfig(**small), again)
    first, second = load_file(f"{folder}/model.safetensors"), load_file(f"{again}/model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_grounding_rewards_on_one_scorer_encode_each_distinct_image_once_per_step(monkeypatch):
    """grounding and phrase_grounding (and counterfactual_grounding) read one image cache per scorer."""
    import uuid

    entries = [
        {"name": "grounding", "model": "tiny:shapes-clip"},
        {"name": "phrase_grounding", "model": "tiny:shapes-clip"},
    ]
    rewards = [build_reward(resolve_reward_entry(e)) for e in entries]
    scorer = rewards[0].model
    assert rewards[1].scorer.model is scorer and rewards[1].scorer.cache is rewards[0].cache
    encoded = []
    real = scorer.get_image_features
    monkeypatch.setattr(
        scorer, "get_image_features", lambda **kw: encoded.append(len(kw["pixel_values"])) or real(**kw)
    )
    scenes = shapes_scenes("test", 3)
    images = [render(s) for s in scenes]
    run = uuid.uuid4().hex  # ids no earlier test has cached
    per_step = []
    for pictures in ([0, 1], [0, 1, 2]):  # two steps, G=4: the second repeats two pictures and adds one
        rows = [k for k in pictures for _ in range(4)]
        texts, ids = [caption(scenes[k].objects) for k in rows], [f"{run}/{k}" for k in rows]
        before = sum(encoded)
        for reward in rewards:
            call(reward, texts, [images[k].copy() for k in rows], ids)
        per_step.append(sum(encoded) - before)
    assert per_step == [2, 1], "one encode per distinct image per step, whatever the number of rewards"

"""ViZer's latent alignment on tiny random VLMs: the encoders, the mapper (Stage A), the `latent` reward and the
Stage B trainer (LoRA only, frozen vision path and mapper)."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from rewards.common import image_key
from rewards.latent import LatentReward, Mapper, caption_states, image_features, latent, tokenize_captions
from vizer.objective import (
    ViZerTrainer,
    collate_images,
    collect_pairs_generated,
    completion_mask,
    distinct_2,
    generate_captions,
    hard_negatives,
    train_mapper,
)
from vizer.qwen2vl_processor import load_qwen2vl_processor
from vizer.tiny import build_tiny

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 220),
    "yellow": (230, 220, 40),
    "purple": (140, 40, 180),
    "orange": (240, 140, 20),
}
TEMPLATES = ("a {} image", "a plain {} picture", "{} background", "a {} square")
PROMPT = "Describe this image."


def colour_image(colour: str, rng: random.Random) -> Image.Image:
    """A jittered solid colour with a random grey rectangle: same colour, different pixels."""
    jitter = [max(0, min(255, v + rng.randint(-25, 25))) for v in COLOURS[colour]]
    image = Image.new("RGB", (64, 64), tuple(jitter))
    x, y = rng.randint(0, 40), rng.randint(0, 40)
    ImageDraw.Draw(image).rectangle(
        [x, y, x + rng.randint(6, 20), y + rng.randint(6, 20)], fill=(rng.randint(0, 255),) * 3
    )
    return image


def load(kind: str):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = str(build_tiny(kind))
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path) if kind == "idefics3" else load_qwen2vl_processor(path)
    return model, processor, path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and two torch processes with 2 threads each on 2 cores spin-wait:
    measured here, this file took 124 s next to another test run instead of 14 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def idefics3():
    return load("idefics3")


@pytest.fixture(scope="module")
def toy():
    """60 images, 10 per colour, 2 captions each naming the colour: a pairing the mapper can learn."""
    rng = random.Random(0)
    names = [c for c in COLOURS for _ in range(10)]
    images = [colour_image(c, rng) for c in names]
    pairs = [(i, t.format(c)) for i, c in enumerate(names) for t in rng.sample(TEMPLATES, 2)]
    return names, images, pairs


@pytest.fixture(scope="module")
def trained(idefics3, toy, tmp_path_factory):
    """Stage A on the toy pairing: the mapper, its report and its saved folder."""
    model, processor, path = idefics3
    _, images, pairs = toy
    mapper, report = train_mapper(
        model, processor, images, pairs, epochs=30, lr=3e-3, batch_size=32, heldout_fraction=0.25, seed=0, variant="GT"
    )
    folder = mapper.save(tmp_path_factory.mktemp("mapper"))
    return mapper, report, folder


# ---------------------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("kind", ["idefics3", "qwen2_vl"])
def test_image_features_tell_images_apart_and_match_copies(kind):
    model, processor, _ = load(kind)
    rng = random.Random(1)
    red = colour_image("red", rng)
    drawn = Image.new("RGB", (80, 56), "white")  # another size, and an RGBA copy of it
    ImageDraw.Draw(drawn).ellipse([10, 10, 50, 40], fill="blue")
    images = [red, colour_image("blue", rng), red.copy(), drawn, drawn.convert("RGBA")]
    feats = image_features(model, processor, images, batch_size=2)  # batches split a pair of copies
    assert feats.shape == (5, model.config.text_config.hidden_size) and feats.dtype == torch.float32
    torch.testing.assert_close(feats[0], feats[2])
    torch.testing.assert_close(feats[3], feats[4])
    assert (feats[0] - feats[1]).abs().max() > 1e-2 and (feats[0] - feats[3]).abs().max() > 1e-2
    # one image alone gives the same vector as inside a batch (no pooling across the batch)
    torch.testing.assert_close(image_features(model, processor, [images[1]])[0], feats[1], atol=1e-5, rtol=1e-5)
    assert not model.training


def test_image_features_name_a_model_without_them(idefics3):
    model, processor, _ = idefics3
    with pytest.raises(ValueError, match="LlamaModel has no get_image_features"):
        image_features(model.model.text_model, processor, [Image.new("RGB", (64, 64))])


@pytest.mark.parametrize("kind", ["idefics3", "qwen2_vl"])
def test_caption_states_ignore_padding(kind):
    model, processor, _ = load(kind)
    short, long = "a red square", "a big blue circle on the left of a small green triangle and a yellow line"
    alone = caption_states(model, processor, [short])
    batch = caption_states(model, processor, [short, long, ""])
    torch.testing.assert_close(batch[0], alone[0], atol=1e-5, rtol=1e-5)
    assert (batch[0] - batch[1]).abs().max() > 1e-2
    assert torch.equal(batch[2], torch.zeros_like(batch[2]))  # empty caption: no tokens, zeros, no NaN
    ids, attention, caption = tokenize_captions(processor, [short, long])
    assert caption.sum(1).tolist() == [
        len(processor.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (short, long)
    ]
    assert caption_states(model, processor, [short], grad=True).requires_grad


# ---------------------------------------------------------------------------------------------- Stage A
def test_stage_a_mapper_learns_the_pairing(trained, idefics3):
    mapper, report, folder = trained
    history = report["epochs"]
    assert [r["epoch"] for r in history] == list(range(1, 31))
    # held-out images: the loss falls, and the mapper matches a caption to its own image, not to any image
    assert 1 - history[-1]["heldout_cosine"] < 0.5 * (1 - history[0]["heldout_cosine"])
    assert report["heldout_cosine"] - report["heldout_shuffled_cosine"] > 0.5
    assert report["heldout_pairs"] == 30 and report["pairs"] == 120
    config = json.loads((folder / "mapper.json").read_text())
    assert config["base_model"] == idefics3[2] and config["variant"] == "GT"
    assert (config["in_dim"], config["width"], config["out_dim"]) == (64, 256, 64)
    loaded = Mapper.load(folder)
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded(x), mapper(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(Mapper(64, 64, seed=5).net[0].weight, Mapper(64, 64, seed=5).net[0].weight)


def test_hard_negatives_repeat_drop_or_swap_one_segment_of_a_real_caption():
    caption = "A dog on a skateboard, a red ball and a wooden bench."
    other = "Two cats sleeping on a sofa with a striped blanket"
    for seed in range(5):
        repeated, dropped, swapped = hard_negatives(caption, other, random.Random(seed))
        segments = ["A dog on a skateboard", "a red ball", "a wooden bench"]
        assert repeated.startswith(caption.rstrip(".") + " and ") and repeated.rsplit(" and ", 1)[1] in segments
        assert sum(s in dropped for s in segments) == 2 and len(dropped) < len(caption)
        assert sum(s in swapped for s in segments) == 2
        assert any(s in swapped for s in ("Two cats sleeping on a sofa", "a striped blanket"))
    # one segment: nothing to drop; another image's caption that shares it: nothing to swap in
    assert hard_negatives("a red square", "a red square", random.Random(0)) == ["a red square and a red square"]
    assert hard_negatives("", other, random.Random(0)) == []


def test_hard_negative_hinge_keeps_captions_closer_than_their_corruptions(idefics3, toy):
    model, processor, _ = idefics3
    _, images, pairs = toy
    settings = dict(epochs=15, lr=3e-3, batch_size=32, heldout_fraction=0.25, seed=0, margin=0.3)
    _, off = train_mapper(model, processor, images, pairs, hard_negatives_weight=1e-9, **settings)  # measured only
    _, on = train_mapper(model, processor, images, pairs, hard_negatives_weight=3.0, **settings)
    assert on["heldout_hard_negative_accuracy"] > off["heldout_hard_negative_accuracy"] + 0.05
    assert on["heldout_hard_negative_accuracy"] > 0.8
    assert on["heldout_cosine"] - on["heldout_shuffled_cosine"] > 0.3  # still matches captions to their images


def test_generated_pairs_hold_no_special_tokens(idefics3, toy):
    model, processor, _ = idefics3
    pairs = collect_pairs_generated(model, processor, toy[1][:6], PROMPT, n_per_image=2, max_new_tokens=12, seed=0)
    assert pairs and {i for i, _ in pairs} <= set(range(6)) and all(c.strip() for _, c in pairs)
    again = collect_pairs_generated(model, processor, toy[1][:6], PROMPT, n_per_image=2, max_new_tokens=12, seed=0)
    assert again == pairs  # seeded
    # sampling at T=1 from a random model: special tokens would appear without suppression
    rollout = generate_captions(model, processor, toy[1][:6], [PROMPT] * 6, max_new_tokens=24)
    new = rollout.sequences[:, rollout.inputs["input_ids"].shape[1] :]
    special = {i for i, t in processor.tokenizer.added_tokens_decoder.items() if t.special}
    eos = model.generation_config.eos_token_id
    pad = processor.tokenizer.pad_token_id
    assert not (set(new[rollout.completion_mask.bool()].tolist()) & (special - {eos})), "special token sampled"
    assert set(new[~rollout.completion_mask.bool()].tolist()) <= {pad, eos}


# ---------------------------------------------------------------------------------------------- reward
def call(reward, captions, images, ids=None):
    return reward(
        prompts=None,
        completions=[[{"role": "assistant", "content": c}] for c in captions],
        completion_ids=None,
        image=images,
        image_id=ids,
    )


def test_latent_reward_encodes_each_image_once_and_ranks_the_right_colour(trained, toy):
    _, _, folder = trained
    reward = latent(mapper=str(folder))  # the base VLM comes from mapper.json
    assert isinstance(reward, LatentReward) and reward.__name__ == "latent"
    names, images, _ = toy
    picks, group = [0, 10, 20], 4
    rows = [i for i in picks for _ in range(group)]
    captions = [f"a {names[i]} image" for i in rows]
    captions[1] = "a blue image"  # red image, wrong colour
    captions[2] = "   "  # empty: floor
    scores = call(reward, captions, [images[i].copy() for i in rows], ids=rows)  # copies: ids decide, not objects
    assert reward.image_encodes == 3 and image_key(images[0], 0) in reward.cache  # keyed by image_id
    assert scores[2] == -1.0 and all(-1.0 <= s <= 1.0 for s in scores)
    assert scores[0] > scores[1] + 0.2
    assert scores[0] == pytest.approx(scores[3], abs=1e-6)
    call(reward, captions[:4], [images[0]] * 4, ids=[0] * 4)
    assert reward.image_encodes == 3  # cache hit
    call(reward, ["a red image"] * 2, [images[1], images[1].copy()])  # no ids: the pixels are the key
    assert reward.image_encodes == 4
    # the right colour beats every wrong one on most images
    wins = [call(reward, [f"a {c} image" for c in COLOURS], [images[i]] * 6) for i in range(0, 60, 5)]
    right = [s[list(COLOURS).index(names[i])] for s, i in zip(wins, range(0, 60, 5))]
    assert sum(r == max(s) for r, s in zip(right, wins)) >= 10


# ---------------------------------------------------------------------------------------------- Stage B
def lora(model, pattern: str):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=pattern))


def greedy_alignment_loss(model, processor, mapper, images) -> float:
    captions = generate_captions(
        model, processor, images, [PROMPT] * len(images), do_sample=False, max_new_tokens=12
    ).captions
    with torch.no_grad():
        h = caption_states(model, processor, captions)
        return (1 - F.cosine_similarity(mapper(h), image_features(model, processor, images))).mean().item()


def training_args(out, **overrides):
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **overrides})


def test_vizer_trainer_lowers_the_loss_and_trains_only_lora(trained, toy, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoProcessor

    mapper, _, folder = trained
    path = str(build_tiny("idefics3"))
    torch.manual_seed(0)  # LoRA's init draws from the global RNG, which earlier tests have moved
    model = lora(AutoModelForImageTextToText.from_pretrained(path), r".*text_model.*\.(q_proj|v_proj)")
    processor = AutoProcessor.from_pretrained(path)
    images = toy[1][::5]
    rows = Dataset.from_dict({"image": images, "prompt": [PROMPT] * len(images), "image_id": list(range(len(images)))})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mapper_before = {n: p.detach().clone() for n, p in mapper.named_parameters()}
    loss_before = greedy_alignment_loss(model, processor, mapper, images)

    # greedy rollouts: with T=1 samples from this random model, the greedy loss after 10 steps (lr 3e-3) went
    # 1.09 -> 0.50, 0.94, 1.44, 0.82 over 4 seeds; with greedy rollouts 0.20..0.41 over 12 seeds
    trainer = ViZerTrainer(
        model,
        training_args(tmp_path, max_steps=10, learning_rate=3e-3),
        mapper=mapper,
        processing_class=processor,
        max_new_tokens=12,
        do_sample=False,
        train_dataset=rows,
    )
    trainer.train()

    loss_after = greedy_alignment_loss(model, processor, mapper, images)
    assert loss_after < loss_before - 0.3, (loss_before, loss_after)  # measured: 1.09 -> 0.20..0.41 (12 seeds)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed), sorted(changed)[:5]
    assert all(torch.equal(p, mapper_before[n]) for n, p in mapper.named_parameters())
    assert not any(p is q for p in model.parameters() for q in mapper.parameters())
    assert len(trainer.features) == len(images)  # each image encoded once, then cached
    logged = [h for h in trainer.state.log_history if "alignment_cosine" in h]
    assert len(logged) == 5 and all({"caption_length", "distinct_2", "loss"} <= h.keys() for h in logged)
    metrics = trainer.evaluate(rows)  # greedy captions, no update
    assert metrics["eval_loss"] == pytest.approx(loss_after, abs=1e-4) and "eval_alignment_cosine" in metrics


def test_vizer_trainer_qwen2vl_with_kl_resumes_from_a_checkpoint(tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText

    path = str(build_tiny("qwen2_vl"))
    processor = load_qwen2vl_processor(path)
    rng = random.Random(2)
    images = [colour_image(c, rng) for c in COLOURS][:4]
    conversational = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": PROMPT}]}]
    rows = Dataset.from_list([{"image": im, "prompt": conversational} for im in images])  # no image_id: pixel keys
    mapper = Mapper(64, 64, seed=0)

    class Counting(ViZerTrainer):
        steps = 0

        def compute_loss(self, *args, **kwargs):
            self.steps += 1
            return super().compute_loss(*args, **kwargs)

    def run(max_steps, resume=None):
        model = lora(AutoModelForImageTextToText.from_pretrained(path), r".*language_model.*\.(q_proj|v_proj)")
        args = training_args(
            tmp_path,
            max_steps=max_steps,
            per_device_train_batch_size=2,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
        )
        trainer = Counting(
            model, args, mapper=mapper, processing_class=processor, kl_beta=1.0, max_new_tokens=8, train_dataset=rows
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    first = run(2)
    kl = [h["kl"] for h in first.state.log_history if "kl" in h]
    assert kl[0] == pytest.approx(0.0, abs=1e-6) and kl[-1] > 0  # LoRA starts as the base, then moves away
    assert (tmp_path / "checkpoint-2" / "adapter_model.safetensors").is_file()
    resumed = run(4, resume=str(tmp_path / "checkpoint-2"))
    assert resumed.steps == 2 and resumed.state.global_step == 4  # continued from step 2, not restarted
    steps = [h["step"] for h in resumed.state.log_history if "alignment_cosine" in h]
    assert steps == [1, 2, 3, 4]  # the checkpoint's history, then the new steps


def test_helpers():
    rows = [{"image": Image.new("RGB", (8, 8)), "prompt": PROMPT, "image_id": 7}] * 2
    batch = collate_images(rows)
    assert isinstance(batch["image"][0], Image.Image) and batch["image_id"] == [7, 7]
    assert distinct_2(["a red square", "a red circle"]) == pytest.approx(3 / 4)
    assert distinct_2(["red"]) == 0.0
    new = torch.tensor([[5, 6, 2, 9, 9], [5, 2, 2, 9, 9], [5, 6, 7, 8, 6], [3, 9, 9, 9, 9]])
    assert completion_mask(new, [2, 3]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]

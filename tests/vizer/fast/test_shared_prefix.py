"""The group-shared prefix is exact: TRL's stock per-token log-probs, entropies and LoRA gradients, with each
group's prompt and image run once, for both families, both attention implementations that take a 4D mask, with
and without gradient checkpointing; and the comparison notices a position one off."""

import contextlib
import functools
import random
import types
from collections import Counter

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head, entropy_from_logits, selective_log_softmax

import vizer.fast.shared_prefix as shared_prefix
from vizer.families import detect_family
from vizer.fast.shared_prefix import grouped_per_token_logps, lm_tokens, prompt_groups, why_not_shared_prefix
from vizer.fast.shared_vision import vision_tower
from vizer.model_ids import resolve_model_id

FAMILIES = ["idefics3", "qwen2_vl"]
G = 3
TEMPERATURE = 0.7
# the language model's attention projections only (both vision towers have projections too)
LANGUAGE_QV = {"idefics3": r".*text_model.*\.(q_proj|v_proj)", "qwen2_vl": r".*language_model.*\.(q_proj|v_proj)"}
# Two groups, different prompt lengths (left padding) and image sizes (Qwen2-VL: different image_grid_thw).
TWO_GROUPS = (("Describe this image.", (64, 64), "red"), ("What shapes do you see in this picture?", (112, 56), "blue"))
# Completion lengths, one per row: right padding, and one row with a single token.
LENGTHS = (5, 2, 7, 4, 7, 1)


def picture(size: tuple[int, int], colour: str) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.putpixel((3, 5), (7, 200, 9))  # not one flat colour
    return image


@functools.cache
def processor(family: str):
    path = resolve_model_id(f"tiny:{family}")
    loaded = detect_family(path).load_processor(path, {"do_image_splitting": False} if family == "idefics3" else {})
    loaded.tokenizer.padding_side = "left"  # as TRL pads prompts
    return loaded


def trl_batch(family: str, groups=TWO_GROUPS, lengths=LENGTHS, seed: int = 0) -> dict:
    """What TRL hands `_get_per_token_logps_and_entropies`: G rows per prompt, left-padded prompts followed by
    right-padded completions, the processor's image inputs for every row."""
    proc = processor(family)
    texts, images = [], []
    for text, size, colour in groups:
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        prompt = proc.apply_chat_template(message, add_generation_prompt=True)
        texts += [prompt] * G
        images += [[picture(size, colour)] for _ in range(G)]  # TRL: each copy its own object
    inputs = dict(proc(text=texts, images=images, padding=True, return_tensors="pt"))
    width = max(lengths)
    completion_mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    completions = torch.randint(100, 400, (len(lengths), width), generator=torch.Generator().manual_seed(seed))
    completions = completions.masked_fill(completion_mask == 0, proc.tokenizer.pad_token_id)
    batch = {
        "input_ids": torch.cat([inputs.pop("input_ids"), completions], 1),
        "attention_mask": torch.cat([inputs.pop("attention_mask"), completion_mask], 1),
        "logits_to_keep": width,
        "num_images": [1] * len(lengths),
        **inputs,
    }
    if "mm_token_type_ids" in batch:  # TRL extends them with zeros over the completions
        batch["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(completions)], 1)
    return batch


def reordered(batch: dict, order: list[int]) -> dict:
    """The batch with its rows in another order (as TRL's shuffled training micro-batches)."""
    out = dict(batch, num_images=[batch["num_images"][i] for i in order])
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_attention_mask"):
        if key in batch:
            out[key] = batch[key][order]
    if "image_grid_thw" in batch:
        blocks = torch.split(batch["pixel_values"], batch["image_grid_thw"].prod(-1).tolist())
        out["pixel_values"] = torch.cat([blocks[i] for i in order])
        out["image_grid_thw"] = batch["image_grid_thw"][order]
    else:
        out["pixel_values"] = batch["pixel_values"][order]
    return out


@functools.cache
def lora_model(family: str):
    """A tiny random model with TRL's fused LM head (as GRPOTrainer installs it) and LoRA on the language model."""
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(resolve_model_id(f"tiny:{family}"), dtype=torch.float32)
    add_fused_lm_head(model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_QV[family], init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def ready(family: str, attention: str = "sdpa", checkpointing: bool = False):
    model = lora_model(family)
    model.set_attn_implementation(attention)
    if checkpointing:
        model.activation_checkpointing_enable()
    else:
        model.activation_checkpointing_disable()
    model.train()  # checkpointing acts in training mode only
    return model


def stock_forward(model, batch: dict, compute_entropy: bool = True):
    """TRL's own `_get_per_token_logps_and_entropies`, unbound from the trainer."""
    trainer = types.SimpleNamespace(accelerator=types.SimpleNamespace(autocast=contextlib.nullcontext))
    inputs = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "logits_to_keep")}
    stock = GRPOTrainer._get_per_token_logps_and_entropies.__wrapped__  # without the profiling decorator
    logps, entropies, _ = stock(
        trainer,
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["logits_to_keep"],
        compute_entropy=compute_entropy,
        **inputs,
    )
    return logps, entropies


def shared_forward(model, batch: dict, **kwargs):
    return grouped_per_token_logps(model, **batch, compute_entropy=True, fused_lm_head=True, **kwargs)


def with_gradients(model, forward, batch: dict):
    """Log-probs, entropies and LoRA gradients of a GRPO-like loss that weighs every completion token."""
    model.zero_grad()
    logps, entropies = forward(model, batch)
    weights = torch.randn(logps.shape, generator=torch.Generator().manual_seed(1))
    mask = batch["attention_mask"][:, -batch["logits_to_keep"] :]
    ((logps + 0.1 * entropies) * weights * mask).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), entropies.detach(), grads


def images_encoded(model, family: str, forward) -> tuple[object, int]:
    """The forward's result and how many images the vision tower encoded for it."""
    seen = []
    tower = vision_tower(model, family)

    def count(module, args, kwargs):
        if family == "qwen2_vl":  # all images' patches in one sequence, one grid row per image
            seen.append(len(kwargs["grid_thw"]))
        else:  # a batch of tiles
            seen.append(len(kwargs["pixel_values"] if "pixel_values" in kwargs else args[0]))

    handle = tower.register_forward_pre_hook(count, with_kwargs=True)
    try:
        return forward(), sum(seen)
    finally:
        handle.remove()


def assert_equal_results(shared, stock, atol: float = 1e-4) -> None:
    for name, got, expected in zip(("log-probs", "entropies"), shared[:2], stock[:2]):
        torch.testing.assert_close(got, expected, atol=atol, rtol=0, msg=name)
    assert shared[2].keys() == stock[2].keys()
    for name, grad in stock[2].items():
        assert grad.abs().max() > 0, name  # every LoRA matrix gets a gradient: the comparison means something
        torch.testing.assert_close(shared[2][name], grad, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_log_probs_entropies_and_lora_gradients_equal_trls_stock_forward(family, attention, checkpointing):
    model = ready(family, attention, checkpointing)
    assert why_not_shared_prefix(model, family) is None
    batch = trl_batch(family)
    assert (batch["attention_mask"][:, 0] == 0).any(), "a left-padded prompt"
    if family == "qwen2_vl":
        assert len(set(map(tuple, batch["image_grid_thw"].tolist()))) == 2, "two image grids"
    stock, stock_images = images_encoded(model, family, lambda: with_gradients(model, stock_forward, batch))
    shared, shared_images = images_encoded(model, family, lambda: with_gradients(model, shared_forward, batch))
    assert_equal_results(shared, stock)
    assert (stock_images, shared_images) == (2 * G, 2), "each group's image is encoded once"
    padded = batch["attention_mask"][:, -batch["logits_to_keep"] :] == 0
    assert padded.any() and (shared[0][padded] == 0).all(), "padded positions give 0, as TRL's fused head does"


def test_only_completion_positions_reach_the_vocabulary_projection(family, monkeypatch):
    """On a device without Triton TRL's fused head scores every position; the packed rows' prompt columns are
    never scored, so only the labelled completion tokens are projected onto the vocabulary (and the log-probs
    stay the stock ones, checked above)."""
    import trl.trainer.utils as trl_utils

    projected = []
    chunked = trl_utils._ChunkedLogProbFunction

    def counting(hidden, *args):
        projected.append(hidden.shape[0])
        return chunked.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", types.SimpleNamespace(apply=counting))
    batch = trl_batch(family)
    with torch.no_grad():
        logps, _ = shared_forward(ready(family), batch)
    assert projected == [sum(LENGTHS)]
    assert trl_utils._use_triton(torch.device("cpu")) is False, "TRL's own choice is back after the forward"
    assert (logps != 0).sum() == sum(LENGTHS)


@pytest.mark.parametrize("batch_size", [None, 2])
def test_a_shuffled_micro_batch_with_look_alike_prompts(family, batch_size):
    """A training micro-batch: TRL shuffles the generation batch and splits it, so groups arrive out of order and
    in parts of unequal size (packed rows of different lengths); two prompts have the same tokens but different
    pictures; `batch_size` cuts groups. All exact, on the plain-logits path (no fused head) at a temperature."""
    model = ready(family)
    # the second and third groups differ in pixels only (same text and size: same prompt tokens)
    groups = (TWO_GROUPS[1], ("Describe this image.", (64, 64), "green"), ("Describe this image.", (64, 64), "red"))
    order = list(range(3 * G))
    random.Random(0).shuffle(order)
    order = order[:6]  # one of two micro-batches
    sizes = sorted(Counter(row // G for row in order).values())
    assert sizes == [1, 2, 3], "parts of unequal size"
    batch = reordered(trl_batch(family, groups, lengths=(3, 6, 1, 6, 2, 2, 5, 4, 6)), order)
    prompt_len = batch["input_ids"].shape[1] - batch["logits_to_keep"]
    assert len(prompt_groups(batch["input_ids"], batch["attention_mask"], prompt_len)) == 2, "tokens alone merge"

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k not in ("logits_to_keep", "num_images")}
        logits = model(**inputs).logits[:, :-1][:, -batch["logits_to_keep"] :] / TEMPERATURE
        completions = batch["input_ids"][:, -batch["logits_to_keep"] :]
        expected = selective_log_softmax(logits, completions), entropy_from_logits(logits)
        (logps, entropies), encoded = images_encoded(
            model,
            family,
            lambda: grouped_per_token_logps(
                model, **batch, temperature=TEMPERATURE, compute_entropy=True, batch_size=batch_size
            ),
        )
    torch.testing.assert_close(logps, expected[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(entropies, expected[1], atol=1e-4, rtol=0)
    assert encoded == (3 if batch_size is None else 4), "one image per group, or per piece of a cut group"


def test_a_position_one_off_is_caught(family, monkeypatch):
    """The comparison is sensitive: completion positions starting one later make it fail."""
    model = ready(family)
    batch = trl_batch(family)
    stock = stock_forward(model, batch)
    prompt_len = batch["input_ids"].shape[1] - batch["logits_to_keep"]
    exact = shared_prefix.stock_position_ids

    def one_off(*args, **kwargs):
        positions = exact(*args, **kwargs).clone()
        positions[..., prompt_len:] += 1
        return positions

    monkeypatch.setattr(shared_prefix, "stock_position_ids", one_off)
    with torch.no_grad():
        planted = shared_forward(model, batch)
    assert (planted[0] - stock[0]).abs().max() > 1e-3
    with pytest.raises(AssertionError):
        torch.testing.assert_close(planted[0], stock[0], atol=1e-4, rtol=0)


def test_a_block_seeing_another_block_is_caught(family, monkeypatch):
    """The comparison notices a mask that lets a completion see its siblings."""
    model = ready(family)
    batch = trl_batch(family)
    stock = stock_forward(model, batch)
    exact = shared_prefix.packed_attention

    def leaky(packing, attention_mask):
        siblings = (packing.seg[:, None, :] > 0) & (packing.seg[:, :, None] > 0)
        earlier = torch.arange(packing.seg.shape[1])[None, :] < torch.arange(packing.seg.shape[1])[:, None]
        return exact(packing, attention_mask) | (siblings & earlier)

    monkeypatch.setattr(shared_prefix, "packed_attention", leaky)
    with torch.no_grad():
        planted = shared_forward(model, batch)
    assert (planted[0] - stock[0]).abs().max() > 1e-3


def test_where_it_cannot_be_exact_it_says_why(family, monkeypatch):
    model = ready(family)
    text = model.config.get_text_config()
    assert "llava" in why_not_shared_prefix(model, "llava")
    monkeypatch.setattr(text, "_attn_implementation", "flash_attention_2")
    assert "flash_attention_2 cannot take the custom 4D attention mask" in why_not_shared_prefix(model, family)
    with pytest.raises(ValueError, match="not exact under flash_attention_2"):
        shared_forward(model, trl_batch(family))
    monkeypatch.setattr(text, "_attn_implementation", "flex_attention")
    assert "flex_attention" in why_not_shared_prefix(model, family)
    monkeypatch.setattr(text, "_attn_implementation", "sdpa")
    monkeypatch.setattr(text, "layer_types", ["full_attention", "sliding_attention"], raising=False)
    assert "sliding-window" in why_not_shared_prefix(model, family)


def test_dropout_in_training_is_a_reason(family):
    """With dropout a group would share one draw over its prompt and image, where stock rows draw G."""
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(resolve_model_id(f"tiny:{family}"), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=LANGUAGE_QV[family]))
    assert "dropout" in why_not_shared_prefix(model.train(), family)
    assert why_not_shared_prefix(model.eval(), family) is None  # no draws outside training


def test_lm_tokens_counts_what_the_language_model_reads():
    # 2 groups of 8, prompt 100 (image included), completions 20: stock 16 * 120, shared 2 * 99 + 16 * 21
    assert lm_tokens(16, 100, 20, 8) == (1920, 534)
    batch = trl_batch("qwen2_vl")
    rows, length = batch["input_ids"].shape
    prompt_len = length - batch["logits_to_keep"]
    packing = shared_prefix.pack(
        [list(range(G)), list(range(G, 2 * G))], prompt_len, batch["logits_to_keep"], torch.device("cpu")
    )
    assert packing.src_col.numel() == lm_tokens(rows, prompt_len, batch["logits_to_keep"], G)[1]


# ---------------------------------------------------------------------------------------------
# In the runner: `model.share_prefix`
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "generations"),
    [([], 3), (["grpo.num_iterations=2", "grpo.beta=0.04"], 2)],  # two iterations reuse one generation
    ids=["plain", "old-and-reference-log-probs"],  # TRL's two extra forwards: the old policy's and the base's
)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_short_run_trains_the_same_adapter_with_and_without_the_shared_prefix(
    family, extra, generations, tmp_path, capsys, monkeypatch
):
    from safetensors.torch import load_file
    from test_train import tiny_overrides

    import vizer.grpo
    from vizer import train as runner
    from vizer.config import load_recipe

    prefilled = []  # (rows prefilled, rows generated) per generate call of the shared run

    def recorded(generate, model, size):
        wrapped = vizer.grpo.prefill_once.__wrapped__(generate, model, size)

        def call(**kwargs):
            out = wrapped(**kwargs)
            prefilled.append((wrapped.stats["prefilled_rows"], wrapped.stats["rows"]))
            return out

        return call

    recorded.__wrapped__ = vizer.grpo.prefill_once
    monkeypatch.setattr(vizer.grpo, "prefill_once", recorded)
    adapters = {}
    for setting in ("false", "auto"):
        overrides = [
            *tiny_overrides("tiny-shapes"),
            f"model.id=tiny:{family}",
            "model.processor={}",  # the shapes recipe sets an idefics3 knob
            "grpo.max_steps=3",
            "grpo.per_device_train_batch_size=4",  # two micro-batches per generation batch: whole groups each
            f"model.share_prefix={setting}",
            *extra,
        ]
        runner.train(load_recipe("tiny-shapes", overrides), tmp_path / setting)
        adapters[setting] = load_file(str(tmp_path / setting / "adapter" / "adapter_model.safetensors"))
    said = capsys.readouterr().out
    assert (
        "language model: stock path, every completion re-reads its prompt and image (model.share_prefix is false)"
        in said
    )
    assert "language model: each group's prompt and image read once per forward" in said
    for key, value in adapters["false"].items():
        torch.testing.assert_close(adapters["auto"][key], value, atol=1e-5, rtol=1e-4, msg=key)
    # generation prefilled one row per group of 4 (2 images per step), in every generation of the shared run only
    assert prefilled == [(2, 8)] * generations, prefilled


def test_share_prefix_true_refuses_what_would_not_be_exact_and_auto_says_why(tmp_path, capsys):
    from test_train import tiny_overrides

    from vizer import train as runner
    from vizer.config import RecipeError, load_recipe

    dropout = [*tiny_overrides("tiny-shapes"), "model.lora.dropout=0.1", "grpo.max_steps=1"]
    refused = r"'model.share_prefix' is true, but model.lora.dropout is 0.1: a group would share one dropout draw"
    with pytest.raises(RecipeError, match=refused):  # seen in the recipe, before any model loads
        runner.train(load_recipe("tiny-shapes", [*dropout, "model.share_prefix=true"]), tmp_path / "true")
    runner.train(load_recipe("tiny-shapes", dropout), tmp_path / "auto")
    assert "language model: stock path, every completion re-reads its prompt and image (dropout is active" in (
        capsys.readouterr().out
    )


def test_micro_batches_are_cut_between_whole_groups():
    from vizer.grpo import shuffle_whole_groups

    torch.manual_seed(0)
    batch = {"ids": torch.arange(12).repeat_interleave(1), "names": [f"g{i // 4}" for i in range(12)], "n": None}
    out = shuffle_whole_groups(4)(batch)
    blocks = [out["names"][i : i + 4] for i in range(0, 12, 4)]
    assert all(len(set(b)) == 1 for b in blocks) and sorted(b[0] for b in blocks) == ["g0", "g1", "g2"]
    assert [f"g{int(i) // 4}" for i in out["ids"]] == out["names"] and out["n"] is None  # rows move in unison
    assert sorted(out["ids"].tolist()) == list(range(12))
    odd = shuffle_whole_groups(5)(batch)  # 12 rows do not split into 5s: TRL's row-wise shuffle
    assert sorted(odd["ids"].tolist()) == list(range(12))

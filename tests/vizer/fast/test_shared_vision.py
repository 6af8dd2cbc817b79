"""Group-shared vision is exact: the same logits, gradients and trained adapter as the stock path, with each
distinct image encoded once."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from test_train import tiny_overrides
from transformers import AutoModelForImageTextToText

import vizer.train as runner
from vizer.config import RecipeError, load_recipe
from vizer.families import detect_family
from vizer.fast.shared_vision import share_vision, why_not_shared
from vizer.model_ids import resolve_model_id

G = 4
# the language model's attention projections only (both families' vision towers have projections too)
LANGUAGE_QV = {"idefics3": r".*text_model.*\.(q_proj|v_proj)", "qwen2_vl": r".*language_model.*\.(q_proj|v_proj)"}


def tiny_batch(family: str = "idefics3"):
    path = resolve_model_id(f"tiny:{family}")
    processor = detect_family(path).load_processor(path, {"do_image_splitting": False} if family == "idefics3" else {})
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    # different sizes: Qwen2-VL cuts its patch sequence per image by grid, so the cut must land right
    images = [Image.new("RGB", size, c) for size, c in (((64, 64), "red"), ((96, 64), "blue"), ((64, 64), "green"))]
    rows = [im.copy() for im in images for _ in range(G)]  # TRL: each copy decoded separately
    processor.tokenizer.padding_side = "left"  # as in training: the caption tokens end every row
    inputs = processor(
        text=[prompt + " a red"] * len(rows), images=[[im] for im in rows], padding=True, return_tensors="pt"
    )
    return path, inputs


def lora_model(path, targets=LANGUAGE_QV["idefics3"]):
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def logps_and_grads(model, inputs):
    model.zero_grad()
    logits = model(**inputs).logits[:, :-1]
    logps = logits.log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
    logps[:, -3:].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logps.detach(), grads


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_log_probs_and_gradients_match_the_stock_path(family):
    path, inputs = tiny_batch(family)
    stock_model, shared_model = lora_model(path, LANGUAGE_QV[family]), lora_model(path, LANGUAGE_QV[family])
    stock = logps_and_grads(stock_model, inputs)
    assert why_not_shared(shared_model, family) is None
    hook = share_vision(shared_model, family)
    for _ in range(2):  # generation-, old-logp- and training-like calls: the second is all cache hits
        shared = logps_and_grads(shared_model, inputs)
    torch.testing.assert_close(shared[0], stock[0], atol=1e-4, rtol=0)
    for name, grad in stock[1].items():
        torch.testing.assert_close(shared[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)
    assert hook.tiles_seen == 2 * 3 * G and hook.tiles_encoded == 3, "3 distinct images, encoded once"


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_a_short_run_trains_the_same_adapter_either_way(family, tmp_path, capsys):
    adapters = {}
    for setting in ("false", "auto"):
        overrides = [
            *tiny_overrides("tiny-shapes"),
            f"model.id=tiny:{family}",
            "model.processor={}",  # the shapes recipe sets an idefics3 knob
            "grpo.max_steps=3",
            f"model.share_vision={setting}",
        ]
        runner.train(load_recipe("tiny-shapes", overrides), tmp_path / setting)
        adapters[setting] = load_file(str(tmp_path / setting / "adapter" / "adapter_model.safetensors"))
    said = capsys.readouterr().out
    assert "vision: stock path" in said and "vision: each distinct image encoded once per step" in said
    assert "preprocessing: stock path" in said and "preprocessing: each distinct picture processed once" in said
    for key, value in adapters["false"].items():
        torch.testing.assert_close(adapters["auto"][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_the_stock_path_runs_where_sharing_would_not_be_exact(tmp_path):
    path, _ = tiny_batch()
    assert "trains" in why_not_shared(lora_model(path, targets=r".*(q_proj|v_proj)"), "idefics3")  # vision LoRA
    assert "llava" in why_not_shared(lora_model(path), "llava")  # a family without a hook runs the stock path
    qwen = resolve_model_id("tiny:qwen2_vl")
    assert "trains" in why_not_shared(lora_model(qwen, targets=r".*(qkv|q_proj|v_proj)"), "qwen2_vl")
    recipe = load_recipe(
        "tiny-shapes", [*tiny_overrides("tiny-shapes"), "model.lora.targets=all-linear", "model.share_vision=true"]
    )
    with pytest.raises(RecipeError, match=r"'model.share_vision' is true, but the vision tower trains"):
        runner.train(recipe, tmp_path / "run")

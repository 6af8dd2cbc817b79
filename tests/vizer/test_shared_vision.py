"""Group-shared vision is exact: the same logits, gradients and trained adapter as the stock path, with each
distinct image encoded once."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from test_train import tiny_overrides
from transformers import AutoModelForImageTextToText, AutoProcessor

import vizer.train as runner
from vizer.config import RecipeError, load_recipe
from vizer.model_ids import resolve_model_id
from vizer.shared_vision import share_vision, why_not_shared

G = 4


def tiny_batch():
    path = resolve_model_id("tiny:idefics3")
    processor = AutoProcessor.from_pretrained(path)
    processor.image_processor.do_image_splitting = False
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    rows = [im.copy() for im in images for _ in range(G)]  # TRL: each copy decoded separately
    inputs = processor(text=[prompt + " a red"] * len(rows), images=[[im] for im in rows], return_tensors="pt")
    return path, inputs


def lora_model(path, targets=r".*text_model.*\.(q_proj|v_proj)"):
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


def test_log_probs_and_gradients_match_the_stock_path():
    path, inputs = tiny_batch()
    stock_model, shared_model = lora_model(path), lora_model(path)
    stock = logps_and_grads(stock_model, inputs)
    assert why_not_shared(shared_model, "idefics3") is None
    hook = share_vision(shared_model)
    for _ in range(2):  # generation-, old-logp- and training-like calls: the second is all cache hits
        shared = logps_and_grads(shared_model, inputs)
    torch.testing.assert_close(shared[0], stock[0], atol=1e-4, rtol=0)
    for name, grad in stock[1].items():
        torch.testing.assert_close(shared[1][name], grad, atol=1e-4, rtol=1e-4, msg=name)
    assert hook.tiles_seen == 2 * 3 * G and hook.tiles_encoded == 3, "3 distinct images, encoded once"


def test_a_short_run_trains_the_same_adapter_either_way(tmp_path, capsys):
    adapters = {}
    for setting in ("false", "auto"):
        overrides = [*tiny_overrides("tiny-shapes"), "grpo.max_steps=3", f"model.share_vision={setting}"]
        runner.train(load_recipe("tiny-shapes", overrides), tmp_path / setting)
        adapters[setting] = load_file(str(tmp_path / setting / "adapter" / "adapter_model.safetensors"))
    said = capsys.readouterr().out
    assert "vision: stock path" in said and "vision: each distinct image encoded once per step" in said
    for key, value in adapters["false"].items():
        torch.testing.assert_close(adapters["auto"][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_the_stock_path_runs_where_sharing_would_not_be_exact(tmp_path):
    path, _ = tiny_batch()
    assert "trains" in why_not_shared(lora_model(path, targets=r".*(q_proj|v_proj)"), "idefics3")  # vision LoRA
    assert "qwen2_vl" in why_not_shared(lora_model(path), "qwen2_vl")
    recipe = load_recipe(
        "tiny-shapes", [*tiny_overrides("tiny-shapes"), "model.lora.targets=all-linear", "model.share_vision=true"]
    )
    with pytest.raises(RecipeError, match=r"'model.share_vision' is true, but the vision tower trains"):
        runner.train(recipe, tmp_path / "run")

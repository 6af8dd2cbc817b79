"""A recipe's GRPO step settings, for `python -m benchmarks.grpo_step --recipe NAME`.

The benchmark runs the random real-sized model of the recipe's model (`benchmarks.real_sized`) at the recipe's
group size, images per step, per-device batch, completion length, quantization, gradient checkpointing and
processor options; anything else in the recipe (data, rewards, learning rate) does not change a step's cost
in kind and is replaced by the benchmark's own (ShapesCap pictures, a word-count reward).
"""

from __future__ import annotations

from typing import Any

# hub ids (lower case) of the checkpoints benchmarks/real_sized.py has the dimensions of
REAL_SIZED = {
    "huggingfacetb/smolvlm-256m-base": "smolvlm256",
    "huggingfacetb/smolvlm-256m-instruct": "smolvlm256",
    "huggingfacetb/smolvlm-500m-base": "smolvlm500",
    "huggingfacetb/smolvlm-500m-instruct": "smolvlm500",
    "huggingfacetb/smolvlm-base": "smolvlm2b",
    "huggingfacetb/smolvlm-instruct": "smolvlm2b",
    "qwen/qwen2-vl-2b-instruct": "qwen2vl2b",
    "qwen/qwen2-vl-2b": "qwen2vl2b",
}
PROCESSOR_KEYS = {"do_image_splitting", "min_pixels", "max_pixels"}
PER_DEVICE_DEFAULT = 8  # the runner's: images_per_step without a per-device cap holds 8 completions a forward


def recipe_settings(name: str) -> dict[str, Any]:
    """The benchmark options (argparse dests) a recipe sets; ValueError for one the benchmark cannot stand for."""
    from trl import GRPOConfig

    from vizer.config import load_recipe

    recipe = load_recipe(name)
    if recipe["objective"] != "grpo":
        raise ValueError(f"{name}: objective {recipe['objective']}; the GRPO step benchmark needs objective grpo")
    model = REAL_SIZED.get(str(recipe["model"]["id"]).lower())
    if model is None:
        known = ", ".join(sorted(REAL_SIZED))
        raise ValueError(f"{name}: no real-sized model for {recipe['model']['id']} (known: {known})")
    quant = recipe["model"]["quantization"]
    if quant not in ("none", "4bit"):
        raise ValueError(f"{name}: quantization {quant}; the benchmark runs none or 4bit")
    processor = dict(recipe["model"]["processor"] or {})
    if set(processor) - PROCESSOR_KEYS:
        raise ValueError(f"{name}: processor options {sorted(set(processor) - PROCESSOR_KEYS)} are not benchmarked")
    grpo = recipe["grpo"]
    fields = GRPOConfig.__dataclass_fields__
    generations = grpo.get("num_generations") or fields["num_generations"].default
    per_device = grpo.get("per_device_train_batch_size") or PER_DEVICE_DEFAULT
    checkpointing = grpo.get("activation_checkpointing", grpo.get("gradient_checkpointing"))
    return {
        "model": model,
        "quant": quant,
        "generations": generations,
        "images_per_step": grpo.get("images_per_step") or max(1, per_device // generations),
        "per_device": per_device,
        "completion_length": grpo.get("max_completion_length") or fields["max_completion_length"].default,
        # SmolVLM's processor splits unless told not to; Qwen2-VL has no such option
        "image_splitting": bool(processor.get("do_image_splitting", not model.startswith("qwen"))),
        "min_pixels": processor.get("min_pixels"),
        "max_pixels": processor.get("max_pixels"),
        "gradient_checkpointing": True if checkpointing is None else bool(checkpointing),  # TRL's default
    }

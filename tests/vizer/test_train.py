"""GRPO training end to end on tiny models: every shipped recipe, resume, QLoRA."""

import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rewards.registry import IMAGE_SCORER_REWARDS
from vizer.config import load_recipe
from vizer.train import train

VISION_MARKERS = ("vision", "visual", "connector", "multi_modal_projector", "lm_head")
LANGUAGE_MARKERS = (".text_model.", ".language_model.")


def tiny_overrides(recipe_name: str) -> list[str]:
    """Swap a recipe's model, data and scorers for tiny local ones; everything else stays as shipped."""
    recipe = load_recipe(recipe_name)
    family = "qwen2_vl" if "qwen" in recipe["model"]["id"].lower() else "idefics3"
    overrides = [
        f"model.id=tiny:{family}",
        "plugins=[shapescap]",
        "data.source=shapes",
        "data.split=train",
        "data.limit=8",
        "data.streaming=false",
        "grpo.max_steps=2",
        "grpo.num_generations=4",
        "grpo.images_per_step=2",
        "grpo.per_device_train_batch_size=8",
        "grpo.max_completion_length=8",
        "grpo.logging_steps=1",
        "grpo.save_steps=100",
        "grpo.gradient_checkpointing=false",
        "grpo.learning_rate=1.0e-3",
    ]
    for i, entry in enumerate(recipe["rewards"]):
        if entry["name"] in IMAGE_SCORER_REWARDS:  # the rewards that take an image scorer
            overrides.append(f"rewards.{i}.model=tiny:clip")
    if recipe["eval_data"] is not None:  # the canary set: a couple of eval images, scored by a tiny CLIP
        overrides += ["monitor.canary=2", "eval.scorer=tiny:clip", "eval.judge=null"]
        if recipe["eval_data"]["source"] != "shapes":
            overrides.append("eval_data={source: shapes, split: validation, limit: 2}")
    if recipe["model"]["dtype"] == "auto":
        overrides.append("model.dtype=float32")
    if recipe["mapper_data"] is not None:  # ViZer's stage A on a few shapes scenes
        overrides += ["mapper_data={source: shapes, split: validation, limit: 12}", "mapper.epochs=2"]
        overrides += ["mapper.max_new_tokens=8", "mapper.pairs_per_image=1"]
    if recipe["objective"] == "vizer":
        overrides += ["vizer.max_steps=2", "vizer.images_per_step=4", "vizer.per_device_train_batch_size=4"]
        overrides += ["vizer.max_new_tokens=8", "vizer.logging_steps=1", "vizer.save_steps=100"]
        overrides += ["vizer.gradient_checkpointing=false", "vizer.learning_rate=1.0e-3"]
    return overrides


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_shipped_recipe_trains_on_a_tiny_model_of_its_family(shipped_recipe, tmp_path):
    recipe = load_recipe(shipped_recipe, tiny_overrides(shipped_recipe))
    adapter = train(recipe, tmp_path)

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b), "LoRA B starts at zero: training must move it"
    for key in weights:
        assert any(m in key for m in LANGUAGE_MARKERS), f"LoRA on a non-language module: {key}"
        assert not any(m in key for m in VISION_MARKERS), f"LoRA on the vision side: {key}"

    saved = load_recipe(str(tmp_path / "recipe.yaml"))
    section = "vizer" if recipe["objective"] == "vizer" else "grpo"
    assert saved["model"]["id"] == recipe["model"]["id"] and saved[section]["max_steps"] == 2
    metrics = read_metrics(tmp_path)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    if recipe["objective"] == "vizer":
        assert "alignment_cosine" in steps[0] and (tmp_path / "mapper" / "mapper.json").is_file()
        return
    for entry in recipe["rewards"]:
        assert f"rewards/{entry.get('id', entry['name'])}/mean" in steps[0]
    assert list((tmp_path / "completions").glob("*.parquet")), "sampled captions are logged"


def test_qlora_4bit_loads_the_language_model_in_4bit():
    import bitsandbytes as bnb

    from vizer.models import load_model

    recipe = load_recipe("smolvlm-openimages", tiny_overrides("smolvlm-openimages"))
    assert recipe["model"]["quantization"] == "4bit"
    model = load_model(recipe["model"]).model
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(".text_model." in n for n in quantized)


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("model.id=no-such-org/no-such-vlm", "'model.id'"),
        ("rewards.0.model=no-such-org/no-such-clip", "'rewards[0]' (grounding)"),
    ],
)
def test_unreachable_model_is_one_line_naming_the_key(tmp_path, override, culprit):
    from vizer.config import RecipeError

    with pytest.raises(RecipeError) as err:
        train(load_recipe("tiny-shapes", [override]), tmp_path)
    assert str(err.value).startswith(culprit) and "\n" not in str(err.value)


@pytest.mark.parametrize("fault", ["truncated", "another-base", "another-width", "no-weights"])
def test_a_mapper_that_does_not_fit_the_model_is_one_line_before_anything_loads(tmp_path, capsys, fault):
    # Fails if ViZer trains with a mapper of another base model without a word, or a cut-short file or another
    # input width reaches safetensors or the first matmul (a traceback minutes in).
    from transformers import AutoConfig

    from rewards.latent import WEIGHTS, Mapper
    from vizer.cli import main
    from vizer.mapper import check_mapper
    from vizer.model_ids import resolve_model_id

    path = resolve_model_id("tiny:idefics3")
    hidden = AutoConfig.from_pretrained(path).get_text_config().hidden_size
    good, bad = tmp_path / "good", tmp_path / "bad"
    Mapper(hidden, hidden, 16, meta={"base_model": path}).save(good)
    in_dim = hidden + 8 if fault == "another-width" else hidden
    base = "someone/another-vlm" if fault == "another-base" else path
    Mapper(in_dim, hidden, 16, meta={"base_model": base}).save(bad)
    if fault == "truncated":
        with (bad / WEIGHTS).open("r+b") as f:
            f.truncate((bad / WEIGHTS).stat().st_size - 64)
    elif fault == "no-weights":
        (bad / WEIGHTS).unlink()
    overrides = [*tiny_overrides("tiny-shapes"), "objective=vizer", "vizer.max_steps=1"]
    assert check_mapper(good, load_recipe("tiny-shapes", [*overrides, f"mapper.path={good}"])).in_dim == hidden
    out = tmp_path / "out"
    assert main(["train", "tiny-shapes", "--out", str(out), *overrides, f"mapper.path={bad}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 'mapper.path': ") and str(bad) in err and "\n" not in err, err
    says = {"another-base": "trained for base model someone/another-vlm", "another-width": f"width {in_dim}"}
    assert says.get(fault, "cannot load the mapper") in err
    assert not out.exists(), "refused before OUT was touched"


def test_data_smaller_than_one_optimizer_step_is_one_line_not_an_untrained_adapter(tmp_path, capsys):
    # Fails if training starts on fewer images than one step takes: no step runs, an untrained adapter is
    # saved and the command exits 0.
    from shapescap.scenes import render, shapes_scenes
    from vizer.cli import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i, scene in enumerate(shapes_scenes("validation", 3)):
        render(scene).save(folder / f"{i}.png")
    overrides = [*tiny_overrides("tiny-shapes"), "data.source=folder", f"data.path={folder}", "data.limit=null"]
    out = tmp_path / "out"
    assert main(["train", "tiny-shapes", "--out", str(out), *overrides, "grpo.images_per_step=4"]) == 2
    err = capsys.readouterr().err.strip()  # a progress bar of the dataset map may come first
    assert "Traceback" not in err and err.splitlines()[-1] == (
        "error: one optimizer step takes 4 images but the data has 3: lower grpo.images_per_step (or the "
        "per-device batch), or add images"
    )
    assert not (out / "adapter").exists()


def test_two_runs_in_one_process_log_tensorboard_into_their_own_out(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    for name in ("first", "second"):  # as make demo trains its seeds one after another
        train(load_recipe("tiny-shapes", [*tiny_overrides("tiny-shapes"), "grpo.max_steps=1"]), tmp_path / name)
        assert list((tmp_path / name / "tensorboard").rglob("events.out.tfevents.*")), name
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "mine"))  # a folder the user chose is kept
    train(load_recipe("tiny-shapes", [*tiny_overrides("tiny-shapes"), "grpo.max_steps=1"]), tmp_path / "third")
    assert list((tmp_path / "mine").rglob("events.out.tfevents.*"))

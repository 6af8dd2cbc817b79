"""Recipes fail fast with one clear line, before any model loads."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vizer.config import RECIPES_DIR, RecipeError, apply_overrides, load_recipe

ROOT = Path(__file__).resolve().parents[2]


def write_recipe(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((RECIPES_DIR / "tiny-shapes.yaml").read_text())
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_every_shipped_recipe_validates(shipped_recipe):
    recipe = load_recipe(shipped_recipe)
    assert recipe["rewards"] and recipe["model"]["id"]


def test_overrides_reach_nested_keys_and_list_entries():
    recipe = load_recipe(
        "tiny-shapes", ["grpo.max_steps=3", "data.limit=8", "rewards.0.model=tiny:siglip", "model.lora.r=4"]
    )
    assert recipe["grpo"]["max_steps"] == 3 and recipe["data"]["limit"] == 8
    assert recipe["rewards"][0]["model"] == "tiny:siglip" and recipe["model"]["lora"]["r"] == 4


def test_yaml_exponent_without_dot_is_a_number():
    recipe = load_recipe("tiny-shapes", ["grpo.learning_rate=1e-5"])
    assert recipe["grpo"]["learning_rate"] == pytest.approx(1e-5)


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda r: r["model"].update(quantisation="4bit"),
            "unknown key 'model.quantisation' (did you mean 'quantization'?)",
        ),
        (
            lambda r: r["grpo"].update(num_generation=4),
            "unknown key 'grpo.num_generation' (did you mean 'num_generations'?)",
        ),
        (lambda r: r.update(reward=[]), "unknown key 'reward' (did you mean 'rewards'?)"),
        (lambda r: r["grpo"].update(max_steps="ten"), "'grpo.max_steps' expects an integer"),
        (lambda r: r["model"]["lora"].update(r="big"), "'model.lora.r' expects an integer"),
        (lambda r: r["model"].update(quantization="3bit"), "'model.quantization' must be one of none, 4bit, 8bit"),
        (
            lambda r: r["data"].update(source="folder", path="/no/such/folder"),
            "image folder not found: /no/such/folder",
        ),
        (lambda r: r["model"].update(id="./no/such/model"), "model folder not found: ./no/such/model"),
        (lambda r: r["rewards"].append({"name": "groundng"}), "groundng"),
        (lambda r: r["rewards"].append({"name": "no_such_pkg.mod:factory"}), "no_such_pkg"),
        (lambda r: r["grpo"].update(output_dir="x"), "'grpo.output_dir' is set by the runner"),
    ],
)
def test_bad_recipe_gives_one_clear_line(tmp_path, mutate, expected):
    path = write_recipe(tmp_path, mutate)
    with pytest.raises(RecipeError) as err:
        load_recipe(str(path))
    message = str(err.value)
    assert expected in message, message
    assert "\n" not in message


def test_unknown_reward_plugin_names_the_closest(tmp_path):
    path = write_recipe(tmp_path, lambda r: r["rewards"].append({"name": "groundng"}))
    with pytest.raises(RecipeError, match="grounding"):
        load_recipe(str(path))


def test_unknown_recipe_lists_available():
    with pytest.raises(RecipeError, match="did you mean 'tiny-shapes'"):
        load_recipe("tiny-shape")


def test_override_on_a_missing_list_index():
    with pytest.raises(RecipeError, match="rewards.9"):
        apply_overrides({"rewards": [{}]}, ["rewards.9.model=x"])


@pytest.mark.parametrize(
    "args",
    [
        ["train", "tiny-shape"],
        ["train", "tiny-shapes", "grpo.num_generation=2"],
        ["check", "tiny-shapes", "model.lora.r=big"],
        # only trl.GRPOConfig itself knows: 8 completions per step cannot split into groups of 3
        ["check", "tiny-shapes", "grpo.images_per_step=null", "grpo.num_generations=3"],
        ["check", "tiny-shapes", "--processes", "3"],  # 2 images per step cannot split over 3 GPUs
        ["check", "tiny-shapes", "plugins=[no_such_plugin]"],
        ["check", "tiny-shapes", "data.source=shape"],
    ],
)
def test_cli_exits_2_with_one_line_and_no_traceback(args):
    result = subprocess.run(
        [sys.executable, "-m", "vizer", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr


def test_check_builds_the_trainer_config_as_train_would():
    result = subprocess.run(
        [sys.executable, "-m", "vizer", "check", "tiny-shapes", "grpo.images_per_step=null", "grpo.num_generations=3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "grpo:" in result.stderr and "num_generations" in result.stderr, result.stderr


def test_plugin_sources_need_their_plugin(tmp_path):
    path = write_recipe(tmp_path, lambda r: r.pop("plugins"))
    # a fresh process: nothing has imported shapescap, so `source: shapes` is unknown until the recipe names it
    result = subprocess.run(
        [sys.executable, "-m", "vizer", "check", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "'data.source': unknown data source 'shapes'" in result.stderr and "plugins: [shapescap]" in result.stderr
    path = write_recipe(tmp_path, lambda r: r["data"].update(source="shape"))
    with pytest.raises(RecipeError, match=r"^'data.source': unknown data source 'shape' \(did you mean 'shapes'\?\)"):
        load_recipe(str(path))

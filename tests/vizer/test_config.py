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
        # what train refused only after loading the model, or at its first step
        ["check", "tiny-shapes", "model.share_prefix=true", "model.lora.dropout=0.05"],
        ["check", "tiny-shapes", "grpo.multi_objective_aggregation=sum"],
        ["train", "tiny-shapes", "grpo.multi_objective_aggregation=sum"],
        ["check", "tiny-shapes", "rewards.0={name: phrase_grounding, model: 'tiny:clip', margin: 2}"],
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


# ---------------------------------------------------------------------------------------------- recipe files
TINY = (RECIPES_DIR / "tiny-shapes.yaml").read_text()


def test_a_key_twice_in_one_mapping_is_an_error_naming_key_and_line(tmp_path):
    # Fails if the loader keeps the later value (PyYAML's default), dropping the earlier block's settings.
    path = tmp_path / "twice.yaml"
    path.write_text(TINY + "\ngrpo:\n  max_steps: 3\n")  # a second grpo: block at the end
    line = len(TINY.splitlines()) + 2
    first = TINY.splitlines().index("grpo:") + 1
    with pytest.raises(RecipeError, match=rf"line {line} .*duplicate key 'grpo' \(first at line {first}\)"):
        load_recipe(str(path))
    path.write_text(
        TINY.replace("  quantization: none\n", "  quantization: none\n  dtype: float32\n  quantization: 4bit\n")
    )
    with pytest.raises(RecipeError, match=r"duplicate key 'quantization'"):
        load_recipe(str(path))
    # a merge key (<<) may be overridden on purpose: not a duplicate
    path.write_text(
        TINY.replace("grpo:\n", "base: &b {max_steps: 3}\ngrpo:\n  <<: *b\n").replace("description", "name")
    )
    with pytest.raises(RecipeError, match="unknown key 'base'"):  # got past the loader
        load_recipe(str(path))


@pytest.mark.parametrize(
    "text, key",
    [
        ("grpo: {max_steps: 2, max_steps: 3}\n", "max_steps"),  # flow mapping, keys on one line
        ("grpo: {max_steps: 2,\n  logging_steps: 1, max_steps: 3}\n", "max_steps"),  # flow over two lines
        ("eval: {batch_size: 2}\neval: {batch_size: 4}\n", "eval"),  # flow mappings as block values
        ("rewards:\n  - {name: length, weight: 1, weight: 2}\n", "weight"),  # inside a list entry
        ("grpo:\n  max_steps: 2\n  'max_steps': 3\n", "max_steps"),  # quoted and plain: one key
        ("b: &b {max_steps: 2}\ngrpo:\n  <<: *b\n  seed: 1\n  seed: 2\n", "seed"),  # beside a merge key
        ("b: &b {max_steps: 2}\ngrpo:\n  <<: *b\n  <<: *b\n", "<<"),  # the merge key itself twice
    ],
)
def test_a_duplicate_key_is_found_in_every_yaml_form(text, key):
    # Fails where one form slips through and PyYAML silently keeps the later value.
    from vizer.config import load_yaml

    with pytest.raises(yaml.YAMLError, match=rf"duplicate key '{key}' \(first at line \d+\)"):
        load_yaml(text)


def test_keys_a_merge_brings_in_may_be_overridden_and_aliases_are_no_duplicates():
    from vizer.config import load_yaml

    text = "b: &b {max_steps: 2, seed: 1}\ngrpo:\n  <<: *b\n  seed: 3\nother: *b\nmore: *b\n"
    assert load_yaml(text)["grpo"] == {"max_steps": 2, "seed": 3}
    nested = "a: &a {x: 1}\nb: &b {<<: *a, y: 2}\nc: {<<: *b, x: 5, y: 6}\n"
    assert load_yaml(nested)["c"] == {"x": 5, "y": 6}


def test_a_recipe_that_expands_through_aliases_is_refused_fast_without_printing_it(tmp_path):
    # Fails if aliases are expanded without a bound (MemoryError after tens of seconds) or the error shows the value.
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        laughs.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(laughs) + "\nprompt: [*i, *i]\n")
    assert path.stat().st_size < 600
    result = subprocess.run(
        [sys.executable, "-m", "vizer", "check", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert "expands to more than" in line and "lol" not in line and len(line) < 300
    # a value too large to be a count is shown cut short, never whole
    with pytest.raises(RecipeError, match=r"'prompt' expects a string") as err:
        load_recipe("tiny-shapes", ["prompt=[" + ", ".join(["word"] * 5000) + "]"])
    assert len(str(err.value)) < 200


@pytest.mark.parametrize(
    "key", ["model.share_vision", "model.quantization", "model.dtype", "objective", "mapper.variant"]
)
def test_a_value_outside_the_choices_is_one_line_listing_them(key):
    # Fails if formatting the choices crashes (share_vision's true/false are bools) instead of naming the key.
    with pytest.raises(RecipeError, match=rf"^'{key}' must be one of .*, got 'maybe'$") as err:
        load_recipe("tiny-shapes", [f"{key}=maybe"])
    if key == "model.share_vision":
        assert "auto, true, false" in str(err.value)


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "grpo.multi_objective_aggregation=sum",
            "'grpo.multi_objective_aggregation' must be one of sum_then_normalize",
        ),
        ("grpo.multi_objective_aggregation=3", "'grpo.multi_objective_aggregation' must be one of"),
        ("grpo.loss_type=ppo", "'grpo.loss_type' must be one of grpo, dr_grpo"),
        ("grpo.scale_rewards=std", "'grpo.scale_rewards' must be one of group, batch, none, true, false"),
        ("grpo.importance_sampling_level=[token]", "'grpo.importance_sampling_level' must be one of token"),
        ("grpo.cache_implementation=fast", "'grpo.cache_implementation' must be one of"),
        ("grpo.log_level=3", "'grpo.log_level' expects a string, got 3"),
        ("model.share_prefix=true", "'model.share_prefix' is true, but model.lora.dropout is 0.05"),
        ("model.merge_for_generation=true", "'model.merge_for_generation' is true, but model.lora.dropout is 0.05"),
    ],
)
def test_what_training_would_refuse_after_loading_the_model_check_refuses(override, expected):
    with pytest.raises(RecipeError) as err:
        load_recipe("tiny-shapes", ["model.lora.dropout=0.05", override])
    assert str(err.value).startswith(expected)


def test_trainer_choices_are_the_values_trl_names():
    # Fails when the runner's list of a field's values drifts from the values TRL's help for the field names.
    import dataclasses
    import re

    from trl import GRPOConfig

    from vizer.config import GRPO_CHOICES

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(GRPOConfig)}
    for key, choices in GRPO_CHOICES.items():
        named = set(re.findall(r"[`']([a-z_]+)[`']", helps[key]))
        assert {c for c in choices if not isinstance(c, bool)} <= named, key
    settings = ["grpo.scale_rewards=false", "grpo.multi_objective_aggregation=normalize_then_sum"]
    assert load_recipe("tiny-shapes", settings)["grpo"]["scale_rewards"] is False


def test_all_zero_reward_weights_and_impossible_batches_are_refused():
    # Fails if check accepts a run that cannot learn (every advantage 0) or can never take a step.
    zero = [f"rewards.{i}.weight=0" for i in range(5)]
    with pytest.raises(RecipeError, match=r"^'rewards': every weight is 0"):
        load_recipe("tiny-shapes", zero)
    load_recipe("tiny-shapes", zero[:-1])  # one reward left is enough
    with pytest.raises(RecipeError, match=r"'grpo.images_per_step' \(65536\) is more than the 64 images of data.limit"):
        load_recipe("tiny-shapes", ["grpo.images_per_step=65536"])
    with pytest.raises(RecipeError, match=r"'grpo.images_per_step' is too large"):
        load_recipe("tiny-shapes", ["grpo.images_per_step=100000000000000000000", "data.limit=null"])


@pytest.mark.parametrize("processes", ["0", "-1"])
def test_check_with_no_or_negative_processes_is_one_line(processes):
    result = subprocess.run(
        [sys.executable, "-m", "vizer", "check", "tiny-shapes", "--processes", processes],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line == f"error: --processes must be at least 1 (the GPUs to split the batch over), got {processes}"


# ---------------------------------------------------------------------------------------------- checkpointing
@pytest.mark.parametrize("section", ["grpo", "vizer"])
def test_either_checkpointing_spelling_reaches_the_trainer_under_the_installed_name(section, tmp_path):
    from transformers import TrainingArguments

    from vizer.train import training_args

    installed = (
        "activation_checkpointing"
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else ("gradient_checkpointing")
    )
    base = ["objective=vizer", "mapper.path=null"] if section == "vizer" else []
    base += ["mapper_data={source: shapes, split: validation, limit: 4}"] if section == "vizer" else []
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        for value in (True, False):
            recipe = load_recipe("tiny-shapes", [*base, f"{section}.{name}={str(value).lower()}"])
            spelled = {k for k in recipe[section] if "checkpointing" in k}
            assert spelled == {installed}, spelled
            assert recipe[section][installed] is value
            args = training_args(recipe, tmp_path, processes=1)
            assert args.gradient_checkpointing is value and getattr(args, installed) is value
    # the two names in one file with different values: one line naming both
    path = tmp_path / "both.yaml"
    raw = yaml.safe_load(TINY)
    raw.setdefault(section, {}).update(gradient_checkpointing=True, activation_checkpointing=False)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(
        RecipeError, match=rf"^'{section}.activation_checkpointing' \(False\) and '{section}.gradient_che"
    ):
        load_recipe(str(path))
    raw[section]["gradient_checkpointing"] = False  # the same value twice is harmless
    path.write_text(yaml.safe_dump(raw))
    assert load_recipe(str(path))[section][installed] is False


def test_shipped_recipes_spell_checkpointing_one_way(shipped_recipe):
    raw = yaml.safe_load((RECIPES_DIR / f"{shipped_recipe}.yaml").read_text())
    for section in ("grpo", "vizer"):
        assert "gradient_checkpointing" not in (raw.get(section) or {}), f"{shipped_recipe}: {section}"


def test_a_run_saved_under_the_old_checkpointing_name_resumes_unchanged():
    # Fails if a rerun compares the spellings literally: every older run would be refused as "another recipe".
    from vizer.run_dir import recipe_changes

    new = load_recipe("tiny-shapes")
    saved = yaml.safe_load(yaml.safe_dump(new))
    saved["grpo"]["gradient_checkpointing"] = saved["grpo"].pop("activation_checkpointing")
    assert recipe_changes(saved, new) == ([], [])
    saved["grpo"]["gradient_checkpointing"] = True
    assert recipe_changes(saved, new)[1] == ["grpo.activation_checkpointing"]


@pytest.mark.parametrize("version", ["2", "3"])
def test_flash_attention_without_its_package_is_one_line_before_the_model_loads(version, monkeypatch):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, f"is_flash_attn_{version}_available", lambda: False)
    with pytest.raises(
        RecipeError, match=rf"^'model.attn_implementation' is flash_attention_{version}, but flash-attn"
    ):
        load_recipe("tiny-shapes", [f"model.attn_implementation=flash_attention_{version}"])
    monkeypatch.setattr(transformers.utils, f"is_flash_attn_{version}_available", lambda: True)
    load_recipe("tiny-shapes", [f"model.attn_implementation=flash_attention_{version}"])

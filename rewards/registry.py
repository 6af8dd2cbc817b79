"""From a recipe's reward entry to a TRL reward callable.

An entry is `{name: <builtin or "pkg.module:factory">, weight: <float>, id: <optional name>, **options}`.
`weight` goes to TRL's `reward_weights` (not to the plugin); every other key is a keyword argument of the
factory. The callable's `__name__` is the entry's `id` or `name`, so TRL logs `rewards/<that>/mean`.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any

from data.errors import ConfigError, closest

from .common import Reward

BUILTINS: dict[str, str] = {
    "grounding": "rewards.grounding:grounding",
    "consistency": "rewards.consistency:consistency",
    "length": "rewards.guards:length",
    "repetition": "rewards.guards:repetition",
    "degenerate": "rewards.guards:degenerate",
    "latent": "rewards.latent:latent",
    "phrase_grounding": "rewards.phrase_level:phrase_grounding",
    "phrase_agreement": "rewards.phrase_level:phrase_agreement",
    "counterfactual_grounding": "rewards.counterfactual:counterfactual_grounding",
}
# The built-ins that score captions with an image scorer (`model`: a CLIP/SigLIP-style checkpoint).
IMAGE_SCORER_REWARDS = ("grounding", "phrase_grounding", "counterfactual_grounding")
RESERVED = ("name", "weight", "id")
# Filled in by the runner when the factory takes them and the entry does not set them: the training device, the
# recipe's prompt, the run's trained mapper folder and the recipe's image-processor options (model.processor).
INJECTED = ("device", "prompt", "mapper", "image_options")


class RewardConfigError(ConfigError):
    """A reward entry that cannot be built; the message is one line naming the entry and the key."""


def checks_options(check: Callable[..., None]) -> Callable[[Callable], Callable]:
    """Mark a factory with `check`, called with the factory's arguments (the entry's options over the
    defaults) when a recipe is checked, before any model loads; it raises ValueError naming the option. The
    factory (or its reward) should call the same check, so the two never disagree."""

    def mark(factory: Callable) -> Callable:
        factory.check_options = check
        return factory

    return mark


def _closest(word: str, choices: typing.Iterable[str]) -> str:
    """'(did you mean 'x'?); valid: a, b' after a message about `word`."""
    choices = list(choices)
    return f"{closest(word, choices)}; valid: {', '.join(choices) or '(none)'}"


def _where(entry: Any, index: int | None) -> str:
    name = (entry.get("id") or entry.get("name")) if isinstance(entry, dict) else None
    where = f"rewards[{index}]" if index is not None else "reward entry"
    return where + (f" ({name})" if isinstance(name, str) else "")


def resolve_factory(name: str) -> Callable[..., Callable]:
    """The factory for a builtin name or an import path `pkg.module:factory`."""
    target = BUILTINS.get(name, name)
    if ":" not in target:
        raise RewardConfigError(f"unknown reward plugin '{name}'{_closest(name, BUILTINS)} or 'pkg.module:factory'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardConfigError(f"reward plugin '{name}': cannot import module '{module_name}' ({e})") from None
    except Exception as e:  # the plugin's own code fails at import (SyntaxError, RuntimeError, ...)
        first = str(e).splitlines()[0] if str(e) else ""
        raise RewardConfigError(
            f"reward plugin '{name}': importing '{module_name}' failed ({type(e).__name__}: {first})"
        ) from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = [
            n
            for n, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module.__name__ and not n.startswith("_")
        ]
        raise RewardConfigError(
            f"reward plugin '{name}': '{module_name}' has no factory '{attr}'{_closest(attr, public)}"
        )
    return factory


def _type_ok(value: Any, hint: Any) -> tuple[bool, str]:
    """Whether value fits a simple annotation (anything unusual is accepted and left to the factory)."""
    origin = typing.get_origin(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True, ""
    if origin in (typing.Union, types.UnionType):
        results = [_type_ok(value, h) for h in typing.get_args(hint)]
        return any(ok for ok, _ in results), next((m for ok, m in results if m), "")
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return True, ""
        return False, f"must be one of {', '.join(map(str, choices))}{closest(str(value), map(str, choices))}"
    if hint is type(None):
        return value is None, ""
    if hint is bool:
        return isinstance(value, bool), ""
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), ""
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), ""
    if hint is str:
        return isinstance(value, str), ""
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple)), ""
    if origin is dict or hint is dict:
        return isinstance(value, dict), ""
    return True, ""


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def validate_reward_entry(entry: dict, index: int | None) -> None:
    """Check an entry without building it: the plugin resolves, its options exist and have sane types."""
    if not isinstance(entry, dict):
        raise RewardConfigError(
            f"{_where(entry, index)}: expected a mapping like {{name: grounding, weight: 1.0}}, got {type(entry).__name__}"
        )
    where = _where(entry, index)
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise RewardConfigError(f"{where}: missing 'name' (a builtin: {', '.join(BUILTINS)}; or 'pkg.module:factory')")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        raise RewardConfigError(f"{where}: 'weight' must be a finite number, got {weight!r}")
    if "id" in entry and not (isinstance(entry["id"], str) and re.fullmatch(r"[A-Za-z_][\w.-]*", entry["id"])):
        raise RewardConfigError(f"{where}: 'id' must be a name (letters, digits, _ . -), got {entry['id']!r}")
    try:
        factory = resolve_factory(name)
    except RewardConfigError as e:
        raise RewardConfigError(f"{where}: {e}") from None
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # unresolvable annotations in a user plugin: skip the type checks
        hints = {}
    for key, value in entry.items():
        if key in RESERVED:
            continue
        if key not in accepted:
            if takes_any:
                continue
            valid = [n for n in accepted if n not in INJECTED] + [n for n in accepted if n in INJECTED] + list(RESERVED)
            raise RewardConfigError(f"{where}: unknown option '{key}'{_closest(key, valid)}")
        ok, why = _type_ok(value, hints.get(key, inspect.Parameter.empty))
        if not ok:
            raise RewardConfigError(
                f"{where}: option '{key}' {why or 'must be ' + _describe(hints[key])}, got {value!r}"
            )
    missing = [
        n
        for n, p in params.items()
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and n not in entry
        and n not in INJECTED
    ]
    if missing:
        raise RewardConfigError(f"{where}: missing required option '{missing[0]}'")
    _check_values(factory, {k: v for k, v in entry.items() if k in accepted}, where)


def _check_values(factory: Callable, options: dict, where: str) -> None:
    """The factory's own check of its option values (`checks_options`), without building anything."""
    check = getattr(factory, "check_options", None)
    if check is None:
        return
    bound = inspect.signature(factory).bind_partial(**options)
    bound.apply_defaults()
    try:
        check(**bound.arguments)
    except (ValueError, TypeError) as e:
        raise RewardConfigError(f"{where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def reward_name(entry: dict) -> str:
    """The name TRL logs the reward under: the entry's `id`, else its plugin name (last part of a path)."""
    return entry.get("id") or re.split(r"[:.]", entry["name"])[-1]


class NamedReward:
    """Gives a reward callable the name TRL logs it under, without renaming a shared function."""

    def __init__(self, func: Callable, name: str) -> None:
        self.func, self.__name__ = func, name

    def __call__(self, *args: Any, **kwargs: Any) -> list[float]:
        return self.finite(self.func(*args, **kwargs), kwargs.get("log_metric"))

    def finite(self, values: Any, log_metric: Callable[[str, float], None] | None) -> list:
        """NaN/inf (which TRL would silently drop from the mean) become the call's lowest finite value, and are
        counted in `rewards/<name>/nonfinite` as the Reward base class does; None (not applicable) stays."""
        values = list(values)
        bad = [i for i, v in enumerate(values) if v is not None and not math.isfinite(float(v))]
        if bad:
            finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
            floor = min(finite) if finite else 0.0
            for i in bad:
                values[i] = floor
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/nonfinite", float(len(bad)))
        return values


class AsyncNamedReward(NamedReward):
    async def __call__(self, *args: Any, **kwargs: Any) -> list[float]:
        return self.finite(await self.func(*args, **kwargs), kwargs.get("log_metric"))


def build_reward(entry: dict, *, device: str = "cpu", prompt: str = "", **context: Any) -> Callable:
    """Validate the entry, call its factory with the options, plus whatever of device, prompt and the runner's
    `context` (see INJECTED) the factory takes and the entry does not set."""
    validate_reward_entry(entry, None)
    factory = resolve_factory(entry["name"])
    params = inspect.signature(factory).parameters
    options = {k: v for k, v in entry.items() if k not in RESERVED}
    for key, value in {"device": device, "prompt": prompt, **context}.items():
        if key in params and key not in options and value is not None:
            options[key] = value
    if "mapper" in params and "mapper" not in options and params["mapper"].default is inspect.Parameter.empty:
        raise RewardConfigError(
            f"{_where(entry, None)}: needs a trained mapper: set 'mapper' or give the recipe "
            "a mapper_data section (make mapper)"
        )
    func = factory(**options)
    if not callable(func):
        raise RewardConfigError(f"{_where(entry, None)}: the factory returned {type(func).__name__}, not a callable")
    name = reward_name(entry)
    if isinstance(func, Reward):  # built fresh by the factory: name it in place
        func.__name__ = name
        return func
    call = func if inspect.isfunction(func) or inspect.ismethod(func) else func.__call__
    return (AsyncNamedReward if inspect.iscoroutinefunction(call) else NamedReward)(func, name)

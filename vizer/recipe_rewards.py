"""A recipe's reward entries as TRL reward callables, as training and evaluation build them."""

from __future__ import annotations

from pathlib import Path

from rewards import build_reward, reward_name
from vizer.config import RecipeError, needs_mapper
from vizer.mapper import mapper_dir
from vizer.model_ids import resolve_reward_entry


def print_rewards(recipe: dict, say=print) -> None:
    total = sum(abs(float(e.get("weight", 1.0))) for e in recipe["rewards"]) or 1.0
    say("rewards (effective weight, share of total):")
    for entry in recipe["rewards"]:
        weight = float(entry.get("weight", 1.0))
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        say(f"  {reward_name(entry):<14} x{weight:<6g} {abs(weight) / total:5.0%}  {options or ''}")


def build_rewards(recipe: dict, device: str, out_dir: Path | None = None) -> list:
    mapper = str(mapper_dir(recipe, out_dir)) if out_dir is not None and needs_mapper(recipe) else None
    funcs = []
    for i, entry in enumerate(recipe["rewards"]):
        try:
            funcs.append(
                build_reward(
                    resolve_reward_entry(entry),
                    device=device,
                    prompt=recipe["prompt"],
                    mapper=mapper,
                    image_options=recipe["model"]["processor"] or None,
                )
            )
        except OSError as err:  # a scorer that is neither a folder nor reachable on the hub
            raise RecipeError(
                f"'rewards[{i}]' ({reward_name(entry)}): cannot load its model ({str(err).splitlines()[0]})"
            ) from None
    return funcs

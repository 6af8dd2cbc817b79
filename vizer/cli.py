"""Command line: `python -m vizer train <recipe> [--out DIR] [key.sub=value ...]`."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from vizer.config import RecipeError


def _train(args: argparse.Namespace) -> None:
    from vizer.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    from vizer.train import train  # heavy imports only after the recipe is known to be valid

    train(recipe, Path(args.out or f"outputs/{recipe['name']}"))


def _check(args: argparse.Namespace) -> None:
    from vizer.config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: ok ({recipe['model']['id']}, {len(recipe['rewards'])} rewards)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vizer", description="Zero-label caption enhancement for VLMs with GRPO.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a caption adapter from a recipe")
    t.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or a path to a YAML file")
    t.add_argument("--out", help="run directory (default outputs/<recipe>); re-running into it resumes")
    t.add_argument("overrides", nargs="*", help="recipe overrides, e.g. grpo.max_steps=2 data.limit=8")
    t.set_defaults(func=_train)
    c = sub.add_parser("check", help="validate a recipe without loading any model")
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

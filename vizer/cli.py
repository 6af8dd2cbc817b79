"""Command line: `python -m vizer train|check|eval|caption|merge|push ...` (see `python -m vizer -h`)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from vizer.config import RecipeError, load_recipe


def _train(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    import torch.distributed as dist

    from vizer.train import train  # heavy imports only after the recipe is known to be valid

    try:
        train(recipe, Path(args.out or f"outputs/{recipe['name']}"))
    finally:
        # under `accelerate launch`: gloo's worker threads still alive when the interpreter shuts down can
        # abort the process (SIGABRT) after a finished run, so the group goes first, once per process
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _check(args: argparse.Namespace) -> None:
    if args.processes < 1:
        raise RecipeError(f"--processes must be at least 1 (the GPUs to split the batch over), got {args.processes}")
    recipe = load_recipe(args.recipe, args.overrides)
    from vizer.train import trainer_settings, training_args  # heavy imports only once the recipe is valid

    with tempfile.TemporaryDirectory() as out:  # builds the trainer's config as `make train` would, writes nothing
        training_args(recipe, Path(out), args.processes)
    plan = trainer_settings(recipe, args.processes)[1]
    print(f"{args.recipe}: ok ({recipe['model']['id']}, {len(recipe['rewards'])} rewards)")
    if plan is not None:
        print(plan.describe())


def _gpus(args: argparse.Namespace) -> None:
    import torch  # only for this command: counting the GPUs

    from vizer.scale import check_gpus

    check_gpus(args.processes, torch.cuda.device_count())


def _mapper(args: argparse.Namespace) -> None:
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe["mapper_data"] is None:
        raise RecipeError(f"{args.recipe}: no mapper_data section (the images the mapper learns from)")
    from vizer.mapper import mapper_dir, train_recipe_mapper  # heavy imports only for the command that runs

    out = Path(args.out or f"outputs/{recipe['name']}")
    folder = mapper_dir(recipe, out)
    if (folder / "mapper.json").is_file():
        print(f"mapper: {folder} is already trained (delete it to train again)")
        return
    train_recipe_mapper(recipe, folder)


def _eval(args: argparse.Namespace) -> None:
    from vizer.eval.evaluate import evaluate  # heavy imports (torch, transformers) only for the command that runs

    evaluate(Path(args.run), args.overrides, images=Path(args.images) if args.images else None, limit=args.limit)


def _caption(args: argparse.Namespace) -> None:
    from vizer.eval.caption import caption_folder  # heavy imports (torch, transformers) only for the command that runs

    adapter, images = Path(args.adapter), Path(args.images)
    out = Path(args.out) if args.out else adapter.parent / "captions.jsonl"
    caption_folder(adapter, images, out, prompt=args.prompt)


def _merge(args: argparse.Namespace) -> None:
    from vizer.export import merge  # heavy imports (torch, transformers) only for the command that runs

    merge(Path(args.run), Path(args.out) if args.out else None)


def _push(args: argparse.Namespace) -> None:
    from vizer.export import push

    push(Path(args.run), args.repo, merged=args.merged, private=args.private)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vizer", description="Zero-label caption enhancement for VLMs with GRPO.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a caption adapter from a recipe")
    t.add_argument("recipe", help="recipe name (recipes/<name>.yaml) or a path to a YAML file")
    t.add_argument("--out", help="run directory (default outputs/<recipe>); re-running into it resumes")
    t.add_argument("overrides", nargs="*", help="recipe overrides, e.g. grpo.max_steps=2 data.limit=8")
    t.set_defaults(func=_train)
    m = sub.add_parser("mapper", help="ViZer stage A: train the mapper of a recipe into OUT/mapper")
    m.add_argument("recipe")
    m.add_argument("--out", help="run directory (default outputs/<recipe>)")
    m.add_argument("overrides", nargs="*")
    m.set_defaults(func=_mapper)
    c = sub.add_parser("check", help="validate a recipe without loading any model")
    c.add_argument("recipe")
    c.add_argument("--processes", type=int, default=1, help="check the batch split for this many processes (GPUs)")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_check)
    n = sub.add_parser("gpus", help="refuse (one line) to launch more processes than this machine has GPUs")
    n.add_argument("--processes", type=int, required=True, help="processes about to be launched (make's GPUS)")
    n.set_defaults(func=_gpus)
    e = sub.add_parser(
        "eval", help="base vs tuned captions on held-out images: RUN/eval/results.{json,md}, gallery.html"
    )
    e.add_argument("run", help="a finished run directory (holds recipe.yaml and adapter/)")
    e.add_argument(
        "overrides", nargs="*", help="overrides of the run's recipe, e.g. eval.judge=... eval_data.limit=500"
    )
    e.add_argument("--images", help="evaluate on this image folder (optional references in its captions.jsonl)")
    e.add_argument("--limit", type=int, help="evaluate on the first N images of the eval set")
    e.set_defaults(func=_eval)
    k = sub.add_parser("caption", help="caption a folder of images with a trained adapter")
    k.add_argument("--adapter", required=True, help="adapter folder (its run's recipe.yaml names the base model)")
    k.add_argument("--images", required=True, help="image folder (searched recursively)")
    k.add_argument("--out", help="captions.jsonl to write (default: beside the adapter, ADAPTER/../captions.jsonl)")
    k.add_argument("--prompt", help="prompt (default: the run's recipe prompt)")
    k.set_defaults(func=_caption)
    g = sub.add_parser("merge", help="merge a run's adapter into its full-precision base model: RUN/merged")
    g.add_argument("run", help="a finished run directory (holds recipe.yaml and adapter/)")
    g.add_argument("--out", help="folder to write (default RUN/merged)")
    g.set_defaults(func=_merge)
    u = sub.add_parser("push", help="upload a run's adapter (or merged model) with a model card to the Hub")
    u.add_argument("run", help="a finished run directory (holds recipe.yaml and adapter/)")
    u.add_argument("--repo", required=True, help="Hub repository id, e.g. user/smolvlm-captions")
    u.add_argument("--merged", action="store_true", help="upload RUN/merged (merged first when missing or stale)")
    u.add_argument("--private", action="store_true", help="create the repository as private")
    u.set_defaults(func=_push)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    # argparse stops collecting overrides at the first option: `eval RUN a=1 --limit 3 b=2` keeps b=2 here
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # train saves a checkpoint first and says where (vizer.train.Interrupted)
        print(str(err) or "interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

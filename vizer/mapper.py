"""Stage A of ViZer from a recipe: train (or reuse) the mapper that the `vizer` objective and the `latent`
reward read, and save it under the run directory.

    make mapper RECIPE=<name> [OUT=dir]     # also the first phase of `make train` when the recipe needs one

OUT/mapper/ holds mapper.json (dimensions, base model, variant, held-out cosines) and mapper.safetensors;
another recipe reuses it with `mapper.path: OUT/mapper`.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState

from data import build_dataset
from data.images import UNREADABLE, to_rgb
from rewards.latent import CONFIG, Mapper
from vizer.config import RecipeError
from vizer.model_ids import resolve_model_id
from vizer.models import load_model
from vizer.objective import NEGATIVE_ACCURACY, collect_pairs_generated, train_mapper


def mapper_dir(recipe: dict, out_dir: Path) -> Path:
    """The mapper this run uses: the recipe's `mapper.path`, else OUT/mapper."""
    path = recipe["mapper"]["path"]
    return Path(path).expanduser() if path else out_dir / "mapper"


def mapper_pairs(recipe: dict) -> tuple[list, list[tuple[int, str]] | None]:
    """The images of mapper_data and, for variant GT, their (image index, human caption) pairs."""
    cfg, gt = recipe["mapper_data"], recipe["mapper"]["variant"] == "GT"
    rows = build_dataset(cfg, recipe["prompt"], where="mapper_data", with_references=gt)
    images, pairs, skipped = [], [], 0
    for row in rows:
        try:
            image = to_rgb(row["image"])
        except UNREADABLE:
            skipped += 1
            continue
        if gt:
            pairs += [(len(images), ref) for ref in row.get("references") or [] if ref and ref.strip()]
        images.append(image)
    if skipped:
        print(f"mapper_data: skipped {skipped} unreadable image(s)")
    if not images:
        raise RecipeError("'mapper_data': no readable images")
    if gt and not pairs:
        raise RecipeError("'mapper_data': variant GT found no captions (set mapper_data.captions_column)")
    return images, (pairs if gt else None)


def ensure_mapper(recipe: dict, out_dir: Path) -> Path:
    """The trained mapper's folder, training it first (main process only) when it is not there yet."""
    folder = mapper_dir(recipe, out_dir)
    state = PartialState()
    if not (folder / CONFIG).is_file() and state.is_main_process:
        train_recipe_mapper(recipe, folder)
    state.wait_for_everyone()
    return folder


def check_mapper(folder: Path, recipe: dict) -> Mapper:
    """The mapper at `folder`, loaded on the CPU, or one line (before the policy loads) when it cannot serve
    this recipe's model: unreadable or cut-short files, trained for another base model, or another width."""
    where = "mapper.path" if recipe["mapper"]["path"] else "mapper"
    try:
        mapper = Mapper.load(folder)
    except Exception as err:  # noqa: BLE001 (json, safetensors, shape or key errors: all mean "cannot use it")
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise RecipeError(f"'{where}': cannot load the mapper in {folder} ({detail})") from None
    model_id = recipe["model"]["id"]
    base, path = mapper.meta.get("base_model"), resolve_model_id(model_id)
    if base and base not in (path, model_id):  # a mapper from another model's latents maps noise
        raise RecipeError(
            f"'{where}': the mapper in {folder} was trained for base model {base}, not {model_id}; train one for "
            "this model (make mapper, without mapper.path)"
        )
    from transformers import AutoConfig  # heavy: only for a recipe that uses a mapper

    hidden = AutoConfig.from_pretrained(path, revision=recipe["model"]["revision"]).get_text_config().hidden_size
    if mapper.in_dim != hidden:
        raise RecipeError(
            f"'{where}': the mapper in {folder} takes latents of width {mapper.in_dim}, but {model_id}'s language "
            f"model has {hidden}; train one for this model (make mapper, without mapper.path)"
        )
    return mapper


def train_recipe_mapper(recipe: dict, folder: Path) -> Path:
    settings = recipe["mapper"]
    images, pairs = mapper_pairs(recipe)
    loaded = load_model(recipe["model"], for_training=False)  # the base VLM, frozen: only the mapper learns
    loaded.model.eval().requires_grad_(False)
    print(f"mapper: variant {settings['variant']} on {len(images)} images of {recipe['mapper_data']['source']}")
    if pairs is None:
        pairs = collect_pairs_generated(
            loaded.model,
            loaded.processor,
            images,
            recipe["prompt"],
            n_per_image=settings["pairs_per_image"],
            max_new_tokens=settings["max_new_tokens"],
            seed=settings["seed"],
            temperature=settings["temperature"],
        )
    mapper, report = train_mapper(
        loaded.model,
        loaded.processor,
        images,
        pairs,
        width=settings["width"],
        epochs=settings["epochs"],
        lr=settings["lr"],
        batch_size=settings["batch_size"],
        heldout_fraction=settings["heldout_fraction"],
        seed=settings["seed"],
        variant=settings["variant"],
        base_model=resolve_model_id(recipe["model"]["id"]),
        hard_negatives_weight=settings["hard_negatives"],
        margin=settings["margin"],
    )
    mapper.save(folder)
    (folder / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"mapper: held-out cosine {report['heldout_cosine']:.4f} (another image's: "
        f"{report['heldout_shuffled_cosine']:.4f}) on {report['heldout_pairs']} pairs; saved to {folder}"
    )
    if NEGATIVE_ACCURACY in report:
        print(
            f"mapper: held-out captions closer to their image than their hard negatives: {report[NEGATIVE_ACCURACY]:.3f}"
        )
    return folder

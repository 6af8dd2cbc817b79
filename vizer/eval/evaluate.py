"""`vizer eval RUN`: captions of held-out images from the base model and the tuned adapter, scored side by side.

Writes RUN/eval/results.json ({"dataset", "n_images", "models": {"base": {...}, "tuned": {...}}, ...}),
RUN/eval/results.md (metric | base | tuned | Δ, and notes) and RUN/eval/gallery.html. Captions are cached
in RUN/eval/cache/ per (model, decoding settings, image), so a re-run only generates what is missing.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from transformers import AutoTokenizer

from data import build_dataset, conversational_prompt
from data.images import to_rgb
from data.registry import Source, get_source
from rewards import build_reward, reward_name
from rewards.grounding import grounding
from rewards.registry import IMAGE_SCORER_REWARDS
from vizer.config import DATA_SCHEMA, RecipeError, load_recipe
from vizer.eval.caption import Decoding, generate_captions, report_skipped
from vizer.eval.gallery import GalleryItem, thumbnail_data_uri, write_gallery
from vizer.eval.health import caption_health
from vizer.eval.metrics import clip_scores, reference_scores, text_stats
from vizer.model_ids import resolve_model_id
from vizer.models import check_adapter, load_with_adapter
from vizer.recipe_rewards import build_rewards
from vizer.records import read_records

MODELS = ("base", "tuned")
GALLERY_MAX = 400  # beyond this, the gallery keeps the largest changes both ways (the page stays light)
REWARD_CHUNK = 64  # images per reward call


@dataclass
class EvalImage:
    image_id: str
    source: object  # anything data.images.to_rgb opens; decoded again only when needed
    digest: str  # of the decoded pixels: the cache key does not trust ids alone
    references: list[str] = field(default_factory=list)
    truth: str | None = None  # the source's known truth for this image (e.g. a shapes scene), as JSON


# ---------------------------------------------------------------------------------------------
# Eval set
# ---------------------------------------------------------------------------------------------


def folder_data_cfg(folder: Path, limit: int | None = None) -> dict:
    """A data section for an image folder, as the recipe schema would fill it."""
    if not folder.is_dir():
        raise RecipeError(f"--images: image folder not found: {folder}")
    cfg = {key: default for key, (_, default) in DATA_SCHEMA.items()}
    cfg.update(source="folder", path=str(folder), limit=limit)
    return cfg


def describe_data(cfg: dict) -> str:
    if cfg["source"] == "folder":
        return f"folder:{cfg['path']}"
    name = cfg["id"] if cfg["source"] == "hub" else cfg["source"]
    return f"{name}/{cfg['split']}" + (
        f" (limit {cfg['limit']}, seed {cfg['seed']})"
        if cfg["shuffle"]
        else f" (first {cfg['limit']})"
        if cfg["limit"]
        else ""
    )


def load_eval_set(cfg: dict, prompt: str) -> tuple[list[EvalImage], list[str]]:
    """The eval images with references (and truth, for sources that know it), and the ones skipped."""
    skipped: list[str] = []
    dataset = build_dataset(cfg, prompt, where="eval_data", with_references=True, skipped=skipped)
    if isinstance(dataset, Dataset):  # decode ourselves, so that one broken image is skipped, not fatal
        dataset = dataset.cast_column("image", ImageFeature(decode=False))
    items = []
    for row in dataset:
        try:
            pixels = to_rgb(row["image"]).tobytes()
        except Exception:  # PIL raises many types for broken files: skip and count, never fail the report
            skipped.append(str(row["image_id"]))
            continue
        items.append(
            EvalImage(
                row["image_id"],
                row["image"],
                hashlib.sha1(pixels).hexdigest()[:16],
                [r for r in row.get("references") or [] if r and r.strip()],
                row.get("truth"),
            )
        )
    if not items:
        raise RecipeError("eval: no readable images in the eval set")
    return items, skipped


# ---------------------------------------------------------------------------------------------
# Captions, cached
# ---------------------------------------------------------------------------------------------


def hash_dir(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_file(cache_dir: Path, tag: str, identity: dict) -> Path:
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{tag}-{key}.jsonl"


def read_cache(path: Path) -> dict[str, list[str]]:
    # a line cut short by an interrupted run is not a record: it is generated again
    return {r["key"]: r["captions"] for _, r in read_records(path)[0] if "key" in r and "captions" in r}


def model_captions(
    tag: str, loader, items: Sequence[EvalImage], prompt: str, decoding: Decoding, cache: Path
) -> list[list[str]]:
    """Captions for every item, generating (and appending to the cache) only the missing ones."""
    keys = [f"{it.image_id}@{it.digest}" for it in items]
    cached = read_cache(cache)
    todo = [i for i, k in enumerate(keys) if k not in cached]
    print(f"{tag}: {len(items) - len(todo)} cached, {len(todo)} to generate ({cache.name})")
    if todo:
        loaded = loader()
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a") as f:

            def save(start: int, captions: list[list[str]]) -> None:
                for j, texts in enumerate(captions):
                    key = keys[todo[start + j]]
                    cached[key] = texts
                    f.write(json.dumps({"key": key, "captions": texts}) + "\n")
                f.flush()

            generate_captions(
                loaded, [items[i].source for i in todo], prompt, decoding, on_batch=save, desc=f"captions ({tag})"
            )
        del loaded
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return [cached[k] for k in keys]


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


def build_scorers(recipe: dict, device: str, run: Path) -> tuple[dict, dict]:
    """The training reward plugins by metric name, and CLIP-S scorers by metric suffix ("" and "_judge")."""
    funcs = build_rewards(recipe, device, run)
    rewards = {f"reward/{reward_name(e)}": f for e, f in zip(recipe["rewards"], funcs, strict=True)}
    return rewards, clip_scorers(recipe["eval"], device)


def clip_scorers(eval_cfg: dict, device: str) -> dict:
    """The eval's CLIP-S scorers by metric suffix: "" (eval.scorer) and "_judge" (eval.judge, when set)."""
    judges = {"": eval_cfg["scorer"], "_judge": eval_cfg["judge"]}
    return {
        suffix: build_reward({"name": "grounding", "model": resolve_model_id(model_id)}, device=device)
        for suffix, model_id in judges.items()
        if model_id
    }


def reward_scores(
    rewards: dict, prompt: str, items: Sequence[EvalImage], captions: Sequence[list[str]], tokenizer
) -> dict[str, list[float | None]]:
    """Every training reward's score per caption (image-major, samples contiguous), called as TRL calls it."""
    out: dict[str, list[float | None]] = {name: [] for name in rewards}
    messages = conversational_prompt(prompt)
    for start in range(0, len(items), REWARD_CHUNK):  # an image's samples stay in one call: they are a group
        chunk = range(start, min(start + REWARD_CHUNK, len(items)))
        flat = [(i, c) for i in chunk for c in captions[i]]
        images = {i: to_rgb(items[i].source) for i in chunk}
        columns = {"image": [images[i] for i, _ in flat], "image_id": [items[i].image_id for i, _ in flat]}
        if items[start].truth is not None:
            columns["truth"] = [items[i].truth for i, _ in flat]
        call = {
            "prompts": [messages] * len(flat),
            "completions": [[{"role": "assistant", "content": c}] for _, c in flat],
            "completion_ids": [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c in flat],
            "trainer_state": None,
            "log_extra": lambda *a, **k: None,
            "log_metric": lambda *a, **k: None,
        }
        for name, reward in rewards.items():
            out[name].extend(None if v is None else float(v) for v in reward(**call, **columns))
    return out


def mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]  # NaN would break results.json
    return sum(kept) / len(kept) if kept else None


def score_model(
    items: Sequence[EvalImage],
    captions: Sequence[list[str]],
    rewards: dict,
    scorers: dict,
    source: Source | None = None,
    weights: dict[str, float] | None = None,
) -> tuple[dict, list[dict]]:
    """Corpus metrics and per-image scores (of each image's first caption) for one model's captions; `weights`
    (by reward metric name) weigh the rewards' shares in the `health/*` metrics, as in training."""
    flat = [(i, c) for i, texts in enumerate(captions) for c in texts]
    texts = [c for _, c in flat]
    corpus: dict = {}
    per_flat: list[dict] = [{} for _ in flat]

    def add(name: str, values: Sequence[float | None]) -> None:
        corpus[name] = mean(values)
        for row, v in zip(per_flat, values):
            row[name] = v

    with_refs = any(items[i].references for i, _ in flat)
    for suffix, scorer in scorers.items():
        clip_s, ref_s = clip_scores(
            scorer,
            [items[i].source for i, _ in flat],
            texts,
            [items[i].references for i, _ in flat],
            [items[i].image_id for i, _ in flat],
        )
        add(f"clip_s{suffix}", clip_s)
        if with_refs:
            add(f"refclip_s{suffix}", ref_s)
    for name, values in rewards.items():
        add(name, values)
    corpus.update(text_stats(texts))
    # the health training logs, on these captions (agreement only where an image has several)
    shares = {name.removeprefix("reward/"): [math.nan if v is None else v for v in vs] for name, vs in rewards.items()}
    weights = {name.removeprefix("reward/"): w for name, w in (weights or {}).items()}
    corpus.update(caption_health(texts, [i for i, _ in flat], rewards=shares, weights=weights))
    for row, text in zip(per_flat, texts):
        row["length_words"] = float(len(text.split()))

    keys = [f"{i}#{j}" for i, texts_i in enumerate(captions) for j in range(len(texts_i))]
    refs = {k: items[i].references for k, (i, _) in zip(keys, flat) if items[i].references}
    ref_corpus, ref_each = reference_scores(dict(zip(keys, texts)), refs)
    corpus.update(ref_corpus)
    for key, row in zip(keys, per_flat):
        row.update(ref_each.get(key, {}))
    if source is not None and source.metrics is not None and items and items[0].truth is not None:
        truth_corpus, truth_each = source.metrics(texts, [items[i].truth for i, _ in flat])
        corpus.update(truth_corpus)
        for row, extra in zip(per_flat, truth_each):
            row.update(extra)
    first = {}
    for (i, _), row in zip(flat, per_flat):
        first.setdefault(i, row)
    return corpus, [first[i] for i in range(len(items))]


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def training_scorers(recipe: dict) -> set[str]:
    """The resolved models the image-scoring rewards (grounding and the phrase-level ones) trained against."""
    default = inspect.signature(grounding).parameters["model"].default
    return {resolve_model_id(e.get("model", default)) for e in recipe["rewards"] if e["name"] in IMAGE_SCORER_REWARDS}


def report_notes(recipe: dict, items: Sequence[EvalImage], skipped: int, gallery_note: str | None) -> list[str]:
    notes = []
    trained_on = training_scorers(recipe)
    for key, what in (("scorer", "CLIP-S scorer"), ("judge", "judge")):
        model_id = recipe["eval"][key]
        if model_id and resolve_model_id(model_id) in trained_on:
            notes.append(
                f"the eval {what} ({model_id}) is the training grounding scorer: not an independent judge"
                + ("" if recipe["eval"]["judge"] else "; set eval.judge=<another CLIP/SigLIP> for a second one")
            )
    with_refs = sum(bool(it.references) for it in items)
    if with_refs < len(items):
        notes.append(f"reference metrics use the {with_refs} of {len(items)} images that have references")
    if skipped:
        notes.append(f"{skipped} unreadable image(s) skipped")
    if any(e["name"] == "consistency" for e in recipe["rewards"]) and not recipe["eval"]["do_sample"]:
        notes.append("reward/consistency compares the captions of one image; greedy decoding gives one per image")
    if gallery_note:
        notes.append(gallery_note)
    return notes


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def results_markdown(results: dict, lower_is_better: Sequence[str] = ()) -> str:
    base, tuned = results["models"]["base"], results["models"]["tuned"]
    lines = [
        f"# Evaluation: {results['run']}",
        "",
        f"dataset: {results['dataset']} · images: {results['n_images']} · skipped: {results['skipped_images']}",
        "",
        "| metric | base | tuned | Δ |",
        "|---|---:|---:|---:|",
    ]
    for metric in base:
        b, t = base[metric], tuned.get(metric)
        delta = None if b is None or t is None else t - b
        lines.append(f"| {metric} | {fmt(b)} | {fmt(t)} | {'' if delta is None else f'{delta:+.4g}'} |")
    lower = [m for m in base if m in lower_is_better]
    if lower:
        lines += ["", f"Lower is better for {', '.join(lower)}."]
    if results["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in results["notes"]]]
    settings = results["settings"]
    lines += [
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "prompt"),
        f"Prompt: {settings['prompt']!r}",
        "",
    ]
    return "\n".join(lines)


def gallery_items(items: Sequence[EvalImage], per_image: dict) -> tuple[list[int], str | None]:
    """Indices shown in the gallery: all, or the largest CLIP-S changes both ways when there are many."""
    order = list(range(len(items)))
    if len(order) <= GALLERY_MAX:
        return order, None

    def gain(i: int) -> float:
        b, t = per_image["base"][i].get("clip_s"), per_image["tuned"][i].get("clip_s")
        return 0.0 if b is None or t is None else t - b

    ranked = sorted(order, key=gain)
    half = GALLERY_MAX // 2
    keep = sorted(set(ranked[:half] + ranked[-half:]))
    return keep, (
        f"gallery.html shows {len(keep)} of the {len(items)} evaluated images: the {half} largest CLIP-S "
        f"gains and the {half} largest losses"
    )


def evaluate(
    run: Path,
    overrides: Sequence[str] = (),
    images: Path | None = None,
    limit: int | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Evaluate RUN's adapter against its base model; writes and returns out_dir (default RUN/eval)."""
    recipe_file, adapter = run / "recipe.yaml", run / "adapter"
    if not recipe_file.is_file():
        raise RecipeError(f"eval: {recipe_file} not found (is {run} a finished run directory?)")
    if not adapter.is_dir():
        raise RecipeError(f"eval: {adapter} not found (train first: make train OUT={run})")
    if (adapter / "adapter_config.json").is_file():
        check_adapter(adapter)  # before minutes of base captions
    if limit is not None and limit <= 0:
        raise RecipeError(f"--limit must be positive, got {limit}")
    recipe = load_recipe(str(recipe_file), overrides)
    data_cfg = folder_data_cfg(images.expanduser(), limit) if images else recipe["eval_data"]
    if data_cfg is None:
        raise RecipeError("eval: the recipe has no eval_data; pass --images FOLDER or eval_data.* overrides")
    if limit is not None:
        data_cfg = {**data_cfg, "limit": limit}
    items, skipped_names = load_eval_set(data_cfg, recipe["prompt"])
    skipped = len(skipped_names)
    print(f"eval set: {describe_data(data_cfg)}: {len(items)} images" + (f", {skipped} skipped" if skipped else ""))

    decoding = Decoding.from_eval(recipe["eval"])
    out_dir = out_dir or run / "eval"
    model_keys = ("id", "revision", "family", "quantization", "dtype", "processor")
    common = {
        "prompt": recipe["prompt"],
        "decoding": decoding.cache_key(),
        "model": {**{k: recipe["model"][k] for k in model_keys}, "path": resolve_model_id(recipe["model"]["id"])},
    }  # a tiny: id's path carries its version
    is_peft = (adapter / "adapter_config.json").is_file()
    tuned_cfg = recipe["model"] if is_peft else {**recipe["model"], "id": str(adapter)}  # full fine-tune
    loaders = {
        "base": lambda: load_with_adapter(recipe["model"], None),
        "tuned": lambda: load_with_adapter(tuned_cfg, str(adapter) if is_peft else None),
    }
    identities = {"base": {**common, "weights": "base"}, "tuned": {**common, "weights": hash_dir(adapter)}}
    captions = {
        tag: model_captions(
            tag,
            loaders[tag],
            items,
            recipe["prompt"],
            decoding,
            cache_file(run / "eval" / "cache", tag, identities[tag]),
        )
        for tag in MODELS
    }

    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_id(recipe["model"]["id"]), revision=recipe["model"]["revision"]
    )
    rewards, scorers = build_scorers(recipe, "cuda" if torch.cuda.is_available() else "cpu", run)
    source = get_source(data_cfg["source"])
    weights = {f"reward/{reward_name(e)}": float(e.get("weight", 1.0)) for e in recipe["rewards"]}
    metrics, per_image = {}, {}
    for tag in MODELS:
        values = reward_scores(rewards, recipe["prompt"], items, captions[tag], tokenizer)
        metrics[tag], per_image[tag] = score_model(items, captions[tag], values, scorers, source, weights)

    shown, gallery_note = gallery_items(items, per_image)
    results = {
        "dataset": describe_data(data_cfg),
        "n_images": len(items),
        "models": metrics,
        "run": str(run),
        "skipped_images": skipped,
        "n_with_references": sum(bool(it.references) for it in items),
        "notes": report_notes(recipe, items, skipped, gallery_note),
        "settings": {
            "prompt": recipe["prompt"],
            **decoding.cache_key(),
            "scorer": recipe["eval"]["scorer"],
            "judge": recipe["eval"]["judge"],
            "model": recipe["model"]["id"],
            "adapter": identities["tuned"]["weights"],
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    if skipped_names:
        report_skipped(skipped_names, out_dir / "skipped.txt")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text(results_markdown(results, source.lower_is_better))
    gallery = [
        GalleryItem(
            thumbnail_data_uri(to_rgb(items[i].source)),
            items[i].image_id,
            captions["base"][i][0],
            captions["tuned"][i][0],
            per_image["base"][i],
            per_image["tuned"][i],
            items[i].references,
        )
        for i in shown
    ]
    write_gallery(
        out_dir / "gallery.html",
        gallery,
        title=f"{run.name}: base vs tuned ({results['dataset']})",
        lower_is_better=source.lower_is_better,
        default_metric="clip_s",
        total=len(items),
        subset_note=gallery_note,
    )
    print(results_markdown(results, source.lower_is_better))
    print(f"wrote {out_dir / 'results.json'}, results.md, gallery.html")
    return out_dir

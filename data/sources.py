"""Hub datasets, image folders and synthetic shapes, all as prompt rows."""
from __future__ import annotations

import io
import json
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset
from datasets import Image as ImageFeature
from PIL import Image, UnidentifiedImageError

from data.shapes import SPLITS, describe, render, shapes_scenes
from vizer.config import RecipeError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEFAULT_SHAPES_LIMIT = 256


def conversational_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def build_dataset(cfg: dict, prompt: str, *, where: str = "data", with_references: bool = False
                  ) -> Dataset | IterableDataset:
    """Rows {prompt, image, image_id[, scene][, references]} from a validated data section."""
    builders = {"hub": _hub, "folder": _folder, "shapes": _shapes}
    dataset = builders[cfg["source"]](cfg, where, with_references)
    messages = conversational_prompt(prompt)
    return dataset.map(lambda _: {"prompt": messages})


def _hub(cfg: dict, where: str, with_references: bool) -> Dataset | IterableDataset:
    try:
        dataset = load_dataset(cfg["id"], cfg["config"], split=cfg["split"], streaming=cfg["streaming"])
    except Exception as err:  # datasets raises many types; the user needs the first line
        raise RecipeError(f"'{where}.id': cannot load {cfg['id']} split {cfg['split']} "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    columns = _column_names(dataset)
    wanted = {"image_column": cfg["image_column"], "id_column": cfg["id_column"]}
    if with_references:
        wanted["captions_column"] = cfg["captions_column"]
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise RecipeError(f"'{where}.{key}': column '{column}' not in {cfg['id']} (columns: {', '.join(columns)})")
    if cfg["shuffle"]:
        dataset = (dataset.shuffle(seed=cfg["seed"], buffer_size=1000) if cfg["streaming"]
                   else dataset.shuffle(seed=cfg["seed"]))
    if cfg["limit"] is not None and not cfg["streaming"]:
        dataset = dataset.take(cfg["limit"])
    image_column = cfg["image_column"]
    if _is_image_feature(dataset, image_column):
        # Decode ourselves so that one corrupt picture is skipped instead of stopping a long run.
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    prefix = f"{cfg['id']}/{cfg['split']}"

    def to_row(example: dict, index: int) -> dict:
        image_id = str(example[cfg["id_column"]]) if cfg["id_column"] else f"{prefix}/{index}"
        row = {"image": _open_image(example[image_column], image_id, where), "image_id": image_id}
        if with_references and cfg["captions_column"]:
            refs = example[cfg["captions_column"]]
            row["references"] = [refs] if isinstance(refs, str) else list(refs)
        return row

    rows = dataset.map(to_row, with_indices=True, remove_columns=columns).filter(lambda r: r["image"] is not None)
    if cfg["limit"] is not None and cfg["streaming"]:
        rows = rows.take(cfg["limit"])
    if isinstance(rows, Dataset):  # stored rows: decode on access again
        rows = rows.cast_column("image", ImageFeature())
    return rows


def _is_image_feature(dataset: Dataset | IterableDataset, column: str) -> bool:
    return isinstance((dataset.features or {}).get(column), ImageFeature)


ImageSource = Image.Image | Path | str | dict


def load_image(source: ImageSource) -> Image.Image:
    """A fully decoded PIL image from a PIL image, a file path, or datasets' {"bytes", "path"} record.

    Decoding the pixels (not only PIL's header `verify()`) is what catches truncated files."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, dict):
        source = io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    image = Image.open(source)
    image.load()
    return image


UNREADABLE = (UnidentifiedImageError, OSError, SyntaxError, ValueError, TypeError, KeyError, AttributeError)


def _open_image(value, image_id: str, where: str) -> Image.Image | None:
    """load_image, or None (said once per image) if it cannot be decoded."""
    try:
        return load_image(value)
    except UNREADABLE:
        print(f"{where}: skipping unreadable image {image_id}")
        return None


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())  # a stream without declared features


def find_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def readable(path: Path) -> bool:
    try:
        load_image(path).close()
        return True
    except UNREADABLE:
        return False


def split_readable(folder: Path) -> tuple[list[Path], list[Path]]:
    """(readable, unreadable) image files under folder, searched recursively."""
    paths = find_images(folder)
    good = [p for p in paths if readable(p)]
    kept = set(good)
    return good, [p for p in paths if p not in kept]


def load_folder_references(folder: Path) -> dict[str, list[str]]:
    """Optional captions.jsonl beside the images: {"image": "rel/path.jpg", "captions": [...]} per line."""
    path = folder / "captions.jsonl"
    if not path.is_file():
        return {}
    refs: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            captions = record.get("captions", record.get("caption"))
            refs[record["image"]] = [captions] if isinstance(captions, str) else list(captions)
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RecipeError(f"{path}:{number}: expected {{\"image\": ..., \"captions\": [...]}}") from None
    return refs


def _folder(cfg: dict, where: str, with_references: bool) -> Dataset:
    folder = Path(cfg["path"]).expanduser()
    good, bad = split_readable(folder)
    if bad:
        print(f"{where}: skipped {len(bad)} unreadable image(s) in {folder}")
    if not good:
        raise RecipeError(f"'{where}.path': no readable images in {folder}")
    if cfg["limit"] is not None:
        good = good[: cfg["limit"]]
    ids = [p.relative_to(folder).as_posix() for p in good]
    columns: dict = {"image": [str(p) for p in good], "image_id": ids}
    if with_references:
        refs = load_folder_references(folder)
        columns["references"] = [refs.get(i, []) for i in ids]
    return Dataset.from_dict(columns).cast_column("image", ImageFeature())


def _shapes(cfg: dict, where: str, with_references: bool) -> Dataset:
    if cfg["split"] not in SPLITS:
        raise RecipeError(f"'{where}.split': shapes has splits {', '.join(SPLITS)}, got {cfg['split']!r}")
    n = cfg["limit"] or DEFAULT_SHAPES_LIMIT
    scenes = shapes_scenes(cfg["split"], n, cfg["max_objects"])
    columns: dict = {
        "image": [render(s, cfg["image_size"]) for s in scenes],
        "image_id": [f"shapes/{cfg['split']}/{i}" for i in range(n)],
        "scene": [s.to_json() for s in scenes],
    }
    if with_references:
        columns["references"] = [[describe(s)] for s in scenes]
    return Dataset.from_dict(columns).cast_column("image", ImageFeature())

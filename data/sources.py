"""The built-in data sources, `hub` and `folder`, and `build_dataset`, which turns any source's rows into
TRL's prompt rows."""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset
from datasets import Image as ImageFeature
from PIL import Image

from data.errors import ConfigError
from data.images import UNREADABLE, load_image, split_readable
from data.registry import Source, get_source, register_source


def conversational_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def build_dataset(
    cfg: dict, prompt: str, *, where: str = "data", with_references: bool = False, skipped: list[str] | None = None
) -> Dataset | IterableDataset:
    """Rows {prompt, image, image_id[, references][, truth]} from a validated data section. The names of images
    that cannot be used are appended to `skipped` (for a streamed dataset, as the stream reaches them)."""
    skipped = skipped if skipped is not None else []
    dataset = get_source(cfg["source"], f"{where}.source").build(cfg, where, with_references, skipped)
    messages = conversational_prompt(prompt)
    return dataset.map(lambda _: {"prompt": messages})


def _hub(cfg: dict, where: str, with_references: bool, skipped: list[str]) -> Dataset | IterableDataset:
    try:
        dataset = load_dataset(cfg["id"], cfg["config"], split=cfg["split"], streaming=cfg["streaming"])
    except Exception as err:  # datasets raises many types; the user needs the first line
        raise ConfigError(
            f"'{where}.id': cannot load {cfg['id']} split {cfg['split']} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
    columns = _column_names(dataset)
    wanted = {"image_column": cfg["image_column"], "id_column": cfg["id_column"]}
    if with_references:
        wanted["captions_column"] = cfg["captions_column"]
    for key, column in wanted.items():
        if column is not None and column not in columns:
            raise ConfigError(f"'{where}.{key}': column '{column}' not in {cfg['id']} (columns: {', '.join(columns)})")
    if cfg["shuffle"]:
        dataset = (
            dataset.shuffle(seed=cfg["seed"], buffer_size=1000)
            if cfg["streaming"]
            else dataset.shuffle(seed=cfg["seed"])
        )
    if cfg["limit"] is not None and not cfg["streaming"]:
        dataset = dataset.take(cfg["limit"])
    image_column = cfg["image_column"]
    if _is_image_feature(dataset, image_column):
        # Decode ourselves so that one corrupt picture is skipped instead of stopping a long run.
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    prefix = f"{cfg['id']}/{cfg['split']}"

    def to_row(example: dict, index: int) -> dict:
        image_id = str(example[cfg["id_column"]]) if cfg["id_column"] else f"{prefix}/{index}"
        row = {"image": _open_image(example.get(image_column), image_id, where, skipped), "image_id": image_id}
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


def _open_image(value, image_id: str, where: str, skipped: list[str]) -> Image.Image | None:
    """load_image, or None (said once per image, and recorded) if it cannot be used."""
    try:
        if value is None:
            raise ValueError("no image in this row")
        return load_image(value)
    except UNREADABLE as err:
        print(f"{where}: skipping unreadable image {image_id} ({type(err).__name__})")
        skipped.append(image_id)
        return None


def _column_names(dataset: Dataset | IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(next(iter(dataset)).keys())  # a stream without declared features


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
            raise ConfigError(f'{path}:{number}: expected {{"image": ..., "captions": [...]}}') from None
    return refs


def _folder(cfg: dict, where: str, with_references: bool, skipped: list[str]) -> Dataset:
    folder = Path(cfg["path"]).expanduser()
    good, bad = split_readable(folder)
    if bad:
        names = [p.relative_to(folder).as_posix() for p in bad]
        skipped += names
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        print(f"{where}: skipped {len(bad)} unreadable image(s) in {folder}: {shown}")
    if not good:
        raise ConfigError(f"'{where}.path': no readable images in {folder}")
    if cfg["limit"] is not None:
        good = good[: cfg["limit"]]
    ids = [p.relative_to(folder).as_posix() for p in good]
    columns: dict = {"image": [str(p) for p in good], "image_id": ids}
    if with_references:
        refs = load_folder_references(folder)
        columns["references"] = [refs.get(i, []) for i in ids]
    return Dataset.from_dict(columns).cast_column("image", ImageFeature())


register_source(Source("hub", _hub))
register_source(Source("folder", _folder))

"""`source: shapes` in a recipe: synthetic scenes with known content, as data rows with their truth.

Registered with the data source registry by `shapescap` (a recipe names `plugins: [shapescap]`). The `truth`
column holds each scene as JSON, which `make eval` hands to `shapescap.metrics` (object recall,
hallucination, duplicates, ...).
"""

from __future__ import annotations

from datasets import Dataset
from datasets import Image as ImageFeature

from data.errors import ConfigError
from data.registry import Source
from shapescap.metrics import LOWER_IS_BETTER, shapes_metrics
from shapescap.scenes import SPLITS, describe, render, shapes_scenes

DEFAULT_LIMIT = 256


def build(cfg: dict, where: str, with_references: bool, skipped: list[str]) -> Dataset:
    if cfg["split"] not in SPLITS:
        raise ConfigError(f"'{where}.split': shapes has splits {', '.join(SPLITS)}, got {cfg['split']!r}")
    n = cfg["limit"] or DEFAULT_LIMIT
    scenes = shapes_scenes(cfg["split"], n, cfg["max_objects"])
    columns: dict = {
        "image": [render(s, cfg["image_size"]) for s in scenes],
        "image_id": [f"shapes/{cfg['split']}/{i}" for i in range(n)],
        "truth": [s.to_json() for s in scenes],
    }
    if with_references:
        columns["references"] = [[describe(s)] for s in scenes]
    return Dataset.from_dict(columns).cast_column("image", ImageFeature())


SHAPES_SOURCE = Source(
    name="shapes",
    build=build,
    options={"image_size": ((int,), 64), "max_objects": ((int,), 3)},
    metrics=shapes_metrics,
    lower_is_better=LOWER_IS_BETTER,
)

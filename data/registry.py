"""Data sources by name: the built-in `hub` and `folder`, and any a plugin registers (e.g. ShapesCap's `shapes`).

A source turns a validated `data:` section into rows {image, image_id[, references][, truth]}; the runner
adds the prompt. A source may declare extra recipe keys (`options`) and, when its images come with a known
truth (a JSON string per row in the `truth` column), the metrics that judge captions against it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from data.errors import ConfigError, closest

# (cfg, where, with_references, skipped) -> datasets.Dataset | datasets.IterableDataset; the names of images
# that cannot be used are appended to `skipped`
Builder = Callable[[dict, str, bool, list], Any]
# (captions, truths) -> (corpus metrics, per-caption metrics)
TruthMetrics = Callable[[Sequence[str], Sequence[str]], tuple[dict, list[dict]]]


@dataclass(frozen=True)
class Source:
    name: str
    build: Builder
    options: dict[str, tuple[tuple, Any]] = field(default_factory=dict)  # extra keys: (types, default)
    metrics: TruthMetrics | None = None
    lower_is_better: tuple[str, ...] = ()  # metric names where a drop is the improvement


_SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> None:
    _SOURCES[source.name] = source


def source_names() -> list[str]:
    return list(_SOURCES)


def get_source(name: str, key: str = "data.source") -> Source:
    if name not in _SOURCES:
        raise ConfigError(
            f"'{key}': unknown data source {name!r}{closest(name, _SOURCES)}; "
            f"available: {', '.join(_SOURCES)} (plugins add more, e.g. plugins: [shapescap])"
        )
    return _SOURCES[name]

"""Preprocess once: the image processor sees each distinct picture of a GRPO step once.

TRL repeats each prompt G times and runs the processor twice per step (prompts for generation, then again for
the log-prob and training forwards), each time on G copies of every picture: on a GPU that CPU work (resizing,
tiling, normalising) can be most of the step. While installed on the image processor's `preprocess`, this
processes only the distinct rows of a call (by content: TRL decodes each copy into its own object) and hands
every row its copy of the result; a second call on the same rows (TRL's second pass) is served from the cache.
The values are exactly the processor's own, so everything downstream (generation, log-probs, loss) is unchanged.

Layouts (the families of `vizer.fast.shared_vision.SUPPORTED_FAMILIES`):
- idefics3: every output is per row (pixel values and masks padded to the batch's largest tile count and size,
  rows/cols lists). The distinct rows of a call are processed together, so the padding is the full batch's.
- qwen2_vl: all images' patches in one sequence cut by `image_grid_thw`, one grid row per image; nothing is
  padded, so rows are cut out by their grids and put back in the batch's order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image
from transformers import BatchFeature


def content_key(image: Image.Image) -> tuple:
    """Equal pictures give equal keys, whatever object holds them."""
    return image.mode, image.size, hashlib.blake2b(image.tobytes(), digest_size=16).digest()


def _rows(images: Any) -> list[list[Image.Image]] | None:
    """The call's images as rows of PIL images, or None for any layout this does not handle (passed through)."""
    if not isinstance(images, (list, tuple)) or not images:
        return None
    if not all(isinstance(row, (list, tuple)) and row for row in images):
        return None
    if not all(isinstance(image, Image.Image) for row in images for image in row):
        return None
    return [list(row) for row in images]


class PreprocessOnce:
    """Wraps an image processor's `preprocess` (see `vizer.grpo`, which installs it for one generation batch
    and calls `clear` after it). Counts what was asked for and what was processed."""

    def __init__(self) -> None:
        self.cache: dict[tuple, BatchFeature] = {}
        self.images_requested = self.images_processed = 0

    def clear(self) -> None:
        self.cache.clear()

    def wrap(self, preprocess: Callable) -> Callable:
        def once(images: Any, *args: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
            rows = _rows(images)
            if rows is None or args:
                return preprocess(images, *args, return_tensors=return_tensors, **kwargs)
            keys = [tuple(content_key(image) for image in row) for row in rows]
            position: dict[tuple, int] = {}
            first: list[list[Image.Image]] = []  # the first row of each distinct key, in order
            for key, row in zip(keys, rows):
                if key not in position:
                    position[key] = len(first)
                    first.append(row)
            cache_key = (tuple(position), repr(sorted(kwargs.items())))
            self.images_requested += sum(map(len, rows))
            if cache_key not in self.cache:
                # numpy out (no return_tensors): the form both of TRL's calls can be served from
                self.cache[cache_key] = preprocess(first, **kwargs)
                self.images_processed += sum(map(len, first))
            out = self.cache[cache_key]
            index = [position[key] for key in keys]
            return _expand(out, index, [len(row) for row in first], return_tensors)

        return once


def _expand(out: BatchFeature, index: list[int], images_per_row: list[int], return_tensors: Any) -> BatchFeature:
    """The batch's output from the distinct rows' output: row i of the batch is distinct row index[i]."""
    if "image_grid_thw" in out:  # qwen2_vl: patches of all images in one sequence
        grids = np.asarray(out["image_grid_thw"])
        blocks = np.split(np.asarray(out["pixel_values"]), np.cumsum(grids.prod(-1))[:-1])
        starts = np.concatenate([[0], np.cumsum(images_per_row)])
        images = [i for row in index for i in range(starts[row], starts[row + 1])]
        arrays = {"pixel_values": np.concatenate([blocks[i] for i in images]), "image_grid_thw": grids[images]}
        lists = {}
    else:  # idefics3: one entry per row in every output
        arrays = {k: v[np.asarray(index)] for k, v in out.items() if isinstance(v, np.ndarray)}
        lists = {k: [v[i] for i in index] for k, v in out.items() if not isinstance(v, np.ndarray)}
    expanded = BatchFeature(data=arrays, tensor_type=return_tensors)
    expanded.update(lists)  # rows/cols stay lists, as the processor returns them
    return expanded

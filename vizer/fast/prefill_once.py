"""Prefill once per group: `generate` reads each group's prompt and image once, then samples its G continuations.

TRL hands `generate` every prompt G times, so the language model's prefill (prompt and image tokens) and the
vision tower run G times per picture before the first new token. Here the first row of each group is prefilled
(all prompt tokens but the last, at the position ids `generate` itself would give them), its cache is repeated
for the group's G rows, and `generate` continues from that cache on the full rows: it feeds only the last prompt
token, then samples as before. The cache holds what a stock prefill would have computed for every row, so the
logits, and with the same random state the samples, are the stock ones.

Runs only where that is exact: consecutive runs of G identical rows (prompt tokens, mask and pictures, as TRL
orders them), one image per row for Qwen2-VL, no cache passed in; otherwise `generate` runs as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vizer.fast.shared_prefix import RowImages, prompt_groups

IMAGE_KEYS = ("pixel_values", "pixel_attention_mask", "image_grid_thw")


def in_consecutive_groups(input_ids: torch.Tensor, attention_mask: torch.Tensor, images: RowImages, size: int) -> bool:
    """Whether the rows are consecutive runs of `size` identical rows (prompt tokens, mask and pictures), the
    layout the repeated cache takes; the groups are found as the shared prefix finds them."""
    rows = input_ids.size(0)
    if size < 2 or rows % size:
        return False
    groups = prompt_groups(input_ids, attention_mask, input_ids.size(1), images.same)
    return groups == [list(range(start, start + size)) for start in range(0, rows, size)]


def prefill_once(generate: Callable, model: nn.Module, num_generations: int) -> Callable:
    """`generate` (the model's bound method) with each group's prompt prefilled once; `stats` counts the calls."""

    def wrapped(*args: Any, **kwargs: Any):
        input_ids, attention_mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        if args or input_ids is None or attention_mask is None or kwargs.get("cache") is not None:
            return generate(*args, **kwargs)
        try:
            images = RowImages(
                input_ids.size(0),
                *(kwargs.get(k) for k in ("pixel_values", "pixel_attention_mask")),
                kwargs.get("image_grid_thw"),
                None,
            )
        except ValueError:  # rows without exactly one image each (Qwen2-VL)
            return generate(*args, **kwargs)
        if not in_consecutive_groups(input_ids, attention_mask, images, num_generations):
            return generate(*args, **kwargs)
        first = list(range(0, input_ids.size(0), num_generations))
        cache = _prefill(model, kwargs, first, images)
        cache.batch_repeat_interleave(num_generations)
        for module in model.modules():  # Qwen2-VL keeps its M-RoPE offset per row from the prefill
            if isinstance(getattr(module, "rope_deltas", None), torch.Tensor):
                module.rope_deltas = module.rope_deltas.repeat_interleave(num_generations, dim=0)
        wrapped.stats["prefilled_rows"] += len(first)
        wrapped.stats["rows"] += input_ids.size(0)
        rest = {k: v for k, v in kwargs.items() if k not in IMAGE_KEYS}  # the cache holds the image
        return generate(**rest, cache=cache)

    wrapped.stats = {"prefilled_rows": 0, "rows": 0}
    return wrapped


def _prefill(model: nn.Module, kwargs: dict, rows: list[int], images: RowImages):
    """The cache of these rows' prompts but their last token, computed as `generate`'s own first step would."""
    inputs = {"input_ids": kwargs["input_ids"][rows], "attention_mask": kwargs["attention_mask"][rows]}
    if kwargs.get("mm_token_type_ids") is not None:
        inputs["mm_token_type_ids"] = kwargs["mm_token_type_ids"][rows]
    inputs.update(images.inputs(rows))
    positions = _positions(model, inputs)
    head = {
        k: (v[:, :-1] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v) for k, v in inputs.items()
    }
    with torch.no_grad():
        out = model(**head, position_ids=positions[..., :-1], use_cache=True)
    return out.cache


def _positions(model: nn.Module, inputs: dict) -> torch.Tensor:
    """generate's own position ids for these rows (attention-mask based; Qwen2-VL: M-RoPE, which also sets its
    rope_deltas, the per-row offset generate continues from)."""
    return model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))

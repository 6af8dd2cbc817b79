"""Group-shared vision: each distinct image is encoded once per GRPO step, not G times per forward.

TRL repeats every prompt G times, so a frozen vision tower sees G identical copies of each image in
generation, and again in the old/reference log-prob and the training forwards. The tower is frozen (LoRA sits
on the language model only), so its output depends on the pixels alone: this hook wraps the tower's forward,
encodes each distinct tile of a call once, without gradients, and remembers the result across the calls of a
step. Nothing else in TRL or transformers changes; the language model still sees every row's image tokens.

Families: idefics3 (SmolVLM), whose tower takes a batch of tiles and returns one row of features per tile.
Qwen2-VL's tower takes all images' patches as one sequence split by `grid_thw`, so sharing there needs a
different cut; it runs the stock path (said at start-up).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

SUPPORTED_FAMILIES = ("idefics3",)


def vision_tower(model: nn.Module) -> nn.Module | None:
    """The idefics3 vision encoder under any PEFT/DDP wrapping, or None."""
    for name, module in model.named_modules():
        if name.endswith("vision_model") and type(module).__name__.endswith("VisionTransformer"):
            return module
    return None


def why_not_shared(model: nn.Module, family: str) -> str | None:
    """Why the stock path must run (a reason for the start-up line), or None when sharing is exact."""
    if family not in SUPPORTED_FAMILIES:
        return f"the {family} family's vision tower takes all images as one sequence"
    tower = vision_tower(model)
    if tower is None:
        return "no idefics3 vision tower found"
    if any(p.requires_grad for p in tower.parameters()):
        return "the vision tower trains (LoRA or full fine-tuning reaches it)"
    if tower.training and any(getattr(m, "p", 0) for m in tower.modules() if isinstance(m, nn.Dropout)):
        return "the vision tower has dropout"
    return None


class SharedVision:
    """Replaces a frozen tower's forward: one encoding per distinct (tile, patch mask), remembered (LRU)."""

    def __init__(self, tower: nn.Module, cache_size: int = 32) -> None:
        self.tower, self.forward = tower, tower.forward
        self.cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.tiles_seen = self.tiles_encoded = 0  # for the start-up check, tests and the benchmark
        self._projection: torch.Tensor | None = None

    def _keys(self, pixels: torch.Tensor, mask: torch.Tensor | None) -> list[tuple]:
        # Two fixed random projections of each tile's pixels (and patch mask): identical tiles give identical
        # keys; different ones collide with negligible probability. Computed on the tiles' own device.
        flat = pixels.reshape(pixels.shape[0], -1).double()
        if self._projection is None or self._projection.shape[0] != flat.shape[1]:
            generator = torch.Generator().manual_seed(0)
            self._projection = torch.randn(flat.shape[1], 2, generator=generator, dtype=torch.float64)
        projection = self._projection.to(flat.device)
        # one row at a time: the same kernel for a tile wherever it sits in the batch, so equal tiles, equal keys
        sums = [tuple((row @ projection).tolist()) for row in flat]
        masks = mask.reshape(mask.shape[0], -1).sum(1).tolist() if mask is not None else [0] * len(sums)
        shape = tuple(pixels.shape[1:])
        return [(shape, a, b, m) for (a, b), m in zip(sums, masks)]

    def __call__(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None, **kwargs: Any):
        keys = self._keys(pixel_values, patch_attention_mask)
        first: dict[tuple, int] = {}
        for row, key in enumerate(keys):
            first.setdefault(key, row)
        missing = [key for key in first if key not in self.cache]
        if missing:
            rows = torch.tensor([first[k] for k in missing], device=pixel_values.device)
            mask = patch_attention_mask[rows] if patch_attention_mask is not None else None
            with torch.no_grad():
                out = self.forward(pixel_values=pixel_values[rows], patch_attention_mask=mask, **kwargs)
            for key, features in zip(missing, out.last_hidden_state):
                self.cache[key] = features
            self.tiles_encoded += len(missing)
        self.tiles_seen += len(keys)
        for key in first:
            self.cache.move_to_end(key)
        while len(self.cache) > max(self.cache_size, len(first)):
            self.cache.popitem(last=False)
        return BaseModelOutput(last_hidden_state=torch.stack([self.cache[k] for k in keys]))


def share_vision(model: nn.Module, cache_size: int = 32) -> SharedVision:
    """Install the hook on the model's vision tower (call `why_not_shared` first)."""
    tower = vision_tower(model)
    hook = SharedVision(tower, cache_size)
    tower.forward = hook
    return hook

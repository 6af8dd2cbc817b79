"""Group-shared vision: each distinct image is encoded once per GRPO step, not G times per forward.

TRL repeats every prompt G times, so a frozen vision tower sees G identical copies of each image in
generation, and again in the old/reference log-prob and the training forwards. The tower is frozen (LoRA sits
on the language model only), so its output depends on the pixels alone: this hook wraps the tower's forward,
encodes each distinct image of a call once, without gradients, and remembers the result across the calls of a
step. Nothing else in TRL or transformers changes; the language model still sees every row's image tokens,
and Qwen2-VL still gets `image_grid_thw` for its M-RoPE positions, because the pixels are still passed.

Families:
- idefics3 (SmolVLM): the tower takes a batch of tiles and returns one row of features per tile; the unit
  shared is a tile (with its patch mask).
- qwen2_vl: the tower takes all images' patches as one sequence cut by `grid_thw` (attention never crosses
  images), and its own merger (the connector) is inside it; the unit shared is an image's run of patches,
  and what is remembered is the merged output, about 3x smaller than the patch features (N/4 rows of 1536 against N of 1280).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

SUPPORTED_FAMILIES = ("idefics3", "qwen2_vl")
# the class name each family's vision tower ends with, and the attribute path it sits under
TOWERS = {"idefics3": ("vision_model", "VisionTransformer"), "qwen2_vl": ("visual", "VisionTransformerPretrainedModel")}


def vision_tower(model: nn.Module, family: str = "idefics3") -> nn.Module | None:
    """The family's vision encoder under any PEFT/DDP wrapping, or None."""
    if family not in TOWERS:
        return None
    attribute, class_suffix = TOWERS[family]
    for name, module in model.named_modules():
        if name.split(".")[-1] == attribute and type(module).__name__.endswith(class_suffix):
            return module
    return None


def why_not_shared(model: nn.Module, family: str) -> str | None:
    """Why the stock path must run (a reason for the start-up line), or None when sharing is exact."""
    if family not in SUPPORTED_FAMILIES:
        return f"group-shared vision is not written for the {family} family"
    tower = vision_tower(model, family)
    if tower is None:
        return f"no {family} vision tower found"
    if any(p.requires_grad for p in tower.parameters()):
        return "the vision tower trains (LoRA or full fine-tuning reaches it)"
    if tower.training and any(getattr(m, "p", 0) for m in tower.modules() if isinstance(m, nn.Dropout)):
        return "the vision tower has dropout"
    return None


class _Fingerprint:
    """Content keys for pixel blocks: identical blocks give identical keys; different ones collide with
    negligible probability. Identical images arrive as different tensors (TRL decodes each row on its own), so
    identity cannot be used; hashing the bytes would move every tile to the CPU."""

    def __init__(self) -> None:
        self._projections: dict[tuple[int, str], torch.Tensor] = {}

    def _projection(self, rows: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (width, str(device))
        if key not in self._projections:
            generator = torch.Generator().manual_seed(0)
            self._projections[key] = torch.randn(width, 2, generator=generator, dtype=torch.float64).to(device)
        # a weight per row, so that reordered patches give another key
        weights = torch.randn(rows, generator=torch.Generator().manual_seed(rows), dtype=torch.float64)
        return self._projections[key], weights.to(device)

    def __call__(self, block: torch.Tensor) -> tuple[float, float]:
        flat = block.reshape(block.shape[0], -1).double()
        projection, weights = self._projection(*flat.shape, flat.device)
        return tuple((weights @ (flat @ projection)).tolist())


class SharedVision:
    """Replaces a frozen tower's forward: one encoding per distinct unit, remembered across calls (LRU)."""

    def __init__(self, tower: nn.Module, cache_size: int = 32) -> None:
        self.tower, self.forward = tower, tower.forward
        self.cache: OrderedDict[tuple, Any] = OrderedDict()
        self.cache_size = cache_size
        self.tiles_seen = self.tiles_encoded = 0  # units (tiles or images), for the start-up check and tests
        self.fingerprint = _Fingerprint()

    def _lookup(self, keys: list[tuple], encode) -> list:
        """Cached value per key; `encode(first_rows)` computes the missing ones (one call, no grad)."""
        first: dict[tuple, int] = {}
        for row, key in enumerate(keys):
            first.setdefault(key, row)
        missing = [key for key in first if key not in self.cache]
        if missing:
            with torch.no_grad():
                values = encode([first[k] for k in missing])
            self.cache.update(zip(missing, values))
            self.tiles_encoded += len(missing)
        self.tiles_seen += len(keys)
        for key in first:
            self.cache.move_to_end(key)
        while len(self.cache) > max(self.cache_size, len(first)):
            self.cache.popitem(last=False)
        return [self.cache[k] for k in keys]


class SharedTiles(SharedVision):
    """idefics3: a batch of tiles in, one row of patch features per tile out."""

    def __call__(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor | None = None, **kwargs: Any):
        shape = tuple(pixel_values.shape[1:])
        masks = (
            patch_attention_mask.reshape(len(pixel_values), -1).sum(1).tolist()
            if patch_attention_mask is not None
            else [0] * len(pixel_values)
        )
        # one tile at a time: the same kernel for a tile wherever it sits in the batch, so equal tiles, equal keys
        keys = [(shape, self.fingerprint(tile), m) for tile, m in zip(pixel_values, masks)]

        def encode(rows: list[int]) -> torch.Tensor:
            index = torch.tensor(rows, device=pixel_values.device)
            mask = patch_attention_mask[index] if patch_attention_mask is not None else None
            return self.forward(pixel_values=pixel_values[index], patch_attention_mask=mask, **kwargs).last_hidden_state

        return BaseModelOutput(last_hidden_state=torch.stack(self._lookup(keys, encode)))


class SharedImages(SharedVision):
    """qwen2_vl: all images' patches as one sequence cut by `grid_thw`; the merged output is what is kept."""

    def __call__(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any):
        sizes = grid_thw.prod(-1).tolist()
        blocks = torch.split(hidden_states, sizes)
        keys = [(tuple(thw), self.fingerprint(block)) for thw, block in zip(grid_thw.tolist(), blocks)]
        merge = self.tower.spatial_merge_size**2

        def encode(rows: list[int]) -> tuple[torch.Tensor, ...]:
            out = self.forward(torch.cat([blocks[r] for r in rows]), grid_thw=grid_thw[rows], **kwargs)
            return torch.split(out.pooler_output, [sizes[r] // merge for r in rows])

        # Qwen2-VL reads only the merged output (pooler_output); the per-patch states are not kept.
        return BaseModelOutputWithPooling(last_hidden_state=None, pooler_output=torch.cat(self._lookup(keys, encode)))


def share_vision(model: nn.Module, family: str = "idefics3", cache_size: int = 32) -> SharedVision:
    """Install the hook on the model's vision tower (call `why_not_shared` first)."""
    tower = vision_tower(model, family)
    hook = (SharedImages if family == "qwen2_vl" else SharedTiles)(tower, cache_size)
    tower.forward = hook
    return hook

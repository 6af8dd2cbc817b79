"""Generation with the LoRA adapter merged into the weights it adapts, for the duration of `generate`.

The adapter does not change while a step samples its captions, yet every new token pays for it separately: two
small projections, a scale and an add per adapted layer (210 layers per token for SmolVLM-256M with the recipes'
`language` targets). Merged, each adapted layer is one matrix product. The delta (scaling * B @ A) is added to
each base weight in place before `generate` and taken out after it, with the adapter switched off in between,
as TRL merges an adapter before handing the weights to vLLM; no extra copy of the weights is held.

Only in float32. There, the merged layer's output equals the unmerged one to float32 rounding, and the round trip
moves a base weight by rounding only (about 1e-7 of its largest entry, not growing with the steps: tested). In
bfloat16 or float16 a delta smaller than half a unit in the last place of its weight rounds away, so generation
would sample from (nearly) the base model while training moves the adapter, and the round trip would drift the
frozen weights; quantized layers (QLoRA) cannot take a delta in place; dropout on the adapter's input (in
training mode) has no merged equivalent. `why_not_merged` names the reason, and generation runs unmerged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def why_not_merged(model: nn.Module) -> str | None:
    """Why generation must run with the adapter unmerged (a reason for the start-up line), or None."""
    if not isinstance(model, PeftModel):
        return "there is no LoRA adapter to merge"
    layers = _lora_layers(model)
    if not layers:
        return "there is no LoRA adapter to merge"
    for layer in layers:
        if len(layer.active_adapters) != 1:
            return "more than one adapter is active"
        name = layer.active_adapters[0]
        base = layer.get_base_layer()
        if type(base) is not nn.Linear or getattr(layer, "fan_in_fan_out", False):
            return f"{type(base).__name__} layers cannot take the adapter's delta in place (only plain Linear can)"
        if layer.use_dora.get(name) or getattr(layer, "lora_variant", {}).get(name) is not None:
            return "a LoRA variant (e.g. DoRA) is not a plain weight delta"
        if getattr(layer.lora_B[name], "bias", None) is not None:
            return "the adapter has a bias"
        if base.weight.dtype != torch.float32:
            return f"the weights are {str(base.weight.dtype).removeprefix('torch.')}: a small delta would round away"
        dropout = layer.lora_dropout[name]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0 and model.training:
            return "LoRA dropout is active: a merged layer has no dropout on the adapter's input"
    return None


def _add_delta(layers: list[LoraLayer], sign: float) -> None:
    with torch.no_grad():
        for layer in layers:
            name = layer.active_adapters[0]
            # W (out x in) += sign * scaling * B (out x r) @ A (r x in), in one pass over W
            layer.get_base_layer().weight.addmm_(
                layer.lora_B[name].weight, layer.lora_A[name].weight, alpha=sign * layer.scaling[name]
            )


@contextlib.contextmanager
def merged_adapter(model: PeftModel) -> Iterator[None]:
    """The adapter merged into its base weights, and switched off, inside the block; unmerged after it (also when
    the block raises). Check `why_not_merged` first."""
    layers = _lora_layers(model)
    if any(layer.disable_adapters for layer in layers):  # switched off already: nothing to merge
        yield
        return
    _add_delta(layers, 1.0)
    # PEFT's own switch, per layer (PeftModel.disable_adapter does the same, plus a model-wide status check
    # that costs more than the merge on a 256M model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        _add_delta(layers, -1.0)

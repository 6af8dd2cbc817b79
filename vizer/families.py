"""Model families: what differs between VLMs, kept in one small adapter each.

A family knows how to load its processor (and the quirks of doing so), which image-token
knobs its image processor has, which modules are its language model (LoRA targets), and
which modules should stay unquantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoProcessor, ProcessorMixin

from data.errors import closest
from vizer.config import RecipeError
from vizer.qwen2vl_processor import load_qwen2vl_processor

# Leaf names of the language model's linear layers in Llama/Qwen-style decoders.
DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # Regex (PEFT full-match) for the language model's projections only; None = derive from the loaded model.
    language_lora_regex: str | None
    # Modules kept in full precision under 4/8-bit loading (vision tower, projector); transformers
    # matches these as regexes from the start of the module name, hence the leading `.*`.
    keep_unquantized: tuple[str, ...] = ()
    # Image-token knobs a recipe may set under model.processor (documentation and validation).
    image_knobs: tuple[str, ...] = ()
    notes: str = ""
    aliases: dict[str, str] = field(default_factory=dict)

    def load_processor(self, path: str, options: dict, revision: str | None = None) -> ProcessorMixin:
        processor = AutoProcessor.from_pretrained(path, revision=revision)
        if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
            raise RecipeError(
                f"'model.id': {path} has no image processor (AutoProcessor returned {type(processor).__name__}); "
                "it is not a vision-language model folder"
            )
        apply_image_options(processor, options, self)
        return processor


def apply_image_options(processor: ProcessorMixin, options: dict, family: Family) -> None:
    """Set image-processor knobs from the recipe, refusing names the processor does not have."""
    image_processor = processor.image_processor
    valid = set(getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})) | set(
        family.image_knobs
    )
    for key, value in options.items():
        if key in family.aliases:  # e.g. qwen2_vl's min_pixels -> size.shortest_edge
            size = dict(image_processor.size)
            size[family.aliases[key]] = value
            image_processor.size = size
        elif key in valid or hasattr(image_processor, key):
            setattr(image_processor, key, value)
        else:
            raise RecipeError(
                f"unknown key 'model.processor.{key}' for {type(image_processor).__name__}"
                f"{closest(key, sorted(valid) or dir(image_processor))}"
            )


class Qwen2VLFamily(Family):
    def load_processor(self, path: str, options: dict, revision: str | None = None) -> ProcessorMixin:
        # Without torchvision, AutoProcessor silently returns only the tokenizer for Qwen2-VL.
        processor = load_qwen2vl_processor(path)
        apply_image_options(processor, options, self)
        return processor


IDEFICS3 = Family(
    name="idefics3",
    model_types=("idefics3",),
    language_lora_regex=r".*\.text_model\..*\.(" + "|".join(DECODER_PROJECTIONS) + ")",
    keep_unquantized=(r".*vision_model", r".*connector", "lm_head"),
    image_knobs=("do_image_splitting", "max_image_size", "size"),
    notes="SmolVLM v1. do_image_splitting=false keeps one image at ~64-81 tokens instead of ~830-1,380.",
)
QWEN2_VL = Qwen2VLFamily(
    name="qwen2_vl",
    model_types=("qwen2_vl", "qwen2_5_vl"),
    language_lora_regex=r".*\.language_model\..*\.(" + "|".join(DECODER_PROJECTIONS) + ")",
    keep_unquantized=(r".*visual", "lm_head"),
    image_knobs=("min_pixels", "max_pixels"),
    notes="Image tokens = pixels / 28^2; bound them with max_pixels (256*28*28 gives ~256).",
    aliases={"min_pixels": "shortest_edge", "max_pixels": "longest_edge"},
)
GENERIC = Family(
    name="generic",
    model_types=(),
    language_lora_regex=None,
    keep_unquantized=("lm_head",),
    notes="Any AutoModelForImageTextToText whose processor has a chat template.",
)
FAMILIES = {f.name: f for f in (IDEFICS3, QWEN2_VL, GENERIC)}


def detect_family(path: str, requested: str = "auto", revision: str | None = None) -> Family:
    if requested != "auto":
        return FAMILIES[requested]
    model_type = AutoConfig.from_pretrained(path, revision=revision).model_type
    for family in (IDEFICS3, QWEN2_VL):
        if model_type in family.model_types:
            return family
    return GENERIC


def language_lora_targets(model: torch.nn.Module, family: Family) -> str:
    """A PEFT regex matching the language model's linear layers, never the vision tower."""
    if family.language_lora_regex is not None:
        return family.language_lora_regex
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, module in decoder.named_modules() if isinstance(module, torch.nn.Linear)}
    )
    return rf"{re.escape(prefix)}\..*\.({'|'.join(leaves)})"

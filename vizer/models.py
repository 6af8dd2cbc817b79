"""Load a VLM and its processor from a recipe's `model:` section (LoRA / QLoRA ready)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForImageTextToText, BitsAndBytesConfig, PreTrainedModel, ProcessorMixin

from vizer.config import RecipeError
from vizer.families import Family, detect_family, language_lora_targets
from vizer.model_ids import resolve_model_id


@dataclass
class LoadedModel:
    model: PreTrainedModel
    processor: ProcessorMixin
    family: Family
    path: str


def pick_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # CPU: fp32 is both faster and safer than emulated bf16


def quantization_config(kind: str, dtype: torch.dtype, family: Family) -> BitsAndBytesConfig | None:
    if kind == "none":
        return None
    skip = list(family.keep_unquantized)
    if kind == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            llm_int8_skip_modules=skip,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def keep_4bit_layout(model: torch.nn.Module) -> None:
    # bitsandbytes repacks 4-bit weights in place during an eval-mode forward on CPUs with
    # AVX512-BF16, which breaks every later training forward; keep the trainable layout.
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_model(model_cfg: dict, *, for_training: bool = True, gradient_checkpointing: bool = True) -> LoadedModel:
    path = resolve_model_id(model_cfg["id"])
    revision = model_cfg.get("revision")
    try:
        family = detect_family(path, model_cfg["family"], revision)
    except OSError as err:
        raise RecipeError(f"'model.id': cannot load config of {model_cfg['id']} ({str(err).splitlines()[0]})") from None
    try:
        processor = family.load_processor(path, model_cfg["processor"], revision)
    except OSError as err:
        raise RecipeError(
            f"'model.id': cannot load the processor of {model_cfg['id']} ({str(err).splitlines()[0]})"
        ) from None
    if getattr(processor, "chat_template", None) is None:
        raise RecipeError(f"'model.id': the processor of {model_cfg['id']} has no chat template")
    processor.tokenizer.padding_side = "left"  # generation pads on the left

    dtype = pick_dtype(model_cfg["dtype"])
    kwargs: dict = {"dtype": dtype, "revision": revision}
    if model_cfg.get("attn_implementation"):
        kwargs["attn_implementation"] = model_cfg["attn_implementation"]
    quant = quantization_config(model_cfg["quantization"], dtype, family)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": _local_device()}
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except OSError as err:
        raise RecipeError(f"'model.id': cannot load {model_cfg['id']} ({str(err).splitlines()[0]})") from None
    if quant is not None:
        keep_4bit_layout(model)
        if for_training:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return LoadedModel(model=model, processor=processor, family=family, path=path)


def _local_device() -> str | int:
    if torch.cuda.is_available():
        from accelerate import PartialState

        return PartialState().local_process_index
    return "cpu"


def lora_config(lora_cfg: dict, model: torch.nn.Module, family: Family) -> LoraConfig | None:
    if not lora_cfg["enabled"]:
        return None
    targets = lora_cfg["targets"]
    if targets == "language":
        targets = language_lora_targets(model, family)
    return LoraConfig(
        r=lora_cfg["r"],
        lora_alpha=lora_cfg["alpha"],
        lora_dropout=lora_cfg["dropout"],
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def load_with_adapter(model_cfg: dict, adapter_dir: str | None) -> LoadedModel:
    """Base model (adapter_dir=None) or base + trained adapter, ready for generation."""
    loaded = load_model(model_cfg, for_training=False)
    if adapter_dir is not None:
        loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dir)
    loaded.model.eval()
    return loaded

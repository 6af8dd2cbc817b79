"""Load a VLM and its processor from a recipe's `model:` section (LoRA / QLoRA ready)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from safetensors import SafetensorError, safe_open
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


ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter(adapter_dir: str | Path) -> None:
    """One line when a LoRA adapter folder cannot be loaded: no config, no weights, or weights cut short.
    Cheap (reads the safetensors header), so commands call it before minutes of other work."""
    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise RecipeError(f"adapter {folder}: no adapter_config.json (not a LoRA adapter folder)")
    weights = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
    if not weights or all(w.stat().st_size == 0 for w in weights):
        # without this, PEFT takes the folder for a hub id and fails with a validation traceback
        raise RecipeError(
            f"adapter {folder}: adapter_config.json but no weights (adapter_model.safetensors); an "
            "interrupted save? train again into the run (it resumes)"
        )
    for path in weights:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as err:
            raise RecipeError(f"adapter {path}: unreadable or cut short ({str(err).splitlines()[0]})") from None


def _adapter_base(adapter_dir: str) -> str | None:
    try:
        return json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def load_with_adapter(model_cfg: dict, adapter_dir: str | None) -> LoadedModel:
    """Base model (adapter_dir=None) or base + trained adapter, ready for generation."""
    if adapter_dir is not None:
        check_adapter(adapter_dir)
    loaded = load_model(model_cfg, for_training=False)
    if adapter_dir is not None:
        try:
            loaded.model = PeftModel.from_pretrained(loaded.model, adapter_dir)
        except (RuntimeError, ValueError, KeyError, SafetensorError) as err:  # shapes or module names differ
            base = _adapter_base(adapter_dir)
            named = f"; it was trained on {base}" if base and base != loaded.path else ""
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise RecipeError(
                f"adapter {adapter_dir} does not fit the base model {model_cfg['id']}{named} ({detail})"
            ) from None
    loaded.model.eval()
    return loaded

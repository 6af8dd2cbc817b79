"""Random-weight captioners with the published dimensions of real checkpoints, built offline.

Speed and memory depend on the shapes, not on the weights' values, so a random model with a checkpoint's
published dimensions stands in for it where the hub cannot be reached. The tokenizers are the project's
offline ones (`vizer.tiny`): a few hundred ids with each family's special tokens and chat template. The
models keep the published vocabulary (embedding and LM-head sizes count for memory and time), so a caller
must keep generation inside `len(processor.tokenizer)` (see `unused_vocab`).

    build("smolvlm256")                          # (model, processor), float32 on the CPU
    build("qwen2vl2b", max_pixels=256 * 28 * 28, dtype=torch.bfloat16, device="cuda")

Sources, read from the published files and from copies of them (noted per dict). Where a published config.json
leaves a field out, the value is the transformers default the checkpoint loads with, and the comment says so.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

NAMES = ("smolvlm256", "smolvlm500", "smolvlm2b", "qwen2vl2b")

# HuggingFaceTB/SmolVLM-256M-Base config.json (idefics3; same architecture as SmolVLM-256M-Instruct, whose
# config.json is mirrored e.g. in Mattimax/DATA-AI_Smol256M-Instruct): SmolLM2-135M decoder with the
# vocabulary resized to 49,280 for the image/row-col tokens, SigLIP base-patch16-512, pixel shuffle 4.
# tie_word_embeddings: absent at the top level, so Idefics3Config's default False applies: the LM head is
# its own matrix. That is what makes the name: untied 256.5M parameters (tied would be 228.1M), and
# model.safetensors is 513 MB in bf16.
SMOLVLM_256M: dict[str, Any] = {
    "text": {
        "vocab_size": 49280,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "scale_factor": 4,
    "tie_word_embeddings": False,
}

# HuggingFaceTB/SmolVLM-500M-Base config.json (idefics3): SmolLM2-360M decoder (its own config.json: hidden 960,
# MLP 2560, 32 layers, 15 heads / 5 KV heads, rope_theta 100000, 8192 positions) with the vocabulary resized to
# 49,280; the same SigLIP base-patch16-512 tower and pixel shuffle 4 as the 256M model (the SmolVLM blog
# "SmolVLM Grows Smaller" and the 500M config copy vidore/ColSmolVLM-Instruct-500M-base). Untied LM head as
# above: 507.5M parameters, model.safetensors 1.02 GB in bf16.
SMOLVLM_500M: dict[str, Any] = {
    "text": {
        "vocab_size": 49280,
        "hidden_size": 960,
        "intermediate_size": 2560,
        "num_hidden_layers": 32,
        "num_attention_heads": 15,
        "num_key_value_heads": 5,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
    "vision": dict(SMOLVLM_256M["vision"]),
    "scale_factor": 4,
    "tie_word_embeddings": False,
}

# HuggingFaceTB/SmolVLM-Base config.json (idefics3, "2.2B"): SmolLM2-1.7B decoder with the context extended to
# 16k (max_position_embeddings 16384, rope_theta 273768 — "RoPE base from 10k to 273k" in the SmolVLM blog)
# and a 49,155-token vocabulary; SigLIP so400m-patch14-384 (hidden 1152, MLP 4304, 27 layers, 16 heads);
# pixel shuffle 3, so image_seq_len 81 (its processor_config.json). Copies of this config.json:
# frontrx/ECGv3 (a SmolVLM-Base fine-tune) and chflame163/ComfyUI_LayerStyle (SmolVLM-Instruct).
# num_attention_heads and num_key_value_heads are absent from its text_config: LlamaConfig's default 32 heads
# applies, and KV heads default to the head count (32, as in SmolLM2-1.7B). Untied LM head:
# 2.25B parameters, model.safetensors 4.49 GB in bf16.
SMOLVLM_2B: dict[str, Any] = {
    "text": {
        "vocab_size": 49155,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 16384,
        "rope_theta": 273768.0,
        "rms_norm_eps": 1e-5,
    },
    "vision": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
    },
    "scale_factor": 3,
    "tie_word_embeddings": False,
}

# Qwen/Qwen2-VL-2B-Instruct config.json (qwen2_vl; copies e.g. onnx-community/Qwen2-VL-2B-Instruct,
# lightonai/MonoQwen2-VL-v0.1): Qwen2-1.5B decoder, tied embeddings, M-RoPE sections [16, 24, 24]
# (sum 64 = head_dim 128 / 2). Its vision_config lists only hidden_size 1536 (the merger's output = the
# decoder width), in_chans 3 and spatial_patch_size 14; depth 32, embed_dim 1280, num_heads 16, mlp_ratio 4,
# patch_size 14, spatial_merge_size 2 and temporal_patch_size 2 are Qwen2VLVisionConfig's defaults, the
# values the checkpoint loads with (and what Qwen2-VL's own vision-only configs spell out, e.g.
# zszhong/Lyra_Qwen2VL_2B_ViT). 2.21B parameters (the open VLM leaderboard lists 2.209B).
QWEN2VL_2B: dict[str, Any] = {
    "text": {
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "use_sliding_window": False,
        "max_window_layers": 28,
    },
    "vision": {
        "depth": 32,
        "embed_dim": 1280,
        "num_heads": 16,
        "mlp_ratio": 4,
        "hidden_size": 1536,
        "in_channels": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "tie_word_embeddings": True,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "smolvlm256": SMOLVLM_256M,
    "smolvlm500": SMOLVLM_500M,
    "smolvlm2b": SMOLVLM_2B,
    "qwen2vl2b": QWEN2VL_2B,
}
# vizer.families names: they pick the LoRA targets and the group-shared vision path
FAMILIES = {"smolvlm256": "idefics3", "smolvlm500": "idefics3", "smolvlm2b": "idefics3", "qwen2vl2b": "qwen2_vl"}
# Qwen2-VL's published processor bounds (preprocessor_config.json); the benchmarks pass a smaller max_pixels
QWEN2VL_MIN_PIXELS = 56 * 56
QWEN2VL_MAX_PIXELS = 28 * 28 * 1280 * 16  # 12,845,056: up to ~16k image tokens per picture
DEFAULT_MAX_PIXELS = 256 * 28 * 28  # ~256 image tokens, the project's recipes' bound


def family(name: str) -> str:
    """The vizer family name of a real-sized model ("idefics3" or "qwen2_vl")."""
    return FAMILIES[_check(name)]


def _check(name: str) -> str:
    if name not in CONFIGS:
        raise ValueError(f"unknown real-sized model {name!r}; choose from {', '.join(NAMES)}")
    return name


def published_vocab(name: str) -> int:
    return CONFIGS[_check(name)]["text"]["vocab_size"]


def unused_vocab(name: str, processor: Any) -> range:
    """Ids of the published vocabulary the offline tokenizer cannot decode: generation must never pick them."""
    return range(len(processor.tokenizer), published_vocab(name))


# ---------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------


def build_processor(
    name: str, *, image_splitting: bool = False, max_pixels: int | None = None, min_pixels: int | None = None
) -> Any:
    """The family's processor with the published image settings and the project's offline tokenizer."""
    if family(name) == "idefics3":
        processor = _idefics3_processor(CONFIGS[name], image_splitting)
    else:
        processor = _qwen2vl_processor(max_pixels or DEFAULT_MAX_PIXELS, min_pixels or QWEN2VL_MIN_PIXELS)
    # the published context, not the tiny tokenizer's: split SmolVLM prompts exceed 1,024 tokens
    processor.tokenizer.model_max_length = CONFIGS[name]["text"]["max_position_embeddings"]
    return processor


def _idefics3_processor(dims: dict, image_splitting: bool) -> Any:
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    from vizer.tiny import IDEFICS3_CHAT_TEMPLATE, idefics3_tokenizer

    tile = dims["vision"]["image_size"]
    # published preprocessor: longest edge resized to 4 tiles, split into tiles of the encoder's size
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=image_splitting,
        size={"longest_edge": 4 * tile},
        max_image_size={"longest_edge": tile},
    )
    return Idefics3Processor(
        image_processor,
        idefics3_tokenizer(),
        image_seq_len=tile_tokens(dims),
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )


def tile_tokens(dims: dict) -> int:
    """Image tokens per SmolVLM tile: (patches per side)^2 / scale_factor^2 (64 for 512/16/4, 81 for 384/14/3)."""
    side = dims["vision"]["image_size"] // dims["vision"]["patch_size"]
    return side * side // dims["scale_factor"] ** 2


def _qwen2vl_processor(max_pixels: int, min_pixels: int = QWEN2VL_MIN_PIXELS) -> Any:
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from vizer.qwen2vl_processor import Qwen2VLImageOnlyProcessor
    from vizer.tiny import QWEN2VL_CHAT_TEMPLATE, build_tiny

    # the tiny Qwen2-VL folder carries the offline tokenizer with Qwen2-VL's special tokens (built once, cached)
    tokenizer = AutoTokenizer.from_pretrained(build_tiny("qwen2_vl"))
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=QWEN2VL_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def build_config(name: str, processor: Any) -> Any:
    """The transformers config: published dimensions, special-token ids from the offline tokenizer."""
    if family(name) == "idefics3":
        return _idefics3_config(CONFIGS[name], processor)
    return _qwen2vl_config(CONFIGS[name], processor)


def _idefics3_config(dims: dict, processor: Any) -> Any:
    from transformers import Idefics3Config

    tok = processor.tokenizer  # ids are read after the processor registered its special tokens
    eos, pad = tok.convert_tokens_to_ids("<end_of_utterance>"), tok.convert_tokens_to_ids("<|im_end|>")
    return Idefics3Config(
        text_config={"model_type": "llama", **dims["text"], "eos_token_id": eos, "pad_token_id": pad},
        vision_config=dict(dims["vision"]),
        scale_factor=dims["scale_factor"],
        image_token_id=processor.image_token_id,
        tie_word_embeddings=dims["tie_word_embeddings"],
        pad_token_id=pad,
    )


def _qwen2vl_config(dims: dict, processor: Any) -> Any:
    from transformers import Qwen2VLConfig

    tok = processor.tokenizer
    ids = {
        t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")
    }
    text = {
        **dims["text"],
        "rope_parameters": dict(dims["text"]["rope_parameters"]),  # the config edits it in place
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": dims["tie_word_embeddings"],
    }
    return Qwen2VLConfig(
        text_config=text,
        vision_config=dict(dims["vision"]),
        image_token_id=processor.image_token_id,
        video_token_id=processor.video_token_id,
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=dims["tie_word_embeddings"],
    )


def model_class(name: str) -> type:
    from transformers import Idefics3ForConditionalGeneration, Qwen2VLForConditionalGeneration

    return Idefics3ForConditionalGeneration if family(name) == "idefics3" else Qwen2VLForConditionalGeneration


def build_model(name: str, config: Any, *, dtype: torch.dtype = torch.float32, device: str | None = None) -> Any:
    """A seeded random model in eval mode; `device="meta"` allocates nothing (shapes and counts only)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate in the target dtype: a 2B model in fp32 first would double the peak
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device) if device else contextlib.nullcontext():
            torch.manual_seed(0)
            model = model_class(name)(config)
    finally:
        torch.set_default_dtype(previous)
    _set_generation_ids(model, config)
    return model.eval()


def _set_generation_ids(model: Any, config: Any) -> None:
    text = config.get_text_config()
    model.generation_config.eos_token_id = text.eos_token_id
    model.generation_config.pad_token_id = text.pad_token_id
    model.generation_config.bos_token_id = getattr(text, "bos_token_id", None)


def build(
    name: str,
    *,
    image_splitting: bool = False,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
) -> tuple[Any, Any]:
    """(model, processor) for one of NAMES: random weights, published dimensions, offline tokenizer.

    `image_splitting` applies to SmolVLM (tiles plus a global view instead of one resized tile); `max_pixels`
    to Qwen2-VL (default 256*28*28, about 256 image tokens).
    """
    processor = build_processor(name, image_splitting=image_splitting, max_pixels=max_pixels, min_pixels=min_pixels)
    processor.tokenizer.padding_side = "left"  # generation pads on the left
    model = build_model(name, build_config(name, processor), dtype=dtype, device=device)
    return model, processor


def parameter_count(model: Any) -> int:
    """Distinct parameters (a tied LM head counts once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Image tokens
# ---------------------------------------------------------------------------------------------


def image_tokens(processor: Any, image: Any, prompt: str = "Describe this image.") -> int:
    """Image tokens the processor puts into one prompt for `image` (input_ids equal to the image token)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(text=[text], images=[[image]], return_tensors="pt")
    return int((batch["input_ids"] == processor.image_token_id).sum())

"""A Qwen2-VL processor that works without torchvision.

Qwen2VLProcessor always builds a video processor, which needs torchvision; without it,
`AutoProcessor.from_pretrained` on a Qwen2-VL folder silently returns only the tokenizer, and a
trainer later fails on missing `pixel_values`. The image-only processor here tokenizes the same
way (same image tokens, `pixel_values`, `image_grid_thw`, `mm_token_type_ids`) and saves folders
that a full Qwen2VLProcessor loads again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2VLProcessor,
)

PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# Image-processor settings the Qwen2-VL video processor shares with the image processor.
_SHARED_VIDEO_KEYS = (
    "size",
    "do_resize",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "patch_size",
    "temporal_patch_size",
    "merge_size",
)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor with an image processor and a tokenizer only (no video processor)."""

    # Written into saved configs so that a full install reloads the folder as the original class.
    saved_processor_class = "Qwen2VLProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = getattr(tokenizer, "image_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.image_token
        )
        self.video_token_id = getattr(tokenizer, "video_token_id", None) or tokenizer.convert_tokens_to_ids(
            self.video_token
        )
        # Skip Qwen2VLProcessor.__init__: it requires the video processor.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = self.saved_processor_class
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs) -> list[str]:
        if push_to_hub:
            raise NotImplementedError("save locally, then upload the folder")
        files = super().save_pretrained(save_directory, **kwargs)
        # Make the folder look like one saved by Qwen2VLProcessor (which also stores a video processor).
        write_processor_config(save_directory, self.image_processor, self.saved_processor_class)
        _set_json_key(Path(save_directory) / TOKENIZER_CONFIG, "processor_class", self.saved_processor_class)
        self.tokenizer._set_processor_class(self.saved_processor_class)
        return files


def video_processor_dict(image_processor) -> dict[str, Any]:
    """The Qwen2VLVideoProcessor config matching an image processor (legacy folders share one config)."""
    image = image_processor.to_dict()
    video = {key: image[key] for key in _SHARED_VIDEO_KEYS if key in image}
    video.update(
        min_frames=4,
        max_frames=768,
        do_sample_frames=False,
        return_metadata=False,
        video_processor_type="Qwen2VLVideoProcessor",
    )
    return video


def write_processor_config(folder: str | Path, image_processor, processor_class: str = "Qwen2VLProcessor") -> Path:
    """Write processor_config.json as Qwen2VLProcessor.save_pretrained does (it can't run without torchvision)."""
    config = {
        "image_processor": image_processor.to_dict(),
        "video_processor": video_processor_dict(image_processor),
        "processor_class": processor_class,
    }
    path = Path(folder) / PROCESSOR_CONFIG
    path.write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n")
    return path


def load_qwen2vl_processor(path: str, **image_kwargs) -> ProcessorMixin:
    """AutoProcessor's Qwen2-VL processor when it can be built, else an image-only one.

    `image_kwargs` (e.g. min_pixels, max_pixels) override the saved image-processor settings.
    """
    path = str(path)
    try:
        loaded = AutoProcessor.from_pretrained(path)
    except ImportError:  # the video processor needs torchvision (some folders return the tokenizer instead)
        loaded = None
    if isinstance(loaded, ProcessorMixin) and getattr(loaded, "image_processor", None) is not None:
        if image_kwargs:
            loaded.image_processor = AutoImageProcessor.from_pretrained(path, **image_kwargs)
        return loaded
    tokenizer = loaded if isinstance(loaded, PreTrainedTokenizerBase) else AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path, **image_kwargs)
    processor_dict, _ = ProcessorMixin.get_processor_dict(path)
    # The processor's own template (chat_template.jinja / .json) wins over the tokenizer's, as in from_pretrained.
    chat_template = processor_dict.get("chat_template") or tokenizer.chat_template
    processor = Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=chat_template)
    saved_class = processor_dict.get("processor_class") or _legacy_processor_class(path)
    if isinstance(saved_class, str) and saved_class.endswith("Processor"):
        processor.saved_processor_class = saved_class  # e.g. Qwen2_5_VLProcessor
    return processor


def _legacy_processor_class(path: str) -> str | None:
    """The processor_class a legacy preprocessor_config.json names, if any."""
    legacy = Path(path) / "preprocessor_config.json"
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("processor_class")
    return None


def _set_json_key(path: Path, key: str, value: Any) -> None:
    if path.is_file():
        data = json.loads(path.read_text())
        data[key] = value
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _json_default(value: Any) -> Any:
    # numpy values and enums, as the library's own to_json_string handles them.
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"not JSON serializable: {type(value).__name__}")

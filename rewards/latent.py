"""latent: ViZer's latent alignment, cos(F_image, mapper(h_caption)), as a reward.

- F_image: mean over the image tokens of the VLM's connector outputs (`get_image_features(...).pooler_output`).
  The vision tower's own pooled patches are nearly identical across images; the connector's are not.
- h_caption: mean over the caption tokens of the last hidden state (after the final norm, LM head excluded) of
  a TEXT-ONLY forward of the caption. With the image in context the mapper reads the image, not the caption.
- mapper: Linear(d_text, 256) - GELU - Linear(256, d_vision), trained by `vizer.objective.train_mapper` and saved
  as a folder (`mapper.json` + `mapper.safetensors`) that records the base VLM it was trained on.

Each distinct image is encoded once per call and kept in a bounded LRU cache keyed by `image_id` (or the pixels).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from data.images import to_rgb

from .common import LRUCache, Reward, call_images, encode_distinct, torch_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CONFIG, WEIGHTS = "mapper.json", "mapper.safetensors"


# ---------------------------------------------------------------------------------------------- mapper
class Mapper(nn.Module):
    """ViZer's 2-layer MLP from the language model's hidden size to the vision feature size."""

    def __init__(
        self, in_dim: int, out_dim: int, width: int = 256, *, seed: int = 0, meta: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.width, self.seed = int(in_dim), int(out_dim), int(width), int(seed)
        with torch.random.fork_rng(devices=[]):  # same seed, same init, without touching the caller's RNG
            torch.manual_seed(self.seed)
            self.net = nn.Sequential(nn.Linear(self.in_dim, self.width), nn.GELU(), nn.Linear(self.width, self.out_dim))
        self.meta: dict[str, Any] = dict(meta or {})  # base_model, variant, heldout_cosine, ...: kept in mapper.json

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h.to(self.net[0].weight.dtype))

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS))
        config = {"in_dim": self.in_dim, "width": self.width, "out_dim": self.out_dim, "seed": self.seed, **self.meta}
        (folder / CONFIG).write_text(json.dumps(config, indent=2, default=str) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str = "cpu") -> Mapper:
        from safetensors.torch import load_file

        folder = Path(folder)
        if not (folder / CONFIG).is_file():
            raise FileNotFoundError(f"latent: no {CONFIG} in {folder} (train one with vizer.objective.train_mapper)")
        config = json.loads((folder / CONFIG).read_text())
        dims = {k: config.pop(k) for k in ("in_dim", "out_dim", "width", "seed")}
        mapper = cls(dims["in_dim"], dims["out_dim"], dims["width"], seed=dims["seed"], meta=config)
        mapper.load_state_dict(load_file(str(folder / WEIGHTS)))
        return mapper.to(torch_device(device)).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- encoders
def _unwrap(model: Any) -> Any:
    """The transformers model under DDP/PEFT wrappers (PEFT's LoRA layers stay inside it)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _image_inputs(image_processor: Any, images: list[Any], accepted: set[str]) -> dict[str, torch.Tensor]:
    # one list per image: idefics3 treats a flat list as ONE sample holding every image
    enc = image_processor(images=[[to_rgb(im)] for im in images], return_tensors="pt")
    return {k: v for k, v in enc.items() if k in accepted and isinstance(v, torch.Tensor)}


def image_features(model: Any, processor: Any, images: Sequence[Any], *, batch_size: int = 16) -> torch.Tensor:
    """F_I: (n, d_vision) float32, the mean of each image's connector outputs, without gradients.

    `processor` may be the VLM's processor or its image processor. Works for any model whose
    `get_image_features` returns per-image token features (idefics3/SmolVLM, qwen2_vl, ...).
    """
    base = _unwrap(model)
    if not callable(getattr(base, "get_image_features", None)):
        raise ValueError(
            f"latent: {type(base).__name__} has no get_image_features; the latent objective needs a VLM "
            "that exposes its projected image features"
        )
    image_processor = getattr(processor, "image_processor", processor)
    accepted = {
        n
        for n, p in inspect.signature(base.get_image_features).parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    device, dtype = next(base.parameters()).device, next(base.parameters()).dtype
    merge = getattr(getattr(base.config, "vision_config", None), "spatial_merge_size", 1) or 1
    was_training, out = base.training, []
    base.eval()  # no vision dropout in the target, also mid-training
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = list(images[start : start + batch_size])
                inputs = {
                    k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                    for k, v in _image_inputs(image_processor, batch, accepted).items()
                }
                pooled = base.get_image_features(**inputs, return_dict=True).pooler_output
                if isinstance(pooled, torch.Tensor):
                    if pooled.dim() == 3:  # (images, tokens, dim)
                        pooled = list(pooled)
                    elif "image_grid_thw" in inputs:  # qwen-style, all images' tokens concatenated
                        pooled = pooled.split((inputs["image_grid_thw"].prod(-1) // merge**2).tolist())
                    else:
                        raise ValueError(
                            f"latent: cannot split {type(base).__name__}'s image features "
                            f"{tuple(pooled.shape)} into {len(batch)} images"
                        )
                if len(pooled) != len(batch):
                    raise ValueError(
                        f"latent: {type(base).__name__} returned features for {len(pooled)} images, "
                        f"expected {len(batch)}"
                    )
                out.append(torch.stack([f.reshape(-1, f.shape[-1]).float().mean(0) for f in pooled]))
    finally:
        base.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def tokenize_captions(
    tokenizer: Any, captions: Sequence[str], device: Any = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, caption_mask), right-padded; caption_mask marks the tokens averaged into h."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    ids = tok(list(captions), add_special_tokens=False)["input_ids"]
    # A BOS, when the tokenizer has one, starts the text as in pretraining (attention sink); it is left out of the
    # mean so h depends on the caption only. No chat markup: h should read the caption, not the template.
    bos = tok.bos_token_id
    prefix = [bos] if bos is not None else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(1, max((len(prefix) + len(r) for r in ids), default=1))
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros((len(ids), width), dtype=torch.long)
    caption = torch.zeros((len(ids), width), dtype=torch.bool)
    for i, row in enumerate(ids):
        full = prefix + row
        input_ids[i, : len(full)] = torch.tensor(full, dtype=torch.long)
        attention[i, : max(1, len(full))] = 1  # an empty caption still attends to one token (no all-masked row)
        caption[i, len(prefix) : len(full)] = True
    return input_ids.to(device), attention.to(device), caption.to(device)


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions; an empty row gives zeros (`where`, so NaN in padding cannot leak)."""
    mask = mask.unsqueeze(-1)
    total = torch.where(mask, states, torch.zeros((), dtype=states.dtype, device=states.device)).sum(1)
    return total / mask.sum(1).clamp(min=1).to(states.dtype)


def caption_states(
    model: Any, tokenizer: Any, captions: Sequence[str], *, grad: bool = False, batch_size: int | None = None
) -> torch.Tensor:
    """h: (n, d_text), the masked mean of the last hidden state over each caption's tokens, text only.

    The call goes through the whole VLM with no image (only its language model runs), so PEFT adapters
    and DDP wrappers see it; `grad=True` keeps the graph (ViZer Stage B trains LoRA through it).
    `tokenizer` may be the VLM's processor.
    """
    base = _unwrap(model)
    device = next(base.parameters()).device
    accepts = inspect.signature(base.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in accepts else {}  # skip the LM head over the caption
    step = batch_size or max(1, len(captions))
    out = []
    with torch.set_grad_enabled(grad):
        for start in range(0, len(captions), step):
            input_ids, attention, caption = tokenize_captions(tokenizer, captions[start : start + step], device)
            result = model(
                input_ids=input_ids, attention_mask=attention, output_hidden_states=True, use_cache=False, **extra
            )
            # transformers 5 ties hidden_states[-1] to the final-norm output (= the LM head's input)
            out.append(masked_mean(result.hidden_states[-1], caption).float())
    return torch.cat(out) if out else torch.zeros(0, 0)


# ---------------------------------------------------------------------------------------------- reward
class LatentReward(Reward):
    """cos(F_image, mapper(h_caption)) with h and F from a frozen copy of the base VLM; in [-1, 1]."""

    __name__ = "latent"
    floor = -1.0

    def __init__(
        self,
        mapper: Mapper,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        batch_size: int = 16,
        cache_size: int = 4096,
        device: str = "cpu",
    ) -> None:
        self.device = torch.device(torch_device(device))
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.mapper = mapper.to(self.device).eval().requires_grad_(False)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.batch_size = max(1, int(batch_size))
        self.cache = LRUCache(cache_size)
        self.image_encodes = 0  # images actually run through the vision tower (for tests)

    def image_table(self, images: list[Any], ids: list[Any] | None) -> tuple[torch.Tensor, list[int]]:
        """F_I of the distinct images of a call (cached), and the row of each completion."""

        def encode(batch: list[Any]) -> torch.Tensor:
            self.image_encodes += len(batch)
            return image_features(self.model, self.image_processor, batch, batch_size=self.batch_size)

        table, rows, _ = encode_distinct(images, ids, self.cache, encode)
        return table.to(self.device), rows

    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        images, ids = call_images(kwargs, "latent")
        valid = [i for i, t in enumerate(texts) if t is not None]
        scores = [float("nan")] * len(texts)
        if not valid:
            return scores
        table, rows = self.image_table([images[i] for i in valid], [ids[i] for i in valid] if ids else None)
        unique = list(dict.fromkeys(texts[i] for i in valid))  # GRPO samples repeat captions: forward each once
        with torch.no_grad():
            mapped = self.mapper(caption_states(self.model, self.tokenizer, unique, batch_size=self.batch_size))
        row_of = {t: j for j, t in enumerate(unique)}
        predicted = mapped[[row_of[texts[i]] for i in valid]]
        cos = F.cosine_similarity(predicted.float(), table[rows].float(), dim=-1)
        for i, v in zip(valid, cos.tolist(), strict=True):
            scores[i] = v
        return scores


def load_vlm(
    model: str, device: str = "cpu", dtype: str = "float32", image_options: dict | None = None
) -> tuple[Any, Any, Any]:
    """A frozen VLM, its tokenizer and image processor. Loaded separately rather than through AutoProcessor,
    which for Qwen2-VL without torchvision silently returns only the tokenizer."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    path = model  # the runner resolves `tiny:` ids before calling the factory
    vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype])
    image_processor = AutoImageProcessor.from_pretrained(path)
    for key, value in (image_options or {}).items():  # the image-token budget the mapper was trained with
        setattr(image_processor, key, value)
    return (
        vlm.to(torch_device(device)).eval().requires_grad_(False),
        AutoTokenizer.from_pretrained(path),
        image_processor,
    )


def latent(
    mapper: str,
    model: str | None = None,
    batch_size: int = 16,
    cache_size: int = 4096,
    device: str = "cpu",
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    image_options: dict | None = None,
) -> LatentReward:
    """ViZer's latent alignment of a caption with its image, by the base VLM and a trained mapper.

    Args:
        mapper: folder written by `vizer.objective.train_mapper` (mapper.json + mapper.safetensors).
        model: the VLM whose latents the mapper reads (hub id or folder); default: the one recorded
            in mapper.json. Use the base model, not the policy being trained.
        batch_size: images and captions per forward.
        cache_size: image features kept across steps (0 disables the cache).
        device: where the frozen VLM runs (the training device by default).
        dtype: its precision.
        image_options: image-processor attributes (the recipe's model.processor, filled in by the runner), so
            that images are seen as they were when the mapper was trained.
    """
    m = Mapper.load(mapper, device)
    model = model or m.meta.get("base_model")
    if not model:
        raise ValueError(f"latent: {mapper}/{CONFIG} records no base_model; pass the `model` option")
    vlm, tokenizer, image_processor = load_vlm(model, device, dtype, image_options)
    d_text = getattr(getattr(vlm.config, "text_config", vlm.config), "hidden_size", None)
    if d_text is not None and d_text != m.in_dim:
        raise ValueError(f"latent: mapper {mapper} reads {m.in_dim}-dim states, {model} has {d_text}")
    return LatentReward(m, vlm, tokenizer, image_processor, batch_size=batch_size, cache_size=cache_size, device=device)

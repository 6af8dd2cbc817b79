"""grounding: how well a caption matches its image, by a CLIP- or SigLIP-style embedding model.

Score (option `score`):
- `clip_s` (default): CLIP-S of Hessel et al. 2021, w * max(cos, 0) with the text prefixed "A photo depicts".
- `cosine`: the raw cosine.
- `contrastive`: CLIP-S to the caption's own image minus its mean CLIP-S to other images (the other images
  of the call, topped up with recently seen ones), so a generic caption that fits anything earns ~0.

Each distinct image is encoded once per call (the G completions of a group share it), and image embeddings
are kept in a bounded LRU cache keyed by `image_id` (or by the pixels when there is no id). There is one such
cache per loaded scorer, shared by every reward built on it through `grounding(...)` (`phrase_grounding`,
`counterfactual_grounding`, the eval's scorers): with several of them on, a step still encodes each distinct
image once.
"""

from __future__ import annotations

import functools
import weakref
from typing import Any, Literal

import torch
import torch.nn.functional as F

from data.images import to_rgb

from .common import LRUCache, Reward, call_images, encode_distinct, torch_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _features(out: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; older, a tensor
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class GroundingReward(Reward):
    __name__ = "grounding"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any,
        *,
        score: str = "clip_s",
        prefix: str = "A photo depicts",
        w: float = 2.5,
        batch_size: int = 16,
        cache_size: int = 4096,
        negatives: int = 32,
        device: str = "cpu",
        share_images: bool = True,
        cache: LRUCache | None = None,
    ) -> None:
        if score not in ("clip_s", "cosine", "contrastive"):
            raise ValueError(f"grounding: unknown score {score!r}; expected clip_s, cosine or contrastive")
        self.device = torch.device(torch_device(device))
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.score_kind, self.prefix, self.w = score, prefix.strip(), float(w)
        self.batch_size, self.negatives = max(1, int(batch_size)), max(0, int(negatives))
        self.cache = LRUCache(cache_size) if cache is None else cache  # None: a cache of its own
        self.share_images = share_images  # False only to measure the cost of encoding per completion
        self.floor = {"clip_s": 0.0, "cosine": -1.0, "contrastive": -self.w}[score]
        self.dtype = next(self.model.parameters()).dtype
        config = model.config
        text_config = getattr(config, "text_config", config)
        limits = [getattr(text_config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.max_length = min(int(x) for x in limits if x and x < 1_000_000)
        # SigLIP was trained on text padded to its full length; CLIP pools at EOS and pads to the longest
        self.padding = "max_length" if "siglip" in str(getattr(config, "model_type", "")) else "longest"
        self.truncated = 0
        self.image_encodes = 0  # images actually run through the vision tower (for tests and the benchmark)

    # ------------------------------------------------------------------------------------- encoders
    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit embeddings of `prefix + text`, in the order given."""
        unique = list(dict.fromkeys(texts))  # GRPO samples repeat captions; encode each once
        prompts = [f"{self.prefix} {t}" if self.prefix else t for t in unique]
        # CLIP's text tower has 77 positions: truncate explicitly (keeping EOS, which CLIP pools) and count it
        lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        self.truncated = sum(texts.count(t) for t, n in zip(unique, lengths) if n > self.max_length)
        order = sorted(range(len(prompts)), key=lengths.__getitem__)  # similar lengths together: less padding
        emb = [None] * len(prompts)
        for i in range(0, len(order), self.batch_size):
            rows = order[i : i + self.batch_size]
            enc = self.tokenizer(
                [prompts[r] for r in rows],
                padding=self.padding,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            keep = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            for r, e in zip(rows, _features(self.model.get_text_features(**keep)).float()):
                emb[r] = e
        row = {t: i for i, t in enumerate(unique)}
        return F.normalize(torch.stack([emb[row[t]] for t in texts]), dim=-1)

    @torch.inference_mode()
    def encode_images(self, images: list[Any]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            batch = [to_rgb(im) for im in images[i : i + self.batch_size]]
            inputs = self.image_processor(images=batch, return_tensors="pt")  # SigLIP2 adds masks and shapes
            inputs = {
                k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                for k, v in inputs.items()
                if isinstance(v, torch.Tensor)
            }
            out.append(_features(self.model.get_image_features(**inputs)).float())
        self.image_encodes += len(images)
        return F.normalize(torch.cat(out), dim=-1)

    def image_embeddings(self, images: list[Any], ids: list[Any] | None) -> tuple[torch.Tensor, list[int], list]:
        """Embeddings of the distinct images of a call, the row of each completion, and the distinct keys."""
        if not self.share_images:
            return self.encode_images(images), list(range(len(images))), [object() for _ in images]
        return encode_distinct(images, ids, self.cache, self.encode_images)

    # ------------------------------------------------------------------------------------- score
    def score(self, texts: list[str | None], **kwargs: Any) -> list[float]:
        images, ids = call_images(kwargs, "grounding")
        valid = [i for i, t in enumerate(texts) if t is not None]
        scores = [float("nan")] * len(texts)
        log_metric = kwargs.get("log_metric")
        if not valid:
            return scores
        self.model.eval()  # cheap, and a shared model may have been left in train mode
        table, rows, keys = self.image_embeddings([images[i] for i in valid], [ids[i] for i in valid] if ids else None)
        text_emb = self.encode_texts([texts[i] for i in valid])
        cos = text_emb @ table.T  # (valid captions, distinct images)
        own = cos[torch.arange(len(valid)), torch.tensor(rows)]
        if self.score_kind == "cosine":
            values = own
        else:
            values = self.w * own.clamp(min=0)
            if self.score_kind == "contrastive":
                values = values - self.w * self._negative_similarity(text_emb, cos, rows, keys).clamp(min=0)
        for i, v in zip(valid, values.tolist(), strict=True):
            scores[i] = v
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/truncated", self.truncated / len(valid))
        return scores

    def _negative_similarity(
        self, text_emb: torch.Tensor, cos: torch.Tensor, rows: list[int], keys: list
    ) -> torch.Tensor:
        """Mean clipped cosine of each caption to the images that are not its own."""
        n_img = cos.shape[1]
        mask = torch.ones_like(cos)
        mask[torch.arange(len(rows)), torch.tensor(rows)] = 0
        sims, counts = (cos.clamp(min=0) * mask).sum(1), mask.sum(1)
        extra = self.cache.recent(self.negatives, exclude=set(keys)) if self.share_images else []
        if extra:  # a call may hold a single group (one image): borrow recently seen images too
            bank = torch.stack(extra).to(text_emb.device)
            sims, counts = sims + (text_emb @ bank.T).clamp(min=0).sum(1), counts + len(extra)
        if n_img <= 1 and not extra:
            return torch.zeros(len(rows), device=cos.device)
        return sims / counts.clamp(min=1)


# scorer model -> its image-embedding cache; an embedding depends only on the scorer and the image
_IMAGE_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_image_cache(scorer: Any, size: int) -> LRUCache:
    """The one image-embedding cache of a loaded scorer, holding as many as its largest user asks for; size 0:
    a cache of one's own that keeps nothing."""
    if size <= 0:
        return LRUCache(0)
    cache = _IMAGE_CACHES.setdefault(scorer, LRUCache(size))
    cache.maxsize = max(cache.maxsize, int(size))
    return cache


@functools.lru_cache(maxsize=4)
def load_scorer(model: str, device: str = "cpu", dtype: str = "float32") -> tuple[Any, Any, Any]:
    """Model, tokenizer and image processor of a CLIP/SigLIP-style checkpoint (hub id or folder). Loaded once
    per process: several rewards (and evaluation) that name the same scorer share it, frozen."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    path = model
    scorer = AutoModel.from_pretrained(path, dtype=DTYPES[dtype])
    if not (hasattr(scorer, "get_image_features") and hasattr(scorer, "get_text_features")):
        raise ValueError(f"grounding: {model} ({type(scorer).__name__}) has no get_image_features/get_text_features")
    return (
        scorer.to(torch_device(device)).eval(),
        AutoTokenizer.from_pretrained(path),
        AutoImageProcessor.from_pretrained(path),
    )


def grounding(
    model: str = "openai/clip-vit-base-patch32",
    score: Literal["clip_s", "cosine", "contrastive"] = "clip_s",
    prefix: str = "A photo depicts",
    w: float = 2.5,
    negatives: int = 32,
    batch_size: int = 16,
    cache_size: int = 4096,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    device: str = "cpu",
) -> GroundingReward:
    """Image-caption agreement by a CLIP/SigLIP-style model.

    Args:
        model: hub id or local folder (in a recipe also a `tiny:` id, e.g. `tiny:shapes-clip`).
        score: `clip_s` (w * max(cos, 0)), `cosine`, or `contrastive` (own image minus other images).
        prefix: prepended to every caption ("" for none).
        w: CLIP-S scale.
        negatives: for `contrastive`, how many recently seen images to add as negatives.
        batch_size: encoder batch size.
        cache_size: image embeddings kept across steps, in the scorer's one cache (0: none kept for this reward).
        dtype: scorer precision.
        device: where the scorer runs (the training device by default).
    """
    scorer, tokenizer, processor = load_scorer(model, device, dtype)
    return GroundingReward(
        scorer,
        tokenizer,
        processor,
        score=score,
        prefix=prefix,
        w=w,
        batch_size=batch_size,
        negatives=negatives,
        device=device,
        cache=shared_image_cache(scorer, cache_size),
    )

"""What every reward plugin shares: the TRL call convention, text and image extraction, NaN handling."""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from PIL import Image

from data.errors import ConfigError


# ---------------------------------------------------------------------------------------------- text
def completion_text(completion: Any) -> str | None:
    """The text of one completion: a plain string, or a conversational `[{"role": ..., "content": ...}]`.

    Returns None when there is no usable text (non-string, empty or whitespace-only).
    """
    if isinstance(completion, dict):
        completion = completion.get("content")
    elif isinstance(completion, (list, tuple)):
        # conversational: the assistant turn(s); content may itself be a list of typed parts
        parts = [completion_text(m) for m in completion]
        completion = " ".join(p for p in parts if p) if parts else None
    if isinstance(completion, list):  # content parts: [{"type": "text", "text": ...}]
        completion = " ".join(p.get("text") or "" for p in completion if isinstance(p, dict))
    if not isinstance(completion, str) or not completion.strip():
        return None
    return completion.strip()


def prompt_text(prompt: Any) -> str:
    """The text a user wrote in a prompt (conversational or plain), image placeholders dropped."""
    if isinstance(prompt, str):
        return prompt.strip()
    if isinstance(prompt, dict):
        if prompt.get("role") not in (None, "user", "system"):
            return ""
        content = prompt.get("content", prompt.get("text"))
        if isinstance(content, list):
            return " ".join(prompt_text(p) for p in content if isinstance(p, dict) and p.get("type") == "text").strip()
        return prompt_text(content) if content is not None else ""
    if isinstance(prompt, (list, tuple)):
        return " ".join(t for t in (prompt_text(m) for m in prompt) if t).strip()
    return ""


# ---------------------------------------------------------------------------------------------- images
def image_key(image: Any, image_id: Any = None) -> Hashable:
    """A cache key for an image: its id when the data has one, else a hash of its pixels."""
    if image_id is not None:
        size = getattr(image, "size", None)
        return ("id", type(image_id).__name__, str(image_id), size)  # size: two datasets may reuse ids
    if isinstance(image, Image.Image):
        h = hashlib.blake2b(image.tobytes(), digest_size=16)
        h.update(f"{image.mode}{image.size}".encode())
        return ("px", h.hexdigest())
    return ("obj", id(image))


class LRUCache:
    """A small bounded mapping that forgets the least recently used entry."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = max(0, int(maxsize))
        self._data: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        if self.maxsize == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def recent(self, n: int, exclude: set | None = None) -> list[Any]:
        """Up to n most recently used values whose keys are not in `exclude`."""
        out = []
        for key in reversed(self._data):
            if len(out) >= n:
                break
            if not exclude or key not in exclude:
                out.append(self._data[key])
        return out

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data


def call_images(kwargs: dict, plugin: str) -> tuple[list[Any], list[Any] | None]:
    """The image of each completion of a TRL reward call (first image when a row has several) and the ids."""
    images = kwargs.get("image") if kwargs.get("image") is not None else kwargs.get("images")
    if images is None:
        raise ValueError(f"{plugin} needs the images: the dataset must have an `image` column")
    images = [im[0] if isinstance(im, (list, tuple)) else im for im in images]
    ids = kwargs.get("image_id")
    return images, (list(ids) if ids is not None and len(ids) == len(images) else None)


def encode_distinct(
    images: list[Any], ids: list[Any] | None, cache: LRUCache, encode: Callable[[list[Any]], Any]
) -> tuple[Any, list[int], list[Hashable]]:
    """Each distinct image of a call encoded once (`encode` gets only those the cache lacks): the stacked
    table of distinct embeddings, the row of each completion in it, and the distinct keys."""
    import torch

    keys: list[Hashable] = [image_key(im, ids[i] if ids else None) for i, im in enumerate(images)]
    first: dict[Hashable, Any] = {}
    for key, im in zip(keys, images, strict=True):
        first.setdefault(key, im)
    order = list(first)
    table = [cache.get(key) for key in order]
    missing = [j for j, emb in enumerate(table) if emb is None]
    if missing:
        fresh = encode([first[order[j]] for j in missing])
        for row, j in enumerate(missing):
            table[j] = fresh[row]
            cache.put(order[j], fresh[row])
    row_of = {key: j for j, key in enumerate(order)}
    return torch.stack(table), [row_of[k] for k in keys], order


# ---------------------------------------------------------------------------------------------- groups
def group_ids(n: int, kwargs: dict, column: str = "image_id") -> list[Hashable]:
    """The group of each completion: the id column when present, else the image's content.

    TRL passes every dataset column with one entry per completion, but no group id of its own, and the
    completions of one prompt are not guaranteed to be neighbours, so grouping never relies on position.
    """
    ids = kwargs.get(column)
    if ids is not None:
        if len(ids) != n:
            raise ConfigError(f"reward grouping: column '{column}' has {len(ids)} entries for {n} completions")
        missing = sum(i is None for i in ids)
        if missing:  # one None would silently merge unrelated captions into one group
            raise ConfigError(f"reward grouping: column '{column}' is missing for {missing} of {n} completions")
        return [("id", type(i).__name__, str(i)) for i in ids]  # 1 and "1" stay different groups
    images = kwargs.get("image") if kwargs.get("image") is not None else kwargs.get("images")
    if images is not None and len(images) == n:
        return [image_key(im[0] if isinstance(im, list) and im else im) for im in images]
    return [("all",)] * n  # no id and no image: one group


# ---------------------------------------------------------------------------------------------- devices
def torch_device(device: Any) -> str:
    return str(device) if device not in (None, "") else "cpu"


# ---------------------------------------------------------------------------------------------- base
class Reward:
    """A TRL reward callable: `f(prompts=..., completions=..., **columns) -> list[float]`.

    Subclasses implement `score(texts, **kwargs)`, where a text is None for an empty, whitespace-only or
    non-string completion; those get `floor`, as does any NaN/inf, which is also counted in the logged
    metric `rewards/<name>/nonfinite` so a broken scorer shows up instead of silently steering training.
    """

    __name__ = "reward"
    floor: float = -1.0

    def score(self, texts: list[str | None], **kwargs: Any) -> Sequence[float]:
        raise NotImplementedError

    def __call__(
        self,
        prompts: list | None = None,
        completions: list | None = None,
        completion_ids: list | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        completions = list(completions or [])
        texts = [completion_text(c) for c in completions]
        if not completions:
            return []
        raw = self.score(texts, prompts=prompts, completion_ids=completion_ids, log_metric=log_metric, **kwargs)
        out, nonfinite = [], 0
        for text, value in zip(texts, raw, strict=True):
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = math.nan
            if text is None:
                value = self.floor
            elif not math.isfinite(value):
                nonfinite += 1
                value = self.floor
            out.append(value)
        if log_metric is not None:
            log_metric(f"rewards/{self.__name__}/nonfinite", float(nonfinite))
        return out

    def __repr__(self) -> str:
        return f"<reward {self.__name__}>"

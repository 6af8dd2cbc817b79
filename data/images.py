"""Opening images, the one place: files, datasets' undecoded records, PIL images and arrays, as 8-bit RGB.

Every reader (training sources, rewards, eval, caption) opens images through here, so that what counts as
readable and how odd modes are converted is the same everywhere.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# What PIL raises for files that are not images, truncated, malformed in other ways, or decompression bombs
# (a few bytes declaring a gigapixel image); UnusableImage for pictures no VLM processor takes.
class UnusableImage(ValueError):
    """A decodable image of a shape no VLM captions (a 1 x 4000 strip, a 2 x 2 icon)."""


UNREADABLE = (
    UnidentifiedImageError,
    Image.DecompressionBombError,
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
)
# Bounds every processor here accepts (Qwen2-VL refuses an aspect ratio above 200 and sides under 28 px are
# upsampled; idefics3 resizes anything): an image outside them is skipped where it is read, never mid-step.
MAX_ASPECT_RATIO = 50
MIN_SIDE = 8

ImageSource = Image.Image | Path | str | dict


def load_image(source: ImageSource) -> Image.Image:
    """A fully decoded PIL image from a PIL image, a file path, or datasets' {"bytes", "path"} record.

    Decoding the pixels (not only PIL's header `verify()`) is what catches truncated files."""
    if isinstance(source, Image.Image):
        check_shape(source)
        return source
    if isinstance(source, dict):
        source = io.BytesIO(source["bytes"]) if source.get("bytes") else source["path"]
    image = Image.open(source)
    check_shape(image)  # before decoding: a decompression bomb is refused by its header alone
    image.load()
    return image


def check_shape(image: Image.Image) -> None:
    width, height = image.size
    if min(width, height) < MIN_SIDE or max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise UnusableImage(f"{width}x{height} px (sides >= {MIN_SIDE}, aspect ratio <= {MAX_ASPECT_RATIO})")


def to_rgb(image: Any) -> Image.Image:
    """Any PIL mode (RGBA, LA, P, L, 1, CMYK, I;16, I, F), a numpy array, a path or a datasets record, as RGB."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    elif isinstance(image, (str, bytes, dict)) or hasattr(image, "__fspath__"):
        image = load_image(io.BytesIO(image) if isinstance(image, bytes) else image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        # high bit depth: stretch the actual range to 8 bits (a plain convert would clip to white)
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent pixels on white
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def find_images(folder: Path) -> list[Path]:
    """Image files under folder (by suffix), broken links included: they are counted as unreadable, not lost."""
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())
    )


def readable(path: Path) -> bool:
    try:
        str(path).encode("utf-8")  # a name that is not UTF-8 cannot go into a datasets table
        load_image(path).close()
        return True
    except (*UNREADABLE, UnicodeEncodeError):
        return False


def split_readable(folder: Path) -> tuple[list[Path], list[Path]]:
    """(readable, unreadable) image files under folder, searched recursively."""
    paths = find_images(folder)
    good = [p for p in paths if readable(p)]
    kept = set(good)
    return good, [p for p in paths if p not in kept]

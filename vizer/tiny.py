"""Tiny random models built offline, deterministically, and cached on disk.

`tiny:<kind>` model ids resolve to folders that load with the usual Auto classes, so tests and
smoke runs exercise the same code paths as real checkpoints without network access.

    python -m vizer.tiny idefics3 [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

KINDS = ("idefics3", "qwen2_vl", "clip", "siglip")
VERSION = "v1"  # bump when a builder changes, so stale caches are never reused
SEED = 1234
MARKER = "vizer_tiny.json"  # written last inside the temp dir; its presence means a complete build
# Builds seed torch's global RNG: serialise them within a process so threads cannot interleave draws.
_BUILD_LOCK = threading.Lock()

# ---------------------------------------------------------------------------------------------
# Paths and public entry points
# ---------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """$VIZER_CACHE if set, else <repo root>/.cache/vizer."""
    env = os.environ.get("VIZER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / ".cache" / "vizer"


def build_tiny(kind: str, root: Path | None = None) -> Path:
    """Return <root>/tiny/<kind>-v1, building it first if it is missing."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    root = Path(root) if root is not None else cache_root()
    target = root / "tiny" / f"{kind}-{VERSION}"
    if (target / MARKER).is_file():
        return target
    with _BUILD_LOCK:

        def build(tmp: Path) -> None:
            with no_progress_bars():
                info = _BUILDERS[kind](tmp)
            (tmp / MARKER).write_text(json.dumps({"kind": kind, "version": VERSION, "seed": SEED, **info}, indent=2))

        return build_once(target, build)


def build_once(target: Path, build: Callable[[Path], None], marker: str = MARKER) -> Path:
    """Run `build` into a temp folder beside `target` and move it into place atomically.

    `build` must write `marker` last: a folder holding it is finished and is reused as is, also
    one another process published first.
    """
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target so the final rename stays on one filesystem (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _publish(tmp, target, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish(tmp: Path, target: Path, marker: str = MARKER) -> None:
    """Move a finished build into place atomically; a concurrent winner's folder is kept."""
    try:
        os.rename(tmp, target)
    except OSError:
        if (target / marker).is_file():
            return  # another process finished first: its build is identical
        # A leftover folder without a marker is an interrupted foreign write; replace it.
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
        os.rename(tmp, target)


# ---------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE trained on generated captions
# ---------------------------------------------------------------------------------------------

# Words of simple shape drawings (the ShapesCap benchmark's vocabulary among them), so that shape captions
# tokenize into whole words. Changing them changes every tiny tokenizer: bump VERSION.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
_GENERAL_NOUNS = (
    "man woman person people child boy girl baby dog cat bird horse cow sheep elephant giraffe zebra bear "
    "car bus truck train bike bicycle motorcycle boat plane street road sidewalk building house city tree "
    "grass field park beach water ocean sea river lake sky cloud sun snow mountain hill table chair bench "
    "plate bowl cup food pizza sandwich cake fruit apple banana orange bread kitchen room bed window door "
    "wall floor clock sign light phone computer laptop book ball kite frisbee umbrella bag hat shirt jacket "
    "background foreground object objects shape shapes circle square triangle line pattern scene picture "
    "photo image view group pair couple crowd team game player fence flower flowers"
).split()
_GENERAL_ADJECTIVES = (
    "small large big little tall short young old white black brown gray grey red green blue yellow purple "
    "orange pink dark bright colorful colourful empty busy wooden plain simple single two three several many "
    "blank solid round flat open sunny cloudy"
).split()
_GENERAL_VERBS = (
    "standing sitting walking running holding looking playing riding eating drinking lying flying parked "
    "waiting talking carrying wearing watching crossing driving posing resting smiling floating placed "
    "shown drawn painted centered"
).split()
_PREPOSITIONS = (
    "on in at near next to beside behind under over above below with of by inside along across between against around"
).split()
_OPENERS = (
    "a photo of",
    "an image of",
    "a picture of",
    "this image shows",
    "this picture shows",
    "the image shows",
    "the photo depicts",
    "a photo depicts",
    "this photo depicts",
    "there is",
    "there are",
    "here we see",
    "in this image there is",
    "a drawing of",
    "a simple drawing of",
)
_PROMPTS = (
    "Describe this image.",
    "Describe the image briefly.",
    "Describe this picture.",
    "What is in this photo?",
    "Provide a one-sentence caption for the provided image.",
    "Write a short caption.",
    "Caption this image.",
    "What shapes do you see?",
    "List the objects in the image.",
)
_POSITIONS = ("on the left", "on the right", "in the middle", "at the top", "at the bottom", "in the center")


def _shape_phrase(rng: random.Random) -> str:
    art = rng.choice(("a", "one", "the"))
    parts = [rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES)]
    if rng.random() < 0.3:
        parts = parts[1:]
    phrase = f"{art} {' '.join(parts)}"
    if art == "a" and parts[0] == "orange":
        phrase = "an " + phrase[2:]
    return phrase + (f" {rng.choice(_POSITIONS)}" if rng.random() < 0.4 else "")


def _shapes_caption(rng: random.Random) -> str:
    objects = [_shape_phrase(rng) for _ in range(rng.randint(1, 3))]
    body = objects[0] if len(objects) == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]
    if rng.random() < 0.4:
        body = f"{rng.choice(_OPENERS)} {body}"
    if rng.random() < 0.3:
        body += rng.choice((" on a white background", " on a plain background", " with nothing else"))
    return body + ("." if rng.random() < 0.6 else "")


def _general_caption(rng: random.Random) -> str:
    adj, noun, verb = rng.choice(_GENERAL_ADJECTIVES), rng.choice(_GENERAL_NOUNS), rng.choice(_GENERAL_VERBS)
    prep, other = rng.choice(_PREPOSITIONS), rng.choice(_GENERAL_NOUNS)
    text = f"a {adj} {noun} {verb} {prep} the {other}"
    if rng.random() < 0.3:
        text = f"{rng.choice(_OPENERS)} {text}"
    return text + ("." if rng.random() < 0.5 else "")


def caption_corpus(n: int = 3000, seed: int = SEED) -> list[str]:
    """Deterministic English-like text: shape captions, generic captions, prompts, role words."""
    rng = random.Random(seed)
    lines = [
        " ".join(_GENERAL_NOUNS),
        " ".join(_GENERAL_ADJECTIVES),
        " ".join(_GENERAL_VERBS),
        " ".join(_PREPOSITIONS),
        *_OPENERS,
        *_PROMPTS,
        "User: Assistant: system user assistant",
    ]
    for i in range(n):
        text = _shapes_caption(rng) if i % 3 else _general_caption(rng)
        if rng.random() < 0.25:
            text = text[0].upper() + text[1:]
        lines.append(text)
    for i in range(n // 10):  # chat framing of both families, so role words get whole tokens
        prompt, answer = rng.choice(_PROMPTS), _shapes_caption(rng)
        if i % 2:
            lines.append(f"User:{prompt}\nAssistant: {answer}")
        else:
            lines.append(f"system\nYou are a helpful assistant.\nuser\n{prompt}\nassistant\n{answer}")
    return lines


def _train_tokenizer(special_tokens: list[str], vocab_size: int = 800, lowercase: bool = False):
    """A byte-level BPE whose special tokens take the first ids, in the given order."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(caption_corpus(), trainer=trainer)
    return tok


def _fast_tokenizer(tok, **kwargs):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _seeded_model(model_cls, config):
    """Instantiate with a fixed seed without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_cls(config)
    return model.eval()


@contextlib.contextmanager
def no_progress_bars():
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _save_generation_config(model, bos: int | None, eos: int | list[int], pad: int) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad)


# ---------------------------------------------------------------------------------------------
# idefics3 (SmolVLM v1)
# ---------------------------------------------------------------------------------------------

# SmolVLM-Instruct's template; plain-string content is also accepted.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_VISION = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
IDEFICS3_SCALE_FACTOR = 2


def _text_dims(vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
    }


def idefics3_tokenizer():
    """The shapes-vocabulary BPE with SmolVLM's special tokens and chat template."""
    rows_cols = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<fake_token_around_image>",
        "<image>",
        "<end_of_utterance>",
        "<global-img>",
        *rows_cols,
    ]
    return _fast_tokenizer(
        _train_tokenizer(specials),
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|im_end|>",
        model_max_length=1024,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )


def _build_idefics3(out: Path) -> dict:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    tokenizer = idefics3_tokenizer()
    side = IDEFICS3_VISION["image_size"]
    # One tile = the vision encoder's input; `size` allows a 2x2 split when splitting is switched on.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": 2 * side},
        max_image_size={"longest_edge": side},
    )
    image_seq_len = (side // IDEFICS3_VISION["patch_size"]) ** 2 // IDEFICS3_SCALE_FACTOR**2
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=image_seq_len, chat_template=IDEFICS3_CHAT_TEMPLATE
    )
    tok = processor.tokenizer  # ids are read after the processor registered its special tokens
    ids = {name: tok.convert_tokens_to_ids(name) for name in ("<|im_start|>", "<end_of_utterance>", "<|im_end|>")}
    text = {
        **_text_dims(len(tok)),
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<end_of_utterance>"],
        "pad_token_id": ids["<|im_end|>"],
    }
    config = Idefics3Config(
        text_config={"model_type": "llama", **text},
        vision_config=dict(IDEFICS3_VISION),
        scale_factor=IDEFICS3_SCALE_FACTOR,
        image_token_id=processor.image_token_id,
        pad_token_id=ids["<|im_end|>"],
    )
    model = _seeded_model(Idefics3ForConditionalGeneration, config)
    _save_generation_config(model, ids["<|im_start|>"], ids["<end_of_utterance>"], ids["<|im_end|>"])
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return {"params": _n_params(model), "vocab_size": len(tok), "image_tokens": image_seq_len}


# ---------------------------------------------------------------------------------------------
# qwen2_vl
# ---------------------------------------------------------------------------------------------

# Qwen2-VL-Instruct's template.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2VL_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# 64x64 -> 84x84 -> 6x6 patches -> 9 tokens; anything larger is capped at 112x112 -> 16 tokens.
QWEN2VL_MIN_PIXELS = 84 * 84
QWEN2VL_MAX_PIXELS = 112 * 112


def _build_qwen2_vl(out: Path) -> dict:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from vizer.qwen2vl_processor import write_processor_config  # transformers loads only when a model is built

    tokenizer = _fast_tokenizer(
        _train_tokenizer(QWEN2VL_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in QWEN2VL_SPECIALS}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN2VL_MIN_PIXELS, max_pixels=QWEN2VL_MAX_PIXELS)
    text = {
        **_text_dims(len(tokenizer)),
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [2, 3, 3],
        },  # sums to head_dim/2
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "num_heads": 2,
        "mlp_ratio": 2,
        "hidden_size": text["hidden_size"],
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = _seeded_model(Qwen2VLForConditionalGeneration, config)
    _save_generation_config(
        model, ids["<|endoftext|>"], [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"]
    )
    model.save_pretrained(out)
    # What Qwen2VLProcessor.save_pretrained writes; it cannot be built here without torchvision.
    tokenizer._set_processor_class("Qwen2VLProcessor")
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2VL_CHAT_TEMPLATE)
    write_processor_config(out, image_processor)
    merge = vision["spatial_merge_size"] ** 2
    return {
        "params": _n_params(model),
        "vocab_size": len(tokenizer),
        "image_tokens_64px": image_processor.get_number_of_image_patches(64, 64, {}) // merge,
        "image_tokens_max": QWEN2VL_MAX_PIXELS // (14 * 14) // merge,
    }


# ---------------------------------------------------------------------------------------------
# clip and siglip (reward scorers)
# ---------------------------------------------------------------------------------------------

SCORER_IMAGE = {"image_size": 64, "patch_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2}


def _build_clip(out: Path) -> dict:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    specials = ["<|startoftext|>", "<|endoftext|>", "<|pad|>"]
    # CLIP pools the text at its first EOS, so the tokenizer must append one.
    tokenizer = _fast_tokenizer(
        _train_tokenizer(specials, lowercase=True),
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        add_bos_token=True,
        add_eos_token=True,
        model_max_length=77,
    )
    ids = [tokenizer.convert_tokens_to_ids(t) for t in specials]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "bos_token_id": ids[0],
        "eos_token_id": ids[1],
        "pad_token_id": ids[2],
    }
    vision = {**SCORER_IMAGE, "hidden_size": 64, "intermediate_size": 128}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = _seeded_model(CLIPModel, config)
    side = SCORER_IMAGE["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    model.save_pretrained(out)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return {"params": _n_params(model), "vocab_size": len(tokenizer), "projection_dim": 32}


def _build_siglip(out: Path) -> dict:
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    specials = ["<pad>", "</s>", "<unk>"]
    # SigLIP pools the last position: pad to max_length; it has no BOS.
    tokenizer = _fast_tokenizer(
        _train_tokenizer(specials, lowercase=True),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_eos_token=True,
        model_max_length=64,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
        "bos_token_id": None,
        "eos_token_id": ids["</s>"],
        "pad_token_id": ids["<pad>"],
    }
    vision = {**SCORER_IMAGE, "hidden_size": 32, "intermediate_size": 64}
    config = SiglipConfig(text_config=text, vision_config=vision)
    model = _seeded_model(SiglipModel, config)
    side = SCORER_IMAGE["image_size"]
    image_processor = SiglipImageProcessorPil(size={"height": side, "width": side})
    model.save_pretrained(out)
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return {"params": _n_params(model), "vocab_size": len(tokenizer), "projection_dim": 32}


_BUILDERS = {"idefics3": _build_idefics3, "qwen2_vl": _build_qwen2_vl, "clip": _build_clip, "siglip": _build_siglip}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vizer.tiny", description="Build tiny random models offline.")
    parser.add_argument("kinds", nargs="+", choices=KINDS, metavar="KIND", help=f"one or more of {', '.join(KINDS)}")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="cache root (default: $VIZER_CACHE or <repo>/.cache/vizer); models go to DIR/tiny/<kind>-" + VERSION,
    )
    args = parser.parse_args(argv)
    for kind in args.kinds:
        print(build_tiny(kind, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

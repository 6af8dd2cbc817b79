"""Batched caption generation with a loaded VLM; shared by `vizer eval` and `vizer caption`.

python -m vizer caption --adapter RUN/adapter --images FOLDER [--out FILE]
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.images import ImageSource, split_readable, to_rgb
from data.sources import conversational_prompt
from vizer.config import MODEL_SCHEMA, TOP_SCHEMA, RecipeError, load_recipe
from vizer.models import LoadedModel, load_with_adapter
from vizer.records import read_records
from vizer.run_dir import fingerprint

DEFAULT_PROMPT: str = TOP_SCHEMA["prompt"][1]


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 64
    batch_size: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    num_samples: int = 1
    seed: int = 0

    @classmethod
    def from_eval(cls, eval_cfg: dict) -> Decoding:
        return cls(**{k: eval_cfg[k] for k in cls.__dataclass_fields__ if k in eval_cfg})

    @property
    def samples(self) -> int:
        return self.num_samples if self.do_sample else 1  # greedy decoding gives one caption per image

    def cache_key(self) -> dict:
        """The settings that change the captions (batch size only changes speed)."""
        key = asdict(self)
        del key["batch_size"]
        if not self.do_sample:
            key.update(temperature=None, num_samples=1, seed=None)
        return key


def place(loaded: LoadedModel) -> torch.device:
    """Move an unquantized model to the GPU when there is one; quantized models are placed at load time."""
    if (
        torch.cuda.is_available()
        and not getattr(loaded.model, "is_quantized", False)
        and getattr(loaded.model, "hf_device_map", None) is None
    ):
        loaded.model.to("cuda")
    return next(loaded.model.parameters()).device


@torch.inference_mode()
def generate_captions(
    loaded: LoadedModel,
    images: Sequence[ImageSource],
    prompt: str,
    decoding: Decoding,
    on_batch: Callable[[int, list[list[str]]], None] | None = None,
    desc: str = "captions",
) -> list[list[str]]:
    """`decoding.samples` captions per image, in order; images are opened one batch at a time.
    `on_batch(start, captions)` sees each batch as it ends (for caching)."""
    device = place(loaded)
    text = loaded.processor.apply_chat_template(conversational_prompt(prompt), add_generation_prompt=True)
    kwargs: dict = {"max_new_tokens": decoding.max_new_tokens, "do_sample": decoding.do_sample}
    if decoding.do_sample:
        kwargs.update(temperature=decoding.temperature, num_return_sequences=decoding.samples)
        torch.manual_seed(decoding.seed)
    tokenizer = loaded.processor.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[str]] = []
    with tqdm(total=len(images), desc=desc, unit="img") as bar:
        for start in range(0, len(images), decoding.batch_size):
            batch = [to_rgb(images[i]) for i in range(start, min(start + decoding.batch_size, len(images)))]
            inputs = loaded.processor(
                text=[text] * len(batch), images=[[im] for im in batch], return_tensors="pt", padding=True
            ).to(device)
            generated = loaded.model.generate(**inputs, pad_token_id=pad_id, **kwargs)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            texts = [t.strip() for t in loaded.processor.batch_decode(new_tokens, skip_special_tokens=True)]
            captions = [texts[i : i + decoding.samples] for i in range(0, len(texts), decoding.samples)]
            out.extend(captions)
            if on_batch is not None:
                on_batch(start, captions)
            bar.update(len(batch))
    return out


def model_for_adapter(adapter: Path) -> tuple[dict, str, dict]:
    """(model config, prompt, eval config) for an adapter: from the run's recipe.yaml when it has one,
    else the base model named in adapter_config.json with default settings."""
    recipe_file = adapter.parent / "recipe.yaml"
    if recipe_file.is_file():
        recipe = load_recipe(str(recipe_file))
        return recipe["model"], recipe["prompt"], recipe["eval"]
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise RecipeError(f"--adapter: {adapter} has neither ../recipe.yaml nor adapter_config.json")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise RecipeError(f"--adapter: {config_file} names no base_model_name_or_path")
    model_cfg = {k: (v if not isinstance(v, dict) else dict(v)) for k, (_, v) in MODEL_SCHEMA.items()}
    model_cfg.update(id=base, lora={})
    return model_cfg, DEFAULT_PROMPT, {}


def read_done(out: Path, wanted: set[str]) -> dict[str, str]:
    """Lines of an earlier, interrupted `make caption` into the same file, by image (a torn last line dropped)."""
    return {record["image"]: line for line, record in read_records(out)[0] if record.get("image") in wanted}


def report_skipped(names: Sequence[str], listing: Path) -> None:
    """The first few unusable images in the log, all of them in `listing`."""
    shown = ", ".join(repr(n) for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    listing.parent.mkdir(parents=True, exist_ok=True)
    # names that are not UTF-8 are written with their odd bytes escaped (\xff), so the list stays readable
    listing.write_text("".join(os.fsencode(n).decode("utf-8", "backslashreplace") + "\n" for n in names))
    print(f"skipped {len(names)} unreadable image(s): {shown} (all listed in {listing})")


MODEL_KEYS = ("id", "revision", "family", "quantization", "dtype", "processor")


def caption_source(model_cfg: dict, adapter: Path | None, prompt: str, decoding: Decoding) -> dict:
    """What the captions of a file come from: a rerun appends to it only when this is unchanged."""
    return {
        "model": {k: model_cfg.get(k) for k in MODEL_KEYS},
        "adapter": fingerprint(adapter) if adapter is not None else None,  # also a full fine-tune's weights
        "prompt": prompt,
        "decoding": decoding.cache_key(),
    }


def check_source(out: Path, source: dict, done: int) -> None:
    """Record what OUT's captions come from (OUT.source.json); refuse to add to captions of another source
    (an adapter trained further, another prompt or decoding): one file never mixes two."""
    path = out.with_name(out.stem + ".source.json")
    if done:
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded != source:
            why = (
                "another " + " and ".join(k for k in source if recorded.get(k) != source[k])
                if isinstance(recorded, dict)
                else f"an unknown source (no {path.name})"
            )
            raise RecipeError(
                f"--out: {out} holds {done} captions from {why}; write to another --out, or delete it to start over"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(source, indent=1) + "\n")


def caption_folder(
    adapter: Path | None,
    folder: Path,
    out: Path,
    *,
    model_cfg: dict | None = None,
    prompt: str | None = None,
    decoding: Decoding | None = None,
) -> Path:
    """Write {"image": relative path, "caption": text} per readable image (the format captions.jsonl
    references use); unreadable files are skipped and counted."""
    if not folder.is_dir():
        raise RecipeError(f"--images: image folder not found: {folder}")
    if adapter is not None and not adapter.is_dir():
        raise RecipeError(f"--adapter: adapter folder not found: {adapter}")
    if out.resolve() == (folder / "captions.jsonl").resolve() and out.is_file():
        raise RecipeError(f"--out: {out} holds the folder's reference captions; write elsewhere")
    if model_cfg is None:
        if adapter is None:
            raise RecipeError("caption: give --adapter (its run's recipe.yaml names the base model)")
        model_cfg, default_prompt, eval_cfg = model_for_adapter(adapter)
        prompt = prompt or default_prompt
        decoding = decoding or Decoding.from_eval(eval_cfg)
    prompt, decoding = prompt or DEFAULT_PROMPT, decoding or Decoding()
    good, bad = split_readable(folder)
    if bad:
        report_skipped([p.relative_to(folder).as_posix() for p in bad], out.with_name(out.stem + ".skipped.txt"))
    if not good:
        raise RecipeError(f"--images: no readable images in {folder}")
    adapter_dir = str(adapter) if adapter is not None and (adapter / "adapter_config.json").is_file() else None
    if adapter is not None and adapter_dir is None:  # a full fine-tune saves the whole model there
        if not (adapter / "config.json").is_file():
            raise RecipeError(f"--adapter: {adapter} holds neither adapter_config.json nor a model (config.json)")
        model_cfg = {**model_cfg, "id": str(adapter)}
    names = [p.relative_to(folder).as_posix() for p in good]
    done = read_done(out, set(names))
    check_source(out, caption_source(model_cfg, adapter, prompt, decoding), len(done))
    todo = [i for i, name in enumerate(names) if name not in done]
    if done:
        print(f"{out}: {len(done)} of {len(names)} images already captioned; captioning the other {len(todo)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    # rewritten with what is kept, then appended batch by batch: a crash loses at most the batch in flight
    out.write_text("".join(done[name] + "\n" for name in names if name in done))
    if todo:
        loaded = load_with_adapter(model_cfg, adapter_dir)
        with out.open("a") as f:

            def save(start: int, captions: list[list[str]]) -> None:
                for j, texts in enumerate(captions):
                    record = {"image": names[todo[start + j]]}
                    record.update({"caption": texts[0]} if len(texts) == 1 else {"captions": texts})
                    f.write(json.dumps(record) + "\n")
                f.flush()

            generate_captions(loaded, [good[i] for i in todo], prompt, decoding, on_batch=save)
    print(f"wrote {len(good)} captions to {out}" + (f" ({len(bad)} unreadable image(s) skipped)" if bad else ""))
    return out

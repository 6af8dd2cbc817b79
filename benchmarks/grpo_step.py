"""One GRPO step of a real-sized captioner, stock TRL vs the runner's shared path, side by side.

    python -m benchmarks.grpo_step [--model smolvlm256] [--repeats 2] [--steps 2]
    python -m benchmarks.grpo_step --recipe smolvlm256-openimages --device cuda --repeats 1
    python -m benchmarks.grpo_step --model qwen2vl2b --max-pixels 200704
    python -m benchmarks.grpo_step --model smolvlm2b --device cuda --quant 4bit --repeats 1 --csv steps.csv
    python -m benchmarks.grpo_step --generation-option cache_implementation=static --repeats 1

The models are random with the published dimensions of SmolVLM-256M/500M/2.2B-Base and Qwen2-VL-2B-Instruct
(`benchmarks/real_sized.py`, which names the sources); speed and memory do not depend on the weights' values.
The offline tokenizer is smaller than the published vocabulary, so generation is kept inside its ids (a mask
built once per `generate` call on both sides: a real run suppresses one image token, not ~49,000 ids).

Each side runs in its own process (so peak memory is its own: RSS on the CPU, torch.cuda.max_memory_allocated
on a GPU; GB here are 2^30 bytes); sides alternate, `repeats` times, and the median seconds per step (after a warm-up step) is
reported with its split as `make train` logs it (`timing/*`): preprocess (the processor), generation, reward,
forward_backward (log-prob forwards, the loss forward and backward) and other (the rest of the step).
The shared side preprocesses each distinct picture once (`vizer.fast.preprocess_once`), reads each group's prompt
once in the language model when `vizer.fast.shared_prefix.why_not_shared_prefix` allows, and asks
`vizer.fast.shared_vision.why_not_shared` before sharing the vision tower, and generates with the adapter merged where
`vizer.fast.merged_generation.why_not_merged` allows (float32: the CPU; not bf16 or 4-bit); when one names a reason
(e.g. a family whose tower cannot share), the reason goes to stderr and that part runs, and is reported, as stock. Both sides
count the positions the language model computes in the log-prob and training forwards (`lm_tokens_per_step_*`,
padding included) and the shared side's count against the ideal P + G*R per group (`lm_tokens_shared_over_ideal`).
`--generation-option KEY=VALUE` times the shared side without and with one more GRPOConfig setting instead
(`generation_speedup_*`, `step_speedup_*`).
Each side also reports images/s (distinct pictures per second of step) and `preprocess_calls_per_distinct_image`
(pictures the image processor was handed per distinct picture of the run: 2G for stock TRL, 1 when shared).

Without `--recipe`: G=8, one picture per step, all 8 completions in one forward, 16-token captions. With
`--recipe NAME`, the recipe's G, images_per_step, per-device batch, completion length, quantization, gradient
checkpointing and processor options on the random real-sized model of its checkpoint
(`benchmarks/recipe_settings.py`); flags given as well override the recipe's values. Pictures are 512x512
(`--image-size`), the size the SmolVLM processors resize to.

Training runs with gradient checkpointing, as the shipped recipes do (`--no-gradient-checkpointing` turns it
off; result names then end in `_nogc`). `--quant 4bit` loads the random model through bitsandbytes NF4 (vision tower and LM head unquantized, as
`vizer.models` does for QLoRA recipes); `--csv PATH` appends one row per side; `--dry-run` builds the model,
the LoRA trainer and the sharing decision, then exits without training.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

MODELS = ("smolvlm256", "smolvlm500", "smolvlm2b", "qwen2vl2b")  # = benchmarks.real_sized.NAMES
DEFAULT_MAX_PIXELS = 256 * 28 * 28
# the step's split, as `make train` logs it (timing/<phase>, vizer.watch.step_timing)
SPLIT = ("preprocess_s", "generation_s", "reward_s", "forward_backward_s", "other_s")
PARTS = ("step_s", *SPLIT, "peak_gb", "images_per_s", "preprocess_calls_per_distinct_image")
# the benchmark's own settings where no recipe is named
PLAIN = {"generations": 8, "images_per_step": 1, "per_device": 8, "completion_length": 16}
CSV_FIELDS = (
    "model",
    "quant",
    "shared",
    "peak_gb",
    "step_s",
    "images_per_s",
    *SPLIT,
    "preprocess_calls_per_distinct_image",
    "image_tokens",
    "device",
    "note",
)


# ---------------------------------------------------------------------------------------------
# One side, in its own process
# ---------------------------------------------------------------------------------------------


def load(options: argparse.Namespace) -> tuple[Any, Any]:
    """(model, processor) of a real-sized model on the requested device, in bf16/fp32 or NF4."""
    from benchmarks import real_sized

    dtype = _dtype(options.device)
    if options.quant == "none":
        return real_sized.build(
            options.model,
            image_splitting=options.image_splitting,
            max_pixels=options.max_pixels,
            min_pixels=options.min_pixels,
            dtype=dtype,
            device=options.device,
        )
    processor = real_sized.build_processor(
        options.model,
        image_splitting=options.image_splitting,
        max_pixels=options.max_pixels,
        min_pixels=options.min_pixels,
    )
    processor.tokenizer.padding_side = "left"
    return _load_quantized(options, processor, dtype), processor


def _dtype(device: str):
    import torch

    # bf16 where the GPU supports it (what the recipes' dtype: auto picks); fp32 on the CPU
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _load_quantized(options: argparse.Namespace, processor: Any, dtype: Any) -> Any:
    # bitsandbytes quantizes while a checkpoint loads: save the random model once, then load it as a recipe would
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForImageTextToText

    from benchmarks import real_sized
    from vizer.families import FAMILIES
    from vizer.models import keep_4bit_layout, quantization_config

    folder = _random_checkpoint(options.model, processor, dtype, options.device)
    quant = quantization_config(options.quant, dtype, FAMILIES[real_sized.family(options.model)])
    device_map = {"": 0 if options.device == "cuda" else options.device}
    model = AutoModelForImageTextToText.from_pretrained(
        folder, quantization_config=quant, dtype=dtype, device_map=device_map
    )
    keep_4bit_layout(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=options.gradient_checkpointing)


def _random_checkpoint(name: str, processor: Any, dtype: Any, device: str) -> Path:
    """A saved random model (cached per model, dtype and tokenizer) for the quantized loads."""
    from benchmarks import real_sized
    from vizer.tiny import build_once

    root = Path(os.environ.get("VIZER_BENCH_CACHE", "/tmp/vizer-real-sized"))
    target = root / f"{name}-{str(dtype).removeprefix('torch.')}-{len(processor.tokenizer)}"

    def save(tmp: Path) -> None:
        config = real_sized.build_config(name, processor)
        model = real_sized.build_model(name, config, dtype=dtype, device=device)
        model.save_pretrained(tmp)
        (tmp / "done.json").write_text("{}")

    return build_once(target, save, marker="done.json")


def picture(scene: Any, size: tuple[int, int]) -> Any:
    """A ShapesCap scene drawn at `size` (width, height)."""
    from shapescap.scenes import render

    return render(scene, max(size)).resize(size)


def train_rows(count: int, size: tuple[int, int]) -> Any:
    """Distinct images (so no step can reuse another's features), each with a caption prompt."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    from data.sources import conversational_prompt
    from shapescap.scenes import shapes_scenes

    scenes = shapes_scenes("validation", count)
    rows = Dataset.from_dict({"image": [picture(s, size) for s in scenes], "image_id": [str(i) for i in range(count)]})
    return rows.cast_column("image", ImageFeature()).map(
        lambda _: {"prompt": conversational_prompt("Describe this image.")}
    )


def grpo_args(options: argparse.Namespace, model: Any, processor: Any) -> Any:
    import torch
    from trl import GRPOConfig

    from benchmarks import real_sized
    from vizer.objective import suppressed_ids
    from vizer.scale import batch_settings

    on_gpu = options.device.startswith("cuda")
    # images_per_step x G completions per optimizer step, per_device of them per forward (as the runner splits it)
    batch, _ = batch_settings(
        {"per_device_train_batch_size": options.per_device}, options.images_per_step, options.generations, 1, "grpo"
    )
    return GRPOConfig(
        output_dir="/tmp/vizer-bench-grpo",
        **batch,
        num_generations=options.generations,
        max_completion_length=options.completion_length,
        max_steps=options.steps + 1,
        learning_rate=1e-5,
        bf16=_dtype(options.device) == torch.bfloat16,
        use_cpu=not on_gpu,
        gradient_checkpointing=options.gradient_checkpointing,  # the shipped recipes turn it on
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        shuffle_dataset=False,
        # a random model samples anything: keep it to the tokenizer's ids and off the image/special tokens
        generation_kwargs={
            "suppress_tokens": [
                *suppressed_ids(model, processor.tokenizer),
                *real_sized.unused_vocab(options.model, processor),
            ]
        },
        **(dict([_option(options.grpo_option)]) if options.grpo_option else {}),
    )


def _option(text: str) -> tuple[str, Any]:
    """'key=value' -> (key, value parsed as YAML), e.g. cache_implementation=static."""
    import yaml

    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def _run_side(shared: bool, options: argparse.Namespace) -> dict:
    """Train `options.steps` GRPO steps (after one warm-up) in this process; seconds per step and its split."""
    # imported here, in the measuring subprocess only: the orchestrating process stays free of torch
    import torch

    from benchmarks import real_sized

    if not options.device.startswith("cuda"):
        torch.set_num_threads(2)  # as on the 2-core CI machine; a fresh process starts its GPU peak at zero
    _suppress_with_one_mask()
    model, processor = load(options)
    pictures = (options.steps + 1) * options.images_per_step  # the warm-up step's too
    rows = train_rows(pictures, options.image_size)
    tokens = real_sized.image_tokens(processor, rows[0]["image"])
    steps: list[dict[str, float]] = []
    trainer = _trainer(options, model, processor, rows, steps)
    handed = _count_preprocessed(processor.image_processor)  # from here on: what training hands the processor
    fallback, hook = _share(trainer, options.model, shared)
    read = _count_lm_tokens(trainer)
    result = {"path": "stock" if hook is None else "shared", "fallback": fallback, "image_tokens": tokens}
    if options.dry_run:
        # no steps: the peak is that of building (weights, LoRA, trainer)
        built = {**dict.fromkeys(PARTS, 0.0), "peak_gb": _peak_gb(options.device)}
        return {**result, "parameters": real_sized.parameter_count(model), **built}
    trainer.train()
    summary = _summary(steps, options.device)
    return {
        **result,
        **summary,
        "images_per_s": _ratio(options.images_per_step, summary["step_s"]),
        "preprocess_calls_per_distinct_image": handed["images"] / pictures,
        "tiles_encoded": getattr(hook, "tiles_encoded", None),
        # per step, over the log-prob and training forwards (the warm-up step's too: every step reads alike)
        "lm_tokens_per_step": read["tokens"] / (options.steps + 1),
        "lm_tokens_ideal_shared_per_step": read["ideal_shared"] / (options.steps + 1),
    }


def _suppress_with_one_mask() -> None:
    """Generation here suppresses the ~49,000 ids of the published vocabulary that the offline tokenizer lacks
    (`grpo_args`); transformers' SuppressTokensLogitsProcessor rebuilds that mask at every new token (4.5 ms per
    token for 8 rows on the 2-core CPU), a cost a real run, which suppresses one image token, does not have. The
    mask is built once per `generate` call instead, on both sides; the scores are the same."""
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor

    def suppress(self: Any, input_ids: Any, scores: Any) -> Any:
        import torch

        mask = getattr(self, "_mask", None)
        if mask is None or mask.shape[-1] != scores.shape[-1] or mask.device != scores.device:
            vocab = torch.arange(scores.shape[-1], device=scores.device)
            mask = self._mask = torch.isin(vocab, self.suppress_tokens.to(scores.device))
        return torch.where(mask, -float("inf"), scores)

    SuppressTokensLogitsProcessor.__call__ = suppress


def _count_lm_tokens(trainer: Any) -> dict[str, int]:
    """Counts the positions the language model computes in the log-prob and training forwards (rows x length of
    each call, padding included), and what a perfect prefix share would read for the same batches: per group,
    P + G*R in place of G*(P + R), P the prompt (image tokens included) and R the completion columns."""
    counted = {"tokens": 0, "ideal_shared": 0}
    language = next(m for name, m in trainer.model.named_modules() if name.endswith(("text_model", "language_model")))
    active = {"on": False}

    def read(module: Any, args: Any, kwargs: Any) -> None:
        if active["on"]:
            shape = (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else args[0]).shape
            counted["tokens"] += shape[0] * shape[1]

    language.register_forward_pre_hook(read, with_kwargs=True)
    logps = trainer._get_per_token_logps_and_entropies

    def counting(model: Any, input_ids: Any, attention_mask: Any, logits_to_keep: int, *args: Any, **kwargs: Any):
        rows, length = input_ids.shape
        groups = -(-rows // trainer.num_generations)
        counted["ideal_shared"] += groups * (length - logits_to_keep) + rows * logits_to_keep
        active["on"] = True
        try:
            return logps(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        finally:
            active["on"] = False

    trainer._get_per_token_logps_and_entropies = counting
    return counted


def _count_preprocessed(image_processor: Any) -> dict[str, int]:
    """Counts the pictures handed to the image processor's own preprocess (under any caching in front of it)."""
    handed = {"images": 0}
    preprocess = image_processor.preprocess

    def counted(images: Any, *args: Any, **kwargs: Any) -> Any:
        rows = images if isinstance(images, (list, tuple)) else [images]
        handed["images"] += sum(len(r) if isinstance(r, (list, tuple)) else 1 for r in rows)
        return preprocess(images, *args, **kwargs)

    image_processor.preprocess = counted
    return handed


def _trainer(options: argparse.Namespace, model: Any, processor: Any, rows: Any, steps: list) -> Any:
    """The runner's trainer; each step's `timing/*` split (its own clock, as `make train` logs it) goes to
    `steps`."""
    from transformers import TrainerCallback

    from benchmarks import real_sized
    from vizer.families import FAMILIES, language_lora_targets
    from vizer.grpo import CaptionGRPOTrainer
    from vizer.models import lora_config

    def length(completions, **kwargs):
        return [float(len(c[0]["content"].split())) for c in completions]

    class Split(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "timing/other" in logs:
                steps.append({f"{k.removeprefix('timing/')}_s": v for k, v in logs.items() if k.startswith("timing/")})

    family = FAMILIES[real_sized.family(options.model)]
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "language", "enabled": True}
    peft = lora_config(lora, model, family)
    assert peft.target_modules == language_lora_targets(model, family)
    return CaptionGRPOTrainer(
        model=model,
        reward_funcs=[length],
        args=grpo_args(options, model, processor),
        train_dataset=rows,
        processing_class=processor,
        peft_config=peft,
        callbacks=[Split()],
    )


def _share(trainer: Any, name: str, shared: bool) -> tuple[str | None, Any]:
    """(reason the shared side's vision runs stock, installed hook); the decision is vizer.fast.shared_vision's.
    The shared side preprocesses each distinct picture once, as `make train` does for these families."""
    if not shared:
        return None, None
    from benchmarks import real_sized
    from vizer.fast.merged_generation import why_not_merged
    from vizer.fast.preprocess_once import PreprocessOnce
    from vizer.fast.shared_prefix import why_not_shared_prefix
    from vizer.fast.shared_vision import share_vision, why_not_shared

    family = real_sized.family(name)
    trainer.preprocess_once = PreprocessOnce()
    prefix_reason = why_not_shared_prefix(trainer.model, family)
    if prefix_reason:
        print(f"grpo_step: {name}: the shared side reads every prefix: {prefix_reason}", file=sys.stderr, flush=True)
    trainer.share_prefix = prefix_reason is None
    was = trainer.model.training
    trainer.model.train()  # judged as it will generate, as `make train` judges it
    merge_reason = why_not_merged(trainer.accelerator.unwrap_model(trainer.model))
    trainer.model.train(was)
    if merge_reason:
        print(f"grpo_step: {name}: the shared side generates unmerged: {merge_reason}", file=sys.stderr, flush=True)
    trainer.merge_for_generation = merge_reason is None
    reason = why_not_shared(trainer.model, family)
    if reason:
        print(f"grpo_step: {name}: the shared side runs the stock path: {reason}", file=sys.stderr, flush=True)
        return reason, None
    return None, share_vision(trainer.model, family)


def _summary(steps: list[dict[str, float]], device: str) -> dict:
    """Median seconds per phase over the timed steps (the first pays one-off costs); a step is its five phases."""
    timed = steps[1:] or steps
    split = {part: statistics.median(step[part] for step in timed) for part in SPLIT}
    return {"step_s": statistics.median(sum(step.values()) for step in timed), **split, "peak_gb": _peak_gb(device)}


def _peak_gb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux


def append_csv(path: Path, options: argparse.Namespace, side: str, result: dict) -> None:
    """One row per side; the header is written with the first row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    row = {
        "model": label(options),
        "quant": options.quant,
        "shared": "yes" if result["path"] == "shared" else ("no" if side == "stock" else "fallback"),
        **{k: f"{result[k]:.4f}" for k in ("peak_gb", "step_s", "images_per_s", *SPLIT)},
        "preprocess_calls_per_distinct_image": f"{result['preprocess_calls_per_distinct_image']:.2f}",
        "image_tokens": result["image_tokens"],
        "device": options.device,
        "note": "; ".join(
            n
            for n in (
                result.get("fallback"),
                "dry run" if options.dry_run else None,
                f"with {options.grpo_option}" if options.grpo_option else None,
            )
            if n
        ),
    }
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


# ---------------------------------------------------------------------------------------------
# Orchestration: alternate the sides, one process each
# ---------------------------------------------------------------------------------------------


def label(options: argparse.Namespace) -> str:
    """The model (or recipe) name in result names; settings other than the model's (recipe's) are spelled out."""
    base = {**PLAIN, "image_splitting": False, "max_pixels": None, "quant": "none", **options.recipe_settings}
    name = options.recipe.replace("-", "_") if options.recipe else options.model
    if options.image_splitting != base["image_splitting"] and not options.model.startswith("qwen"):
        name += "_split" if options.image_splitting else "_nosplit"
    if options.model.startswith("qwen") and options.max_pixels not in (None, DEFAULT_MAX_PIXELS, base["max_pixels"]):
        name += f"_px{options.max_pixels // (28 * 28)}"
    for key, short in (
        ("generations", "g"),
        ("images_per_step", "ips"),
        ("per_device", "pd"),
        ("completion_length", "len"),
    ):
        if getattr(options, key) != base[key]:
            name += f"_{short}{getattr(options, key)}"
    if options.recipe and options.quant != base["quant"]:
        name += f"_{options.quant}"
    if tuple(options.image_size) != (512, 512):
        name += f"_{options.image_size[0]}x{options.image_size[1]}"
    if not options.gradient_checkpointing:
        name += "_nogc"
    return name


def side_command(options: argparse.Namespace, side: str) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.grpo_step", "--side", side, "--model", options.model]
    if options.recipe:  # for the result names; every value it set is passed explicitly below
        command += ["--recipe", options.recipe]
    command += ["--steps", str(options.steps), "--device", options.device, "--quant", options.quant]
    command += ["--generations", str(options.generations), "--images-per-step", str(options.images_per_step)]
    command += ["--per-device", str(options.per_device), "--completion-length", str(options.completion_length)]
    command += ["--image-size", f"{options.image_size[0]}x{options.image_size[1]}"]
    command.append("--image-splitting" if options.image_splitting else "--no-image-splitting")
    if not options.gradient_checkpointing:
        command.append("--no-gradient-checkpointing")
    if options.max_pixels is not None:
        command += ["--max-pixels", str(options.max_pixels)]
    if options.min_pixels is not None:
        command += ["--min-pixels", str(options.min_pixels)]
    if options.csv:
        command += ["--csv", str(options.csv)]
    if options.dry_run:
        command.append("--dry-run")
    if side == "option":  # the shared side with one more GRPOConfig setting
        command[command.index("--side") + 1] = "shared"
        command += ["--grpo-option", options.generation_option]
    return command


class SideFailed(Exception):
    """A side's process ended with an error (its own message is above, on stderr)."""


def run_side(options: argparse.Namespace, side: str) -> dict:
    """One side in a fresh process; its stderr passes through (the fallback reason, errors)."""
    out = subprocess.run(side_command(options, side), stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SideFailed(f"the {side} side failed (exit {out.returncode}); its error is above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_option(options: argparse.Namespace) -> dict[str, float]:
    """The shared side without and with `--generation-option`, alternating: its effect on generation and step."""
    runs: dict[str, list[dict]] = {"shared": [], "option": []}
    for _ in range(options.repeats):
        for side in runs:
            runs[side].append(run_side(options, side))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in PARTS} for side, rs in runs.items()}
    key, value = _option(options.generation_option)
    name = f"{label(options)}_{key}_{value}".replace("-", "_")
    results = {
        f"generation_speedup_{name}": _ratio(med["shared"]["generation_s"], med["option"]["generation_s"]),
        f"step_speedup_{name}": _ratio(med["shared"]["step_s"], med["option"]["step_s"]),
    }
    for side in runs:
        for part in ("step_s", "generation_s", "peak_gb"):
            results[f"grpo_{side}_{part}_{name}"] = med[side][part]
    return results


def compare(options: argparse.Namespace) -> dict[str, float]:
    if options.generation_option:
        return compare_option(options)
    nan = float("nan")  # a side that did not count (a dry run)
    runs: dict[str, list[dict]] = {"stock": [], "shared": []}
    for _ in range(options.repeats):
        for side in runs:  # alternate, so a noisy machine slows both alike
            runs[side].append(run_side(options, side))
    med = {side: {k: statistics.median(r[k] for r in rs) for k in PARTS} for side, rs in runs.items()}
    name = label(options)
    memory = "peak_gpu_ratio" if options.device.startswith("cuda") else "peak_rss_ratio"
    results = {
        f"grpo_step_speedup_{name}": _ratio(med["stock"]["step_s"], med["shared"]["step_s"]),
        f"grpo_{memory}_{name}": _ratio(med["stock"]["peak_gb"], med["shared"]["peak_gb"]),
        f"grpo_preprocess_time_ratio_{name}": _ratio(med["stock"]["preprocess_s"], med["shared"]["preprocess_s"]),
        # the language model's positions per step, stock vs shared, and shared against the ideal P + G*R per group
        f"lm_tokens_per_step_stock_{name}": runs["stock"][0].get("lm_tokens_per_step", nan),
        f"lm_tokens_per_step_shared_{name}": runs["shared"][0].get("lm_tokens_per_step", nan),
        f"lm_tokens_shared_over_ideal_{name}": _ratio(
            runs["shared"][0].get("lm_tokens_per_step", nan), runs["shared"][0].get("lm_tokens_ideal_shared_per_step")
        ),
    }
    for side, rs in runs.items():
        for part in PARTS:
            results[f"grpo_{side}_{part}_{name}"] = med[side][part]
        results[f"grpo_{side}_image_tokens_{name}"] = float(rs[0]["image_tokens"])
    return results


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    try:
        size = int(width), int(height or width)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like WIDTHxHEIGHT, got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"needs a positive width and height, got {text!r}")
    return size


PROG = "python -m benchmarks.grpo_step"


class OneLineParser(argparse.ArgumentParser):
    """Bad input is one line and exit 2 (argparse would print the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _check(options: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """What would otherwise fail in the side processes, or compare nothing, refused before they start."""
    at_least = {
        "--repeats": (options.repeats, 1),
        "--steps": (options.steps, 1),
        "--generations": (options.generations, 2),
    }
    at_least |= {"--images-per-step": (options.images_per_step, 1), "--per-device": (options.per_device, 1)}
    at_least["--completion-length"] = (options.completion_length, 1)
    for flag, (value, low) in at_least.items():
        if value < low:
            hint = " (use --dry-run to build without training)" if flag == "--steps" else ""
            parser.error(f"{flag} must be at least {low}, got {value}{hint}")
    if options.generation_option is not None:
        key, sep, value = options.generation_option.partition("=")
        if not (key.strip() and sep and value.strip()):
            parser.error(f"--generation-option must look like KEY=VALUE, got {options.generation_option!r}")
    if options.csv is not None and options.csv.is_dir():
        parser.error(f"--csv {options.csv} is a folder; name a CSV file")
    if options.csv is not None and not options.csv.parent.is_dir():
        parser.error(f"--csv {options.csv}: no folder {options.csv.parent}")


def _cuda_available() -> bool:
    """Asked in a separate process: the orchestrating process stays free of torch."""
    probe = [sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", help="take G, batch sizes, completion length, quantization and processor options")
    parser.add_argument("--model", choices=MODELS, default="smolvlm256")
    parser.add_argument("--generations", type=int, default=PLAIN["generations"], help="G, completions per picture")
    parser.add_argument("--images-per-step", type=int, default=PLAIN["images_per_step"])
    parser.add_argument("--per-device", type=int, default=PLAIN["per_device"], help="completions per forward")
    parser.add_argument("--completion-length", type=int, default=PLAIN["completion_length"], help="new tokens")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument(
        "--image-splitting",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="SmolVLM: tiles plus a global view",
    )
    parser.add_argument(
        "--max-pixels", type=int, default=None, help=f"Qwen2-VL image pixel bound (default {DEFAULT_MAX_PIXELS})"
    )
    parser.add_argument("--min-pixels", type=int, default=None, help="Qwen2-VL lower pixel bound")
    parser.add_argument("--image-size", type=_size, default=(512, 512), help="picture WIDTHxHEIGHT (default 512x512)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="train without it (the shipped recipes turn it on: activations recomputed in the backward pass)",
    )
    parser.add_argument("--quant", choices=["none", "4bit"], default="none", help="4bit: bitsandbytes NF4 (QLoRA)")
    parser.add_argument("--csv", type=Path, help="append one row per side to this CSV file")
    parser.add_argument("--dry-run", action="store_true", help="build model, trainer and sharing decision; no steps")
    parser.add_argument(
        "--generation-option",
        metavar="KEY=VALUE",
        help="time the shared side without and with this GRPOConfig setting (e.g. cache_implementation=static)",
    )
    parser.add_argument("--grpo-option", help=argparse.SUPPRESS)  # the setting, in the side's subprocess
    parser.add_argument("--side", choices=["stock", "shared"], help=argparse.SUPPRESS)  # one side, in a subprocess
    options = parser.parse_args(argv)
    options.recipe_settings = {}
    if options.recipe:  # the recipe's values become the defaults; flags given as well still win
        from benchmarks.recipe_settings import recipe_settings

        try:
            settings = recipe_settings(options.recipe)
        except ValueError as err:
            parser.error(str(err))
        parser.set_defaults(**settings)
        options = parser.parse_args(argv)
        options.recipe_settings = settings
    _check(options, parser)
    return options


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    if options.side:
        result = _run_side(options.side == "shared", options)
        if options.csv:
            append_csv(options.csv, options, options.side, result)
        print(json.dumps(result))
        return 0
    if options.device.startswith("cuda") and not _cuda_available():  # else each side fails in its own process
        print(f"{PROG}: error: --device {options.device}, but this Python sees no CUDA device", file=sys.stderr)
        return 2
    try:
        results = compare(options)
    except SideFailed as err:
        print(f"grpo_step: {err}", file=sys.stderr)
        return 1
    for name, value in results.items():
        print(f"{name}: {value:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

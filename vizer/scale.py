"""The same recipe on 1 or N processes: the global batch split per process, and the launch settings refused
because they are known to break (checked at start-up with one line, before minutes of loading).

A recipe states `images_per_step`, the images per optimizer step across all processes. Each image gets a
group of G captions; every process takes whole images (a group split across processes would hand the
group-level rewards, consistency above all, a partial group), and `per_device_train_batch_size` is the most
completions one forward holds. Gradient accumulation makes up the rest, so 1 and N processes train on the
same global batch and therefore the same learning-rate schedule.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass

from data.errors import ConfigError as RecipeError


@dataclass(frozen=True)
class BatchPlan:
    images_per_step: int
    group: int  # completions per image (G; 1 for ViZer's stage B)
    processes: int
    per_device: int  # completions per forward on each process
    accumulation: int

    def describe(self) -> str:
        captions = f" x {self.group} captions" if self.group > 1 else ""
        return (
            f"batch: {self.images_per_step} images{captions} per optimizer step = {self.processes} process(es) x "
            f"{self.per_device} per forward x {self.accumulation} accumulated"
        )


def split_global_batch(
    images_per_step: int, group: int, per_device: int | None, processes: int, where: str
) -> BatchPlan:
    """Per-process batch and accumulation for a global `images_per_step`; RecipeError when it cannot split."""
    if images_per_step % processes:
        raise RecipeError(
            f"'{where}.images_per_step' ({images_per_step}) must be a multiple of the number of processes "
            f"({processes}) so that every process takes whole images and their caption groups"
        )
    local = images_per_step // processes * group  # completions each process handles per optimizer step
    cap = min(per_device or 8, local)  # 8: the trainers' own default per_device_train_batch_size
    # the largest micro-batch under the cap that divides the local share: every step then sees it all
    per_device = max(d for d in range(1, cap + 1) if local % d == 0)
    return BatchPlan(images_per_step, group, processes, per_device, local // per_device)


def batch_settings(
    settings: dict, images_per_step: int | None, group: int, processes: int, where: str
) -> tuple[dict, BatchPlan | None]:
    """Trainer settings with the per-process batch and accumulation for a global `images_per_step` (unchanged
    when it is None: the recipe's per-device keys apply as written)."""
    if images_per_step is None:
        return settings, None
    if "gradient_accumulation_steps" in settings:
        raise RecipeError(
            f"'{where}.images_per_step' and '{where}.gradient_accumulation_steps' are both set: keep images_per_step "
            "(global, split over processes) and drop the other"
        )
    plan = split_global_batch(images_per_step, group, settings.get("per_device_train_batch_size"), processes, where)
    settings = {
        **settings,
        "per_device_train_batch_size": plan.per_device,
        "gradient_accumulation_steps": plan.accumulation,
    }
    return settings, plan


def check_generation_groups(local_generation_batch: int, group: int, where: str) -> None:
    """Each process's generation batch must hold whole groups (TRL hands every process a contiguous slice)."""
    if local_generation_batch % group:
        raise RecipeError(
            f"{where}: each process's generation batch ({local_generation_batch}) must be a multiple of "
            f"num_generations ({group}) so that a caption group stays on one process"
        )


def sharding(env: Mapping[str, str] = os.environ) -> str | None:
    """ "fsdp", "zero3" (or another ZeRO stage) as `accelerate launch` told this process, or None."""
    if env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return f"zero{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '')}"
    return None


def check_launch(quantization: str, env: Mapping[str, str] = os.environ) -> None:
    """Refuse sharded launches that break with bitsandbytes-quantized (QLoRA) weights: the 4/8-bit base
    cannot be sharded or partitioned as loaded. ZeRO-2 and DDP keep a whole base per GPU and are fine."""
    kind = sharding(env)
    if quantization != "none" and kind in ("fsdp", "zero3"):
        raise RecipeError(
            f"model.quantization {quantization} (QLoRA) does not run under {'FSDP' if kind == 'fsdp' else 'ZeRO-3'}: "
            "use ACCELERATE=ddp or zero2, or model.quantization=none"
        )


def check_world_size(processes: int, env: Mapping[str, str] = os.environ) -> None:
    """Refuse processes that a launcher started together but that each run alone: `accelerate launch
    --num_processes N` without GPUs (and without --cpu) gives each one world size 1, so N runs would train as
    one into the same OUT."""
    launched = env.get("WORLD_SIZE", "1")
    if launched.isdigit() and int(launched) > processes:
        raise RecipeError(
            f"the launcher started {launched} processes, but each sees itself alone (world size {processes}): "
            "there is no GPU for them here; launch one process (make train without GPUS), add --cpu to "
            "accelerate launch for CPU processes, or run on a machine with a GPU per process"
        )


def check_gpus(processes: int, available: int) -> None:
    """Refuse, before `accelerate launch`, more processes than GPUs: without a GPU each would start as a
    separate single-process run into the same OUT (the second refused by the first's lock, then a traceback)."""
    if processes < 1:
        raise RecipeError(f"GPUS must be at least 1, got {processes}")
    if processes > available:
        hint = "no GPUS or ACCELERATE (one process, on the CPU)" if available == 0 else f"GPUS={available} or fewer"
        raise RecipeError(f"GPUS={processes}, but this machine has {available} GPU(s) visible to torch: use {hint}")


# TRL's vLLM path is wrong for these, known upstream; a user who has checked a fix can force it
VLLM_REFUSED = {
    "idefics3": "SmolVLM/Idefics3 prompts get their image tokens expanded twice under TRL's vLLM generation "
    "(TRL issue 6294)",
}
VLLM_RANGE = ">=0.22.0,<=0.31.0"  # the versions TRL 1.16 accepts (trl.import_utils.is_vllm_available)


def check_vllm(use_vllm: bool, family: str, quantization: str, force: bool) -> None:
    """Refuse vLLM generation where it is known to be wrong (unless forced) or not installed."""
    if not use_vllm:
        return
    if not force:
        if family in VLLM_REFUSED:
            raise RecipeError(f"grpo.use_vllm: {VLLM_REFUSED[family]}; set grpo.vllm_force=true to run it anyway")
        if quantization != "none":
            raise RecipeError(
                f"grpo.use_vllm with model.quantization {quantization}: TRL cannot sync 4/8-bit LoRA weights into "
                "vLLM; use model.quantization=none, or set grpo.vllm_force=true to run it anyway"
            )
    if importlib.util.find_spec("vllm") is None:
        raise RecipeError(f"grpo.use_vllm needs vLLM {VLLM_RANGE}: pip install -r requirements-vllm.txt")


def hardware(processes: int) -> dict:
    """What the run ran on, for OUT/hardware.json (the model card's hardware line)."""
    import torch  # only here: the rest of this module is read by `make check` without torch

    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    else:
        device = f"CPU ({os.cpu_count()} cores)"
    return {
        "device": device,
        "processes": processes,
        "launch": sharding() or ("data-parallel" if processes > 1 else "single process"),
        "torch": torch.__version__,
    }


def report_to() -> list[str]:
    """TensorBoard always; Weights & Biases too when WANDB_PROJECT is set (wandb is not a dependency)."""
    if not os.environ.get("WANDB_PROJECT"):
        return ["tensorboard"]
    if importlib.util.find_spec("wandb") is None:
        raise RecipeError("WANDB_PROJECT is set but wandb is not installed: pip install wandb, or unset WANDB_PROJECT")
    return ["tensorboard", "wandb"]

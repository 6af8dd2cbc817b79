"""Training a caption adapter: recipe -> TRL GRPOTrainer (objective grpo) or ViZerTrainer (objective vizer) -> OUT/.

OUT/ holds adapter/ (PEFT adapter), recipe.yaml (resolved recipe), metrics.jsonl (one JSON
object per logging step), completions/ (GRPO: TRL's sampled captions with their rewards, parquet),
mapper/ (when the recipe uses ViZer's mapper), canary.jsonl (the canary set's captions, `vizer.watch.canary`),
tensorboard/ and checkpoint-N/ folders.
Re-running into the same OUT resumes; re-running a finished run changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from peft import get_peft_model
from transformers import TrainerCallback, TrainingArguments, set_seed
from trl import GRPOConfig

from data import build_dataset
from rewards.latent import Mapper
from vizer.config import GRPO_SCHEMA, VIZER_SCHEMA, RecipeError, dump_recipe, needs_mapper
from vizer.eval.caption import report_skipped
from vizer.families import detect_family
from vizer.fast.merged_generation import why_not_merged
from vizer.fast.preprocess_once import PreprocessOnce
from vizer.fast.shared_prefix import why_not_shared_prefix
from vizer.fast.shared_vision import SUPPORTED_FAMILIES as SHARED_FAMILIES
from vizer.fast.shared_vision import share_vision, why_not_shared
from vizer.grpo import CaptionGRPOTrainer
from vizer.mapper import check_mapper, ensure_mapper, mapper_dir
from vizer.model_ids import resolve_model_id
from vizer.models import load_model, lora_config
from vizer.objective import ViZerTrainer
from vizer.recipe_rewards import build_rewards, print_rewards
from vizer.records import read_records
from vizer.run_dir import (
    check_rerun,
    checkpoint_step,
    finished_step,
    last_complete_checkpoint,
    locked,
    record_changes,
    trim_metrics,
)
from vizer.scale import (
    BatchPlan,
    batch_settings,
    check_generation_groups,
    check_launch,
    check_vllm,
    check_world_size,
    hardware,
    report_to,
    sharding,
)
from vizer.watch.canary import Canary, canary_images
from vizer.watch.monitor import Monitor

# TRL still passes the old name to transformers; the message says nothing the user can act on.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*is deprecated", category=FutureWarning)

# Runner defaults, each overridable from the recipe's grpo: section (report_to: TensorBoard, + W&B when
# WANDB_PROJECT is set).
GRPO_DEFAULTS = {
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "log_completions": True,
    "num_completions_to_print": 2,
    "remove_unused_columns": False,
}
# The same for the vizer: section (Stage B); the paper trains one epoch with AdamW, weight decay 0.01.
VIZER_DEFAULTS = {
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "remove_unused_columns": False,
    "weight_decay": 0.01,
    "num_train_epochs": 1,
}


class MetricsJsonl(TrainerCallback):
    """Appends each logging step's metrics (loss, rewards/<name>/mean, ...) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def _bf16(recipe: dict, section: dict) -> bool:
    if "bf16" in section:
        return section["bf16"]
    # TRL defaults to bf16, which CPUs emulate slowly; follow the model's dtype instead.
    return (
        recipe["model"]["dtype"] in ("auto", "bfloat16")
        and torch.cuda.is_available()
        and torch.cuda.is_bf16_supported()
    )


def trainer_settings(recipe: dict, processes: int) -> tuple[dict, BatchPlan | None]:
    """The objective's section with runner defaults, its own keys dropped and the global batch split per process."""
    if recipe["objective"] == "vizer":
        section, schema, defaults, group = recipe["vizer"], VIZER_SCHEMA, VIZER_DEFAULTS, 1
    else:
        section, schema, defaults = recipe["grpo"], GRPO_SCHEMA, GRPO_DEFAULTS
        group = section.get("num_generations") or GRPOConfig.__dataclass_fields__["num_generations"].default
    fields = {k: v for k, v in section.items() if k not in schema}  # the trainer config's own fields
    settings, plan = batch_settings(
        {**defaults, **fields}, section["images_per_step"], group, processes, recipe["objective"]
    )
    settings["bf16"] = _bf16(recipe, section)
    settings.setdefault("report_to", report_to())
    return settings, plan


def training_args(recipe: dict, out_dir: Path, processes: int | None = None) -> GRPOConfig | TrainingArguments:
    """The trainer's config object, built as the run will build it (so `make check` catches its errors too).
    `processes` defaults to this launch's process count; the global batch is split over it."""
    processes = processes or PartialState().num_processes
    settings, _ = trainer_settings(recipe, processes)
    if recipe["objective"] == "vizer":
        try:
            return TrainingArguments(output_dir=str(out_dir), **settings)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"vizer: {str(err).splitlines()[0]}") from None
    settings["reward_weights"] = [float(e.get("weight", 1.0)) for e in recipe["rewards"]]
    try:
        args = GRPOConfig(output_dir=str(out_dir), **settings)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"grpo: {str(err).splitlines()[0]}") from None
    # per process, from TRL's own world size (a `make check --processes N` builds the config in one process)
    check_generation_groups(args.generation_batch_size // args.world_size, args.num_generations, "grpo")
    return args


def prepare_resume(out_dir: Path, is_main: bool = True) -> str | None:
    """The newest complete checkpoint in OUT, with metrics.jsonl trimmed (by the main process) to its steps."""
    checkpoint = last_complete_checkpoint(out_dir, set_aside=is_main) if out_dir.is_dir() else None
    if is_main:
        # without a checkpoint the run starts over, including the canary's step 0
        for name in ("metrics.jsonl", "canary.jsonl"):
            trim_metrics(out_dir / name, checkpoint_step(checkpoint) if checkpoint else -1)
        if checkpoint is not None:
            print(f"resuming from {checkpoint} (step {checkpoint_step(checkpoint)})")
    return str(checkpoint) if checkpoint is not None else None


def _size(dataset) -> str:
    return str(len(dataset)) if hasattr(dataset, "__len__") else "a stream of"


def check_one_step(dataset, args: GRPOConfig | TrainingArguments, objective: str) -> None:
    """Refuse a dataset smaller than one optimizer step: the trainer would run no step and exit as if done.
    A stream's length is unknown; the check after training catches that case."""
    if not hasattr(dataset, "__len__"):
        return
    if objective == "grpo":  # TRL's sampler yields only whole generation batches of distinct images
        needed, section = args.generation_batch_size // args.num_generations, "grpo"
    else:
        needed = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        section = "vizer"
    if len(dataset) < needed:
        raise RecipeError(
            f"one optimizer step takes {needed} images but the data has {len(dataset)}: lower "
            f"{section}.images_per_step (or the per-device batch), or add images"
        )


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C or SIGTERM after saving a checkpoint at the current step."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"interrupted at step {step}: saved {checkpoint}; re-run the same command to resume")
        self.step, self.checkpoint = step, checkpoint


class GracefulStop(TrainerCallback):
    """The first Ctrl-C or SIGTERM asks the trainer to save at the end of the current step and stop (a second
    Ctrl-C stops at once), so the promise "re-run to resume" holds also before the first scheduled save."""

    def __init__(self) -> None:
        self.requested, self.step, self._previous = False, None, {}

    def _request(self, signum, frame) -> None:
        self.requested = True
        for sig, handler in self._previous.items():  # the next signal falls through to the default
            signal.signal(sig, handler)
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping")

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread() and not self._previous:  # once
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save, control.should_training_stop = True, True
            self.step = state.global_step

    def restore(self) -> None:
        """Put back the handlers of before training; also when training ends with an exception."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@dataclass(frozen=True)
class FastPath:
    """One exact fast path as start-up decides it. `name` starts its start-up line; `key` is the recipe's
    `model.<key>` (auto: where exact; true: refuse to run otherwise; false: the stock path); `why_not` gives
    the reason it would not be exact (None: it is); `enable` turns it on."""

    name: str
    key: str
    why_not: Callable[[Any, str], str | None]  # (trainer, family)
    enable: Callable[[Any, str], None]
    runs: str  # the start-up line's text when it runs
    stock: str  # ... and when the stock path runs, followed by the reason
    grpo_only: bool = True


def _as_training(why_not: Callable[[Any, str], str | None]) -> Callable[[Any, str], str | None]:
    """Judge the model as it will train and generate: dropout is active only in training mode."""

    def judged(trainer, family: str) -> str | None:
        was = trainer.model.training
        trainer.model.train()
        try:
            return why_not(trainer, family)
        finally:
            trainer.model.train(was)

    return judged


def _why_not_merged(trainer, family: str) -> str | None:
    if trainer.use_vllm:
        return "vLLM generates, and TRL hands it the merged weights itself"
    if sharding() in ("fsdp", "zero3"):
        return f"the weights are sharded ({sharding()}): a merge in place needs each process to hold them whole"
    return why_not_merged(trainer.accelerator.unwrap_model(trainer.model))


def _enable(attribute: str, value: Callable[[], Any]) -> Callable[[Any, str], None]:
    return lambda trainer, family: setattr(trainer, attribute, value())


FAST_PATHS = (
    FastPath(
        "vision",
        "share_vision",
        lambda trainer, family: why_not_shared(trainer.model, family),
        lambda trainer, family: share_vision(trainer.model, family),
        "each distinct image encoded once per step, shared by its group (model.share_vision)",
        "stock path, every completion encodes its image",
        grpo_only=False,
    ),
    FastPath(  # always exact (the processor's own values are reused), under the same switch as shared vision
        "preprocessing",
        "share_vision",
        lambda trainer, family: None if family in SHARED_FAMILIES else f"not written for the {family} family",
        _enable("preprocess_once", PreprocessOnce),
        "each distinct picture processed once per step, reused by its group (model.share_vision)",
        "stock path, the processor runs on every completion's copy, twice a step",
    ),
    FastPath(
        "language model",
        "share_prefix",
        _as_training(lambda trainer, family: why_not_shared_prefix(trainer.model, family)),
        _enable("share_prefix", lambda: True),
        "each group's prompt and image read once per forward and prefilled once in generation, its completions "
        "attend to it (model.share_prefix)",
        "stock path, every completion re-reads its prompt and image",
    ),
    FastPath(
        "generation",
        "merge_for_generation",
        _as_training(_why_not_merged),
        _enable("merge_for_generation", lambda: True),
        "the LoRA adapter merged into its weights while sampling (model.merge_for_generation)",
        "adapter applied unmerged at every token",
    ),
)


def choose(path: FastPath, setting: str | bool, trainer, family: str, state: PartialState) -> None:
    """Turn one fast path on where it is exact, refuse a recipe that insists where it is not, and say which
    path runs."""
    reason = path.why_not(trainer, family) if setting is not False else f"model.{path.key} is false"
    if reason is None:
        path.enable(trainer, family)
        state.print(f"{path.name}: {path.runs}")
    elif setting is True:
        raise RecipeError(f"'model.{path.key}' is true, but {reason}; set it to auto or false")
    else:
        state.print(f"{path.name}: {path.stock} ({reason})")


def train(recipe: dict, out_dir: Path) -> Path:
    """Train and return OUT/adapter. Under `accelerate launch`, only the main process prints and writes
    OUT's own files (recipe.yaml, metrics.jsonl, mapper/); the others stay quiet."""
    # ACCELERATE_USE_CPU=true: CPU processes under torchrun (gloo), e.g. the multi-process test
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world_size(state.num_processes)
    check_launch(recipe["model"]["quantization"])
    args = training_args(recipe, out_dir, state.num_processes)  # before any model loads: fails in a second
    grpo = recipe["grpo"]
    if recipe["objective"] == "grpo" and grpo.get("use_vllm"):
        family = detect_family(resolve_model_id(recipe["model"]["id"]), recipe["model"]["family"])
        check_vllm(True, family.name, recipe["model"]["quantization"], grpo["vllm_force"])
    if needs_mapper(recipe) and recipe["mapper"]["path"]:
        check_mapper(mapper_dir(recipe, out_dir), recipe)  # a mapper from elsewhere: before OUT is touched
    plan = trainer_settings(recipe, state.num_processes)[1]
    if plan is not None:
        state.print(plan.describe())
    if out_dir.exists() and not out_dir.is_dir():
        raise RecipeError(f"OUT {out_dir} is a file, not a directory")
    if state.is_main_process:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RecipeError(f"OUT {out_dir}: cannot create it ({err.strerror})") from None
    with locked(out_dir) if state.is_main_process else contextlib.nullcontext(), tensorboard_dir(out_dir):
        return _train(recipe, out_dir, args, state)


@contextlib.contextmanager
def tensorboard_dir(out_dir: Path):
    """TensorBoard writes into OUT/tensorboard for this run only (TRL/transformers read the folder from the
    environment), so a second run in the same process, e.g. the next seed of `make demo`, writes into its own
    OUT; a folder the user set in TENSORBOARD_LOGGING_DIR is left as it is."""
    if "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out_dir / "tensorboard")
    try:
        yield
    finally:
        os.environ.pop("TENSORBOARD_LOGGING_DIR", None)


def announce_canary(found: int, monitor: dict, state: PartialState) -> None:
    """How many canary pictures, at which steps; fewer than asked (a small eval set) said, not hidden."""
    short = (
        f" (monitor.canary asks for {monitor['canary']}; eval_data has only {found})"
        if found < monitor["canary"]
        else ""
    )
    state.print(f"canary: {found} eval_data pictures{short}, captioned at step 0 and every {monitor['every']} steps")


def _train(recipe: dict, out_dir: Path, args, state: PartialState) -> Path:
    with state.main_process_first():  # the main process checks and trims OUT before anyone reads it
        if state.is_main_process:
            allowed = check_rerun(recipe, out_dir)  # before anything in OUT changes
        section = recipe["objective"]  # its section holds the steps: grpo: or vizer:
        finished = finished_step(out_dir, section, recipe[section], state.is_main_process)
        if finished is not None:  # resuming would train one step past the end
            state.print(f"{out_dir}: already finished at step {finished}; nothing to do (raise max_steps to go on)")
            return out_dir / "adapter"
        skipped: list[str] = []  # filled as the data is read (for a stream, as training reaches it)
        train_dataset = build_dataset(recipe["data"], recipe["prompt"], skipped=skipped)
        check_one_step(train_dataset, args, recipe["objective"])
        resume = prepare_resume(out_dir, state.is_main_process)
        if state.is_main_process:
            saved = out_dir / "recipe.yaml"
            if allowed:
                record_changes(out_dir, allowed, yaml.safe_load(saved.read_text()), recipe)
            dump_recipe(recipe, saved)
            (out_dir / "hardware.json").write_text(json.dumps(hardware(state.num_processes)) + "\n")
    if needs_mapper(recipe):
        ensure_mapper(recipe, out_dir)  # Stage A first; reused when OUT/mapper (or mapper.path) is there
        check_mapper(mapper_dir(recipe, out_dir), recipe)

    # rewards first: a plugin that cannot be built fails before minutes of loading the policy
    reward_funcs = build_rewards(recipe, str(state.device), out_dir) if recipe["objective"] == "grpo" else []
    checkpointing = getattr(args, "activation_checkpointing", None)  # transformers 5 also has the old name
    checkpointing = args.gradient_checkpointing if checkpointing is None else checkpointing
    loaded = load_model(recipe["model"], gradient_checkpointing=bool(checkpointing))
    peft_config = lora_config(recipe["model"]["lora"], loaded.model, loaded.family)
    state.print(
        f"model: {recipe['model']['id']} (family {loaded.family.name}, quantization "
        f"{recipe['model']['quantization']}, LoRA targets {peft_config.target_modules if peft_config else 'none: full'}"
        f", objective {recipe['objective']})"
    )
    stop = GracefulStop()
    # a resumed run's monitor starts from the health its metrics.jsonl (trimmed to the checkpoint) recorded
    history = [r for _, r in read_records(out_dir / "metrics.jsonl")[0]] if resume else []
    monitor = Monitor(recipe["monitor"], history, say=state.print)
    if recipe["objective"] == "vizer":
        state.print(
            "monitor: objective vizer logs no caption health and no reward, so no health or canary warning can "
            "fire (the canary captions are still written)"
        )
    callbacks = [MetricsJsonl(out_dir / "metrics.jsonl"), stop, monitor]
    canary_items = canary_images(recipe)
    canary = None
    if canary_items:
        announce_canary(len(canary_items), recipe["monitor"], state)
        canary = Canary(canary_items, recipe, loaded.family, out_dir / "canary.jsonl", str(state.device))
        callbacks.append(canary)
    if recipe["objective"] == "vizer":
        vizer = recipe["vizer"]
        set_seed(args.seed)  # the LoRA init draws from the global RNG: the same seed, the same adapter
        model = get_peft_model(loaded.model, peft_config) if peft_config is not None else loaded.model
        trainer = ViZerTrainer(
            model,
            args,
            mapper=Mapper.load(mapper_dir(recipe, out_dir), str(state.device)),
            processing_class=loaded.processor,
            kl_beta=vizer["kl_beta"],
            do_sample=vizer["do_sample"],
            temperature=vizer["temperature"],
            max_new_tokens=vizer["max_new_tokens"],
            train_dataset=train_dataset,
            callbacks=callbacks,
        )
    else:
        print_rewards(recipe, state.print)
        trainer = CaptionGRPOTrainer(
            model=loaded.model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            processing_class=loaded.processor,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    if canary is not None:
        canary.bind(trainer)
    for path in FAST_PATHS:
        if isinstance(trainer, CaptionGRPOTrainer) or not path.grpo_only:
            choose(path, recipe["model"][path.key], trainer, loaded.family.name, state)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise RecipeError(
            f"disk full while writing to {out_dir}; the last complete checkpoint is intact and a rerun resumes "
            "from it once there is space"
        ) from None
    finally:
        stop.restore()
    if skipped and state.is_main_process:
        report_skipped(skipped, out_dir / "skipped.txt")
    if stop.requested:
        raise Interrupted(trainer.state.global_step, out_dir / f"checkpoint-{trainer.state.global_step}")
    if trainer.state.global_step == 0:  # an untrained adapter saved as if trained is a silent wrong result
        raise RecipeError(f"no optimizer step ran (data: {_size(train_dataset)} images); nothing saved to {out_dir}")
    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    if state.is_main_process:
        loaded.processor.save_pretrained(str(adapter_dir))
    state.print(f"adapter saved to {adapter_dir}")
    return adapter_dir

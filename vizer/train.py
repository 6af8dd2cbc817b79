"""Training a caption adapter: recipe -> TRL GRPOTrainer (objective grpo) or ViZerTrainer (objective vizer) -> OUT/.

OUT/ holds adapter/ (PEFT adapter), recipe.yaml (resolved recipe), metrics.jsonl (one JSON
object per logging step), completions/ (GRPO: TRL's sampled captions with their rewards, parquet),
mapper/ (when the recipe uses ViZer's mapper), tensorboard/ and checkpoint-N/ folders.
Re-running into the same OUT resumes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from accelerate import PartialState
from peft import get_peft_model
from transformers import TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig

from data import build_dataset
from vizer.config import VIZER_SCHEMA, RecipeError, dump_recipe, needs_mapper
from vizer.grpo import CaptionGRPOTrainer
from vizer.mapper import ensure_mapper, load_mapper, mapper_dir
from vizer.models import load_model, lora_config
from vizer.objective import ViZerTrainer
from vizer.recipe_rewards import build_rewards, print_rewards

# TRL still passes the old name to transformers; the message says nothing the user can act on.
warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*is deprecated", category=FutureWarning)

# Runner defaults, each overridable from the recipe's grpo: section.
GRPO_DEFAULTS = {
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "report_to": ["tensorboard"],
    "log_completions": True,
    "num_completions_to_print": 2,
    "remove_unused_columns": False,
}
# The same for the vizer: section (Stage B); the paper trains one epoch with AdamW, weight decay 0.01.
VIZER_DEFAULTS = {
    "logging_steps": 1,
    "save_strategy": "steps",
    "save_steps": 50,
    "report_to": ["tensorboard"],
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


def training_args(recipe: dict, out_dir: Path) -> GRPOConfig | TrainingArguments:
    """The trainer's config object, built as the run will build it (so `make check` catches its errors too)."""
    if recipe["objective"] == "vizer":
        settings = {**VIZER_DEFAULTS, **{k: v for k, v in recipe["vizer"].items() if k not in VIZER_SCHEMA}}
        settings["bf16"] = _bf16(recipe, recipe["vizer"])
        try:
            return TrainingArguments(output_dir=str(out_dir), **settings)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"vizer: {str(err).splitlines()[0]}") from None
    settings = {**GRPO_DEFAULTS, **recipe["grpo"]}
    settings["reward_weights"] = [float(e.get("weight", 1.0)) for e in recipe["rewards"]]
    settings["bf16"] = _bf16(recipe, recipe["grpo"])
    try:
        args = GRPOConfig(output_dir=str(out_dir), **settings)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"grpo: {str(err).splitlines()[0]}") from None
    local_batch = args.generation_batch_size // max(args.world_size, 1)
    if args.world_size > 1 and local_batch % args.num_generations:
        raise RecipeError(
            f"grpo: each process's generation batch ({local_batch}) must be a multiple of "
            f"num_generations ({args.num_generations}) so that a caption group stays on one process"
        )
    return args


def prepare_resume(out_dir: Path, is_main: bool = True) -> str | None:
    """The last checkpoint in OUT, with metrics.jsonl trimmed (by the main process) to the steps it covers."""
    checkpoint = get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None
    if checkpoint is None:
        return None
    step = int(checkpoint.rsplit("-", 1)[-1])
    path = out_dir / "metrics.jsonl"
    if is_main and path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))
        print(f"resuming from {checkpoint} (step {step})")
    return checkpoint


def train(recipe: dict, out_dir: Path) -> Path:
    """Train and return OUT/adapter. Under `accelerate launch`, only the main process prints and writes
    OUT's own files (recipe.yaml, metrics.jsonl, mapper/); the others stay quiet."""
    state = PartialState()
    args = training_args(recipe, out_dir)  # before any model loads: a bad section fails in a second
    train_dataset = build_dataset(recipe["data"], recipe["prompt"])
    with state.main_process_first():  # the main process trims metrics.jsonl before anyone reads OUT
        if state.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
        resume = prepare_resume(out_dir, state.is_main_process)
        if state.is_main_process:
            dump_recipe(recipe, out_dir / "recipe.yaml")
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out_dir / "tensorboard"))
    if needs_mapper(recipe):
        ensure_mapper(recipe, out_dir)  # Stage A first; reused when OUT/mapper (or mapper.path) is there

    loaded = load_model(recipe["model"], gradient_checkpointing=args.gradient_checkpointing)
    peft_config = lora_config(recipe["model"]["lora"], loaded.model, loaded.family)
    state.print(
        f"model: {recipe['model']['id']} (family {loaded.family.name}, quantization "
        f"{recipe['model']['quantization']}, LoRA targets {peft_config.target_modules if peft_config else 'none: full'}"
        f", objective {recipe['objective']})"
    )
    callbacks = [MetricsJsonl(out_dir / "metrics.jsonl")]
    if recipe["objective"] == "vizer":
        vizer = recipe["vizer"]
        set_seed(args.seed)  # the LoRA init draws from the global RNG: the same seed, the same adapter
        model = get_peft_model(loaded.model, peft_config) if peft_config is not None else loaded.model
        trainer = ViZerTrainer(
            model,
            args,
            mapper=load_mapper(mapper_dir(recipe, out_dir), str(state.device)),
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
            reward_funcs=build_rewards(recipe, str(state.device), out_dir),  # this process's GPU under accelerate
            args=args,
            train_dataset=train_dataset,
            processing_class=loaded.processor,
            peft_config=peft_config,
            callbacks=callbacks,
        )
    trainer.train(resume_from_checkpoint=resume)
    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    if state.is_main_process:
        loaded.processor.save_pretrained(str(adapter_dir))
    state.print(f"adapter saved to {adapter_dir}")
    return adapter_dir

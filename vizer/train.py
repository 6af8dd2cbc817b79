"""GRPO training of a caption adapter: recipe -> TRL GRPOTrainer -> OUT/.

OUT/ holds adapter/ (PEFT adapter), recipe.yaml (resolved recipe), metrics.jsonl (one JSON
object per logging step), completions/ (TRL's sampled captions with their rewards, parquet),
tensorboard/ and checkpoint-N/ folders. Re-running into the same OUT resumes.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint
from trl import GRPOConfig, GRPOTrainer

from data import build_dataset
from rewards import build_reward, reward_name
from vizer.config import RecipeError, dump_recipe
from vizer.model_ids import resolve_reward_entry
from vizer.models import load_model, lora_config

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


class MetricsJsonl(TrainerCallback):
    """Appends each logging step's metrics (loss, rewards/<name>/mean, ...) to metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def grpo_args(recipe: dict, out_dir: Path) -> GRPOConfig:
    settings = {**GRPO_DEFAULTS, **recipe["grpo"]}
    settings["reward_weights"] = [float(e.get("weight", 1.0)) for e in recipe["rewards"]]
    if "bf16" not in recipe["grpo"]:
        # TRL defaults to bf16, which CPUs emulate slowly; follow the model's dtype instead.
        settings["bf16"] = (
            recipe["model"]["dtype"] in ("auto", "bfloat16")
            and torch.cuda.is_available()
            and torch.cuda.is_bf16_supported()
        )
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


def print_rewards(recipe: dict, say=print) -> None:
    total = sum(abs(float(e.get("weight", 1.0))) for e in recipe["rewards"]) or 1.0
    say("rewards (effective weight, share of total):")
    for entry in recipe["rewards"]:
        weight = float(entry.get("weight", 1.0))
        options = {k: v for k, v in entry.items() if k not in ("name", "weight")}
        say(f"  {reward_name(entry):<14} x{weight:<6g} {abs(weight) / total:5.0%}  {options or ''}")


def build_rewards(recipe: dict, device: str) -> list:
    funcs = []
    for i, entry in enumerate(recipe["rewards"]):
        try:
            funcs.append(build_reward(resolve_reward_entry(entry), device=device, prompt=recipe["prompt"]))
        except OSError as err:  # a scorer that is neither a folder nor reachable on the hub
            raise RecipeError(
                f"'rewards[{i}]' ({reward_name(entry)}): cannot load its model ({str(err).splitlines()[0]})"
            ) from None
    return funcs


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
    OUT's own files (recipe.yaml, metrics.jsonl); the others stay quiet."""
    state = PartialState()
    args = grpo_args(recipe, out_dir)  # before any model loads: a bad grpo: section fails in a second
    train_dataset = build_dataset(recipe["data"], recipe["prompt"])
    with state.main_process_first():  # the main process trims metrics.jsonl before anyone reads OUT
        if state.is_main_process:
            out_dir.mkdir(parents=True, exist_ok=True)
        resume = prepare_resume(out_dir, state.is_main_process)
        if state.is_main_process:
            dump_recipe(recipe, out_dir / "recipe.yaml")
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out_dir / "tensorboard"))

    print_rewards(recipe, state.print)
    reward_funcs = build_rewards(recipe, str(state.device))  # this process's GPU under accelerate launch

    loaded = load_model(recipe["model"], gradient_checkpointing=args.gradient_checkpointing)
    peft_config = lora_config(recipe["model"]["lora"], loaded.model, loaded.family)
    state.print(
        f"model: {recipe['model']['id']} (family {loaded.family.name}, quantization "
        f"{recipe['model']['quantization']}, LoRA targets {peft_config.target_modules if peft_config else 'none: full'})"
    )

    trainer = GRPOTrainer(
        model=loaded.model,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=train_dataset,
        processing_class=loaded.processor,
        peft_config=peft_config,
        callbacks=[MetricsJsonl(out_dir / "metrics.jsonl")],
    )
    trainer.train(resume_from_checkpoint=resume)
    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    if state.is_main_process:
        loaded.processor.save_pretrained(str(adapter_dir))
    state.print(f"adapter saved to {adapter_dir}")
    return adapter_dir

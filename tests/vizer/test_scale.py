"""The same recipe on 1 or N processes: the global batch split, the launch profiles, the refused combinations,
and a real 2-process run on CPU (gloo) that trains like the 1-process one."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from safetensors.torch import load_file
from test_train import tiny_overrides

import vizer.scale as scale
import vizer.train as runner
from vizer.config import RecipeError, load_recipe
from vizer.scale import check_generation_groups, check_gpus, check_launch, check_vllm, split_global_batch
from vizer.train import training_args

ROOT = Path(__file__).resolve().parents[2]
PROFILES = {p.stem: p for p in (ROOT / "recipes" / "accelerate").glob("*.yaml")}


def test_one_and_n_processes_train_on_the_same_global_batch():
    one = split_global_batch(4, group=8, per_device=8, processes=1, where="grpo")
    four = split_global_batch(4, group=8, per_device=8, processes=4, where="grpo")
    for plan in (one, four):
        assert plan.processes * plan.per_device * plan.accumulation == 4 * 8  # completions per optimizer step
        assert plan.per_device * plan.accumulation % 8 == 0  # each process holds whole groups
    assert (one.per_device, one.accumulation) == (8, 4) and (four.per_device, four.accumulation) == (8, 1)
    # a memory cap that does not divide a process's share: the largest micro-batch under it that does
    odd = split_global_batch(2, group=8, per_device=6, processes=1, where="grpo")
    assert (odd.per_device, odd.accumulation) == (4, 4)
    # no cap given: the trainers' default of 8 per forward, not one image at a time
    plain = split_global_batch(32, group=1, per_device=None, processes=2, where="vizer")
    assert (plain.per_device, plain.accumulation) == (8, 2)


def test_a_batch_that_cannot_split_over_the_processes_is_refused_with_one_line():
    with pytest.raises(
        RecipeError, match=r"'grpo.images_per_step' \(4\) must be a multiple of the number of processes \(3\)"
    ):
        split_global_batch(4, group=8, per_device=8, processes=3, where="grpo")
    recipe = load_recipe("tiny-shapes", ["grpo.gradient_accumulation_steps=2"])
    with pytest.raises(RecipeError, match="images_per_step' and 'grpo.gradient_accumulation_steps' are both set"):
        training_args(recipe, Path("unused"), processes=1)


def test_training_args_carry_the_split_for_the_launch():
    recipe = load_recipe("smolvlm-openimages")  # images_per_step 4, 8 captions, at most 8 per forward
    for processes, accumulation in ((1, 4), (2, 2), (4, 1)):
        args = training_args(recipe, Path("unused"), processes=processes)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (8, accumulation)
    vizer = load_recipe("smolvlm-openimages-vizer")  # stage B: 32 images, one caption each
    assert training_args(vizer, Path("unused"), processes=2).gradient_accumulation_steps == 2


def test_groups_that_would_straddle_processes_are_refused():
    # per-device keys instead of images_per_step: 2 processes x 4 completions each with G=8 splits every group
    with pytest.raises(RecipeError, match=r"generation batch \(4\) must be a multiple of num_generations \(8\)"):
        check_generation_groups(4, 8, "grpo")
    check_generation_groups(16, 8, "grpo")


def launch_env(profile: str, processes: int = 4) -> dict:
    """The environment `accelerate launch --config_file <profile>` gives each process (no GPU needed)."""
    argv = ["--config_file", str(PROFILES[profile]), "--num_processes", str(processes), "-m", "vizer", "train", "x"]
    args, defaults, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args) if args.multi_gpu or args.use_fsdp else {}


def test_every_launch_profile_loads_with_accelerate():
    assert set(PROFILES) == {"single-gpu", "ddp", "zero2", "zero3", "fsdp2", "multi-node"}
    kinds = {name: load_config_from_file(str(path)).distributed_type.value for name, path in PROFILES.items()}
    assert kinds == {
        "single-gpu": "NO",
        "ddp": "MULTI_GPU",
        "zero2": "DEEPSPEED",
        "zero3": "DEEPSPEED",
        "fsdp2": "FSDP",
        "multi-node": "MULTI_GPU",
    }
    assert load_config_from_file(str(PROFILES["multi-node"])).num_machines > 1
    env = launch_env("fsdp2")
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert launch_env("zero3")["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"


@pytest.mark.parametrize(
    "profile, refused", [("ddp", False), ("zero2", False), ("multi-node", False), ("zero3", True), ("fsdp2", True)]
)
def test_qlora_is_refused_where_the_profile_shards_the_base(profile, refused):
    env = launch_env(profile)
    check_launch("none", env)  # full-precision LoRA runs under every profile
    if refused:
        with pytest.raises(RecipeError, match=r"model.quantization 4bit \(QLoRA\) does not run under (FSDP|ZeRO-3)"):
            check_launch("4bit", env)
    else:
        check_launch("4bit", env)


def test_vllm_is_refused_where_it_is_known_to_be_wrong(monkeypatch):
    with pytest.raises(RecipeError, match="image tokens expanded twice.*6294.*grpo.vllm_force=true"):
        check_vllm(True, "idefics3", "none", force=False)
    with pytest.raises(RecipeError, match="cannot sync 4/8-bit LoRA weights into vLLM"):
        check_vllm(True, "qwen2_vl", "4bit", force=False)
    check_vllm(False, "idefics3", "4bit", force=False)  # off: nothing to refuse
    monkeypatch.setattr(scale.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match=r"needs vLLM >=0.22.0,<=0.31.0: pip install -r requirements-vllm.txt"):
        check_vllm(True, "idefics3", "none", force=True)  # forced past the known bug, but vLLM is missing
    assert (ROOT / "requirements-vllm.txt").is_file()


def test_the_vllm_switch_reaches_trl_and_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    recipe = load_recipe("qwen2vl-openimages", ["grpo.use_vllm=true"])
    args = training_args(recipe, tmp_path, processes=1)
    assert args.use_vllm and args.vllm_mode == "colocate"  # TRL's colocate mode unless the recipe says server
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("a model loaded before the refusal"))
    with pytest.raises(RecipeError, match="6294"):
        runner.train(load_recipe("tiny-shapes", [*tiny_overrides("tiny-shapes"), "grpo.use_vllm=true"]), tmp_path)


def test_weights_and_biases_logs_only_when_asked(monkeypatch, tmp_path):
    recipe = load_recipe("tiny-shapes")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert training_args(recipe, tmp_path, processes=1).report_to == ["tensorboard"]
    monkeypatch.setenv("WANDB_PROJECT", "captions")
    monkeypatch.setattr(scale.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RecipeError, match="WANDB_PROJECT is set but wandb is not installed"):
        training_args(recipe, tmp_path, processes=1)
    monkeypatch.setattr(scale.importlib.util, "find_spec", lambda name: object())
    assert training_args(recipe, tmp_path, processes=1).report_to == ["tensorboard", "wandb"]


RECORDER = '''
import json, os

def make(path: str):
    """A zero-weight reward that writes down which images each call saw, per process."""
    calls = []

    def record(completions, image_id, **kwargs):
        calls.append(list(image_id))
        rank = os.environ.get("RANK", "0")
        with open(os.path.join(path, f"calls-{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"call": len(calls) - 1, "image_id": list(image_id)}) + "\\n")
        return [0.0] * len(completions)

    return record
'''


def recorded_recipe(tmp_path: Path, calls: Path) -> Path:
    """tiny-shapes with tiny models and a recording reward, written as a recipe file both launches read."""
    (tmp_path / "recorder.py").write_text(RECORDER)
    calls.mkdir()
    recipe = yaml.safe_load((ROOT / "recipes" / "tiny-shapes.yaml").read_text())
    recipe["rewards"].append({"name": "recorder:make", "weight": 0.0, "path": str(calls)})
    path = tmp_path / "recorded.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def read_calls(folder: Path) -> dict[str, list[list[str]]]:
    return {
        f.stem: [json.loads(line)["image_id"] for line in f.read_text().splitlines()]
        for f in sorted(folder.glob("calls-*.jsonl"))
    }


def test_two_cpu_processes_train_on_whole_groups_and_the_same_global_batch(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = [*tiny_overrides("tiny-shapes"), "grpo.max_steps=2"]
    one_calls, two_calls = tmp_path / "one-calls", tmp_path / "two-calls"
    one_recipe = recorded_recipe(tmp_path, one_calls)
    runner.train(load_recipe(str(one_recipe), overrides), tmp_path / "one")

    two_recipe = tmp_path / "two.yaml"
    two_recipe.write_text(one_recipe.read_text().replace(str(one_calls), str(two_calls)))
    two_calls.mkdir()
    # `accelerate launch --cpu` starts one process (more only through MPI); torchrun's processes on the CPU
    # (gloo) are `--multi_gpu` with ACCELERATE_USE_CPU set
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), "ACCELERATE_USE_CPU": "true"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    done = subprocess.run(
        [*launch, "-m", "vizer", "train", str(two_recipe), "--out", str(tmp_path / "two"), *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch: 2 images x 4 captions per optimizer step = 2 process(es) x 4 per forward x 1" in done.stdout

    one, two = read_calls(one_calls), read_calls(two_calls)
    assert set(two) == {"calls-0", "calls-1"}, "both processes scored captions"
    for calls in (*one.values(), *two.values()):
        for ids in calls:
            assert set(Counter(ids).values()) == {4}, f"a reward call saw a partial group: {ids}"
    steps = len(one["calls-0"])
    assert steps == 2 and all(len(calls) == steps for calls in two.values())
    for step in range(steps):  # the two processes together saw the images the single process saw
        assert sorted(two["calls-0"][step] + two["calls-1"][step]) == sorted(one["calls-0"][step])
        assert not set(two["calls-0"][step]) & set(two["calls-1"][step]), "each image on one process only"

    out = tmp_path / "two"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2], "one metrics line per step: main process only"
    assert json.loads((out / "hardware.json").read_text())["processes"] == 2
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any(torch.count_nonzero(v) for k, v in adapter.items() if "lora_B" in k), "the adapter trained"


@pytest.mark.parametrize(
    "variables, launch",
    [
        ([], ".venv/bin/python -m vizer train tiny-shapes"),
        (["GPUS=4"], "accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 4 -m vizer train"),
        (["GPUS=8", "ACCELERATE=zero3"], "--config_file recipes/accelerate/zero3.yaml --num_processes 8 -m vizer"),
    ],
)
def test_make_train_launches_through_accelerate_only_when_asked(variables, launch):
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under make test
    shown = subprocess.run(
        ["make", "-n", "--no-print-directory", "train", *variables],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    (line,) = [line for line in shown.stdout.splitlines() if "vizer train" in line]
    assert launch in " ".join(line.split()), line
    assert ("accelerate launch" in line) == bool(variables)


def test_more_processes_than_gpus_is_refused_with_one_line_before_launching(tmp_path):
    # Fails if `make train GPUS=2` reaches `accelerate launch` on a machine without GPUs: the two processes
    # start as separate runs into one OUT, the second refused by its sibling's lock, then a torchrun traceback.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU visible, also on a machine that has some
    out = tmp_path / "out"
    done = subprocess.run(
        ["make", "--no-print-directory", "train", "GPUS=2", f"OUT={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0 and "accelerate launch" not in done.stdout, done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: GPUS=2, but this machine has 0 GPU(s) visible to torch: use no GPUS or ACCELERATE (one process, on the CPU)"
    ]
    assert "Traceback" not in done.stderr and not out.exists()


@pytest.mark.parametrize("processes, available", [(2, 0), (4, 2), (0, 2), (1, 0)])
def test_an_accelerate_launch_needs_a_gpu_per_process(processes, available):
    with pytest.raises(RecipeError, match="^GPUS"):
        check_gpus(processes, available)
    if available:
        check_gpus(available, available)  # as many as there are: launched


def test_processes_launched_together_that_each_run_alone_are_refused(tmp_path, monkeypatch):
    # `accelerate launch --num_processes 2 -m vizer train ...` without GPUs: each process has world size 1
    from vizer.scale import check_world_size

    check_world_size(2, {"WORLD_SIZE": "2"})
    check_world_size(1, {})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RecipeError, match=r"^the launcher started 2 processes, but each sees itself alone"):
        runner.train(load_recipe("tiny-shapes", tiny_overrides("tiny-shapes")), tmp_path / "run")
    assert not (tmp_path / "run").exists(), "refused before OUT is touched"


@pytest.mark.parametrize("fails", [False, True])
def test_train_command_destroys_its_process_group_before_exit(monkeypatch, fails):
    # a group left alive at interpreter shutdown aborted a finished rank (SIGABRT); a failed run must let go too
    from vizer import cli

    destroyed = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: destroyed.append(True))

    def fake_train(recipe, out):
        if fails:
            raise RecipeError("disk full")

    monkeypatch.setattr(runner, "train", fake_train)
    assert cli.main(["train", "tiny-shapes", "--out", "unused"]) == (2 if fails else 0)
    assert destroyed == [True]

"""The real-sized benchmark models have the published sizes, and their processors the published image tokens.

The models are built on the meta device (shapes only, nothing allocated), so a wrong dimension in
benchmarks/real_sized.py (say 12 decoder layers instead of 30) shows up as a wrong parameter count.
"""

import csv
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import grpo_step, real_sized

# Published sizes: the name of each checkpoint, and its model.safetensors size on the hub (bf16, 2 bytes per
# parameter): SmolVLM-256M-Base 513 MB, SmolVLM-500M-Base 1.02 GB, SmolVLM-Base 4.49 GB; Qwen2-VL-2B-Instruct
# 2.209B parameters (open VLM leaderboard request for Qwen/Qwen2-VL-2B-Instruct).
HEADLINE = {"smolvlm256": 0.256e9, "smolvlm500": 0.5e9, "smolvlm2b": 2.2e9, "qwen2vl2b": 2.2e9}
WEIGHT_FILES = {"smolvlm256": 513e6 / 2, "smolvlm500": 1.02e9 / 2, "smolvlm2b": 4.49e9 / 2, "qwen2vl2b": 2.209e9}


@pytest.fixture(scope="module")
def processors() -> dict:
    return {name: real_sized.build_processor(name) for name in real_sized.NAMES}


@pytest.fixture(scope="module")
def parameters(processors) -> dict:
    counts = {}
    for name, processor in processors.items():
        model = real_sized.build_model(name, real_sized.build_config(name, processor), device="meta")
        assert next(model.parameters()).device == torch.device("meta")
        counts[name] = real_sized.parameter_count(model)
    return counts


@pytest.mark.parametrize("name", real_sized.NAMES)
def test_parameter_count_matches_the_published_size(name, parameters):
    assert parameters[name] == pytest.approx(HEADLINE[name], rel=0.10)
    assert parameters[name] == pytest.approx(WEIGHT_FILES[name], rel=0.02)


def test_a_wrong_dimension_changes_the_count(processors, monkeypatch):
    dims = real_sized.CONFIGS["smolvlm256"]
    monkeypatch.setitem(real_sized.CONFIGS, "smolvlm256", {**dims, "text": {**dims["text"], "num_hidden_layers": 12}})
    config = real_sized.build_config("smolvlm256", processors["smolvlm256"])
    model = real_sized.build_model("smolvlm256", config, device="meta")
    assert real_sized.parameter_count(model) != pytest.approx(HEADLINE["smolvlm256"], rel=0.10)


@pytest.mark.parametrize("name", ["smolvlm256", "smolvlm500", "smolvlm2b"])
def test_smolvlm_heads_are_64_wide_with_grouped_kv(name):
    # published: head_dim 64 in every SmolVLM text_config; SmolLM2-135M/360M use 3:1 grouped-query attention
    text = real_sized.CONFIGS[name]["text"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64
    assert text["num_attention_heads"] // text["num_key_value_heads"] == (1 if name == "smolvlm2b" else 3)


def test_qwen2vl_mrope_covers_half_the_head():
    text = real_sized.QWEN2VL_2B["text"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim == 128
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2


@pytest.mark.parametrize(("name", "tokens"), [("smolvlm256", 64), ("smolvlm500", 64), ("smolvlm2b", 81)])
def test_smolvlm_image_tokens_without_splitting(name, tokens, processors):
    for size in ((512, 512), (1024, 768)):
        assert real_sized.image_tokens(processors[name], Image.new("RGB", size, "red")) == tokens
    assert real_sized.tile_tokens(real_sized.CONFIGS[name]) == tokens


def test_qwen2vl_image_tokens_stay_under_the_bound(processors):
    processor = processors["qwen2vl2b"]  # built with max_pixels 256*28*28
    for size in ((512, 512), (1024, 768), (2000, 300)):
        assert 0 < real_sized.image_tokens(processor, Image.new("RGB", size, "red")) <= 256


def test_generation_is_kept_inside_the_offline_tokenizer(processors):
    for name, processor in processors.items():
        unused = real_sized.unused_vocab(name, processor)
        assert unused.start == len(processor.tokenizer) < unused.stop == real_sized.published_vocab(name)


def test_default_result_names_are_kept(monkeypatch):
    side = {**dict.fromkeys(grpo_step.PARTS, 0.5), "step_s": 2.0, "peak_gb": 4.0}
    steps = {
        "stock": dict(side, step_s=8.0, image_tokens=64, lm_tokens_per_step=1000.0),
        "shared": dict(side, image_tokens=64, lm_tokens_per_step=420.0, lm_tokens_ideal_shared_per_step=400.0),
    }
    monkeypatch.setattr(grpo_step, "run_side", lambda options, name: steps[name])
    results = grpo_step.compare(grpo_step.parse(["--repeats", "1"]))
    assert results["grpo_step_speedup_smolvlm256"] == 4.0
    assert results["grpo_shared_image_tokens_smolvlm256"] == 64
    assert results["grpo_stock_preprocess_s_smolvlm256"] == 0.5, "the split as make train logs it"
    assert "grpo_peak_rss_ratio_smolvlm256" in results
    assert (
        results["lm_tokens_per_step_stock_smolvlm256"] == 1000
        and results["lm_tokens_per_step_shared_smolvlm256"] == 420
    )
    assert results["lm_tokens_shared_over_ideal_smolvlm256"] == pytest.approx(1.05), "shared against P + G*R"
    other = grpo_step.compare(grpo_step.parse(["--model", "qwen2vl2b", "--max-pixels", str(1024 * 28 * 28)]))
    assert "grpo_step_speedup_qwen2vl2b_px1024" in other


def test_side_command_passes_the_settings_on():
    options = grpo_step.parse(["--model", "smolvlm2b", "--image-splitting", "--device", "cuda", "--quant", "4bit"])
    command = grpo_step.side_command(options, "shared")
    assert command[command.index("--side") + 1] == "shared"
    assert {"--image-splitting", "cuda", "4bit", "smolvlm2b"} <= set(command)


def test_a_fallback_side_is_reported_as_stock(tmp_path):
    options = grpo_step.parse(["--model", "qwen2vl2b", "--quant", "4bit", "--device", "cuda"])
    result = {"path": "stock", "fallback": "no tower", "image_tokens": 256, **dict.fromkeys(grpo_step.PARTS, 1.0)}
    grpo_step.append_csv(tmp_path / "steps.csv", options, "shared", result)
    (row,) = csv.DictReader((tmp_path / "steps.csv").open())
    assert (row["model"], row["shared"], row["note"]) == ("qwen2vl2b", "fallback", "no tower")


def test_recipe_settings_reach_the_step():
    options = grpo_step.parse(["--recipe", "smolvlm-openimages"])
    assert (options.model, options.quant, options.generations, options.images_per_step) == ("smolvlm2b", "4bit", 8, 4)
    assert (options.per_device, options.completion_length, options.image_splitting) == (8, 64, False)
    qwen = grpo_step.parse(["--recipe", "qwen2vl-openimages", "--images-per-step", "1"])
    assert (qwen.min_pixels, qwen.max_pixels) == (64 * 28 * 28, 256 * 28 * 28)
    assert grpo_step.label(qwen) == "qwen2vl_openimages_ips1", "a flag over the recipe's value is in the name"
    command = grpo_step.side_command(qwen, "stock")
    assert command[command.index("--images-per-step") + 1] == "1"
    assert grpo_step.parse(command[3:]).max_pixels == 256 * 28 * 28, "the side process gets the same settings"


def test_gpu_script_runs_each_recipe_row(tmp_path):
    calls = tmp_path / "calls"
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "DEVICE": "cpu"}
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_step.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "x.csv")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [line.split()[2:] for line in calls.read_text().splitlines()]  # after "-m benchmarks.grpo_step"
    labels = [grpo_step.label(grpo_step.parse(args)) for args in rows]
    assert labels == [
        "smolvlm256_openimages",
        "smolvlm256_openimages_split",  # the row with a GPU target, early enough that the budget keeps it
        "qwen2vl_openimages",
        "smolvlm_openimages",
        "smolvlm_openimages_split",
        "smolvlm256_openimages",
    ]
    assert grpo_step.parse(rows[-1]).generation_option == "cache_implementation=static"  # shared side, with and without


def test_a_generation_option_is_timed_on_the_shared_side_without_and_with_it(monkeypatch):
    options = grpo_step.parse(["--generation-option", "cache_implementation=static", "--repeats", "1"])
    plain, option = grpo_step.side_command(options, "shared"), grpo_step.side_command(options, "option")
    assert "--grpo-option" not in plain
    assert option[option.index("--side") + 1] == "shared" and option[-2:] == [
        "--grpo-option",
        "cache_implementation=static",
    ]
    assert grpo_step.parse(option[3:]).grpo_option == "cache_implementation=static", "the side process reads it back"
    assert grpo_step._option("cache_implementation=static") == ("cache_implementation", "static")
    side = {**dict.fromkeys(grpo_step.PARTS, 1.0)}
    steps = {"shared": dict(side, generation_s=3.0, step_s=4.0), "option": dict(side, generation_s=1.5, step_s=2.5)}
    monkeypatch.setattr(grpo_step, "run_side", lambda options, name: steps[name])
    results = grpo_step.compare(options)
    assert results["generation_speedup_smolvlm256_cache_implementation_static"] == 2.0
    assert results["step_speedup_smolvlm256_cache_implementation_static"] == 1.6


@pytest.mark.parametrize(
    "args, named",
    [
        (["--generation-option", "cache_implementation"], "--generation-option must look like KEY=VALUE"),
        (["--generation-option", "cache_implementation="], "--generation-option must look like KEY=VALUE"),
        (["--repeats", "0"], "--repeats must be at least 1, got 0"),
        (["--generations", "0"], "--generations must be at least 2, got 0"),
        (["--image-size", "0x0"], "needs a positive width and height, got '0x0'"),
        (["--image-size", "big"], "must look like WIDTHxHEIGHT"),
        (["--csv", "."], "--csv . is a folder"),
        (["--device", "cuda"], "--device cuda, but this Python sees no CUDA device"),
    ],
)
def test_bad_benchmark_input_is_one_line_before_any_side_runs(args, named, monkeypatch, capsys):
    # Fails if a bad flag reaches the side processes (a traceback there and again here) or compares two
    # identical sides and exits 0.
    monkeypatch.setattr(grpo_step, "_cuda_available", lambda: False)  # the test machine may have a GPU
    monkeypatch.setattr(grpo_step, "run_side", lambda *a: pytest.fail("a side ran"))
    try:
        code = grpo_step.main(args)
    except SystemExit as stopped:
        code = stopped.code
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err


def test_a_failed_side_is_one_line_from_the_parent(monkeypatch, capsys):
    def failed(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="")

    monkeypatch.setattr(grpo_step.subprocess, "run", failed)
    assert grpo_step.main(["--repeats", "1"]) == 1
    assert capsys.readouterr().err.strip() == "grpo_step: the stock side failed (exit 1); its error is above"


@pytest.mark.parametrize("budget", ["0", "-5", "ten"])
def test_gpu_script_with_no_budget_is_refused_not_a_csv_it_never_wrote(tmp_path, budget):
    stub = tmp_path / "python"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "DEVICE": "cpu", "BUDGET_S": budget}
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_step.sh"
    done = subprocess.run(["bash", str(script), str(tmp_path / "x.csv")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "BUDGET_S must be at least 40 seconds" in done.stderr, done.stderr
    assert "rows in" not in done.stderr

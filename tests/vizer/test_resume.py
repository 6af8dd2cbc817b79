"""Re-running into the same OUT resumes the run itself: adapter, optimizer, schedule and metrics continue
as if it had never stopped (GRPO and ViZer alike)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_overrides

import vizer.train as runner
from vizer.config import load_recipe

STEPS = {"grpo": ["grpo.max_steps=6", "grpo.save_steps=2"], "vizer": ["vizer.max_steps=6", "vizer.save_steps=2"]}
RECIPES = {"grpo": "tiny-shapes", "vizer": "shapes-vizer-g"}


class CrashAtStep(runner.MetricsJsonl):
    """metrics.jsonl as usual, then a crash after step 5 finished: between the saves of steps 4 and 6."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise RuntimeError("simulated crash")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.parametrize("objective", ["grpo", "vizer"])
def test_resumed_run_matches_an_uninterrupted_one(objective, tmp_path, monkeypatch, capsys):
    name = RECIPES[objective]
    recipe = load_recipe(name, [*tiny_overrides(name), *STEPS[objective]])
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    runner.train(recipe, straight)

    monkeypatch.setattr(runner, "MetricsJsonl", CrashAtStep)
    with pytest.raises(RuntimeError, match="simulated crash"):
        runner.train(recipe, resumed)
    monkeypatch.undo()
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    capsys.readouterr()
    runner.train(recipe, resumed)
    assert f"resuming from {resumed / 'checkpoint-4'} (step 4)" in capsys.readouterr().out, "the LAST checkpoint"

    a, b = metrics(straight), metrics(resumed)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5, 6], "each step once: the rerun continued from checkpoint-4"
    assert [m["learning_rate"] for m in b] == pytest.approx([m["learning_rate"] for m in a])
    assert [m["loss"] for m in b] == pytest.approx([m["loss"] for m in a], abs=1e-4)
    final_a = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    final_b = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        torch.testing.assert_close(final_b[key], final_a[key], atol=1e-5, rtol=1e-4, msg=key)
    moved = sum(
        (final_a[k] - load_file(str(straight / "checkpoint-2" / "adapter_model.safetensors"))[k]).abs().sum()
        for k in final_a
    )
    assert moved > 0, "the adapter trains between checkpoints, so equal finals mean the resume restored it"
    opt_a = torch.load(straight / "checkpoint-6" / "optimizer.pt", weights_only=False)["state"]
    opt_b = torch.load(resumed / "checkpoint-6" / "optimizer.pt", weights_only=False)["state"]
    for i in opt_a:
        assert opt_b[i]["step"] == opt_a[i]["step"] == 6
        torch.testing.assert_close(opt_b[i]["exp_avg"], opt_a[i]["exp_avg"], atol=1e-5, rtol=1e-4)

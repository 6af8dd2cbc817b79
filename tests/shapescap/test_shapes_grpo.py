"""ShapesCap: zero-label GRPO learns, which the same run with learning rate 0 (same seed, same images) does not.

Slow (about 5 minutes, and the full captioner builds in about 4 more on first use): `make test-all`. A weaker,
CI-sized captioner did not move its grounding reward beyond sampling noise in 30 steps (measured: lr 1e-3
0.694 -> 0.587 against lr 0 0.649 -> 0.703), so this check uses the demo's own captioner and settings.
"""

import json

import pytest
from safetensors.torch import load_file

from vizer.config import load_recipe
from vizer.train import train

STEPS, WINDOW = 60, 10


def grounding_by_window(run) -> list[float]:
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["rewards/grounding/mean"] for m in logged if "rewards/grounding/mean" in m]


@pytest.mark.slow
def test_grpo_raises_grounding_beyond_what_sampling_noise_does(tmp_path):
    runs = {}
    for lr in ("2.0e-4", "0.0"):
        overrides = [
            f"grpo.max_steps={STEPS}",
            f"grpo.logging_steps={WINDOW}",
            "grpo.save_steps=1000",
            f"grpo.learning_rate={lr}",
        ]
        train(load_recipe("shapes-grpo", overrides), tmp_path / lr)
        runs[lr] = grounding_by_window(tmp_path / lr)
    print("grounding by logging window:", runs)
    trained, frozen = runs["2.0e-4"], runs["0.0"]
    assert len(trained) == len(frozen) == STEPS // WINDOW
    # the same images in the same windows (same seed): the paired difference over the last third is learning
    late = slice(-2, None)
    gain = sum(trained[late]) / 2 - sum(frozen[late]) / 2
    assert gain > 0.05, (gain, runs)
    lora_b = load_file(str(tmp_path / "0.0" / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().max() == 0 for k, v in lora_b.items() if "lora_B" in k), "lr 0 leaves LoRA B at zero"

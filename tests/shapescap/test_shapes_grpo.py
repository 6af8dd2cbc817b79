"""ShapesCap in miniature: zero-label GRPO learns, which a run with learning rate 0 (same seed) does not."""

import json

from safetensors.torch import load_file

from vizer.config import load_recipe
from vizer.train import train

STEPS = 30


def grounding_by_step(run) -> list[float]:
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [m["rewards/grounding/mean"] for m in logged if "rewards/grounding/mean" in m]


def test_grpo_raises_grounding_beyond_what_sampling_noise_does(small_captioner, tmp_path):
    runs = {}
    for lr in ("1.0e-3", "0.0"):
        recipe = load_recipe(
            "shapes-grpo",
            [
                f"model.id={small_captioner}",
                f"grpo.max_steps={STEPS}",
                "grpo.logging_steps=10",
                "grpo.save_steps=1000",
                "data.limit=256",
                "grpo.beta=0.0",
                f"grpo.learning_rate={lr}",
            ],
        )
        train(recipe, tmp_path / lr)
        runs[lr] = grounding_by_step(tmp_path / lr)
    print("grounding by logging step:", runs)
    trained, frozen = runs["1.0e-3"], runs["0.0"]
    assert len(trained) == len(frozen) == STEPS // 10
    gain, noise = trained[-1] - trained[0], abs(frozen[-1] - frozen[0])
    assert gain > noise + 0.05, (gain, noise)
    lora_b = load_file(str(tmp_path / "0.0" / "adapter" / "adapter_model.safetensors"))
    assert all(v.abs().max() == 0 for k, v in lora_b.items() if "lora_B" in k), "lr 0 leaves LoRA B at zero"

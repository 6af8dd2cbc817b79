"""ShapesCap in miniature: zero-label GRPO raises the grounding reward of a weak captioner."""

import json

from shapescap.captioner import build_shapes_captioner
from vizer.config import load_recipe
from vizer.train import train

SMALL_CAPTIONER = dict(n_scenes=512, vision_steps=200, sft_steps=150, probe_scenes=48, eval_scenes=8)


def test_short_grpo_run_raises_mean_grounding(tmp_path):
    captioner = build_shapes_captioner(tmp_path / "parts", **SMALL_CAPTIONER)
    recipe = load_recipe(
        "shapes-grpo",
        [
            f"model.id={captioner}",
            "grpo.max_steps=40",
            "grpo.logging_steps=10",
            "grpo.save_steps=1000",
            "data.limit=256",
            "grpo.beta=0.0",
            "grpo.learning_rate=1.0e-3",
        ],
    )
    train(recipe, tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grounding = [m["rewards/grounding/mean"] for m in logged if "rewards/grounding/mean" in m]
    print("grounding by logging step:", grounding)
    assert len(grounding) == 4
    assert grounding[-1] > grounding[0], grounding

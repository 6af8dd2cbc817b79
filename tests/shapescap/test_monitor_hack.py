"""The monitor on a run that really hacks its reward: `recipes/shapes-hack-length.yaml` (length is the only
reward, high learning rate, no KL) on a ShapesCap captioner that starts out writing short captions."""

import sys
from pathlib import Path

import pytest

from shapescap import captioner as sc
from vizer.config import load_recipe
from vizer.train import train

# A quick build: 150 SFT steps are enough for short captions that end (greedy: 4 words), not for good ones.
SHORT_CAPTIONER = dict(
    n_scenes=64,
    vision_steps=3,
    sft_steps=150,
    vision_batch_size=8,
    batch_size=16,
    probe_scenes=24,
    eval_scenes=4,
    max_new_tokens=24,
)


@pytest.fixture(scope="module")
def short_captioner(tmp_path_factory):
    return sc.build_shapes_captioner(tmp_path_factory.mktemp("captioner"), **SHORT_CAPTIONER)


def test_a_length_hack_warns_within_a_tenth_of_its_steps_and_stops_there(short_captioner, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parents[1] / "vizer"))
    from test_train import read_metrics

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    said = []
    monkeypatch.setattr("vizer.train.PartialState.print", lambda self, *a, **k: said.append(" ".join(map(str, a))))
    recipe = load_recipe(
        "shapes-hack-length", [f"model.id={short_captioner}", "monitor.canary=0", "grpo.log_completions=false"]
    )
    assert recipe["monitor"]["stop_on"] == ["length", "repetition"]  # as shipped
    adapter = train(recipe, tmp_path)

    warnings = [line for line in said if line.startswith("monitor:")]
    # the hack grows captions by repeating words: the length or the repetition signal catches it first
    signal = warnings[0].split()[1] if warnings else None
    assert signal in recipe["monitor"]["stop_on"] and warnings[0].startswith(f"monitor: {signal} at step "), said
    step = int(warnings[0].split()[4].rstrip(":"))
    assert step <= recipe["grpo"]["max_steps"] // 10, warnings[0]
    assert "stopping (monitor.stop_on)" in warnings[0]
    rows = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert rows[-1]["step"] == step, "the run ends at the step that warned"
    assert rows[-1]["health/mean_words"] > 2 * rows[0]["health/mean_words"]  # the captions did grow
    assert (tmp_path / f"checkpoint-{step}" / "trainer_state.json").is_file() and adapter.is_dir()


def test_the_demo_recipe_on_the_same_captioner_warns_of_nothing(short_captioner, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parents[1] / "vizer"))
    from test_train import read_metrics

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    said = []
    monkeypatch.setattr("vizer.train.PartialState.print", lambda self, *a, **k: said.append(" ".join(map(str, a))))
    overrides = [
        f"model.id={short_captioner}",
        "rewards.0.model=tiny:clip",  # grounding and phrase_grounding: a tiny scorer stands in for the shapes CLIP
        "rewards.5.model=tiny:clip",
        "grpo.max_steps=30",
        "grpo.logging_steps=1",
        "monitor.baseline_steps=3",  # as sensitive as the hack's monitor
        "monitor.canary=0",
        "grpo.log_completions=false",
    ]
    recipe = load_recipe("shapes-phrases", overrides)
    assert [r["name"] for r in recipe["rewards"]][5] == "phrase_grounding"
    train(recipe, tmp_path)
    assert not [line for line in said if line.startswith("monitor:")], said
    assert [m["step"] for m in read_metrics(tmp_path) if "loss" in m] == list(range(1, 31))

"""Caption health in every run, the warnings it raises, and `monitor.stop_on`."""

import html
import itertools
import json

import pytest
from accelerate import PartialState
from test_train import read_metrics, tiny_overrides

import vizer.grpo
from vizer.cli import main
from vizer.config import RecipeError, load_recipe
from vizer.train import train
from vizer.watch.canary import paired_standard_error
from vizer.watch.monitor import HealthWatch, Monitor


def rows(lengths, repeated=None):
    repeated = repeated or [0.0] * len(lengths)
    return [{"health/mean_words": w, "health/repeated": r} for w, r in zip(lengths, repeated)]


def alerts(watch, logs):
    return [(a.signal, a.step) for step, row in enumerate(logs, 1) for a in watch.observe(step, row)]


def test_length_warns_once_when_the_recent_mean_doubles_the_first_steps():
    watch = HealthWatch(baseline_steps=2, length_ratio=2.0)
    # baseline (4 + 4) / 2 = 4; step 3: (4 + 10) / 2 = 7; step 4: (10 + 10) / 2 = 10 >= 8 -> warns, then never again
    assert alerts(watch, rows([4, 4, 10, 10, 20, 40])) == [("length", 4)]


def test_one_noisy_step_does_not_warn_but_a_sustained_rise_does():
    watch = HealthWatch(baseline_steps=3, repeated_margin=0.2)
    # a single step at 0.5 lifts the mean of three by 0.17 only
    assert alerts(watch, rows([4] * 7, [0, 0, 0, 0.5, 0, 0, 0])) == []
    watch = HealthWatch(baseline_steps=3, repeated_margin=0.2)
    assert alerts(watch, rows([4] * 6, [0.1, 0, 0.05, 0.3, 0.3, 0.3])) == [("repetition", 6)]


def test_rows_without_health_are_not_counted():
    watch = HealthWatch(baseline_steps=1)
    assert alerts(watch, [{"train_runtime": 1.0}, *rows([4, 9])]) == [("length", 3)]


def test_a_resumed_run_keeps_its_baseline_and_does_not_warn_twice():
    said = []
    settings = {
        "baseline_steps": 2,
        "length_ratio": 2.0,
        "repeated_margin": 0.2,
        "canary_drop": 0.02,
        "stop_on": ["length"],
    }
    history = [{"step": s, **r} for s, r in enumerate(rows([4, 4, 10]), 1)]
    monitor = Monitor(settings, history, say=said.append)

    class State:
        global_step, is_world_process_zero = 4, True

    class Control:
        should_save = should_training_stop = False

    monitor.on_log(None, State, Control, logs=rows([10])[0])  # (10 + 10) / 2 against 4 from the history
    assert Control.should_training_stop and len(said) == 1 and said[0].startswith("monitor: length at step 4")
    monitor.on_log(None, State, Control, logs=rows([40])[0])
    assert len(said) == 1


def test_a_run_stopped_by_the_monitor_may_resume_with_other_monitor_settings():
    from vizer.run_dir import recipe_changes

    saved = load_recipe("tiny-shapes", ["monitor.stop_on=[length]"])
    allowed, refused = recipe_changes(saved, load_recipe("tiny-shapes", ["monitor.length_ratio=3"]))
    assert refused == [] and "monitor.stop_on" in allowed


@pytest.mark.parametrize(
    "override, named",
    [
        ("monitor.basline_steps=3", "unknown key 'monitor.basline_steps' (did you mean 'baseline_steps'?)"),
        ("monitor.stop_on=[lenght]", "'monitor.stop_on[0]' must be one of length, repetition, canary, got 'lenght'"),
        ("monitor.length_ratio=1", "'monitor.length_ratio' must be > 1"),
        ("monitor.stop_on=length", "'monitor.stop_on' expects a list"),
        ("monitor.stop_on=[canray]", "'monitor.stop_on[0]' must be one of length, repetition, canary, got 'canray'"),
        ("monitor.canary=-1", "'monitor.canary' must be >= 0"),
        ("monitor.every=0", "'monitor.every' must be > 0"),
        ("monitor.canary=many", "'monitor.canary' expects"),
        ("monitor.canary_drop=-0.1", "'monitor.canary_drop' must be >= 0"),
    ],
)
def test_a_bad_monitor_key_is_one_line_naming_it_with_exit_code_2(override, named, capsys):
    assert main(["check", "tiny-shapes", override]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err, err


def fake_lengths(monkeypatch, lengths):
    """Each logging step's mean words from `lengths`, the other health metrics from the real captions: the
    tiny random model cannot be made to hack length on cue, so the drift is put in where it is measured."""
    real, values = vizer.grpo.caption_health, iter(lengths)

    def health(*args, **kwargs):
        out = real(*args, **kwargs)
        return {**out, "health/mean_words": next(values)} if out else out

    monkeypatch.setattr(vizer.grpo, "caption_health", health)


@pytest.mark.parametrize("stop_on", [[], ["length"]])
def test_length_drift_warns_in_a_real_run_and_stop_on_ends_it_at_a_checkpoint(tmp_path, monkeypatch, stop_on):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    fake_lengths(monkeypatch, itertools.chain([4.0, 4.0], itertools.repeat(12.0)))
    said = []
    monkeypatch.setattr("vizer.train.PartialState.print", lambda self, *a, **k: said.append(" ".join(map(str, a))))
    overrides = [*tiny_overrides("tiny-shapes"), "grpo.max_steps=6", "monitor.baseline_steps=2"]
    recipe = load_recipe("tiny-shapes", [*overrides, f"monitor.stop_on={json.dumps(stop_on)}"])
    adapter = train(recipe, tmp_path)

    warnings = [line for line in said if line.startswith("monitor:")]
    assert len(warnings) == 1 and warnings[0].startswith("monitor: length at step 3"), said  # (4 + 12) / 2 = 2x
    steps = [m["step"] for m in read_metrics(tmp_path) if "loss" in m]
    assert (adapter / "adapter_model.safetensors").is_file()
    if stop_on:
        assert steps == [1, 2, 3], "stops at the step that warned, not at max_steps"
        assert (tmp_path / "checkpoint-3" / "trainer_state.json").is_file(), "a checkpoint to resume from"
    else:
        assert steps == list(range(1, 7))


def test_the_well_behaved_tiny_recipe_logs_health_every_step_and_warns_of_nothing(tmp_path, monkeypatch):
    # Robust to the random model's noise: each comparison averages 5 logged steps (16 captions each) against
    # the first 5, and the margins (2x words, +0.2 repeated) are far beyond that noise (seeds 0-2 of this
    # recipe: at most 1.02x the baseline's words and +0.013 repeated).
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    said = []
    monkeypatch.setattr("vizer.train.PartialState.print", lambda self, *a, **k: said.append(" ".join(map(str, a))))
    train(load_recipe("tiny-shapes", ["grpo.log_completions=false"]), tmp_path)

    assert not [line for line in said if line.startswith("monitor:")], said
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in steps] == list(range(2, 21, 2))
    for row in steps:
        assert row["health/mean_words"] > 0 and 0 < row["health/distinct_1"] <= 1
        assert 0 <= row["health/repeated"] <= 1 and row["health/truncated"] > 0  # 12 tokens of a random model
        shares = [v for k, v in row.items() if k.startswith("health/reward_share/")]
        assert len(shares) == 5 and sum(shares) == pytest.approx(1.0)


def canary_rows(rewards, canary, judge=None, se=None):
    """A logging step's reward (with health) and, where given, a canary measurement logged before it (with the
    standard error of its change when `se` is given)."""
    out = []
    for i, reward in enumerate(rewards):
        if canary[i] is not None:
            row = {"canary/clip_s": canary[i], **({"canary/clip_s_judge": judge[i]} if judge else {})}
            out.append({**row, **({"canary/clip_s_se": se[i]} if se else {})})
        out.append({"health/mean_words": 4.0, "health/repeated": 0.0, "reward": reward})
    return out


def test_canary_warns_when_the_reward_rises_while_the_canary_score_falls():
    watch = HealthWatch(baseline_steps=2, canary_drop=0.05)
    # rows: canary 0.70, rewards 0.1 0.1 0.3, canary 0.60, reward 0.5. At the second canary row the reward's
    # last two steps, (0.1 + 0.3) / 2, are above the first two (0.1) and the canary is 0.10 down
    logs = canary_rows([0.1, 0.1, 0.3, 0.5], [0.70, None, None, 0.60])
    assert alerts(watch, logs) == [("canary", 5)]


def test_canary_follows_the_judge_when_there_is_one():
    # the scorer (trained against) keeps rising; the independent judge falls
    logs = canary_rows([0.1, 0.1, 0.3, 0.5], [0.70, None, None, 0.80], judge=[0.50, None, None, 0.40])
    assert alerts(HealthWatch(baseline_steps=2, canary_drop=0.05), logs) == [("canary", 5)]
    logs = canary_rows([0.1, 0.1, 0.3, 0.5], [0.70, None, None, 0.60], judge=[0.50, None, None, 0.55])
    assert alerts(HealthWatch(baseline_steps=2, canary_drop=0.05), logs) == []


@pytest.mark.parametrize(
    "rewards, canary",
    [
        ([0.1, 0.1, 0.3, 0.5], [0.70, None, None, 0.80]),  # both rise: learning, not hacking
        ([0.5, 0.5, 0.3, 0.1], [0.70, None, None, 0.60]),  # the reward falls too: not the hacking pattern
        ([0.1, 0.1, 0.3, 0.5], [0.70, None, None, 0.66]),  # a fall within the margin
    ],
)
def test_canary_does_not_warn_without_reward_up_and_canary_down_past_the_margin(rewards, canary):
    assert alerts(HealthWatch(baseline_steps=2, canary_drop=0.05), canary_rows(rewards, canary)) == []


@pytest.mark.parametrize("se, warns", [(0.04, True), (0.06, False)])
def test_a_canary_fall_within_twice_its_standard_error_is_noise(se, warns):
    # 0.10 down: past canary_drop 0.05, and past 2 x 0.04 = 0.08 but not 2 x 0.06 = 0.12
    logs = canary_rows([0.1, 0.1, 0.3, 0.5], [0.70, None, None, 0.60], se=[0.0, None, None, se])
    assert alerts(HealthWatch(baseline_steps=2, canary_drop=0.05), logs) == ([("canary", 5)] if warns else [])


def test_paired_standard_error_of_the_canary_change():
    assert paired_standard_error([]) == paired_standard_error([0.3]) == 0.0
    # every picture moved alike: nothing of it is chance
    assert paired_standard_error([0.1, 0.1, 0.1]) == pytest.approx(0.0, abs=1e-12)
    assert paired_standard_error([0.0, 0.2]) == pytest.approx(0.1)  # sd 0.1414 / sqrt(2)


def canary_run(tmp_path, monkeypatch, *overrides):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    base = [*tiny_overrides("tiny-shapes"), "grpo.max_steps=3", "grpo.log_completions=false"]
    train(load_recipe("tiny-shapes", [*base, *overrides]), tmp_path)
    return read_metrics(tmp_path)


def test_the_canary_captions_the_same_eval_images_at_step_0_and_every_n_steps(tmp_path, monkeypatch, capsys):
    metrics = canary_run(tmp_path, monkeypatch, "monitor.canary=2", "monitor.every=2", "eval.judge=tiny:siglip")
    assert "canary: 2 eval_data pictures, captioned at step 0 and every 2 steps" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "canary.jsonl").read_text().splitlines()]
    assert lines[0]["settings"]["eval.judge"] == "tiny:siglip", "what the scores depend on, for a rerun to compare"
    assert [line["step"] for line in lines] == [0, 2]
    assert [[im["image_id"] for im in line["images"]] for line in lines] == [
        ["shapes/validation/0", "shapes/validation/1"]
    ] * 2
    for image in (im for line in lines for im in line["images"]):
        assert isinstance(image["caption"], str) and image["clip_s"] >= 0 and image["clip_s_judge"] >= 0
    logged = [m for m in metrics if "canary/clip_s" in m]
    assert [m["step"] for m in logged] == [0, 2]
    for line, row in zip(lines, logged):  # the logged means are those of the recorded captions
        assert row["canary/clip_s"] == pytest.approx(sum(im["clip_s"] for im in line["images"]) / 2)
        assert row["canary/clip_s_judge"] == pytest.approx(sum(im["clip_s_judge"] for im in line["images"]) / 2)
    # the noise of the change is measured per picture, against the same picture at step 0
    changes = [now["clip_s"] - then["clip_s"] for now, then in zip(lines[1]["images"], lines[0]["images"])]
    assert [m["canary/clip_s_se"] for m in logged] == pytest.approx([0.0, paired_standard_error(changes)])
    # the page: each picture with its caption at each step
    page = (tmp_path / "canary.html").read_text()
    assert "<th>step 0</th><th>step 2</th>" in page and page.count('<img src="data:image/png;base64,') == 2
    for image in lines[1]["images"]:
        assert html.escape(image["caption"]) in page
    # a canary step keeps its own training log (logging the canary must not swallow it)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]


def test_the_canary_page_marks_a_caption_that_changed_since_the_previous_step():
    from vizer.eval.gallery import render_canary_page

    steps = [
        {"step": 0, "images": [{"image_id": "a", "caption": "a red square", "clip_s": 0.5}]},
        {"step": 50, "images": [{"image_id": "a", "caption": "a red square", "clip_s": 0.5}]},
        {"step": 100, "images": [{"image_id": "a", "caption": "a red square & a red square", "clip_s": 0.4}]},
    ]
    page = render_canary_page({"a": "data:image/png;base64,AAAA"}, steps, title="t")
    cells = page.split("<tr>")[-1].split("<td")[2:]  # after the image cell: steps 0, 50, 100
    assert [c.startswith(" class=changed") for c in cells] == [False, False, True]
    assert "a red square &amp; a red square" in page and "clip_s 0.4" in page


def test_canary_0_captions_nothing(tmp_path, monkeypatch):
    metrics = canary_run(tmp_path, monkeypatch, "monitor.canary=0", "monitor.every=1")
    assert not (tmp_path / "canary.jsonl").exists()
    assert not [k for m in metrics for k in m if k.startswith("canary/")]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]


def test_stop_on_canary_needs_a_canary_set(capsys):
    assert main(["check", "tiny-shapes", "monitor.stop_on=[canary]", "monitor.canary=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'monitor.stop_on' names canary, but there is no canary set" in err and "\n" not in err, err
    assert main(["check", "tiny-shapes", "monitor.stop_on=[canary]"]) == 0


@pytest.mark.parametrize("signal", ["length", "repetition", "canary"])
def test_stop_on_under_objective_vizer_is_refused_not_ignored(signal, capsys):
    # objective vizer logs no health/* and no reward: a stop_on signal there could never fire
    assert main(["check", "shapes-vizer-g", f"monitor.stop_on=[{signal}]"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"'monitor.stop_on' ({signal}) has nothing to watch under objective vizer" in err and "\n" not in err


def test_a_canary_larger_than_the_eval_set_says_how_many_it_measures(capsys):
    from vizer.train import announce_canary
    from vizer.watch.canary import canary_images

    recipe = load_recipe("tiny-shapes", ["monitor.canary=20", "eval_data.limit=3", "monitor.every=5"])
    items = canary_images(recipe)
    assert len(items) == 3
    announce_canary(len(items), recipe["monitor"], PartialState())
    said = capsys.readouterr().out
    assert (
        "canary: 3 eval_data pictures (monitor.canary asks for 20; eval_data has only 3), captioned at step 0" in said
    )


def canary_out(tmp_path, recipe: dict, with_settings: bool = True) -> None:
    """An OUT whose run has a checkpoint and a canary measured at step 0 under `recipe`."""
    from vizer.config import dump_recipe
    from vizer.run_dir import canary_settings

    (tmp_path / "checkpoint-2").mkdir()
    dump_recipe(recipe, tmp_path / "recipe.yaml")
    line = {"step": 0, "images": [{"image_id": "a", "caption": "x", "clip_s": 0.5}]}
    if with_settings:
        line["settings"] = canary_settings(recipe)
    (tmp_path / "canary.jsonl").write_text(json.dumps(line) + "\n")


@pytest.mark.parametrize("with_settings", [True, False])  # False: a canary.jsonl written before the settings were
@pytest.mark.parametrize(
    "change, named",
    [
        ("eval.scorer=tiny:siglip", "eval.scorer"),
        ("eval.judge=tiny:siglip", "eval.judge"),
        ("eval_data.seed=3", "eval_data"),
        ("monitor.canary=1", "pictures"),
    ],
)
def test_a_rerun_may_not_change_what_the_canary_scores_depend_on(tmp_path, change, named, with_settings):
    from vizer.run_dir import check_rerun

    recipe = load_recipe("tiny-shapes", ["monitor.canary=2"])
    canary_out(tmp_path, recipe, with_settings)
    with pytest.raises(RecipeError, match=rf"holds a canary measured since step 0 with other {named}: "):
        check_rerun(load_recipe("tiny-shapes", ["monitor.canary=2", change]), tmp_path)
    # without the canary, or with what does not change its scores, the run resumes
    assert check_rerun(load_recipe("tiny-shapes", [change, "monitor.canary=0"]), tmp_path)
    assert check_rerun(load_recipe("tiny-shapes", ["monitor.canary=2", "eval.batch_size=2"]), tmp_path)

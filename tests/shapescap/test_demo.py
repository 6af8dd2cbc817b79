"""The demo's before/after table judges each target from the measured numbers."""

import json
import sys

import pytest

from shapescap import demo
from shapescap.demo import summary_table


def seed_result(base: dict, tuned: dict) -> dict:
    return {"greedy": {"base": base, "tuned": tuned}, "sampled": {"base": base, "tuned": tuned}}


def row(table: str, metric: str, decoding: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {metric} | {decoding} |"))


def test_targets_are_met_or_missed_by_the_relative_change():
    base = {
        "shapes/object_recall": 0.5,
        "shapes/hallucination": 0.2,
        "shapes/duplicate_object": 0.05,
        "shapes/empty": 0.0,
    }
    good = {
        "shapes/object_recall": 0.7,
        "shapes/hallucination": 0.1,
        "shapes/duplicate_object": 0.05,
        "shapes/empty": 0.0,
    }
    weak = {
        "shapes/object_recall": 0.6,
        "shapes/hallucination": 0.19,
        "shapes/duplicate_object": 0.08,
        "shapes/empty": 0.0,
    }
    table = summary_table([seed_result(base, good), seed_result(base, good)])
    assert "+40%" in row(table, "shapes/object_recall", "greedy") and "met" in row(
        table, "shapes/object_recall", "greedy"
    )
    assert "met" in row(table, "shapes/hallucination", "sampled")
    assert "MISSED" not in table
    table = summary_table([seed_result(base, good), seed_result(base, weak)])
    recall = row(table, "shapes/object_recall", "greedy")
    assert "0.650 ± 0.071" in recall and "+30%" in recall
    assert "MISSED" in row(table, "shapes/duplicate_object", "greedy")


def test_all_six_targets_are_judged_in_the_plain_table():
    base = {
        "shapes/object_recall": 0.5,
        "shapes/hallucination": 0.2,
        "shapes/object_hallucination": 0.04,
        "shapes/duplicate_object": 0.04,
        "shapes/empty": 0.0,
    }
    wrongly_bound = {
        **base,
        "shapes/object_recall": 0.7,
        "shapes/hallucination": 0.1,
        "shapes/object_hallucination": 0.1,
    }
    table = summary_table([seed_result(base, wrongly_bound)])
    assert "MISSED" in row(table, "shapes/object_hallucination", "greedy")
    judged = [line for line in table.splitlines() if line.endswith(("met |", "MISSED |"))]
    assert len(judged) == 6, table


def test_a_base_that_is_not_weak_where_the_targets_look_is_flagged():
    weak = {"shapes/object_recall": 0.58, "shapes/hallucination": 0.27}
    greedy_complete = {"shapes/object_recall": 0.857, "shapes/hallucination": 0.27}
    careful_sampler = {"shapes/object_recall": 0.58, "shapes/hallucination": 0.2}
    assert demo.base_line([seed_result(weak, weak)] * 3).startswith("Base captioner weak")
    line = demo.base_line([seed_result(greedy_complete, weak)])
    assert line.startswith("WARNING") and "greedy object_recall 0.857, at most 0.65 asked" in line
    assert "sampled hallucination" not in line, "only the bound that fails is named"
    line = demo.base_line([seed_result(careful_sampler, careful_sampler)])
    assert "sampled hallucination 0.200, at least 0.25 asked" in line and "object_recall" not in line


def test_a_run_folder_of_another_recipe_is_refused_not_reused(tmp_path):
    import pytest
    import yaml

    from shapescap.demo import train_and_eval
    from vizer.config import RecipeError, load_recipe

    (tmp_path / "adapter").mkdir()
    (tmp_path / "checkpoint-120").mkdir()
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(load_recipe("shapes-grpo")))
    with pytest.raises(RecipeError, match="another recipe"):
        train_and_eval(tmp_path, [], recipe="shapes-phrases")


def test_ceiling_share_is_the_part_of_the_label_gain_reached():
    from shapescap.demo import ceiling_share, share_line

    assert ceiling_share(0.5, 0.8, 0.9) == pytest.approx(0.75)
    assert ceiling_share(0.5, 0.4, 0.9) == pytest.approx(-0.25)  # worse than the base: a negative share
    assert ceiling_share(0.5, 0.6, 0.5) is None  # a ceiling that gains nothing leaves no share to speak of
    seeds = [seed_result({"shapes/object_recall": 0.5}, {"shapes/object_recall": t}) for t in (0.7, 0.8)]
    ceiling = seed_result({"shapes/object_recall": 0.5}, {"shapes/object_recall": 0.9})
    line = share_line(seeds, ceiling)
    assert "0.62" in line and "base 0.500" in line and "zero-label 0.750" in line and "0.900" in line


def test_a_method_that_adds_a_reward_reads_the_rest_from_its_recipe():
    from shapescap.demo import ADD_REWARD, expand_overrides
    from vizer.config import load_recipe

    extra = [ADD_REWARD + "{name: phrase_grounding, weight: 0.3}", "grpo.beta=0.1"]
    overrides = expand_overrides("shapes-grpo", extra)
    recipe = load_recipe("shapes-grpo", overrides)
    own = load_recipe("shapes-grpo")["rewards"]
    assert recipe["rewards"][: len(own)] == own and recipe["rewards"][-1]["name"] == "phrase_grounding"
    assert recipe["grpo"]["beta"] == 0.1


def test_a_method_s_mapper_settings_reach_the_mapper_it_shares(tmp_path, monkeypatch):
    trained = {}

    def fake_train(recipe, folder):  # stage A is minutes of work; record what it would have been asked for
        trained[folder] = recipe["mapper"]
        folder.mkdir(parents=True)
        (folder / "mapper.json").write_text(
            json.dumps({"variant": "G", "hard_negatives": recipe["mapper"]["hard_negatives"]})
        )

    monkeypatch.setattr(demo, "train_recipe_mapper", fake_train)
    monkeypatch.setattr(demo, "resolve_model_id", lambda model_id: "/cache/shapes/captioner-v2.2")  # no build
    plain, plain_folder = demo.method_jobs("grpo-latent", tmp_path, [], [0, 1])
    hard, hard_folder = demo.method_jobs("grpo-latent-hn", tmp_path, [], [0, 1])
    again, _ = demo.method_jobs("grpo-latent", tmp_path, [], [2])
    assert plain_folder != hard_folder and len(trained) == 2  # the third call reuses the first mapper
    assert trained[hard_folder]["hard_negatives"] == 1.0 and trained[plain_folder]["hard_negatives"] == 0.0
    assert f"mapper.path={hard_folder}" in hard[1].overrides and "grpo.seed=1" in hard[1].overrides
    assert f"mapper.path={plain_folder}" in again[0].overrides
    assert [demo.mapper_label(f) for f in (plain_folder, hard_folder)] == ["G", "G with hard negatives"]
    assert demo.method_jobs("grpo", tmp_path, [], [0])[1] is None  # no mapper: none trained, none named


def test_a_run_folder_trained_on_another_build_of_the_base_is_refused(tmp_path, monkeypatch):
    # a new captioner version keeps the model id: only the record tells an old run from a new one
    from vizer.config import RecipeError

    monkeypatch.setattr(demo, "resolve_model_id", lambda model_id: "/cache/shapes/captioner-v2.2")
    fresh = tmp_path / "fresh"
    demo.check_base(fresh, "tiny:shapes-captioner")
    assert json.loads((fresh / demo.BASE_RECORD).read_text()) == {"base": "captioner-v2.2"}
    demo.check_base(fresh, "tiny:shapes-captioner")  # the same build: reused
    (fresh / demo.BASE_RECORD).write_text(json.dumps({"base": "captioner-v2.1"}))
    with pytest.raises(RecipeError, match="trained on captioner-v2.1, not on this checkout's captioner-v2.2"):
        demo.check_base(fresh, "tiny:shapes-captioner")
    unrecorded = tmp_path / "unrecorded"
    (unrecorded / "adapter").mkdir(parents=True)
    with pytest.raises(RecipeError, match="a build it did not record"):
        demo.check_base(unrecorded, "tiny:shapes-captioner")
    assert not (unrecorded / demo.BASE_RECORD).exists(), "a refused folder is left as it was"


def test_the_shared_mapper_of_another_base_build_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "resolve_model_id", lambda model_id: "/cache/shapes/captioner-v2.1")
    old = demo.mapper_folder("shapes-vizer-g", tmp_path, [])
    monkeypatch.setattr(demo, "resolve_model_id", lambda model_id: "/cache/shapes/captioner-v2.2")
    assert old is not None and demo.mapper_folder("shapes-vizer-g", tmp_path, []) != old


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_demo_worker_ends_when_the_demo_process_is_killed():
    import os
    import signal
    import subprocess
    import time

    # the demo's pool, a worker busy on a long job, then the demo alone killed (not its process group)
    script = (
        "import os, sys, time\n"
        "from shapescap.demo import _pool\n"
        "with _pool(1) as pool:\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 120).result()\n"
    )
    demo_process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(demo_process.stdout.readline())
    assert not _gone(worker)
    demo_process.send_signal(signal.SIGKILL)
    demo_process.wait()
    deadline = time.time() + 20
    while not _gone(worker) and time.time() < deadline:
        time.sleep(0.2)
    if not _gone(worker):
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker outlived the demo")

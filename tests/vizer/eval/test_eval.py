"""`vizer eval` and `vizer caption` end to end on a finished tiny run (offline, CPU)."""

import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from rewards.phrases import words as phrase_words
from shapescap.scenes import describe, render, shapes_scenes
from vizer.cli import main
from vizer.config import load_recipe
from vizer.eval.caption import Decoding
from vizer.eval.evaluate import cache_file
from vizer.eval.metrics import tokenize

REWARDS = ("grounding", "consistency", "length", "repetition", "degenerate")
SHAPES = (
    "colour_precision",
    "colour_recall",
    "shape_precision",
    "shape_recall",
    "object_recall",
    "hallucination",
    "colour_hallucination",
    "shape_hallucination",
    "object_hallucination",
    "exact_match",
    "duplicate_object",
    "empty",
)
TEXT = ("length_words", "distinct_1", "distinct_2", "vocab_size")
REFERENCE = ("cider_d", "bleu_4", "rouge_l", "refclip_s")
# the caption health training logs; agreement needs several captions per image (greedy gives one)
HEALTH = ("health/mean_words", "health/distinct_1", "health/distinct_2", "health/repeated")
EVERY_METRIC = {
    "clip_s",
    *TEXT,
    *REFERENCE,
    *HEALTH,
    *(f"reward/{r}" for r in REWARDS),
    *(f"health/reward_share/{r}" for r in REWARDS),
    *(f"shapes/{s}" for s in SHAPES),
}
MAY_BE_UNDEFINED = {"shapes/colour_precision", "shapes/shape_precision"}  # None when nothing is named


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    from vizer.train import train

    run = tmp_path_factory.mktemp("run")
    recipe = load_recipe(
        "tiny-shapes",
        [
            "grpo.max_steps=2",
            "data.limit=8",
            "grpo.save_steps=100",
            "eval_data.limit=6",
            "eval.max_new_tokens=8",
        ],
    )
    train(recipe, run)
    return run


@pytest.fixture(scope="session")
def evaluated(tiny_run) -> Path:
    assert main(["eval", str(tiny_run)]) == 0
    return tiny_run / "eval"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, ignore=shutil.ignore_patterns("checkpoint-*", "tensorboard"))
    return to


def write_images(folder: Path, n: int, references: int = 0) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    scenes = shapes_scenes("test", n)
    for i, scene in enumerate(scenes):
        render(scene).save(folder / f"img{i}.png")
    with (folder / "captions.jsonl").open("w") as f:
        for i in range(references):
            f.write(json.dumps({"image": f"img{i}.png", "captions": [describe(scenes[i])]}) + "\n")
    return scenes


def add_broken_images(folder: Path) -> None:
    (folder / "garbage.png").write_bytes(b"not an image at all")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(jpeg, format="JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])


def test_eval_writes_all_three_files_with_both_models_and_every_metric(evaluated):
    results = json.loads((evaluated / "results.json").read_text())
    assert results["dataset"].startswith("shapes/validation") and results["n_images"] == 6
    assert set(results["models"]) == {"base", "tuned"}
    for model, metrics in results["models"].items():
        assert set(metrics) == EVERY_METRIC, f"{model}: {set(metrics) ^ EVERY_METRIC}"
        for name, value in metrics.items():
            assert isinstance(value, float) or (value is None and name in MAY_BE_UNDEFINED), (model, name, value)
    assert results["skipped_images"] == 0 and results["n_with_references"] == 6
    assert any("not an independent judge" in n for n in results["notes"])  # scorer == training grounding model

    table = (evaluated / "results.md").read_text()
    assert "| metric | base | tuned | Δ |" in table
    for name in EVERY_METRIC:
        assert re.search(rf"^\| {re.escape(name)} \| \S+ \| \S+ \|", table, re.M), name
    assert "not an independent judge" in table

    # the numbers are the captions' own: length and emptiness recomputed from the cached captions
    for model in ("base", "tuned"):
        cache = next((evaluated / "cache").glob(f"{model}-*.jsonl"))
        captions = [json.loads(line)["captions"][0] for line in cache.read_text().splitlines()]
        assert len(captions) == 6
        words = [len(tokenize(c)) for c in captions]
        assert results["models"][model]["length_words"] == pytest.approx(sum(words) / 6)
        assert results["models"][model]["shapes/empty"] == pytest.approx(sum(not c.strip() for c in captions) / 6)
        health = results["models"][model]
        assert health["health/mean_words"] == pytest.approx(sum(len(phrase_words(c)) for c in captions) / 6)
        assert sum(v for k, v in health.items() if k.startswith("health/reward_share/")) == pytest.approx(1.0)

    page = (evaluated / "gallery.html").read_text()
    assert page.count("<tr data-scores=") == 6 and page.count("data:image/png;base64,") == 6
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)


def test_rerun_reads_the_caption_cache_and_loads_no_captioner(evaluated, tiny_run, monkeypatch):
    before = json.loads((evaluated / "results.json").read_text())
    caches = sorted((evaluated / "cache").glob("*.jsonl"))
    assert [p.name.split("-")[0] for p in caches] == ["base", "tuned"]
    assert all(len(p.read_text().splitlines()) == 6 for p in caches)

    import vizer.eval.evaluate

    def no_model(*args, **kwargs):
        raise AssertionError("a cached re-run must not load the captioner")

    monkeypatch.setattr(vizer.eval.evaluate, "load_with_adapter", no_model)
    assert main(["eval", str(tiny_run)]) == 0
    assert json.loads((evaluated / "results.json").read_text())["models"] == before["models"]


def test_cache_key_follows_the_settings_that_change_captions(tmp_path):
    greedy = Decoding(max_new_tokens=8)
    assert greedy.cache_key() == Decoding(max_new_tokens=8, batch_size=2, temperature=0.3, seed=5).cache_key()
    assert greedy.cache_key() != Decoding(max_new_tokens=9).cache_key()
    assert Decoding(do_sample=True, seed=1).cache_key() != Decoding(do_sample=True, seed=2).cache_key()
    ident = {"decoding": greedy.cache_key(), "weights": "base"}
    assert cache_file(tmp_path, "base", ident) == cache_file(tmp_path, "base", dict(ident))
    assert cache_file(tmp_path, "tuned", {**ident, "weights": "abc"}) != cache_file(tmp_path, "tuned", ident)


def test_image_folder_with_corrupt_files_is_evaluated_and_they_are_counted(tiny_run, tmp_path):
    run = copy_run(tiny_run, tmp_path / "run")
    folder = tmp_path / "images"
    write_images(folder, 3, references=2)
    add_broken_images(folder)
    assert main(["eval", str(run), "--images", str(folder)]) == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["n_images"] == 3 and results["skipped_images"] == 2 and results["n_with_references"] == 2
    assert results["dataset"] == f"folder:{folder}"
    for metrics in results["models"].values():
        assert {"clip_s", "cider_d", "bleu_4", "rouge_l", "refclip_s"} <= set(metrics)
        assert not any(k.startswith("shapes/") for k in metrics)  # no known scene content in a folder
    assert "2 unreadable image(s) skipped" in results["notes"]
    assert "reference metrics use the 2 of 3 images that have references" in results["notes"]
    assert (run / "eval" / "gallery.html").read_text().count("<tr data-scores=") == 3


def test_hub_dataset_with_sampling_and_a_second_judge(tiny_run, tmp_path):
    """A local parquet dataset goes through the hub source; sampled captions and a judge on top."""
    from datasets import Dataset
    from datasets import Image as ImageFeature

    run = copy_run(tiny_run, tmp_path / "run")
    scenes = shapes_scenes("test", 2)
    data = Dataset.from_dict(
        {"img": [render(s) for s in scenes], "caps": [[describe(s), "shapes"] for s in scenes], "key": ["k0", "k1"]}
    ).cast_column("img", ImageFeature())
    (tmp_path / "hub" / "data").mkdir(parents=True)
    data.to_parquet(str(tmp_path / "hub" / "data" / "validation-00000-of-00001.parquet"))
    overrides = [
        "eval_data.source=hub",
        f"eval_data.id={tmp_path / 'hub'}",
        "eval_data.split=validation",
        "eval_data.image_column=img",
        "eval_data.captions_column=caps",
        "eval_data.id_column=key",
        "eval.judge=tiny:siglip",
        "eval.do_sample=true",
        "eval.num_samples=2",
    ]
    assert main(["eval", str(run), *overrides]) == 0
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["n_images"] == 2 and results["n_with_references"] == 2
    assert results["settings"]["num_samples"] == 2 and results["settings"]["judge"] == "tiny:siglip"
    for metrics in results["models"].values():
        assert {"clip_s", "clip_s_judge", "refclip_s", "refclip_s_judge", "cider_d"} <= set(metrics)
        assert 0 <= metrics["health/agreement"] <= 1, "two samples per image: their agreement is measured"
    sampled = [p for p in (run / "eval" / "cache").glob("*.jsonl") if "k0@" in p.read_text()]
    assert len(sampled) == 2
    for path in sampled:
        assert all(len(json.loads(line)["captions"]) == 2 for line in path.read_text().splitlines())
    assert not any("consistency compares" in n for n in results["notes"])


def test_caption_command_writes_captions_jsonl(tiny_run, tmp_path):
    folder = tmp_path / "images"
    write_images(folder, 2)
    add_broken_images(folder)
    out = tmp_path / "out" / "captions.jsonl"
    assert main(["caption", "--adapter", str(tiny_run / "adapter"), "--images", str(folder), "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in records] == ["img0.png", "img1.png"]
    assert all(isinstance(r["caption"], str) for r in records)

    # an adapter on its own: the base model comes from adapter_config.json
    alone = shutil.copytree(tiny_run / "adapter", tmp_path / "alone" / "adapter")
    assert main(["caption", "--adapter", str(alone), "--images", str(folder)]) == 0
    assert len((tmp_path / "alone" / "captions.jsonl").read_text().splitlines()) == 2

    # never over a folder's reference captions
    assert (
        main(["caption", "--adapter", str(alone), "--images", str(folder), "--out", str(folder / "captions.jsonl")])
        == 2
    )


def test_user_errors_exit_with_code_2(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tmp_path)]) == 2
    assert main(["eval", str(tiny_run), "--images", str(tmp_path / "missing")]) == 2
    assert main(["eval", str(tiny_run), "--limit", "0"]) == 2
    assert main(["eval", str(tiny_run), "eval.max_new_token=3"]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.png").write_bytes(b"nope")
    assert main(["eval", str(tiny_run), "--images", str(empty)]) == 2
    assert main(["caption", "--adapter", str(tmp_path / "none"), "--images", str(empty)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 6 and all("\n" not in e for e in errors)


def test_a_phrase_grounding_scorer_is_not_an_independent_judge_either():
    from vizer.eval.evaluate import training_scorers
    from vizer.model_ids import resolve_model_id

    recipe = {"rewards": [{"name": "phrase_grounding", "model": "tiny:clip"}, {"name": "length"}]}
    assert training_scorers(recipe) == {resolve_model_id("tiny:clip")}

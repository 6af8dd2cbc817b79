"""The label ceiling (`python -m shapescap.ceiling`): it trains, and it grades the captions it gets right."""

import pytest

from shapescap import captioner as sc
from shapescap import ceiling
from shapescap.scenes import describe, describe_objects, shapes_scenes
from tests.shapescap.test_shapes_captioner import TINY_BUDGET


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory):
    return sc.build_shapes_captioner(tmp_path_factory.mktemp("cache"), **TINY_BUDGET)


def test_training_on_the_true_captions_moves_the_adapter_and_lowers_the_loss(tiny_captioner):
    model, processor = sc.load_captioner(tiny_captioner)
    tuned, losses = ceiling.train_on_true_captions(model, processor, steps=60, scenes=8, batch=8, lr=3e-2)
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < min(losses[:10])  # it learns the eight captions: below any early batch
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: every one was trained
    assert not any(p.requires_grad for n, p in tuned.named_parameters() if "lora_" not in n)


def scripted(monkeypatch, *caption_sets):
    """Make the captioner say the given captions, one set per call of generate_captions, and train nothing."""
    calls = iter(caption_sets)
    monkeypatch.setattr(ceiling, "generate_captions", lambda model, processor, images: next(calls)(len(images)))
    monkeypatch.setattr(ceiling, "train_on_true_captions", lambda model, processor, **kw: (model, [1.0, 0.5]))


def test_report_grades_the_captions_of_the_test_scenes(monkeypatch, tiny_captioner):
    scenes = shapes_scenes("test", 30)
    first_only = lambda n: [describe_objects(s.objects[:1]) for s in scenes[:n]]  # noqa: E731
    truth = lambda n: [describe(s) for s in scenes[:n]]  # noqa: E731
    scripted(monkeypatch, first_only, truth)
    report = ceiling.ceiling_report(tiny_captioner, test_scenes=30)
    n_objects = sum(len(s.objects) for s in scenes)
    assert report["base"]["shapes/object_recall"] == pytest.approx(30 / n_objects)
    assert report["ceiling"]["shapes/object_recall"] == 1.0
    assert report["ceiling"]["shapes/duplicate_object"] == 0.0 and report["ceiling"]["shapes/hallucination"] == 0.0
    assert all(report["met"].values())
    assert "| shapes/object_recall |" in ceiling.report_table(report, "ceiling") and "✓" in ceiling.report_table(
        report, "ceiling"
    )


def test_a_ceiling_that_repeats_an_object_misses_its_target(monkeypatch, tiny_captioner):
    scenes = shapes_scenes("test", 30)
    truth = lambda n: [describe(s) for s in scenes[:n]]  # noqa: E731
    repeats = lambda n: [describe(s) + " and " + describe_objects(s.objects[:1]) for s in scenes[:n]]  # noqa: E731
    scripted(monkeypatch, truth, repeats)
    report = ceiling.ceiling_report(tiny_captioner, test_scenes=30)
    assert report["ceiling"]["shapes/duplicate_object"] == 1.0
    assert report["met"] == {
        "shapes/object_recall": True,
        "shapes/hallucination": True,
        "shapes/object_hallucination": True,
        "shapes/duplicate_object": False,
    }


def test_bad_arguments_fail_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        ceiling.main(["--steps", "0"])
    assert exit_.value.code == 2 and "must be a positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ceiling.main(["--captioner", "/nonexistent/folder"])
    assert "no model folder" in capsys.readouterr().err

"""Image sources give TRL's vision rows: conversational prompt, image, image_id."""

import pytest
from datasets import Dataset
from PIL import Image

from data import build_dataset
from shapescap.scenes import SPLITS, Scene, describe, make_scene, render, scene_seed, shapes_scenes
from vizer.config import RecipeError, check_data

PROMPT = "Describe this image."


def data_cfg(**kw) -> dict:
    return check_data(kw)


def assert_vision_row(row: dict) -> None:
    assert row["prompt"][0]["content"][0]["type"] == "image"
    assert row["prompt"][0]["content"][1]["text"] == PROMPT
    assert isinstance(row["image"], Image.Image) and isinstance(row["image_id"], str)


def test_shapes_are_deterministic_and_splits_disjoint():
    assert [s.to_json() for s in shapes_scenes("train", 20)] == [s.to_json() for s in shapes_scenes("train", 20)]
    seeds = {split: {scene_seed(split, i) for i in range(2000)} for split in SPLITS}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not seeds[a] & seeds[b]
    assert list(render(make_scene(7)).getdata()) == list(render(make_scene(7)).getdata())


def test_shapes_scene_content_is_known_and_round_trips():
    for scene in shapes_scenes("test", 50):
        assert 1 <= len(scene.objects) <= 3
        assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
        assert Scene.from_json(scene.to_json()) == scene
        assert describe(scene).count(" and ") == (1 if len(scene.objects) > 1 else 0)


def test_shapes_rows_carry_truth_and_group_id():
    ds = build_dataset(data_cfg(source="shapes", split="validation", limit=5), PROMPT)
    assert len(ds) == 5 and len(set(ds["image_id"])) == 5
    assert_vision_row(ds[0])
    assert Scene.from_json(ds[0]["truth"]).objects
    assert "references" not in ds.column_names  # zero-label: training rows carry no captions


def test_unknown_shapes_split_is_a_recipe_error():
    with pytest.raises(RecipeError, match="data.split"):
        build_dataset(data_cfg(source="shapes", split="dev", limit=2), PROMPT)


def test_folder_is_recursive_and_skips_unreadable_images(tmp_path, capsys):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(tmp_path / "one.png")
    Image.new("RGBA", (16, 16), "blue").save(tmp_path / "a" / "b" / "two.png")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not an image")
    (tmp_path / "notes.txt").write_text("ignored")
    ds = build_dataset(data_cfg(source="folder", path=str(tmp_path)), PROMPT)
    assert sorted(ds["image_id"]) == ["a/b/two.png", "one.png"]
    assert_vision_row(ds[0])
    assert "skipped 1 unreadable image" in capsys.readouterr().out


def test_folder_references_from_captions_jsonl(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "one.png")
    (tmp_path / "captions.jsonl").write_text('{"image": "one.png", "captions": ["a red square"]}\n')
    ds = build_dataset(data_cfg(source="folder", path=str(tmp_path)), PROMPT, with_references=True)
    assert ds[0]["references"] == ["a red square"]


@pytest.fixture(scope="module")
def local_hub_dataset(tmp_path_factory):
    """A parquet dataset folder: load_dataset reads it exactly like a hub repository."""
    folder = tmp_path_factory.mktemp("hubds")
    images = [render(s) for s in shapes_scenes("validation", 6)]
    ds = Dataset.from_dict({"img": images, "caption": [f"c{i}" for i in range(6)]})
    from datasets import Image as ImageFeature

    ds.cast_column("img", ImageFeature()).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    return str(folder)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_streams_or_loads_with_limit(local_hub_dataset, streaming):
    cfg = data_cfg(source="hub", id=local_hub_dataset, image_column="img", streaming=streaming, limit=4)
    rows = list(build_dataset(cfg, PROMPT))
    assert len(rows) == 4 and len({r["image_id"] for r in rows}) == 4
    assert_vision_row(rows[0])
    assert set(rows[0]) == {"prompt", "image", "image_id"}


def test_hub_source_missing_column_names_it(local_hub_dataset):
    cfg = data_cfg(source="hub", id=local_hub_dataset, image_column="image")
    with pytest.raises(RecipeError, match=r"data.image_column': column 'image' not in .*columns: img, caption"):
        build_dataset(cfg, PROMPT)


def test_hub_source_unknown_dataset_is_one_line():
    cfg = data_cfg(source="hub", id="no-such-user/no-such-dataset")
    with pytest.raises(RecipeError, match="cannot load no-such-user/no-such-dataset") as err:
        build_dataset(cfg, PROMPT)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_source_skips_a_corrupt_image(tmp_path, streaming):
    import io as _io

    from datasets import Features, Value
    from datasets import Image as ImageFeature

    good = _io.BytesIO()
    render(make_scene(1)).save(good, format="PNG")
    images = [
        {"bytes": good.getvalue(), "path": None},
        {"bytes": b"not a png", "path": None},
        {"bytes": good.getvalue(), "path": None},
    ]
    features = Features({"image": ImageFeature(), "n": Value("int64")})
    Dataset.from_dict({"image": images, "n": [0, 1, 2]}, features=features).to_parquet(str(tmp_path / "train.parquet"))
    rows = list(build_dataset(data_cfg(source="hub", id=str(tmp_path), streaming=streaming), PROMPT))
    assert len(rows) == 2 and all(isinstance(r["image"], Image.Image) for r in rows)


def test_folder_skips_a_truncated_image_that_passes_a_header_check(tmp_path, capsys):
    import io as _io

    Image.new("RGB", (16, 16), "red").save(tmp_path / "good.png")
    whole = _io.BytesIO()
    render(make_scene(3)).save(whole, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    ds = build_dataset(data_cfg(source="folder", path=str(tmp_path)), PROMPT)
    assert ds["image_id"] == ["good.png"]
    assert "skipped 1 unreadable image" in capsys.readouterr().out

"""Model ids: the one place `tiny:`, bundled, local and hub ids are resolved and checked."""

import os

import pytest

from data.errors import ConfigError
from vizer import model_ids, tiny


def test_tiny_ids_build_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("VIZER_CACHE", str(tmp_path))
    assert model_ids.resolve_model_id("tiny:clip") == str(tmp_path / "tiny" / f"clip-{tiny.VERSION}")
    assert (tmp_path / "tiny" / f"clip-{tiny.VERSION}" / "config.json").is_file()


def test_hub_ids_and_folders_pass_through():
    for model_id in ("HuggingFaceTB/SmolVLM-256M-Instruct", "Qwen/Qwen2-VL-2B-Instruct", "/some/local/dir"):
        assert model_ids.resolve_model_id(model_id) == model_id
    assert model_ids.resolve_model_id("~/models/x") == os.path.expanduser("~/models/x")


def test_bundled_minilm_resolves_to_the_shipped_weights():
    path = model_ids.resolve_model_id("sentence-transformers/all-MiniLM-L6-v2")
    assert path != "sentence-transformers/all-MiniLM-L6-v2" and os.path.isfile(os.path.join(path, "config.json"))


def test_plugin_models_are_known_once_registered():
    # tests/conftest.py imports shapescap, which registers its trained parts
    assert {"tiny:shapes-clip", "tiny:shapes-judge", "tiny:shapes-captioner"} <= set(model_ids.known_ids())
    assert {f"tiny:{k}" for k in tiny.KINDS} <= set(model_ids.known_ids())


def test_unknown_ids_fail_with_one_line_naming_the_key(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^'model.id': unknown local model 'tiny:idefics' \(did you mean 'tiny:idefics3'\?\)"
    ):
        model_ids.check_model_id("tiny:idefics", "model.id")
    with pytest.raises(ConfigError, match=r"^'rewards\[0\].model': model folder not found: ./nowhere$"):
        model_ids.check_model_id("./nowhere", "rewards[0].model")
    (tmp_path / "config.json").write_text("{}")
    model_ids.check_model_id(str(tmp_path), "model.id")  # an existing model folder is fine
    model_ids.check_model_id("org/some-hub-model", "model.id")  # hub ids are checked when loaded


def test_reward_entries_get_their_model_resolved_with_the_plugin_default():
    consistency = model_ids.resolve_reward_entry({"name": "consistency", "weight": 0.5})
    assert consistency["model"] == model_ids.resolve_model_id("sentence-transformers/all-MiniLM-L6-v2")
    assert consistency["weight"] == 0.5
    grounding = model_ids.resolve_reward_entry({"name": "grounding", "model": "tiny:siglip"})
    assert grounding["model"] == model_ids.resolve_model_id("tiny:siglip")
    assert model_ids.resolve_reward_entry({"name": "length"}) == {"name": "length"}  # takes no model

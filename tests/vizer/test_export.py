"""`vizer merge` and `vizer push` on a tiny trained run (offline, CPU; the hub is faked)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_train import tiny_overrides
from transformers import AutoModelForImageTextToText, AutoProcessor

from shapescap.scenes import render, shapes_scenes
from vizer import export
from vizer.cli import main
from vizer.config import load_recipe
from vizer.eval.caption import Decoding, generate_captions, model_for_adapter
from vizer.export import model_card
from vizer.models import LoadedModel, load_with_adapter
from vizer.train import train

REPO = "someone/tiny-captions"
EVAL_MD = """# Evaluation: outputs/tiny

dataset: shapes validation · images: 4 · skipped: 0

| metric | base | tuned | Δ |
|---|---:|---:|---:|
| clip_s | 1.5 | 1.75 | +0.25 |
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """tiny-shapes trained for 2 steps at a high learning rate, so the adapter visibly moves the model."""
    out = tmp_path_factory.mktemp("export") / "run"
    overrides = [*tiny_overrides("tiny-shapes"), "grpo.learning_rate=5.0e-2", "grpo.save_steps=1"]
    train(load_recipe("tiny-shapes", overrides), out)
    return out


@pytest.fixture(scope="module")
def merged(run) -> Path:
    assert main(["merge", str(run)]) == 0
    return run / "merged"


@pytest.fixture
def run_copy(run, tmp_path) -> Path:
    """A private copy for tests that write into the run directory."""
    return Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("merged")))


@pytest.fixture(scope="module")
def images() -> list:
    return [render(scene) for scene in shapes_scenes("validation", 4)]


def logits(loaded: LoadedModel, image) -> torch.Tensor:
    text = loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        add_generation_prompt=True,
    )
    inputs = loaded.processor(text=[text], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**inputs).logits


# ---------------------------------------------------------------------------------------------- merge
def test_merged_model_captions_like_the_adapter_and_unlike_the_base(run, merged, images):
    # Fails if merge saves the base without the adapter (e.g. unload() for merge_and_unload()): logits equal
    # the base's; or saves the unmerged PEFT model: the folder does not load as a plain model.
    model_cfg, prompt, _ = model_for_adapter(run / "adapter")
    adapter = load_with_adapter(model_cfg, str(run / "adapter"))
    base = load_with_adapter(model_cfg, None)
    model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    processor = AutoProcessor.from_pretrained(merged)
    assert not any("lora" in name for name, _ in model.named_parameters())
    plain = LoadedModel(model=model, processor=processor, family=adapter.family, path=str(merged))

    decoding = Decoding(max_new_tokens=8, batch_size=4)
    assert generate_captions(plain, images, prompt, decoding) == generate_captions(adapter, images, prompt, decoding)
    for image in images[:2]:
        merged_logits = logits(plain, image)
        torch.testing.assert_close(merged_logits, logits(adapter, image), atol=1e-4, rtol=1e-4)
        assert (merged_logits - logits(base, image)).abs().max() > 1e-2, "the merged model is the base model"


def test_merge_of_a_qlora_run_merges_into_the_full_precision_base(run, merged, tmp_path, capsys):
    # Fails if the recipe's quantization is kept when loading the base: 4-bit weights are saved instead.
    qlora = Path(shutil.copytree(run, tmp_path / "qlora", ignore=shutil.ignore_patterns("merged")))
    recipe = yaml.safe_load((qlora / "recipe.yaml").read_text())
    recipe["model"]["quantization"] = "4bit"
    (qlora / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    assert main(["merge", str(qlora), "--out", str(tmp_path / "out")]) == 0
    assert "unquantized" in capsys.readouterr().out
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(merged / "model.safetensors")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == torch.float32 and torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("layout", ["missing", "no-adapter", "empty-adapter"])
def test_merge_of_a_missing_or_unfinished_run_is_one_line_naming_it(run, tmp_path, capsys, layout):
    # Fails if a missing piece reaches from_pretrained (a traceback) or the message drops the path.
    target = tmp_path / "run"
    if layout != "missing":
        target.mkdir()
        shutil.copy(run / "recipe.yaml", target / "recipe.yaml")
    if layout == "empty-adapter":
        (target / "adapter").mkdir()
    assert main(["merge", str(target)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: merge:") and str(target) in err and "\n" not in err


def test_merge_never_replaces_a_folder_it_did_not_write(run_copy, tmp_path, capsys):
    # Fails if the old folder at --out is deleted without checking whose it is.
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    assert main(["merge", str(run_copy), "--out", str(precious)]) == 2
    assert "was not written by `vizer merge`" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_merge_never_removes_a_partial_folder_it_did_not_create(run_copy, tmp_path, capsys):
    # Fails if OUT.partial is cleared without checking whose it is (the user's folder of that name is lost).
    out = tmp_path / "X"
    mine = tmp_path / "X.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main(["merge", str(run_copy), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: merge:") and str(mine) in err and "\n" not in err
    assert (mine / "notes.txt").read_text() == "keep me" and not out.exists()
    shutil.rmtree(mine)  # a partial folder left by an interrupted merge is merge's own: cleared and redone
    mine.mkdir()
    (mine / export.MERGE_STARTED).write_text("x")
    assert main(["merge", str(run_copy), "--out", str(out)]) == 0
    assert export.is_current_merge(out, run_copy / "adapter") and not mine.exists()


def test_a_merge_killed_while_replacing_the_old_one_never_leaves_a_current_looking_half(run_copy, monkeypatch):
    # Fails if the old folder is deleted in place before the new one is moved in: a kill mid-delete leaves
    # config files without weights, which still count as current (and `push --merged` would upload them).
    out = export.merge(run_copy)
    adapter = run_copy / "adapter"
    real_remove = export._remove_ours

    def killed_midway(path):
        if not (Path(path) / "config.json").is_file():  # not a merged model: removed as usual
            return real_remove(path)
        for name in ("model.safetensors", "tokenizer.json"):
            (Path(path) / name).unlink(missing_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "_remove_ours", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        export.merge(run_copy)
    monkeypatch.setattr(export, "_remove_ours", real_remove)
    if export.is_current_merge(out, adapter):
        assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    # a folder missing any file its merge wrote is not current, whatever else it holds
    export.merge(run_copy)
    assert export.is_current_merge(out, adapter)
    (out / "tokenizer.json").unlink()
    assert not export.is_current_merge(out, adapter)
    assert export.merge(run_copy) == out and export.is_current_merge(out, adapter)


def test_a_merge_killed_while_removing_the_old_one_recognises_its_leftover(run_copy, monkeypatch):
    # Fails if the leftover of a removal cut short (merged_from.json already gone) is refused ever after as
    # "not written by vizer merge".
    out = export.merge(run_copy)
    replaced = out.with_name("merged.replaced")
    shutil.copytree(out, replaced, ignore=shutil.ignore_patterns(export.MERGE_INFO, "model.safetensors"))
    assert export.merge(run_copy) == out and not replaced.exists()

    real_unlink, removed = Path.unlink, []

    def killed_after_two_files(path, *args, **kwargs):  # SIGKILL while the old folder is being removed
        if path.parent == replaced:
            removed.append(path.name)
            if len(removed) > 2:
                raise KeyboardInterrupt
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", killed_after_two_files)
    with pytest.raises(KeyboardInterrupt):
        export.merge(run_copy)
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert (replaced / export.MERGE_INFO).is_file(), "its marker goes last"
    assert export.merge(run_copy) == out and not replaced.exists()
    assert export.is_current_merge(out, run_copy / "adapter")


def test_an_adapter_replaced_while_merging_is_never_recorded_as_merged(run_copy, monkeypatch, capsys):
    # Fails if the fingerprint is taken after the model was loaded: a training run that saves a new adapter
    # meanwhile makes a merge of the old weights count as current for the new ones.
    import vizer.models

    weights_file = run_copy / "adapter" / "adapter_model.safetensors"
    real_load = vizer.models.load_with_adapter

    def load_then_training_saves(model_cfg, adapter_dir):
        loaded = real_load(model_cfg, adapter_dir)
        save_file({k: v * 2 for k, v in load_file(weights_file).items()}, weights_file)
        return loaded

    monkeypatch.setattr(vizer.models, "load_with_adapter", load_then_training_saves)
    assert main(["merge", str(run_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "changed while merging" in err.splitlines()[-1] and "Traceback" not in err
    assert not export.is_current_merge(run_copy / "merged", run_copy / "adapter")
    assert not (run_copy / "merged.partial").exists()


@pytest.mark.parametrize("fault", ["truncated", "another-base", "no-weights"])
@pytest.mark.parametrize("command", ["merge", "eval"])
def test_an_adapter_that_cannot_load_is_one_line(run_copy, capsys, fault, command):
    # Fails if a cut-short weights file, an adapter of another base model or a weightless adapter folder
    # reaches PEFT (a safetensors, PEFT or hub-id validation traceback).
    weights_file = run_copy / "adapter" / "adapter_model.safetensors"
    if fault == "truncated":
        with weights_file.open("r+b") as f:
            f.truncate(weights_file.stat().st_size - 100)
    elif fault == "no-weights":
        weights_file.unlink()
        (run_copy / "adapter" / "adapter_model.bin").write_bytes(b"")  # a zero-byte file is no weights either
    else:
        recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text())
        recipe["model"].update(id="tiny:qwen2_vl", processor={})
        (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main([command, str(run_copy), *(["--limit", "2"] if command == "eval" else [])]) == 2
    err = capsys.readouterr().err.strip()  # progress bars of the model load may come first
    line = err.splitlines()[-1]
    assert line.startswith("error: ") and "adapter" in line and "Traceback" not in err, err
    assert {"truncated": "cut short", "another-base": "does not fit the base model tiny:qwen2_vl"}.get(
        fault, ""
    ) in line
    assert not (run_copy / "merged").exists()


# ---------------------------------------------------------------------------------------------- model card
def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_model_card_names_base_rewards_steps_and_eval_table(run_copy):
    # Fails if a reward or weight, the step count or the eval table is dropped from the card.
    (run_copy / "eval").mkdir()
    (run_copy / "eval" / "results.md").write_text(EVAL_MD)
    card = model_card(run_copy, merged=False, repo=REPO)

    meta = front_matter(card)
    assert meta["library_name"] == "peft"
    assert {"vision-language", "image-captioning", "grpo", "trl"} <= set(meta["tags"])
    assert "base_model" not in meta  # tiny:idefics3 is not a hub id
    assert "`tiny:idefics3`" in card and "tiny-shapes" in card
    for reward, weight in [("grounding", 1.0), ("consistency", 0.5), ("length", 0.2), ("degenerate", 1.0)]:
        assert f"| {reward} | {weight} |" in card
    assert "steps trained: 2 of 2 planned" in card
    assert "source `shapes`, split `train`, limit `8`" in card
    assert "- hardware: device: CPU" in card and "processes: 1" in card  # from the run's hardware.json
    assert "| clip_s | 1.5 | 1.75 | +0.25 |" in card and "outputs/tiny" not in card
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in card


def test_model_card_without_eval_says_how_to_make_one_and_names_a_hub_base(run_copy):
    # Fails if base_model is left out for a hub id, or the card claims an evaluation that does not exist.
    recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text())
    recipe["model"]["id"] = "HuggingFaceTB/SmolVLM-Base"
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    card = model_card(run_copy, merged=True, repo=REPO)
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolVLM-Base" and meta["library_name"] == "transformers"
    assert "make eval RUN=" in card and "| metric |" not in card
    assert f'AutoModelForImageTextToText.from_pretrained("{REPO}")' in card


# ---------------------------------------------------------------------------------------------- push
@pytest.fixture
def hub(monkeypatch) -> dict:
    """Fake HfApi: records create_repo's arguments and what upload_folder would send."""
    import huggingface_hub

    calls: dict = {}
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = {"repo_id": repo_id, **kwargs}
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)  # a staging folder that is gone after the call: read it now
        calls["upload"] = {
            "repo_id": repo_id,
            "files": sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()),
            "readme": (folder / "README.md").read_text(),
        }

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_adapter_with_its_card(run_copy, hub):
    # Fails if the upload sends PEFT's boilerplate README, skips the weights, or changes the run directory.
    before = sorted(p.relative_to(run_copy) for p in run_copy.rglob("*"))
    assert main(["push", str(run_copy), "--repo", REPO]) == 0

    assert hub["create_repo"]["repo_id"] == REPO and hub["create_repo"]["exist_ok"] is True
    assert hub["create_repo"]["private"] is False
    files = hub["upload"]["files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= set(files)
    assert "training_args.bin" not in files
    assert hub["upload"]["readme"] == model_card(run_copy, merged=False, repo=REPO)
    assert sorted(p.relative_to(run_copy) for p in run_copy.rglob("*")) == before


def test_push_merged_builds_the_merged_model_once_and_again_when_the_adapter_changes(run_copy, hub, capsys):
    # Fails if --merged uploads the adapter, never builds RUN/merged, or pushes a merge of older weights.
    assert main(["push", str(run_copy), "--repo", REPO, "--merged", "--private"]) == 0
    assert "merging first" in capsys.readouterr().out
    assert (run_copy / "merged" / "config.json").is_file()
    assert {"model.safetensors", "config.json", "README.md"} <= set(hub["upload"]["files"])
    assert "adapter_model.safetensors" not in hub["upload"]["files"]
    assert front_matter(hub["upload"]["readme"])["library_name"] == "transformers"
    assert hub["create_repo"]["private"] is True

    assert main(["push", str(run_copy), "--repo", REPO, "--merged"]) == 0
    assert "merging first" not in capsys.readouterr().out  # up to date: reused

    weights_file = run_copy / "adapter" / "adapter_model.safetensors"
    weights = load_file(weights_file)
    save_file({k: v * 2 for k, v in weights.items()}, weights_file)
    assert main(["push", str(run_copy), "--repo", REPO, "--merged"]) == 0
    assert "merging first" in capsys.readouterr().out


def test_push_without_a_token_is_one_line_before_any_work(run_copy, hub, monkeypatch, capsys):
    # Fails if the missing token surfaces as the hub's traceback (or only after a merge).
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(["push", str(run_copy), "--repo", REPO, "--merged"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: push: no Hugging Face token") and "\n" not in err
    assert not (run_copy / "merged").exists() and "create_repo" not in hub


def test_push_hub_error_is_one_line(run_copy, hub, monkeypatch, capsys):
    # Fails if an HTTP error from the hub escapes as a traceback.
    import sys

    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, Response

    http = sys.modules[Response.__module__.split(".")[0]]  # the hub's HTTP client, whichever it is
    request = http.Request("POST", "https://huggingface.co/api/repos/create")

    def refuse(self, repo_id, **kwargs):
        message = "403 Forbidden: you cannot write to this namespace"
        raise HfHubHTTPError(message, response=Response(403, request=request))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    assert main(["push", str(run_copy), "--repo", REPO]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: push: {REPO}: 403 Forbidden") and "hf auth login" in err and "\n" not in err
    assert not list(run_copy.glob(".push-*")), "the staging folder is removed"


def test_a_qwen2_vl_merge_captions_like_its_adapter(tmp_path, images):
    # Qwen2-VL: M-RoPE positions and an image processor loaded without torchvision, through the merged folder
    out = tmp_path / "qwen"
    overrides = [*tiny_overrides("qwen2vl-openimages"), "grpo.learning_rate=5.0e-2"]
    train(load_recipe("qwen2vl-openimages", overrides), out)
    assert main(["merge", str(out)]) == 0
    model_cfg, prompt, _ = model_for_adapter(out / "adapter")
    assert model_cfg["id"] == "tiny:qwen2_vl"
    adapter = load_with_adapter(model_cfg, str(out / "adapter"))
    merged = load_with_adapter({**model_cfg, "id": str(out / "merged")}, None)
    assert merged.family.name == "qwen2_vl" and not any("lora" in n for n, _ in merged.model.named_parameters())
    decoding = Decoding(max_new_tokens=8, batch_size=4)
    assert generate_captions(merged, images, prompt, decoding) == generate_captions(adapter, images, prompt, decoding)
    base = load_with_adapter(model_cfg, None)
    assert (logits(merged, images[0]) - logits(base, images[0])).abs().max() > 1e-2, "the merged model is the base"

"""Dirty inputs and bad recipes: one bad file never stops a run, and every mistake is one line (exit 2)."""

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from data.images import split_readable
from rewards import build_reward
from shapescap.scenes import render, shapes_scenes
from vizer.cli import main
from vizer.config import RecipeError
from vizer.eval.caption import caption_folder


def bomb_png() -> bytes:
    """68 bytes that declare a 30000 x 30000 picture."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def dirty_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    colours = ["red", "green", "blue", "yellow"]
    for i, colour in enumerate(colours):
        Image.new("RGB", (48, 40), colour).save(folder / f"good{i}.png")
    Image.new("CMYK", (32, 32), (0, 50, 50, 0)).save(folder / "sub" / "cmyk.jpg")
    Image.new("I;16", (32, 32)).save(folder / "sub" / "deep.png")
    Image.new("P", (32, 32)).save(folder / "sub" / "palette.gif")
    Image.new("RGB", (32, 32), "white").save(folder / "sub" / "web.webp")
    (folder / "bomb.png").write_bytes(bomb_png())
    Image.new("RGB", (1, 4000), "red").save(folder / "strip.png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    good = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "broken-link.png").symlink_to(folder / "missing.png")
    os.close(os.open(os.fsencode(folder) + b"/bad-name-\xff.png", os.O_CREAT | os.O_WRONLY, 0o644))
    with open(os.fsencode(folder) + b"/bad-name-\xff.png", "wb") as f:
        f.write(good)
    return folder


def test_every_bad_file_is_skipped_and_counted_none_is_lost(dirty_folder):
    good, bad = split_readable(dirty_folder)
    assert sorted(p.name for p in good) == sorted(
        ["good0.png", "good1.png", "good2.png", "good3.png", "cmyk.jpg", "deep.png", "palette.gif", "web.webp"]
    )
    names = sorted(os.fsencode(p.name) for p in bad)
    assert names == sorted(
        [
            b"bomb.png",
            b"strip.png",
            b"empty.jpg",
            b"notes.png",
            b"truncated.png",
            b"broken-link.png",
            b"bad-name-\xff.png",
        ]
    ), "the decompression bomb, the 1x4000 strip, the broken link and the non-UTF-8 name are counted too"


def test_caption_skips_reports_and_resumes_after_a_crash(dirty_folder, tmp_path, monkeypatch, capsys):
    import vizer.eval.caption as caption

    out = tmp_path / "captions.jsonl"
    model_cfg = {
        "id": "tiny:idefics3",
        "family": "auto",
        "quantization": "none",
        "dtype": "float32",
        "attn_implementation": None,
        "lora": {},
        "processor": {"do_image_splitting": False},
        "revision": None,
    }
    real = caption.generate_captions
    calls = []

    def crash_after_first_batch(loaded, images, prompt, decoding, on_batch=None, desc=""):
        def once(start, captions):
            on_batch(start, captions)
            calls.append(len(captions))
            raise RuntimeError("killed")

        return real(loaded, images, prompt, decoding, on_batch=once, desc=desc)

    monkeypatch.setattr(caption, "generate_captions", crash_after_first_batch)
    decoding = caption.Decoding(max_new_tokens=4, batch_size=3)
    with pytest.raises(RuntimeError, match="killed"):
        caption_folder(None, dirty_folder, out, model_cfg=model_cfg, decoding=decoding)
    assert len(out.read_text().splitlines()) == 3, "the first batch was written before the crash"
    monkeypatch.undo()
    capsys.readouterr()
    caption_folder(None, dirty_folder, out, model_cfg=model_cfg, decoding=decoding)
    said = capsys.readouterr().out
    assert "3 of 8 images already captioned" in said and "skipped 7 unreadable image(s)" in said
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and len({r["image"] for r in records}) == 8
    listing = (tmp_path / "captions.skipped.txt").read_text().splitlines()
    assert len(listing) == 7 and "bomb.png" in listing and "bad-name-\\xff.png" in listing


def test_a_plain_function_plugin_returning_nan_is_replaced_and_counted(tmp_path, monkeypatch):
    (tmp_path / "nan_plugin.py").write_text(
        "def make():\n    return lambda completions, **kw: [float('nan'), 0.5, None, 0.2][: len(completions)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward({"name": "nan_plugin:make"})
    logged = {}
    out = reward(completions=["a", "b", "c", "d"], log_metric=logged.__setitem__)
    assert out == [0.2, 0.5, None, 0.2] and logged == {"rewards/make/nonfinite": 1.0}


BAD_PLUGIN = {
    "raises.py": "raise RuntimeError('plugin is broken')\n",
    "syntax.py": "def make(:\n",
    "returns_int.py": "def make():\n    return 3\n",
}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["grpo.learning_rate=-1"], "'grpo.learning_rate' must be >= 0"),
        (["model.lora.r=0"], "'model.lora.r' must be > 0"),
        (["grpo.max_completion_length=-5"], "'grpo.max_completion_length' must be > 0"),
        (["eval.batch_size=0"], "'eval.batch_size' must be > 0"),
        (["grpo.max_steps=0"], "'grpo.max_steps' must be positive"),
        (["rewards.0.weight=.nan"], "'weight' must be a finite number, got nan"),
        (["rewards=[{name: raises:make}]"], "importing 'raises' failed (RuntimeError: plugin is broken)"),
        (["rewards=[{name: syntax:make}]"], "importing 'syntax' failed (SyntaxError"),
    ],
)
def test_check_refuses_what_train_would_fail_on(args, says, tmp_path, monkeypatch, capsys):
    for name, text in BAD_PLUGIN.items():
        (tmp_path / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["check", "tiny-shapes", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], lines


def test_a_factory_returning_a_non_callable_stops_train_before_the_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / "returns_int.py").write_text(BAD_PLUGIN["returns_int.py"])
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["train", "tiny-shapes", "--out", str(tmp_path / "run"), "rewards=[{name: returns_int:make}]"])
    captured = capsys.readouterr()
    assert code == 2 and "the factory returned int, not a callable" in captured.err
    assert "model: tiny:idefics3" not in captured.out, "refused before the policy was loaded"


def test_unreadable_inputs_are_one_line(tmp_path, capsys):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("description: caf\xe9\n".encode("latin-1"))
    empty_model, empty_adapter = tmp_path / "model", tmp_path / "adapter"
    empty_model.mkdir()
    empty_adapter.mkdir()
    images = tmp_path / "imgs"
    images.mkdir()
    Image.new("RGB", (16, 16)).save(images / "a.png")
    for argv, says in [
        (["check", str(recipe)], "is not UTF-8"),
        (["check", "tiny-shapes", f"model.id={empty_model}"], "holds no model (no config.json)"),
        (["caption", "--adapter", str(empty_adapter), "--images", str(images)], "neither"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err


def test_caption_never_adds_captions_of_another_adapter_prompt_or_decoding(tmp_path, capsys):
    # Fails if a rerun resumes into a captions file written by other weights (training went on), another prompt
    # or other decoding: the file would mix two models' captions under one name.
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    import vizer.eval.caption as caption
    from vizer.models import load_model

    folder = tmp_path / "images"
    folder.mkdir()
    for i, scene in enumerate(shapes_scenes("validation", 2)):
        render(scene).save(folder / f"{i}.png")
    model_cfg = {**{k: v for k, (_, v) in caption.MODEL_SCHEMA.items()}, "id": "tiny:idefics3", "lora": {}}
    model_cfg.update(dtype="float32", processor={"do_image_splitting": False})
    out, decoding = tmp_path / "captions.jsonl", caption.Decoding(max_new_tokens=4, batch_size=2)
    caption_folder(None, folder, out, model_cfg=model_cfg, decoding=decoding)
    first = out.read_text()
    caption_folder(None, folder, out, model_cfg=model_cfg, decoding=decoding)  # unchanged: resumes, nothing to do
    assert out.read_text() == first and "2 of 2 images already captioned" in capsys.readouterr().out

    lines = first.splitlines()
    out.write_text(lines[0] + "\n")  # an interrupted run: one caption written
    for changed, says in [
        ({"prompt": "Say what you see."}, "another prompt"),
        ({"decoding": caption.Decoding(max_new_tokens=6, batch_size=2)}, "another decoding"),
        ({"model_cfg": {**model_cfg, "id": "tiny:qwen2_vl", "processor": {}}}, "another model"),
    ]:
        kwargs = {"model_cfg": model_cfg, "decoding": decoding, **changed}
        with pytest.raises(RecipeError, match=rf"--out: {out} holds 1 captions from {says}"):
            caption_folder(None, folder, out, **kwargs)
        assert out.read_text() == lines[0] + "\n", "the file is left as it was"
    (tmp_path / "captions.source.json").unlink()  # a file of unknown origin is not added to either
    with pytest.raises(RecipeError, match="from an unknown source"):
        caption_folder(None, folder, out, model_cfg=model_cfg, decoding=decoding)

    # an adapter trained further between two runs into the same file
    adapter = tmp_path / "adapter"
    lora = LoraConfig(r=2, target_modules=r".*text_model.*\.q_proj", init_lora_weights=False)
    get_peft_model(load_model(model_cfg, for_training=False).model, lora).save_pretrained(adapter)
    out.unlink()
    caption_folder(adapter, folder, out, model_cfg=model_cfg, decoding=decoding)
    out.write_text(out.read_text().splitlines()[0] + "\n")
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(weights).items()}, weights)
    with pytest.raises(RecipeError, match=rf"--out: {out} holds 1 captions from another adapter"):
        caption_folder(adapter, folder, out, model_cfg=model_cfg, decoding=decoding)

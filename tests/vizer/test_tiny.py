"""Tiny offline models: building, determinism, reloading with Auto classes, and inference."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from vizer import tiny  # noqa: E402
from vizer.qwen2vl_processor import Qwen2VLImageOnlyProcessor, load_qwen2vl_processor  # noqa: E402

CAPTION = "a large red circle and a small blue square"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]


@pytest.fixture(scope="session")
def roots(tmp_path_factory):
    """Two independent cache roots, every kind built in each (the user's cache is never touched)."""
    built = []
    for name in ("a", "b"):
        root = tmp_path_factory.mktemp(f"cache_{name}")
        for kind in tiny.KINDS:
            tiny.build_tiny(kind, root)
        built.append(root)
    return built


@pytest.fixture(scope="session")
def folders(roots):
    return {kind: tiny.build_tiny(kind, roots[0]) for kind in tiny.KINDS}


def scene(size=(64, 64)) -> Image.Image:
    image = Image.new("RGB", size, (245, 245, 240))
    image.paste((220, 40, 40), (8, 8, 30, 30))
    return image


def test_build_layout_and_marker(folders, roots):
    for kind, folder in folders.items():
        assert folder == roots[0] / "tiny" / f"{kind}-v1"
        for name in ("config.json", "model.safetensors", "tokenizer.json", tiny.MARKER):
            assert (folder / name).is_file(), (kind, name)
        info = json.loads((folder / tiny.MARKER).read_text())
        assert info["kind"] == kind and info["params"] < 500_000
    assert not [p for p in (roots[0] / "tiny").iterdir() if p.name.startswith(".")], "temp dirs left behind"


@pytest.mark.parametrize("kind", tiny.KINDS)
def test_builds_are_deterministic(roots, kind):
    a, b = (root / "tiny" / f"{kind}-v1" for root in roots)
    weights_a, weights_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_existing_build_is_reused(folders):
    before = (folders["clip"] / "model.safetensors").stat().st_mtime_ns
    assert tiny.build_tiny("clip", folders["clip"].parent.parent) == folders["clip"]
    assert (folders["clip"] / "model.safetensors").stat().st_mtime_ns == before


def test_publish_keeps_the_winner_of_a_race(tmp_path, folders):
    target = tmp_path / "tiny" / "clip-v1"
    shutil.copytree(folders["clip"], target)
    loser = tmp_path / "tiny" / ".clip-v1.tmp-x"
    loser.mkdir()
    (loser / "partial").write_text("")
    tiny._publish(loser, target)  # must not raise, must not replace the finished folder
    assert (target / tiny.MARKER).is_file() and not (target / "partial").exists()


def load_processor(kind: str, folder: Path):
    return load_qwen2vl_processor(str(folder)) if kind == "qwen2_vl" else AutoProcessor.from_pretrained(folder)


def test_tokenizers_give_word_tokens(folders):
    for kind in tiny.KINDS:
        tokenizer = load_processor(kind, folders[kind]).tokenizer
        tokens = tokenizer.tokenize(CAPTION)
        assert len(tokens) == len(CAPTION.split()), (kind, tokens)
        assert 500 <= len(tokenizer) <= 1000


def test_idefics3_generate(folders):
    folder = str(folders["idefics3"])
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert prompt == "<|im_start|>User:<image>Describe this image.<end_of_utterance>\nAssistant:"
    inputs = processor(text=prompt, images=[[scene()]], return_tensors="pt")
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum().item()
    assert image_tokens == processor.image_seq_len == 16
    out = model.generate(**inputs, max_new_tokens=8, do_sample=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == processor.tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
    # the picture reaches the language model: another image changes the next-token logits, the same one does not
    with torch.no_grad():
        other = processor(text=prompt, images=[[Image.new("RGB", (64, 64), (40, 80, 220))]], return_tensors="pt")
        same, again, changed = (model(**x).logits[0, -1] for x in (inputs, inputs, other))
    assert torch.equal(same, again) and not torch.allclose(same, changed)


def test_idefics3_image_splitting(folders):
    folder = str(folders["idefics3"])
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(text=prompt, images=[[scene((150, 100))]], do_image_splitting=True, return_tensors="pt")
    assert inputs["pixel_values"].shape[1] == 5  # 2x2 tiles + the global image
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_qwen2_vl_generate_and_train_forward(folders):
    folder = str(folders["qwen2_vl"])
    processor = load_qwen2vl_processor(folder)
    # No torchvision here: the full Qwen2VLProcessor cannot be built, the image-only one is used.
    assert getattr(processor, "image_processor", None) is not None
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    processor.tokenizer.padding_side = "left"
    inputs = processor(
        text=[prompt, prompt + CAPTION], images=[scene(), scene((128, 128))], padding=True, return_tensors="pt"
    )
    assert {"pixel_values", "image_grid_thw"} <= set(inputs)
    assert inputs["image_grid_thw"].tolist() == [[1, 6, 6], [1, 8, 8]]  # 9 and 16 image tokens
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 9 + 16
    out = model.generate(**inputs, max_new_tokens=8, do_sample=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_qwen2_vl_chat_template_with_images_tokenizes(folders):
    # The way GRPOTrainer tokenizes prompts: a batch of conversations holding the images.
    processor = load_qwen2vl_processor(str(folders["qwen2_vl"]))
    conversations = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": scene(size)}, {"type": "text", "text": "Describe this image."}],
            }
        ]
        for size in ((64, 64), (128, 128))
    ]
    batch = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, padding=True, return_tensors="pt"
    )
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6], [1, 8, 8]]
    assert batch["pixel_values"].shape[0] == 36 + 64


def test_qwen2_vl_image_kwargs_override(folders):
    processor = load_qwen2vl_processor(str(folders["qwen2_vl"]), min_pixels=56 * 56, max_pixels=56 * 56)
    inputs = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[scene()], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4 image tokens


def test_qwen2_vl_folder_saved_as_qwen2vlprocessor_would(folders, tmp_path):
    folder = folders["qwen2_vl"]
    config = json.loads((folder / "processor_config.json").read_text())
    assert config["processor_class"] == "Qwen2VLProcessor"
    assert config["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    assert config["video_processor"]["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert (folder / "chat_template.jinja").is_file()
    # Saving the image-only processor (as a trainer does at checkpoints) keeps that layout.
    processor = load_qwen2vl_processor(str(folder))
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor" and "video_processor" in saved
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["processor_class"] == "Qwen2VLProcessor"
    assert isinstance(load_qwen2vl_processor(str(tmp_path)), Qwen2VLImageOnlyProcessor)


def test_qwen2_vl_legacy_hub_layout(folders, tmp_path):
    """Hub Qwen2-VL folders have preprocessor_config.json and chat_template.json, no processor_config.json."""
    src = folders["qwen2_vl"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "min_pixels": 3136,
                "max_pixels": 12845056,
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711],
                "image_processor_type": "Qwen2VLImageProcessor",
                "processor_class": "Qwen2VLProcessor",
            }
        )
    )
    (tmp_path / "chat_template.json").write_text(
        json.dumps({"chat_template": (src / "chat_template.jinja").read_text()})
    )
    processor = load_qwen2vl_processor(str(tmp_path), max_pixels=112 * 112)
    assert processor.image_processor.size.longest_edge == 112 * 112
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[scene((640, 480))], return_tensors="pt")
    assert inputs["image_grid_thw"].prod().item() // 4 <= 16


@pytest.mark.parametrize("kind,padding,max_len", [("clip", True, 77), ("siglip", "max_length", 64)])
def test_scorers_give_projection_features(folders, kind, padding, max_len):
    folder = str(folders[kind])
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder)
    assert type(model).__name__ == {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]
    too_long = " ".join([CAPTION] * 20)
    inputs = processor(
        text=[CAPTION, too_long],
        images=[scene(), scene((90, 60))],
        padding=padding,
        truncation=True,
        return_tensors="pt",
    )
    eos = processor.tokenizer.eos_token_id
    assert inputs["input_ids"][1, -1] == eos  # truncation keeps the EOS that CLIP pools at
    assert (inputs["input_ids"][0] == eos).sum() == 1
    if kind == "siglip":
        assert inputs["input_ids"].shape[1] == max_len  # SigLIP pools the last position
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    # transformers 5.24: both return a BaseModelOutputWithPooling, not a tensor; `pooler_output` holds the
    # projected, unnormalised embedding (model(...).image_embeds / text_embeds are the L2-normalised ones).
    assert not isinstance(image, torch.Tensor) and not isinstance(text, torch.Tensor)
    assert image.pooler_output.shape == text.pooler_output.shape == (2, 32)
    assert processor.tokenizer.model_max_length == max_len


def test_default_cache_root_is_in_the_repo(monkeypatch):
    monkeypatch.delenv("VIZER_CACHE", raising=False)
    assert tiny.cache_root() == Path(tiny.__file__).resolve().parent.parent / ".cache" / "vizer"


def test_unknown_kind_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"'llama'.*idefics3, qwen2_vl, clip, siglip"):
        tiny.build_tiny("llama", tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_prints_the_folder(roots, capsys):
    assert tiny.main(["siglip", "--out", str(roots[0])]) == 0
    assert capsys.readouterr().out.strip() == str(roots[0] / "tiny" / "siglip-v1")


def test_build_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny.build_tiny("siglip", tmp_path)
    assert torch.equal(torch.rand(3), expected)

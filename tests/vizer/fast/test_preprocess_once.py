"""Preprocess once is exact: both of TRL's processor passes over a batch of G copies get the processor's own
values, and the image processor sees each distinct picture once."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_shared_vision import G
from transformers import AutoModelForImageTextToText
from trl.data_utils import apply_chat_template, prepare_multimodal_messages

from vizer.families import detect_family
from vizer.fast.preprocess_once import PreprocessOnce
from vizer.grpo import instance_wrapped
from vizer.model_ids import resolve_model_id


def pictures() -> list[Image.Image]:
    # different sizes (idefics3 pads a batch to its largest; Qwen2-VL cuts patches per image by grid) and
    # different pixels, so a row handed another row's values shows
    sizes_colours = (((64, 64), "red"), ((96, 64), "blue"), ((64, 96), "green"))
    out = []
    for size, colour in sizes_colours:
        image = Image.new("RGB", size, colour)
        image.putpixel((3, 5), (7, 200, 9))  # not one flat colour: a resize or a flip would show
        out.append(image)
    return out


def trl_passes(processor, rows: list[Image.Image]) -> tuple[dict, dict]:
    """TRL's two processor passes over a generation batch: prompts for generation (numpy), then the forwards' (pt)."""
    prompts = [prepare_multimodal_messages([{"role": "user", "content": "Describe."}], images=[im]) for im in rows]
    first = processor.apply_chat_template(
        conversation=prompts, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    texts = [apply_chat_template({"prompt": p}, processor)["prompt"] for p in prompts]
    second = processor(images=[[im] for im in rows], text=texts, padding=True, return_tensors="pt")
    return dict(first), dict(second)


def assert_same(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert type(got[key]) is type(value), key
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        elif isinstance(value, np.ndarray):
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key
        else:  # token lists
            assert got[key] == value, key


@pytest.mark.parametrize("family", ["idefics3", "qwen2_vl"])
def test_both_passes_equal_the_stock_processor_with_each_picture_processed_once(family):
    path = resolve_model_id(f"tiny:{family}")
    processor = detect_family(path).load_processor(path, {"do_image_splitting": False} if family == "idefics3" else {})
    processor.tokenizer.padding_side = "left"
    rows = [im.copy() for im in pictures() for _ in range(G)]  # TRL: every copy its own object
    random.Random(0).shuffle(rows)  # a group need not be contiguous
    stock = trl_passes(processor, rows)
    once = PreprocessOnce()
    with instance_wrapped(processor.image_processor, "preprocess", once.wrap):
        shared = trl_passes(processor, rows)
    assert "preprocess" not in vars(processor.image_processor), "the processor is left as it was"
    for got, expected in zip(shared, stock):
        assert_same(got, expected)
    assert (once.images_requested, once.images_processed) == (2 * 3 * G, 3)

    # and the model's logits on the forwards' inputs (what the log-probs and loss read) are the stock ones
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = [model(**inputs).logits for inputs in (shared[1], stock[1])]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=0)


def test_a_new_batch_is_processed_afresh_after_clear():
    path = resolve_model_id("tiny:idefics3")
    processor = detect_family(path).load_processor(path, {"do_image_splitting": False})
    once = PreprocessOnce()
    with instance_wrapped(processor.image_processor, "preprocess", once.wrap):
        trl_passes(processor, [pictures()[0]] * 2)
        once.clear()
        trl_passes(processor, [pictures()[0]] * 2)
    assert once.images_processed == 2, "one picture, once per batch"

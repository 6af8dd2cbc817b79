"""Generation with each group's prompt prefilled once gives the stock samples: the same tokens, greedy and sampled
with the same random state, and the same scores at every step, for both families; rows that are not in groups
run the stock path; a position one off is noticed."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText

sys.path.insert(0, str(Path(__file__).parent))
from test_shared_prefix import FAMILIES, TWO_GROUPS, G, picture, processor  # noqa: E402

import vizer.fast.prefill_once as prefill  # noqa: E402
from vizer.model_ids import resolve_model_id  # noqa: E402


def prompts(family: str, order: list[int] | None = None) -> dict:
    """TRL's generation inputs: each prompt G times in a row (or the rows in `order`), left-padded."""
    proc = processor(family)
    texts, images = [], []
    for text, size, colour in TWO_GROUPS:
        message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        texts += [proc.apply_chat_template(message, add_generation_prompt=True)] * G
        images += [[picture(size, colour)] for _ in range(G)]  # each copy its own object, as TRL has them
    if order is not None:
        texts, images = [texts[i] for i in order], [images[i] for i in order]
    return dict(proc(text=texts, images=images, padding=True, return_tensors="pt"))


def model_of(family: str):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(resolve_model_id(f"tiny:{family}"), dtype=torch.float32).eval()


def generated(generate, inputs: dict, sample: bool):
    torch.manual_seed(1)
    return generate(**inputs, max_new_tokens=8, do_sample=sample, output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sample", [False, True])
def test_prefilled_once_the_samples_and_scores_are_the_stock_ones(family, sample):
    model, inputs = model_of(family), prompts(family)
    stock = generated(model.generate, inputs, sample)
    once = prefill.prefill_once(model.generate, model, G)
    shared = generated(once, inputs, sample)
    assert torch.equal(shared.sequences, stock.sequences)
    for a, b in zip(shared.scores, stock.scores, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=0)
    assert once.stats == {"prefilled_rows": 2, "rows": 2 * G}, "one prefill per group"


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_not_in_groups_of_g_run_the_stock_path(family):
    model = model_of(family)
    inputs = prompts(family, order=[0, 3, 1, 4, 2, 5])  # the two prompts alternate: no run of G identical rows
    once = prefill.prefill_once(model.generate, model, G)
    stock = generated(model.generate, inputs, sample=False)
    assert torch.equal(generated(once, inputs, sample=False).sequences, stock.sequences)
    assert once.stats["prefilled_rows"] == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prefill_one_position_off_is_noticed(family, monkeypatch):
    model, inputs = model_of(family), prompts(family)
    stock = generated(model.generate, inputs, sample=False)
    right = prefill._positions
    monkeypatch.setattr(prefill, "_positions", lambda m, i: right(m, i) + 1)
    shifted = generated(prefill.prefill_once(model.generate, model, G), inputs, sample=False)
    assert max(float((a - b)[torch.isfinite(b)].abs().max()) for a, b in zip(shifted.scores, stock.scores)) > 1e-3

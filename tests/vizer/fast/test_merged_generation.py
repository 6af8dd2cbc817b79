"""Generation with the LoRA adapter merged gives the unmerged samples and scores, applies the adapter (not the
base model), leaves the base weights as they were, and is refused where it would not be exact."""

import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).parent))
from test_prefill_once import model_of, prompts  # noqa: E402
from test_shared_prefix import FAMILIES  # noqa: E402

from vizer.fast.merged_generation import merged_adapter, why_not_merged  # noqa: E402

LANGUAGE = {"idefics3": r".*text_model.*_proj", "qwen2_vl": r".*language_model.*_proj"}


def adapted(family: str, dropout: float = 0.0):
    """A tiny float32 model with a LoRA adapter far from zero (its effect on the scores is visible)."""
    model = model_of(family)
    config = LoraConfig(
        r=4, lora_alpha=16, lora_dropout=dropout, target_modules=LANGUAGE[family], init_lora_weights=False
    )
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    return peft


def generated(model, inputs: dict, sample: bool):
    torch.manual_seed(1)
    return model.generate(
        **inputs, max_new_tokens=8, do_sample=sample, output_scores=True, return_dict_in_generate=True
    )


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sample", [False, True])
def test_merged_the_samples_and_scores_are_the_unmerged_ones(family, sample):
    model, inputs = adapted(family), prompts(family)
    assert why_not_merged(model) is None
    before = base_weights(model)
    unmerged = generated(model, inputs, sample)
    with merged_adapter(model):
        merged = generated(model, inputs, sample)
    with model.disable_adapter():
        base = generated(model, inputs, sample=False)
    assert torch.equal(merged.sequences, unmerged.sequences)
    for a, b in zip(merged.scores, unmerged.scores, strict=True):
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], atol=1e-4, rtol=0)
    # the adapter is what makes the difference: the base model scores visibly otherwise
    assert (base.scores[0] - unmerged.scores[0])[torch.isfinite(base.scores[0])].abs().max() > 1e-2
    for name, weight in before.items():
        torch.testing.assert_close(model.get_parameter(name), weight, atol=1e-6, rtol=0, msg=name)


def test_the_round_trip_does_not_drift_the_base_weights():
    model = adapted("idefics3")
    before = base_weights(model)
    for _ in range(50):
        with merged_adapter(model):
            pass
    largest = max(float(w.abs().max()) for w in before.values())
    drift = max(float((model.get_parameter(n) - w).abs().max()) for n, w in before.items())
    assert drift <= 1e-6 * largest, drift


def test_unmerged_again_after_an_error_in_generation():
    model, inputs = adapted("idefics3"), prompts("idefics3")
    before = base_weights(model)
    with pytest.raises(RuntimeError, match="stop"), merged_adapter(model):
        raise RuntimeError("stop")
    for name, weight in before.items():
        torch.testing.assert_close(model.get_parameter(name), weight, atol=1e-6, rtol=0, msg=name)
    # and the adapter is on again
    unmerged = generated(model, inputs, sample=False)
    with model.disable_adapter():
        base = generated(model, inputs, sample=False)
    assert (base.scores[0] - unmerged.scores[0])[torch.isfinite(base.scores[0])].abs().max() > 1e-2


def test_an_adapter_switched_off_already_is_not_merged():
    model, inputs = adapted("idefics3"), prompts("idefics3")
    with model.disable_adapter():
        base = generated(model, inputs, sample=False)
        with merged_adapter(model):
            inside = generated(model, inputs, sample=False)
    torch.testing.assert_close(inside.scores[0], base.scores[0], atol=1e-5, rtol=0)


def test_where_it_would_not_be_exact_it_says_why():
    assert why_not_merged(model_of("idefics3")) == "there is no LoRA adapter to merge"
    with_dropout = adapted("idefics3", dropout=0.1)
    assert why_not_merged(with_dropout.eval()) is None, "dropout acts in training mode only"
    assert "LoRA dropout is active" in why_not_merged(with_dropout.train())
    half = adapted("idefics3").to(torch.bfloat16)
    assert why_not_merged(half) == "the weights are bfloat16: a small delta would round away"


# ---------------------------------------------------------------------------------------------
# In the runner: `model.merge_for_generation`
# ---------------------------------------------------------------------------------------------


def test_a_short_run_trains_the_same_adapter_merged_or_not(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file
    from test_train import tiny_overrides

    import vizer.grpo
    from vizer import train as runner
    from vizer.config import load_recipe

    merges = []

    def counted(model):
        merges.append(model)
        return merged_adapter(model)

    monkeypatch.setattr(vizer.grpo, "merged_adapter", counted)
    adapters = {}
    for setting in ("false", "auto"):
        overrides = [*tiny_overrides("tiny-shapes"), "grpo.max_steps=3", f"model.merge_for_generation={setting}"]
        runner.train(load_recipe("tiny-shapes", overrides), tmp_path / setting)
        adapters[setting] = load_file(str(tmp_path / setting / "adapter" / "adapter_model.safetensors"))
    said = capsys.readouterr().out
    assert "generation: adapter applied unmerged at every token (model.merge_for_generation is false)" in said
    assert "generation: the LoRA adapter merged into its weights while sampling" in said
    assert len(merges) == 3, "one merge per generation batch, in the merged run only"
    for key, value in adapters["false"].items():
        assert value.abs().max() > 0, key
        torch.testing.assert_close(adapters["auto"][key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_merge_true_refuses_what_would_not_be_exact_and_auto_says_why(tmp_path, capsys):
    from test_train import tiny_overrides

    from vizer import train as runner
    from vizer.config import RecipeError, load_recipe

    dropout = [*tiny_overrides("tiny-shapes"), "model.lora.dropout=0.1", "grpo.max_steps=1"]
    refused = r"'model.merge_for_generation' is true, but model.lora.dropout is 0.1: a merged layer has no dropout"
    with pytest.raises(RecipeError, match=refused):  # seen in the recipe, before any model loads
        runner.train(load_recipe("tiny-shapes", [*dropout, "model.merge_for_generation=true"]), tmp_path / "true")
    runner.train(load_recipe("tiny-shapes", dropout), tmp_path / "auto")
    assert "generation: adapter applied unmerged at every token (LoRA dropout is active" in capsys.readouterr().out


@pytest.mark.parametrize(
    "launch, reason",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "the weights are sharded (fsdp)"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "the weights are sharded (zero3)",
        ),
    ],
)
def test_sharded_weights_are_not_merged(monkeypatch, capsys, launch, reason):
    """FSDP and ZeRO-3 hold a shard of each weight per process outside generation: nothing whole to add to."""
    from types import SimpleNamespace

    from accelerate import PartialState

    from vizer.config import RecipeError
    from vizer.train import FAST_PATHS, choose

    for key, value in launch.items():
        monkeypatch.setenv(key, value)
    model = adapted("idefics3")
    trainer = SimpleNamespace(
        use_vllm=False, model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m), merge_for_generation=False
    )
    merge_path = next(path for path in FAST_PATHS if path.key == "merge_for_generation")
    choose(merge_path, "auto", trainer, "idefics3", PartialState())
    assert f"generation: adapter applied unmerged at every token ({reason}" in capsys.readouterr().out
    assert trainer.merge_for_generation is False
    with pytest.raises(RecipeError, match=r"'model.merge_for_generation' is true, but the weights are sharded"):
        choose(merge_path, True, trainer, "idefics3", PartialState())
    monkeypatch.delenv(next(iter(launch)))  # a plain launch: merged
    choose(merge_path, "auto", trainer, "idefics3", PartialState())
    assert trainer.merge_for_generation is True

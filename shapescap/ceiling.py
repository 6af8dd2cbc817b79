"""The captioner's ceiling: what training its language model on the *true* captions gives (labels; not a method).

Any training signal, zero-label or not, reaches the captions through the same language model. Supervised
fine-tuning on the true caption of every training scene is the strongest such signal: if it cannot name more
objects without more duplicates and wrong bindings, no reward can, and the six targets of `make demo` need a
better captioner. Trains LoRA r32 on the language model (as the recipes do), or with `--train language` the whole
language model and connector, or with `--train all` the vision tower too, then captions the 500 held-out `test`
scenes greedily and prints the six metrics.

    python -m shapescap.ceiling [--train lora|language|all] [--steps 400] [--scenes 2048]
"""

from __future__ import annotations

import argparse
import random

from shapescap.captioner import _pixel_values, _prompt_ids, _sft_batch, generate_captions, load_captioner
from shapescap.metrics import shapes_metrics
from shapescap.scenes import describe, render, shapes_scenes

METRICS = ("shapes/object_recall", "shapes/hallucination", "shapes/object_hallucination", "shapes/duplicate_object")


def greedy_metrics(model, processor, n: int = 500) -> dict[str, float]:
    scenes = shapes_scenes("test", n)
    model.eval()
    captions = generate_captions(model, processor, [render(s) for s in scenes])
    corpus, _ = shapes_metrics(captions, scenes)
    return {**{m: corpus[m] for m in METRICS}, "words": sum(len(c.split()) for c in captions) / len(captions)}


def main(argv: list[str] | None = None) -> int:
    import torch
    from peft import LoraConfig, get_peft_model

    from vizer.model_ids import resolve_model_id

    parser = argparse.ArgumentParser(prog="python -m shapescap.ceiling", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train",
        choices=["lora", "language", "all"],
        default="lora",
        help="LoRA r32 on the language model; the whole language model and connector; or the vision tower too",
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--scenes", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, processor = load_captioner(resolve_model_id("tiny:shapes-captioner"))
    base = greedy_metrics(model, processor)
    if args.train == "all":
        lr = 5e-4  # below the SFT's: the vision tower was trained to perceive first
    elif args.train == "language":
        model.model.vision_model.requires_grad_(False)
        lr = 1e-3  # the captioner's own SFT learning rate
    else:
        targets = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=targets))
        lr = 2e-4  # the recipes' learning rate
    scenes = shapes_scenes("train", args.scenes)
    pixels = _pixel_values(processor, [render(s) for s in scenes])
    captions, prompt_ids = [describe(s) for s in scenes], _prompt_ids(processor)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(args.steps):
        idx = [rng.randrange(len(scenes)) for _ in range(32)]
        loss = model(
            **_sft_batch(processor.tokenizer, prompt_ids, [captions[i] for i in idx]), pixel_values=pixels[idx]
        ).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    tuned = greedy_metrics(model, processor)
    trained = {"lora": "LoRA r32", "language": "language model", "all": "whole model"}[args.train]
    print(f"| metric (greedy, 500 test scenes) | base | SFT on true captions ({trained}, {args.steps} steps) |")
    print("|---|---:|---:|")
    for key in (*METRICS, "words"):
        print(f"| {key} | {base[key]:.3f} | {tuned[key]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

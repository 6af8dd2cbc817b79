"""The captioner's ceiling: what training its language model on the *true* captions gives (labels; not a method).

Any training signal, zero-label or not, reaches the captions through the same language model. Supervised
fine-tuning on the true caption of every training scene is the strongest such signal: if it cannot name more
objects without more duplicates and wrong bindings, no reward can. Trains LoRA r32 on the language model (the
recipes' adapter), or with `--train language` the whole language model and connector, or with `--train all` the
vision tower too, then captions the held-out `test` scenes greedily and prints the four greedy targets of
`make demo`: recall at least `RECALL_TARGET`, every error rate at or below the base's.

    python -m shapescap.ceiling [--train lora|language|all] [--steps 400] [--scenes 2048] [--captioner DIR]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from shapescap.captioner import (
    _encoded,
    _pixel_values,
    _prompt_ids,
    _sft_batch,
    frozen_image_tokens,
    generate_captions,
    load_captioner,
)
from shapescap.metrics import shapes_metrics
from shapescap.scenes import describe, render, shapes_scenes

METRICS = ("shapes/object_recall", "shapes/hallucination", "shapes/object_hallucination", "shapes/duplicate_object")
RECALL_TARGET = 0.95  # the ceiling must leave room above any zero-label method's +30%
LORA_TARGETS = r".*text_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LEARNING_RATES = {"lora": 2e-4, "language": 1e-3, "all": 5e-4}  # recipes' LoRA rate; the SFT's; below the SFT's


def greedy_captions(model, processor, n: int = 500) -> tuple[list[str], dict[str, float]]:
    """Greedy captions of the first n `test` scenes and their four target metrics plus words per caption."""
    scenes = shapes_scenes("test", n)
    model.eval()
    captions = generate_captions(model, processor, [render(s) for s in scenes])
    corpus, _ = shapes_metrics(captions, scenes)
    words = sum(len(c.split()) for c in captions) / len(captions)
    return captions, {**{m: corpus[m] for m in METRICS}, "words": words}


def train_on_true_captions(
    model,
    processor,
    *,
    train: str = "lora",
    steps: int = 400,
    scenes: int = 2048,
    batch: int = 32,
    seed: int = 0,
    lr: float | None = None,
):
    """Fine-tune on the true captions of `train`-split scenes; returns (model, per-step losses)."""
    import torch
    from peft import LoraConfig, get_peft_model

    if train not in LEARNING_RATES:
        raise ValueError(f"unknown --train {train!r}; expected one of {', '.join(LEARNING_RATES)}")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    train_scenes = shapes_scenes("train", scenes)
    pixels = _pixel_values(processor, [render(s) for s in train_scenes])
    # LoRA on the language model leaves the vision side frozen: its outputs are computed once (the same
    # numbers without the per-step cost); the other modes train the connector
    features = frozen_image_tokens(model, pixels) if train == "lora" else None
    if train == "language":
        model.model.vision_model.requires_grad_(False)
    elif train == "lora":
        model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=LORA_TARGETS))
    captions, prompt_ids = [describe(s) for s in train_scenes], _prompt_ids(processor)
    optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr or LEARNING_RATES[train])
    model.train()
    losses = []
    for _ in range(steps):
        idx = [rng.randrange(len(train_scenes)) for _ in range(batch)]
        batch_inputs = _sft_batch(processor.tokenizer, prompt_ids, [captions[i] for i in idx])
        images = {"pixel_values": pixels[idx]} if features is None else {"mm_encoder_outputs": _encoded(features[idx])}
        loss = model(**batch_inputs, **images).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return model, losses


def ceiling_report(
    folder: str | Path,
    *,
    train: str = "lora",
    steps: int = 400,
    scenes: int = 2048,
    test_scenes: int = 500,
    seed: int = 0,
    lr: float | None = None,
) -> dict:
    """{"base": metrics, "ceiling": metrics, "met": {metric: bool}, "losses": [first, last]} for one captioner."""
    model, processor = load_captioner(folder)
    _, base = greedy_captions(model, processor, test_scenes)
    model, losses = train_on_true_captions(model, processor, train=train, steps=steps, scenes=scenes, seed=seed, lr=lr)
    _, tuned = greedy_captions(model, processor, test_scenes)
    met = {m: tuned[m] <= base[m] for m in METRICS[1:]}
    met[METRICS[0]] = tuned[METRICS[0]] >= RECALL_TARGET
    return {"base": base, "ceiling": tuned, "met": met, "losses": [losses[0], losses[-1]] if losses else []}


def report_table(report: dict, label: str) -> str:
    lines = [f"| metric (greedy, test scenes) | base | {label} | target |", "|---|---:|---:|---|"]
    for key in (*METRICS, "words"):
        mark, want = "", ""
        if key in report["met"]:
            mark = " ✓" if report["met"][key] else " ✗"
            want = f"{RECALL_TARGET} or more" if key == METRICS[0] else "not above base"
        lines.append(f"| {key} | {report['base'][key]:.3f} | {report['ceiling'][key]:.3f}{mark} | {want} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from vizer.model_ids import resolve_model_id

    parser = argparse.ArgumentParser(prog="python -m shapescap.ceiling", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train",
        choices=list(LEARNING_RATES),
        default="lora",
        help="LoRA r32 on the language model; the whole language model and connector; or the vision tower too",
    )
    parser.add_argument("--steps", type=_positive, default=400)
    parser.add_argument("--scenes", type=_positive, default=2048, help="training scenes (true captions)")
    parser.add_argument("--test-scenes", type=_positive, default=500)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: per --train mode)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--captioner", default="tiny:shapes-captioner", help="model id or folder")
    args = parser.parse_args(argv)

    folder = resolve_model_id(args.captioner)
    if not (Path(folder) / "config.json").is_file():
        parser.error(f"--captioner {args.captioner}: no model folder at {folder}")
    report = ceiling_report(
        folder,
        train=args.train,
        steps=args.steps,
        scenes=args.scenes,
        test_scenes=args.test_scenes,
        seed=args.seed,
        lr=args.lr,
    )
    trained = {"lora": "LoRA r32", "language": "language model", "all": "whole model"}[args.train]
    print(report_table(report, f"SFT on true captions ({trained}, {args.steps} steps)"))
    met = sum(report["met"].values())
    print(f"ceiling: {met} of {len(report['met'])} greedy targets met")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())

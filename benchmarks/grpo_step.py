"""One GRPO step of a real-sized captioner, stock TRL vs group-shared vision, side by side.

    python -m benchmarks.grpo_step [--repeats 2] [--steps 3]

The model is random with SmolVLM-256M-Base's published dimensions (speed and memory do not depend on the
weights' values): the SmolLM2-135M decoder (hidden 576, 30 layers, 9 heads / 3 KV heads, MLP 1536, vocabulary
49,280) and SigLIP base-patch16-512 (hidden 768, 12 layers, 12 heads, MLP 3072, 512 px tiles, patch 16), pixel
shuffle 4: 64 image tokens per image without splitting. Source: the HuggingFaceTB/SmolVLM-256M-Base model card
(base models SmolLM2-135M and google/siglip-base-patch16-512) and its config.json. The offline tokenizer is
smaller than the published vocabulary, so generation is kept inside the tokenizer's ids.

Each side runs in its own process (so peak RSS is its own); sides alternate, `repeats` times, and the
median seconds per step (after a warm-up step) is reported with its split into generation, reward and the
rest (log-probs and the training forward/backward).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

G = 8
SMOLVLM_256M = {
    "text": {
        "vocab_size": 49280,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    "vision": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 512,
        "patch_size": 16,
    },
    "scale_factor": 4,
}


def smolvlm256_shaped():
    """(model, processor): random weights, published dimensions, the project's offline tokenizer."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    from vizer.tiny import IDEFICS3_CHAT_TEMPLATE, idefics3_tokenizer

    side, dims = SMOLVLM_256M["vision"]["image_size"], SMOLVLM_256M
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False, size={"longest_edge": side}, max_image_size={"longest_edge": side}
    )
    tokens = (side // dims["vision"]["patch_size"]) ** 2 // dims["scale_factor"] ** 2
    processor = Idefics3Processor(
        image_processor, idefics3_tokenizer(), image_seq_len=tokens, chat_template=IDEFICS3_CHAT_TEMPLATE
    )
    tok = processor.tokenizer
    eos, pad = tok.convert_tokens_to_ids("<end_of_utterance>"), tok.convert_tokens_to_ids("<|im_end|>")
    config = Idefics3Config(
        text_config={"model_type": "llama", **dims["text"], "eos_token_id": eos, "pad_token_id": pad},
        vision_config=dims["vision"],
        scale_factor=dims["scale_factor"],
        image_token_id=processor.image_token_id,
        pad_token_id=pad,
    )
    torch.manual_seed(0)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    return model, processor


def one_side(shared: bool, steps: int) -> dict:
    """Train `steps` GRPO steps (after one warm-up) on one process; seconds per step and its split."""
    # imported here, in the measuring subprocess only: the orchestrating process stays free of torch
    import torch
    from datasets import Dataset
    from datasets import Image as ImageFeature
    from transformers import TrainerCallback
    from trl import GRPOConfig

    from data.sources import conversational_prompt
    from shapescap.scenes import render, shapes_scenes
    from vizer.families import IDEFICS3, language_lora_targets
    from vizer.grpo import CaptionGRPOTrainer
    from vizer.models import lora_config
    from vizer.objective import suppressed_ids
    from vizer.shared_vision import share_vision

    torch.set_num_threads(2)
    model, processor = smolvlm256_shaped()
    scenes = shapes_scenes("validation", steps + 1)
    rows = Dataset.from_dict(
        {"image": [render(s, 512) for s in scenes], "image_id": [str(i) for i in range(len(scenes))]}
    )
    rows = rows.cast_column("image", ImageFeature()).map(
        lambda _: {"prompt": conversational_prompt("Describe this image.")}
    )

    timing = {"generation": [], "reward": [], "step": []}

    def length(completions, **kwargs):
        start = time.perf_counter()
        out = [float(len(c[0]["content"].split())) for c in completions]
        timing["reward"].append(time.perf_counter() - start)
        return out

    vocab = len(processor.tokenizer)
    args = GRPOConfig(
        output_dir="/tmp/vizer-bench-grpo",
        per_device_train_batch_size=G,  # one image x G captions per step
        num_generations=G,
        max_completion_length=16,
        max_steps=steps + 1,
        learning_rate=1e-5,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        remove_unused_columns=False,
        shuffle_dataset=False,
        # a random model samples anything: keep it to the tokenizer's ids and off the image/special tokens
        generation_kwargs={
            "suppress_tokens": [
                *suppressed_ids(model, processor.tokenizer),
                *range(vocab, SMOLVLM_256M["text"]["vocab_size"]),
            ]
        },
    )
    lora = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "language", "enabled": True}
    peft = lora_config(lora, model, IDEFICS3)
    assert peft.target_modules == language_lora_targets(model, IDEFICS3)

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            timing["step"].append(time.perf_counter() - self.start)

    trainer = CaptionGRPOTrainer(
        model=model,
        reward_funcs=[length],
        args=args,
        train_dataset=rows,
        processing_class=processor,
        peft_config=peft,
        callbacks=[Clock()],
    )
    generate = trainer._generate_single_turn

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = generate(*a, **k)
        timing["generation"].append(time.perf_counter() - start)
        return out

    trainer._generate_single_turn = timed_generate
    hook = share_vision(trainer.model) if shared else None
    trainer.train()
    keep = slice(1, None)  # the first step pays one-off costs
    step, gen, reward = (statistics.median(timing[k][keep]) for k in ("step", "generation", "reward"))
    return {
        "step_s": step,
        "generation_s": gen,
        "reward_s": reward,
        "training_s": step - gen - reward,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "tiles_encoded": hook.tiles_encoded if hook else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grpo_step", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--side", choices=["stock", "shared"], help=argparse.SUPPRESS)  # one side, in a subprocess
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(one_side(args.side == "shared", args.steps)))
        return 0
    runs: dict[str, list[dict]] = {"stock": [], "shared": []}
    for _ in range(args.repeats):
        for side in runs:  # alternate, so a noisy machine slows both alike
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.grpo_step", "--side", side, "--steps", str(args.steps)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {
        side: {
            k: statistics.median(r[k] for r in rs)
            for k in ("step_s", "generation_s", "reward_s", "training_s", "peak_rss_gb")
        }
        for side, rs in runs.items()
    }
    results = {
        "grpo_step_speedup_smolvlm256": med["stock"]["step_s"] / med["shared"]["step_s"],
        "grpo_peak_rss_ratio_smolvlm256": med["stock"]["peak_rss_gb"] / med["shared"]["peak_rss_gb"],
    }
    for side in runs:
        for part in ("step_s", "generation_s", "reward_s", "training_s", "peak_rss_gb"):
            results[f"grpo_{side}_{part}_smolvlm256"] = med[side][part]
    for name, value in results.items():
        print(f"{name}: {value:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

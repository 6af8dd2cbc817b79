"""A tiny CLIP trained on the synthetic shapes scenes: a grounding scorer with known semantics.

`shapes_clip_path()` trains it once (under a minute on one CPU core, deterministic) and caches the folder,
which loads like any CLIP checkpoint (`AutoModel`, `AutoTokenizer`, `AutoImageProcessor`); the grounding
reward takes it as `model: tiny:shapes-clip`.

Training has two phases. First the image tower alone learns to name the (colour, shape) pairs of a scene,
which teaches a small ViT shapes far faster than contrastive pairs do. Then the text tower and both
projections learn by symmetric InfoNCE with hard negative captions per image: a colour or shape swapped, an
object dropped or added, and the two hacks a plain CLIP reward was seen to reward — a repeated object ("a
red square and a red square") and a run-on ("a red square red square").

    python -m shapescap.clip --eval     # path, and held-out ranking accuracy per kind of error
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shapescap.captions import RANKING_KINDS, negative, positive, ranking_pairs, with_prefix
from shapescap.scenes import COLOURS, SHAPES, SIZES, render, shapes_scenes
from vizer.tiny import build_once, cache_root

if TYPE_CHECKING:  # torch and transformers load inside the functions: `import shapescap` stays fast
    from transformers import CLIPModel, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

_FORMAT = 3  # bump when the training recipe changes, so stale caches are not reused

# CLIP pools text at the first EOS unless eos_token_id == 2 (a legacy path that pools at the highest id).
SPECIAL = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
# Shape words, the prompt prefix and a few generic words so that real captions tokenize to something.
WORDS = sorted(
    set(COLOURS)
    | set(SHAPES)
    | set(SIZES)
    | {s + "s" for s in SHAPES}
    | set(
        "a an and the photo depicts of with next to on in is are there some shapes shape objects object "
        "picture image coloured colored background white grey gray one two three left right top bottom "
        "middle center centre above below near big little tiny , .".split()
    )
)


@dataclass(frozen=True)
class ShapesClipConfig:
    image_size: int = 64
    patch_size: int = 16  # 16 patches: 4x cheaper than patch 8, and a small ViT learns shapes as fast
    hidden: int = 64  # text width and the shared embedding size
    layers: int = 2
    heads: int = 4
    vision_hidden: int = 128
    vision_layers: int = 2
    # Phase 1 trains the image tower alone to name the (colour, shape) pairs of a scene: a dense signal
    # that teaches shapes several times faster than contrastive pairs. Phase 2 is CLIP training of the
    # text tower and both projections against the frozen image tower.
    vision_steps: int = 1000
    vision_batch_size: int = 64
    steps: int = 200
    batch_size: int = 64
    lr: float = 3e-3
    n_scenes: int = 2048
    # hard negative captions of every image in phase 2, plus one drawn from `extra_negatives`
    negatives: tuple[str, ...] = ("colour", "shape")
    extra_negatives: tuple[str, ...] = ("shape", "drop", "add", "repeat", "runon")
    seed: int = 0
    split: str = "scorer"  # scenes it learns from; the judge uses its own, disjoint split


# An independent judge for evaluation: other seed, other size, disjoint scenes.
JUDGE_CONFIG = {"split": "judge", "seed": 1, "hidden": 48, "vision_hidden": 96}


def shapes_clip_path(**overrides) -> str:
    """Folder of the trained shapes CLIP; trains it on first use (cached by config)."""
    cfg = ShapesClipConfig(**overrides)
    key = hashlib.sha256(json.dumps([_FORMAT, asdict(cfg)], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"shapes-clip-{key}"
    build_once(folder, lambda tmp: train(cfg, tmp), marker="shapes_clip.json")  # train() writes it last
    return str(folder)


def shapes_judge_path() -> str:
    """Folder of the evaluation judge (`tiny:shapes-judge`), never used as a training reward."""
    return shapes_clip_path(**JUDGE_CONFIG)


# ---------------------------------------------------------------------------------------------- model
def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lowercased; appends the EOS that CLIP pools."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", bos), ("<|endoftext|>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=77,
    )


def build_model(cfg: ShapesClipConfig, tokenizer: PreTrainedTokenizerFast) -> CLIPModel:
    from transformers import CLIPConfig, CLIPModel

    text = dict(
        hidden_size=cfg.hidden,
        intermediate_size=cfg.hidden * 2,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = dict(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.hidden)
    return CLIPModel(config)


def build_image_processor(cfg: ShapesClipConfig) -> CLIPImageProcessorPil:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # works without torchvision

    side = cfg.image_size
    return CLIPImageProcessorPil(
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def train(cfg: ShapesClipConfig, out: Path, log: bool = False) -> dict:
    import torch

    threads = torch.get_num_threads()
    # one thread: the same floats on every machine, and no slowdown when the cores are shared
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():  # seed locally: leave the caller's random stream alone
            torch.manual_seed(cfg.seed)
            return _train(cfg, out, log)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: ShapesClipConfig, out: Path, log: bool) -> dict:
    import torch
    import torch.nn.functional as F

    rng = random.Random(cfg.seed)
    tokenizer = build_tokenizer()
    model = build_model(cfg, tokenizer)
    processor = build_image_processor(cfg)
    scenes = shapes_scenes(cfg.split, cfg.n_scenes)
    pixels = processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
    t0 = time.perf_counter()

    def report(phase: str, step: int, loss: torch.Tensor) -> None:
        if log and step % 100 == 0:
            print(f"{phase} step {step} loss {loss.item():.3f} {time.perf_counter() - t0:.1f}s", flush=True)

    # phase 1: the image tower names the (colour, shape) pairs present (multi-label), through a throwaway head
    pairs = {(c, s): k for k, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)}
    labels = torch.zeros(len(scenes), len(pairs))
    for j, scene in enumerate(scenes):
        for o in scene.objects:
            labels[j, pairs[(o.colour, o.shape)]] = 1
    head = torch.nn.Linear(cfg.vision_hidden, len(pairs))
    vision = model.vision_model
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.vision_steps, 1), pct_start=0.1)
    model.train()
    for step in range(cfg.vision_steps):
        idx = [rng.randrange(len(scenes)) for _ in range(cfg.vision_batch_size)]
        loss = F.binary_cross_entropy_with_logits(head(vision(pixel_values=pixels[idx]).pooler_output), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        report("vision", step, loss)

    # phase 2: symmetric InfoNCE plus each image's own hard negative captions; the image tower stays as
    # phase 1 left it (its features are computed once), so what it learned about shapes is kept
    model.eval()
    with torch.no_grad():
        features = torch.cat(
            [vision(pixel_values=pixels[i : i + 256]).pooler_output for i in range(0, len(pixels), 256)]
        )
    model.train()
    vision.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1), pct_start=0.1)
    for step in range(cfg.steps):
        idx = [rng.randrange(len(scenes)) for _ in range(cfg.batch_size)]
        kinds = list(cfg.negatives) + ([rng.choice(cfg.extra_negatives)] if cfg.extra_negatives else [])
        pos, neg = [], []
        for j in idx:
            text, sizes = positive(scenes[j], rng)
            pos.append(with_prefix(text, rng))
            neg += [with_prefix(negative(scenes[j], k, rng, sizes), rng) for k in kinds]
        enc = tokenizer(pos + neg, padding=True, return_tensors="pt")
        img = F.normalize(model.visual_projection(features[idx]), dim=-1)
        txt = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
        b, k = len(idx), len(kinds)
        scale = model.logit_scale.exp().clamp(max=100)
        tp, tn = txt[:b], txt[b:].view(b, k, -1)
        i2t = torch.cat([img @ tp.T, torch.einsum("bd,bkd->bk", img, tn)], dim=1) * scale
        t2i = (tp @ img.T) * scale
        target = torch.arange(b)
        loss = (F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        report("clip", step, loss)

    vision.requires_grad_(True)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    info = {"config": asdict(cfg), "train_seconds": round(time.perf_counter() - t0, 1)}
    (out / "shapes_clip.json").write_text(json.dumps(info, indent=1))
    return info


def evaluate(path: str, n: int = 200) -> dict[str, float]:
    """How often the correct caption of a held-out image outscores a wrong one, per kind of error."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(path).eval()
    tokenizer, processor = AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)
    scenes = shapes_scenes("test", n)
    wins = dict.fromkeys(RANKING_KINDS, 0.0)
    with torch.inference_mode():
        pixels = processor([render(s) for s in scenes], return_tensors="pt")["pixel_values"]
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        for kind in RANKING_KINDS:
            pairs = [[f"A photo depicts {t}" for t in texts] for texts in ranking_pairs(scenes, kind)]
            enc = [
                F.normalize(
                    model.get_text_features(**tokenizer(t, padding=True, return_tensors="pt")).pooler_output, dim=-1
                )
                for t in pairs
            ]
            wins[kind] = ((img * enc[0]).sum(-1) > (img * enc[1]).sum(-1)).float().mean().item()
    return wins


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m shapescap.clip", description="Train (once) the shapes CLIP.")
    parser.add_argument("--eval", action="store_true", help="also print held-out ranking accuracy per error kind")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="training config overrides")
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    t = time.perf_counter()
    folder = shapes_clip_path(**overrides)
    print(f"{folder} ({time.perf_counter() - t:.1f}s)")
    if args.eval:
        for kind, acc in evaluate(folder).items():
            print(f"{kind}: {acc:.3f}")

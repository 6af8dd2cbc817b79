"""ViZer (Byun et al., 2025) as a training objective: latent alignment, no reward, no labels.

Stage A trains the mapper on (image, caption) pairs with the VLM frozen: `collect_pairs_generated` (variant G,
the VLM's own captions) or human captions (variant GT), then `train_mapper`.
Stage B trains LoRA only: `ViZerTrainer` generates a caption per image with the current policy, re-forwards it
text-only with gradients, maps it with the frozen mapper, and minimises 1 - cos(F_image, mapper(h)).
See rewards/latent.py for how F_image and h are measured (and why).
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from data.images import to_rgb
from rewards.common import LRUCache, image_key
from rewards.latent import Mapper, caption_states, image_features


# ---------------------------------------------------------------------------------------------- rollouts
def conversation(prompt: Any) -> list[dict]:
    """A plain-string prompt as one user turn with the image first; a conversational one as is."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return list(prompt)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


def suppressed_ids(model: Any, tokenizer: Any) -> list[int]:
    """Special tokens a caption must never contain (image, row/col, chat markup), EOS excepted: a sampled
    `<image>` crashes the re-forward, and `<row_i_col_j>` is not an all_special_id."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    return sorted(special - set(eos_ids(model, tokenizer)))


@dataclass
class Rollout:
    captions: list[str]  # decoded, special tokens skipped, stripped
    inputs: dict[str, torch.Tensor]  # the processor's left-padded prompt batch (one row per prompt)
    sequences: torch.Tensor  # prompt + generated ids, (rows, prompt_len + new)
    completion_mask: torch.Tensor  # generated tokens up to and including the first EOS


@torch.no_grad()
def generate_captions(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    prompts: Sequence[Any],
    *,
    do_sample: bool = True,
    temperature: float = 1.0,
    max_new_tokens: int = 48,
    num_return_sequences: int = 1,
) -> Rollout:
    """One batch of captions from the model, in eval mode (restored after), special tokens suppressed."""
    tokenizer = processor.tokenizer
    texts = [processor.apply_chat_template(conversation(p), add_generation_prompt=True) for p in prompts]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right edge
    try:
        inputs = processor(text=texts, images=[[to_rgb(im)] for im in images], return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    # plain sampling at `temperature`, whatever top_k/top_p the checkpoint's generation_config sets
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {"do_sample": False}
    )
    was_training = model.training
    model.eval()
    try:
        sequences = model.generate(
            **inputs,
            **sampling,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
            suppress_tokens=suppressed_ids(model, tokenizer),
            num_return_sequences=num_return_sequences,
        )
    finally:
        model.train(was_training)
    new = sequences[:, inputs["input_ids"].shape[1] :]
    captions = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return Rollout(captions, inputs, sequences, completion_mask(new, eos))


def completion_mask(new: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """1 for generated tokens up to and including the first EOS (what the policy chose), 0 for the padding after."""
    is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
    first = torch.where(is_eos.any(1), is_eos.long().argmax(1), torch.full_like(new[:, 0], new.shape[1]))
    return (torch.arange(new.shape[1], device=new.device)[None] <= first[:, None]).long()


# ---------------------------------------------------------------------------------------------- Stage A
def collect_pairs_generated(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    prompt: Any,
    n_per_image: int = 2,
    max_new_tokens: int = 48,
    seed: int = 0,
    *,
    temperature: float = 1.0,
    batch_size: int = 8,
) -> list[tuple[int, str]]:
    """Variant G: `n_per_image` sampled captions per image by the VLM itself, as (image index, caption);
    empty captions are dropped. The caller's RNG is left as it was."""
    pairs: list[tuple[int, str]] = []
    with torch.random.fork_rng():  # all devices: manual_seed seeds CUDA too, and sampling runs there
        torch.manual_seed(seed)
        for start in range(0, len(images), batch_size):
            batch = list(images[start : start + batch_size])
            out = generate_captions(
                model,
                processor,
                batch,
                [prompt] * len(batch),
                do_sample=True,
                temperature=temperature,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n_per_image,
            )
            pairs += [(start + k // n_per_image, c) for k, c in enumerate(out.captions) if c]
            done = min(start + batch_size, len(images))
            if done == len(images) or done * 10 // len(images) > start * 10 // len(images):  # ~every 10%
                print(f"vizer stage A: captioned {done}/{len(images)} images, {len(pairs)} captions", flush=True)
    return pairs


# Clause boundaries of a caption: commas, "and", "with", "next to", "beside"; generic, not ShapesCap's words.
_SEGMENT = re.compile(r"\s*,\s*(?:and\s+)?|\s+(?:and|with|next to|beside)\s+", re.IGNORECASE)
NEGATIVE_ACCURACY = "heldout_hard_negative_accuracy"  # the report's key


def hard_negatives(caption: str, other: str, rng: random.Random) -> list[str]:
    """Zero-label hard negatives of one caption, built from its own segments (clauses split at commas, "and",
    "with"): a segment said twice, a segment dropped, a segment replaced by one of `other` (another image's
    caption). Each is a worse caption of the same image; a one-segment caption has no drop."""
    text = caption.strip().rstrip(".")
    segments = [s for s in _SEGMENT.split(text) if s]
    if not segments:
        return []
    out = [text + " and " + rng.choice(segments)]  # said twice
    if len(segments) > 1:
        k = rng.randrange(len(segments))
        out.append(_join(segments[:k] + segments[k + 1 :]))  # one dropped
    foreign = [s for s in _SEGMENT.split(other.strip().rstrip(".")) if s and s not in segments]
    if foreign:
        k = rng.randrange(len(segments))
        out.append(_join([*segments[:k], rng.choice(foreign), *segments[k + 1 :]]))  # one swapped in
    return out


def _join(segments: list[str]) -> str:
    return segments[0] if len(segments) == 1 else ", ".join(segments[:-1]) + " and " + segments[-1]


def train_mapper(
    model: Any,
    processor: Any,
    images: Sequence[Any],
    captions: Sequence[tuple[int, str]],
    *,
    width: int = 256,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 64,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    weight_decay: float = 0.0,
    variant: str = "G",
    base_model: str | None = None,
    hard_negatives_weight: float = 0.0,
    margin: float = 0.05,
) -> tuple[Mapper, dict[str, Any]]:
    """Fit the mapper on (image index, caption) pairs with 1 - cos; the VLM stays frozen, so F_I and h are
    computed once. Held-out pairs are those of held-out IMAGES (unseen images, not unseen captions).

    The report's `heldout_shuffled_cosine` pairs each held-out prediction with another held-out image: features
    share a large common direction, so the margin over it, not the cosine itself, shows what was learned.

    With `hard_negatives_weight` > 0, each caption also gets `hard_negatives` (a segment repeated, dropped or
    swapped for another image's) and a hinge term asks its own image to be `margin` closer in cosine to the
    caption than to each of them; `heldout_hard_negative_accuracy` reports how often it is on held-out images.
    """
    rng = random.Random(seed)
    used = sorted({i for i, _ in captions})
    rng.shuffle(used)
    n_held = max(1, round(heldout_fraction * len(used))) if heldout_fraction > 0 and len(used) > 1 else 0
    held = set(used[:n_held])
    print(f"vizer stage A: features of {len(used)} images and {len(captions)} captions", flush=True)
    index = {img: j for j, img in enumerate(sorted(set(used)))}
    feats = image_features(model, processor, [images[i] for i in sorted(index)])
    target = feats[[index[i] for i, _ in captions]]
    tokenizer = getattr(processor, "tokenizer", processor)
    states = caption_states(model, tokenizer, [c for _, c in captions], batch_size=batch_size)
    is_held = torch.tensor([i in held for i, _ in captions])
    train_index = torch.arange(len(captions))[~is_held]  # row of each training pair in `captions`
    train_x, train_y = states[~is_held], target[~is_held]
    held_x, held_y = states[is_held], target[is_held]

    negatives = _negative_states(model, tokenizer, captions, rng, batch_size) if hard_negatives_weight > 0 else None

    mapper = Mapper(states.shape[1], feats.shape[1], width, seed=seed)
    optimizer = torch.optim.AdamW(mapper.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    shuffle = _derangement(len(held_x), generator)

    def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return F.cosine_similarity(mapper(x), y, dim=-1).mean().item() if len(x) else math.nan

    history = []
    for epoch in range(1, epochs + 1):
        mapper.train()
        for batch in torch.randperm(len(train_x), generator=generator).split(batch_size):
            positive = F.cosine_similarity(mapper(train_x[batch]), train_y[batch], dim=-1)
            loss = (1 - positive).mean()
            if negatives is not None:
                loss = loss + hard_negatives_weight * _hinge(
                    mapper, negatives, train_index[batch], positive, target, margin
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        mapper.eval()
        row = {
            "epoch": epoch,
            "train_cosine": cosine(train_x, train_y),
            "heldout_cosine": cosine(held_x, held_y),
            "heldout_shuffled_cosine": cosine(held_x, held_y[shuffle]),
        }
        if negatives is not None:
            row[NEGATIVE_ACCURACY] = _negative_accuracy(mapper, negatives, states, target, is_held)
        history.append(row)
        if epoch == 1 or epoch == epochs or epoch % max(1, epochs // 5) == 0:
            print(
                f"vizer stage A: epoch {epoch}/{epochs} train cos {row['train_cosine']:.4f} "
                f"held-out cos {row['heldout_cosine']:.4f} (shuffled {row['heldout_shuffled_cosine']:.4f})"
                + (f", hard negatives ranked below {row[NEGATIVE_ACCURACY]:.3f}" if NEGATIVE_ACCURACY in row else ""),
                flush=True,
            )
    report = {
        **{k: v for k, v in history[-1].items() if k != "epoch"},
        "epochs": history,
        "pairs": len(captions),
        "heldout_pairs": int(is_held.sum()),
        "images": len(used),
    }
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    mapper.meta.update(
        base_model=base_model or base or None,
        variant=variant,
        hard_negatives=hard_negatives_weight,
        margin=margin,
        feature="connector_mean",
        text_state="last_hidden_mean_text_only",
        lr=lr,
        epochs=epochs,
        **{k: v for k, v in report.items() if k != "epochs"},
    )
    return mapper.requires_grad_(False), report


def _negative_states(model: Any, tokenizer: Any, captions, rng: random.Random, batch_size: int):
    """(caption row of each negative, its latent): the hard negatives of every caption, another image's caption
    lending the swapped-in segment."""
    rows, texts = [], []
    for row, (image, caption) in enumerate(captions):
        other = captions[rng.randrange(len(captions))]
        if other[0] == image:  # another image's caption, when there is one
            other = next((c for c in captions if c[0] != image), other)
        for negative in hard_negatives(caption, other[1], rng):
            rows.append(row)
            texts.append(negative)
    if not texts:
        return None
    return torch.tensor(rows), caption_states(model, tokenizer, texts, batch_size=batch_size)


def _hinge(mapper, negatives, rows: torch.Tensor, positive: torch.Tensor, target: torch.Tensor, margin: float):
    """Mean of relu(margin - (cos(image, caption) - cos(image, negative))) over the batch's captions' negatives."""
    owner, states = negatives
    pick = torch.isin(owner, rows)
    if not pick.any():
        return positive.new_zeros(())
    slot = torch.empty(int(max(owner.max(), rows.max())) + 1, dtype=torch.long)
    slot[rows] = torch.arange(len(rows))  # each batch row's place in `positive`
    negative = F.cosine_similarity(mapper(states[pick]), target[owner[pick]], dim=-1)
    return F.relu(margin - (positive[slot[owner[pick]]] - negative)).mean()


def _negative_accuracy(mapper, negatives, states, target, is_held) -> float:
    """Share of held-out images' hard negatives that the mapper places farther from the image than the caption."""
    owner, negative_states = negatives
    pick = is_held[owner]
    if not pick.any():
        return math.nan
    with torch.no_grad():
        positive = F.cosine_similarity(mapper(states[owner[pick]]), target[owner[pick]], dim=-1)
        negative = F.cosine_similarity(mapper(negative_states[pick]), target[owner[pick]], dim=-1)
    return (positive > negative).float().mean().item()


def _derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A permutation that moves every index (a shift of a random permutation), so no row meets its own image."""
    if n < 2:
        return torch.arange(n)
    perm = torch.randperm(n, generator=generator)
    out = torch.empty(n, dtype=torch.long)
    out[perm] = perm.roll(1)
    return out


# ---------------------------------------------------------------------------------------------- Stage B
def collate_images(rows: list[dict]) -> dict[str, list]:
    """Column lists, PIL images untouched (the trainer generates from them itself)."""
    return {key: [row[key] for row in rows] for key in rows[0]} if rows else {}


def distinct_2(captions: Sequence[str]) -> float:
    """Distinct word bigrams over all bigrams of a batch of captions (1.0 = no bigram repeats)."""
    bigrams = [tuple(w[i : i + 2]) for w in (c.split() for c in captions) for i in range(len(w) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


class ViZerTrainer(Trainer):
    """Stage B: loss = 1 - cos(F_image, mapper(h_caption)) on the policy's own captions (+ kl_beta * KL).

    Dataset rows: `image` (PIL), `prompt` (string or conversational), optional `image_id` (feature cache key).
    The mapper is frozen and held as a plain attribute: not a parameter of the model, so never optimised
    nor checkpointed (keep its folder; pass the same one when resuming). Eval uses greedy captions.
    """

    def __init__(
        self,
        model: Any,
        args: TrainingArguments,
        *,
        mapper: Mapper,
        processing_class: Any,
        kl_beta: float = 0.0,
        do_sample: bool = True,
        temperature: float = 1.0,
        max_new_tokens: int = 48,
        feature_cache_size: int = 4096,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        args.remove_unused_columns = False  # the model's forward takes no `image`/`prompt`: keep them
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator or collate_images,
            processing_class=processing_class,
            **kwargs,
        )
        if kl_beta and not hasattr(self.accelerator.unwrap_model(self.model), "disable_adapter"):
            raise ValueError("vizer: kl_beta needs a PEFT model (the reference is the policy with its adapter off)")
        self.mapper = mapper.to(self.args.device).eval().requires_grad_(False)
        self.kl_beta, self.do_sample, self.temperature = float(kl_beta), do_sample, temperature
        self.max_new_tokens = max_new_tokens
        self.features = LRUCache(feature_cache_size)
        self._metrics: dict[str, defaultdict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def image_targets(self, policy: Any, images: list[Any], ids: list[Any] | None) -> torch.Tensor:
        """F_I per row, from the base vision path (adapter off), each distinct image encoded once, then cached."""
        keys = [image_key(im, ids[i] if ids else None) for i, im in enumerate(images)]
        missing = {k: im for k, im in zip(keys, images) if self.features.get(k) is None}
        if missing:
            off = policy.disable_adapter() if hasattr(policy, "disable_adapter") else contextlib.nullcontext()
            with off:
                fresh = image_features(policy, self.processing_class, list(missing.values()))
            for key, f in zip(missing, fresh):
                self.features.put(key, f)
        return torch.stack([self.features.get(k) for k in keys]).to(self.args.device)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        mode = "train" if model.training else "eval"
        policy = self.accelerator.unwrap_model(model)
        images = [to_rgb(im[0] if isinstance(im, (list, tuple)) else im) for im in inputs["image"]]
        ids = inputs.get("image_id")
        rollout = generate_captions(
            policy,
            self.processing_class,
            images,
            inputs["prompt"],
            do_sample=self.do_sample and mode == "train",
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
        )
        target = self.image_targets(policy, images, list(ids) if ids is not None else None)
        keep = [i for i, c in enumerate(rollout.captions) if c]  # an empty caption has no state to align
        if keep:
            h = caption_states(
                model, self.processing_class, [rollout.captions[i] for i in keep], grad=torch.is_grad_enabled()
            )  # through the LoRA policy; none in eval
            cos = F.cosine_similarity(self.mapper(h), target[keep], dim=-1)
            loss = (1 - cos).mean()
        else:
            cos = torch.zeros(0, device=self.args.device)
            # zero, but attached to the trainable parameters so backward (and DDP) still runs
            zero = torch.zeros((), device=self.args.device)
            loss = sum((p.sum() * 0.0 for p in model.parameters() if p.requires_grad), zero)
        values = {
            "alignment_cosine": cos.mean().item() if keep else math.nan,
            "caption_length": sum(len(c.split()) for c in rollout.captions) / len(rollout.captions),
            "distinct_2": distinct_2(rollout.captions),
            "empty_captions": 1 - len(keep) / len(rollout.captions),
        }
        if self.kl_beta:
            kl = self.caption_kl(model, policy, rollout)
            loss = loss + self.kl_beta * kl
            values["kl"] = kl.item()
        self._record(mode, values)
        return (loss, {"alignment_cosine": cos.detach()}) if return_outputs else loss

    def caption_kl(self, model: Any, policy: Any, rollout: Rollout) -> torch.Tensor:
        """KL(policy || base) per caption token, in the generation context (image + prompt), exact over the vocab."""
        prompt_len = rollout.inputs["input_ids"].shape[1]
        new = rollout.sequences.shape[1] - prompt_len
        mask = rollout.completion_mask
        forward = {}
        for key, value in rollout.inputs.items():
            if value.shape == rollout.inputs["input_ids"].shape and not key.startswith("pixel"):
                # per-token fields (attention_mask, qwen's mm_token_type_ids): extend over the caption
                tail = mask if key == "attention_mask" else torch.zeros_like(value[:, :1]).expand(-1, new)
                value = torch.cat([value, tail.to(value.dtype)], 1)
            forward[key] = value
        forward["input_ids"] = rollout.sequences
        logp = model(**forward, use_cache=False, logits_to_keep=new + 1).logits[:, :-1].float().log_softmax(-1)
        with torch.no_grad(), policy.disable_adapter():
            logq = policy(**forward, use_cache=False, logits_to_keep=new + 1).logits[:, :-1].float().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        return (kl * mask).sum() / mask.sum().clamp(min=1)

    def _record(self, mode: str, values: dict[str, float]) -> None:
        # one collective per step so every process's batch counts in the logged mean
        local = torch.tensor([values[k] for k in sorted(values)], device=self.args.device, dtype=torch.float32)
        gathered = self.accelerator.gather(local[None]).reshape(-1, len(values))
        for j, key in enumerate(sorted(values)):
            column = gathered[:, j]
            column = column[~column.isnan()]
            if len(column):
                self._metrics[mode][key].append(column.mean().item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)  # in place: evaluate() returns the dict it logged
        super().log(logs, start_time)
        self._metrics[mode].clear()

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: list[str] | None = None
    ) -> tuple[torch.Tensor, None, None]:
        with torch.no_grad():
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
        return loss.detach(), None, None

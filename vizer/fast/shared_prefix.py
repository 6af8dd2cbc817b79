"""Group-shared language-model prefix: one packed row per GRPO group in the log-prob and training forwards.

TRL repeats each prompt (image tokens + prompt text, P columns, left-padded) G times and runs the language model
on every row: G * (P + R) tokens per group, R being the right-padded completion length. Here each group becomes
one row,

    [prompt columns 0..P-2] [last prompt token, c_1] [last prompt token, c_2] ... [last prompt token, c_G]

with a 4D attention mask under which a block attends to the shared prefix and causally to itself only
(PrefixGrouper-style), and with each token's position id copied from where the token sits in its stock row (for
Qwen2-VL the 3 x rows x length M-RoPE ids of the model's own rope-index function). Every query then sees the same
keys, at the same positions, as in the stock row, so the log-probs are the stock ones. The last prompt token is
repeated at the head of each block because its hidden state predicts each completion's first token, and a
position can carry one label only. The image is passed once per group.

Exact for the idefics3 and qwen2_vl families under the eager and sdpa attention implementations, which take a
custom 4D mask as given (see `why_not_shared_prefix` for the rest).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from trl.trainer import utils as trl_utils
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

SUPPORTED_FAMILIES = ("idefics3", "qwen2_vl")
# transformers returns a 4D mask as is from `create_causal_mask`; eager adds it to the scores, sdpa passes it to
# torch. Flash attention reads only a 2D padding mask; flex attention wants a BlockMask.
EXACT_ATTENTION = ("eager", "sdpa")
_LABEL_IGNORE = -100


# ---------------------------------------------------------------------------------------------
# When it is exact, and what it saves
# ---------------------------------------------------------------------------------------------


def _inner(model: nn.Module) -> nn.Module:
    """The model under a DistributedDataParallel wrapper (which has neither its config nor its methods); the
    forward still goes through the wrapper, which synchronises the gradients."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _config(model: nn.Module):
    return _inner(model).config


def _text_config(model: nn.Module):
    return _config(model).get_text_config()


def why_not_shared_prefix(model: nn.Module, family: str) -> str | None:
    """Why the stock forward must run (a reason for the start-up line), or None when the shared prefix is exact."""
    if family not in SUPPORTED_FAMILIES:
        return f"the group-shared prefix is not written for the {family} family"
    text = _text_config(model)
    implementation = text._attn_implementation
    if implementation not in EXACT_ATTENTION:
        if "flash" in str(implementation):
            return f"{implementation} cannot take the custom 4D attention mask the packed rows need"
        return f"the {implementation} attention implementation is not checked with a custom 4D mask (eager, sdpa are)"
    if "sliding_attention" in (getattr(text, "layer_types", None) or ()):
        return "sliding-window layers would lose their window: the custom 4D mask replaces it"
    if model.training and _has_dropout(model):
        return "dropout is active (LoRA or model): the group would share one draw over its prompt and image"
    return None


def _has_dropout(model: nn.Module) -> bool:
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        return True

    def rates(config: dict) -> list[float]:
        found = []
        for key, value in config.items():
            if isinstance(value, dict):
                found += rates(value)
            elif "dropout" in str(key) and isinstance(value, (int, float)):
                found.append(value)
        return found

    return any(rate > 0 for rate in rates(_config(model).to_dict()))  # attention dropout is a rate, not a module


def lm_tokens(rows: int, prompt_len: int, completion_len: int, num_generations: int) -> tuple[int, int]:
    """Tokens the language model reads for `rows` completions in groups of `num_generations`: (stock, shared).

    Stock reads G * (P + R) per group; shared reads P - 1 + G * (R + 1) (the last prompt token heads every block).
    """
    groups = -(-rows // num_generations)
    return rows * (prompt_len + completion_len), groups * (prompt_len - 1) + rows * (completion_len + 1)


# ---------------------------------------------------------------------------------------------
# Stock positions and per-row images
# ---------------------------------------------------------------------------------------------


def _rope_owner(model: nn.Module) -> nn.Module | None:
    """The module that computes Qwen2-VL-style 3D positions, under any PEFT/DDP wrapping."""
    return next((m for m in model.modules() if hasattr(type(m), "compute_3d_position_ids")), None)


def stock_position_ids(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The position ids the model gives the stock rows: (rows, length), or (3, rows, length) for M-RoPE models."""
    rows, length = input_ids.shape
    default = torch.arange(length, device=input_ids.device).expand(rows, length)
    owner = _rope_owner(model)
    if owner is None:
        return default  # llama-style text models (idefics3): the column index, left padding included
    # the call the model's own forward makes when no position ids are passed
    positions = owner.compute_3d_position_ids(
        input_ids=input_ids,
        inputs_embeds=None,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
    )
    return default.expand(3, rows, length) if positions is None else positions


class RowImages:
    """Each row's image inputs, to compare rows and to pass one row per group.

    Two layouts: one entry per row (idefics3: pixel_values and pixel_attention_mask), or all images' patches in
    one sequence cut by `image_grid_thw`, with `num_images` per row (qwen2_vl)."""

    def __init__(
        self,
        rows: int,
        pixel_values: torch.Tensor | None,
        pixel_attention_mask: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        num_images: Sequence[int] | None,
    ) -> None:
        self.pixel_values, self.pixel_attention_mask, self.grid = pixel_values, pixel_attention_mask, image_grid_thw
        self.patches: list[tuple[int, int]] = []
        self.images: list[tuple[int, int]] = []
        if pixel_values is None or image_grid_thw is None:
            return
        if num_images is None:
            if len(image_grid_thw) != rows:
                raise ValueError("pass num_images: the rows do not hold one image each")
            num_images = [1] * rows
        image_ends = torch.tensor(list(num_images)).cumsum(0).tolist()
        patch_ends = [0, *image_grid_thw.prod(-1).cumsum(0).tolist()]
        for end, count in zip(image_ends, num_images):
            self.images.append((end - count, end))
            self.patches.append((patch_ends[end - count], patch_ends[end]))

    def of(self, row: int) -> tuple[torch.Tensor, ...]:
        if self.pixel_values is None:
            return ()
        if self.grid is not None:
            (p0, p1), (i0, i1) = self.patches[row], self.images[row]
            return self.pixel_values[p0:p1], self.grid[i0:i1]
        if self.pixel_attention_mask is None:
            return (self.pixel_values[row],)
        return self.pixel_values[row], self.pixel_attention_mask[row]

    def same(self, a: int, b: int) -> bool:
        x, y = self.of(a), self.of(b)
        return all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(x, y))

    def inputs(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The model's image inputs for these rows, in order."""
        if self.pixel_values is None:
            return {}
        if self.grid is not None:
            parts = [self.of(r) for r in rows if self.images[r][1] > self.images[r][0]]
            if not parts:
                return {}
            return {
                "pixel_values": torch.cat([p for p, _ in parts]),
                "image_grid_thw": torch.cat([g for _, g in parts]),
            }
        index = torch.tensor(rows, device=self.pixel_values.device)
        out = {"pixel_values": self.pixel_values[index]}
        if self.pixel_attention_mask is not None:
            out["pixel_attention_mask"] = self.pixel_attention_mask[index]
        return out


# ---------------------------------------------------------------------------------------------
# Groups and packing
# ---------------------------------------------------------------------------------------------


def prompt_groups(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    prompt_len: int,
    same_images: Callable[[int, int], bool] | None = None,
) -> list[list[int]]:
    """Rows with identical prompts (tokens and padding) and images, in first-seen order; any row order.

    `same_images(a, b)` tells whether rows a and b hold the same images (None: no images)."""
    keys = torch.cat([input_ids[:, :prompt_len], attention_mask[:, :prompt_len]], dim=1).tolist()
    groups: list[list[int]] = []
    by_key: dict[tuple, list[int]] = {}
    for row, key in enumerate(map(tuple, keys)):
        candidates = by_key.setdefault(key, [])
        match = next((g for g in candidates if same_images is None or same_images(groups[g][0], row)), None)
        if match is None:
            candidates.append(len(groups))
            groups.append([row])
        else:
            groups[match].append(row)
    return groups


def chunk_groups(groups: list[list[int]], batch_size: int | None) -> list[list[list[int]]]:
    """Whole groups per forward, at most `batch_size` completions each; a larger group is cut into pieces (each
    piece still shares its prefix)."""
    if not batch_size:
        return [groups]
    pieces = [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    chunks: list[list[list[int]]] = []
    room: list[int] = []
    for piece in pieces:  # first fit
        k = next((k for k, free in enumerate(room) if free >= len(piece)), None)
        if k is None:
            chunks.append([])
            room.append(batch_size)
            k = len(chunks) - 1
        chunks[k].append(piece)
        room[k] -= len(piece)
    return chunks


@dataclass
class Packing:
    """Where each packed column comes from in the stock batch, for one forward.

    src_row/src_col: the stock row and column a packed column copies; seg: 0 for the prefix, b + 1 for block b,
    -1 for filler after a group with fewer blocks than the longest."""

    groups: list[list[int]]
    src_row: torch.Tensor
    src_col: torch.Tensor
    seg: torch.Tensor
    prompt_len: int
    completion_len: int

    @property
    def block_len(self) -> int:
        return self.completion_len + 1

    def scored(self) -> torch.Tensor:
        """(packed rows, length) bool: columns whose hidden state predicts a completion token."""
        offset = self.src_col - (self.prompt_len - 1)
        return (self.seg > 0) & (offset < self.completion_len)

    def block_starts(self) -> tuple[list[int], torch.Tensor]:
        """The stock rows in packed order, and the flat index of each one's first scored column."""
        rows, starts = [], []
        width = self.src_col.shape[1]
        for k, group in enumerate(self.groups):
            for b, row in enumerate(group):
                rows.append(row)
                starts.append(k * width + self.prompt_len - 1 + b * self.block_len)
        return rows, torch.tensor(starts, device=self.src_col.device)


def pack(groups: list[list[int]], prompt_len: int, completion_len: int, device: torch.device) -> Packing:
    """The packed layout of these groups (see the module docstring)."""
    prefix, block = prompt_len - 1, completion_len + 1
    width = prefix + max(map(len, groups)) * block
    src_row = torch.empty(len(groups), width, dtype=torch.long)
    src_col = torch.full((len(groups), width), prefix, dtype=torch.long)  # filler repeats the last prompt token
    seg = torch.full((len(groups), width), -1, dtype=torch.long)
    block_cols = torch.arange(prefix, prefix + block)
    for k, group in enumerate(groups):
        src_row[k] = group[0]
        src_col[k, :prefix] = torch.arange(prefix)
        seg[k, :prefix] = 0
        for b, row in enumerate(group):
            start = prefix + b * block
            src_row[k, start : start + block] = row
            src_col[k, start : start + block] = block_cols
            seg[k, start : start + block] = b + 1
    return Packing(groups, src_row.to(device), src_col.to(device), seg.to(device), prompt_len, completion_len)


def packed_attention(packing: Packing, attention_mask: torch.Tensor) -> torch.Tensor:
    """(packed rows, length, length) bool, True = may attend: a query sees the keys its stock twin sees (not padded,
    not later in the stock row) that lie in the prefix or in its own block."""
    valid = attention_mask[packing.src_row, packing.src_col].bool() & (packing.seg >= 0)
    col, seg = packing.src_col, packing.seg
    allowed = valid[:, None, :] & (col[:, None, :] <= col[:, :, None])
    allowed &= (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    allowed &= seg[:, :, None] >= 0
    # filler queries see themselves only, so no softmax row is empty for them
    eye = torch.eye(col.shape[1], dtype=torch.bool, device=col.device)
    return allowed | (eye & (seg < 0)[:, :, None])


def _mask_for(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask in the form the attention implementation reads: bool for sdpa, additive for eager."""
    allowed = allowed[:, None]
    if implementation == "eager":
        zero = torch.zeros((), dtype=dtype, device=allowed.device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)
    return allowed


def _next_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per stock column: the next column's token (what its hidden state is scored on), and TRL's label for it
    (-100 where the next token is padding). The last column predicts nothing and is never scored."""
    ids = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    attended = torch.cat([attention_mask[:, 1:], torch.zeros_like(attention_mask[:, :1])], dim=1)
    return ids, ids.masked_fill(attended == 0, _LABEL_IGNORE)


# ---------------------------------------------------------------------------------------------
# The forward
# ---------------------------------------------------------------------------------------------


def _forward(
    model: nn.Module,
    packing: Packing,
    stock: dict[str, torch.Tensor],
    images: RowImages,
    temperature: float,
    compute_entropy: bool,
    fused_lm_head: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropies) of the packing's rows, in packed order: (completions, R)."""
    implementation = _text_config(model)._attn_implementation
    dtype = _inner(model).get_input_embeddings().weight.dtype
    inputs = {
        "input_ids": stock["input_ids"][packing.src_row, packing.src_col],
        "attention_mask": _mask_for(packed_attention(packing, stock["attention_mask"]), implementation, dtype),
        "position_ids": stock["positions"][..., packing.src_row, packing.src_col],
        **images.inputs([group[0] for group in packing.groups]),
    }
    scored = packing.scored()
    _, starts = packing.block_starts()
    flat = starts[:, None] + torch.arange(packing.completion_len, device=starts.device)
    if fused_lm_head:
        labels = stock["labels"][packing.src_row, packing.src_col].masked_fill(~scored, _LABEL_IGNORE)
        with _score_labelled_positions_only():
            out = model(**inputs, shift_labels=labels, fused_lm_head=True)
        if compute_entropy and out.entropy is None:
            raise ValueError("the model's fused LM head does not compute entropy")
        logps = out.log_probs.reshape(-1)[flat]
        entropy = out.entropy.reshape(-1)[flat] if compute_entropy else None
        return logps, entropy
    # only scored columns reach the LM head; their logits come out flattened in row-major order
    logits = model(**inputs, logits_to_keep=scored, use_cache=False).logits / temperature
    where = torch.full(scored.shape, -1, dtype=torch.long, device=scored.device)
    where[scored] = torch.arange(int(scored.sum()), device=scored.device)
    picked = where.reshape(-1)[flat]
    index = stock["next_ids"][packing.src_row, packing.src_col].reshape(-1)[flat]
    logps = selective_log_softmax(logits[picked], index)
    return logps, entropy_from_logits(logits[picked]) if compute_entropy else None


@contextlib.contextmanager
def _score_labelled_positions_only() -> Iterator[None]:
    """TRL's fused LM head scores only the labelled positions where Triton runs, and every position elsewhere (so
    that a compiler sees one tile shape per batch). A packed row's prompt columns carry no label: on every device,
    only its completion positions reach the vocabulary projection (on the CPU it was 40% of the positions of a
    SmolVLM-256M row at G=8). The values are the same either way; unlabelled positions give 0."""
    before = trl_utils._use_triton
    trl_utils._use_triton = lambda device: True  # read by the fused forward for this choice only
    try:
        yield
    finally:
        trl_utils._use_triton = before


def grouped_per_token_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    fused_lm_head: bool = False,
    batch_size: int | None = None,
    num_images: Sequence[int] | None = None,
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    **unused: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (rows, logits_to_keep), and entropies when asked, equal to the stock forward's, with
    each group of rows that share a prompt and its images run as one packed row.

    Takes what TRL's `_get_per_token_logps_and_entropies` takes: prompt + completion ids (prompts left-padded,
    completions right-padded, the last `logits_to_keep` columns being the completions), their attention mask and
    the processor's image inputs for every row. Rows may come in any order; groups are found by content.
    `fused_lm_head=True` calls the model as TRL 1.16 does (`add_fused_lm_head`: its temperature applies, padded
    completion positions give 0); otherwise the model's logits divided by `temperature` are scored at every
    completion position. `batch_size` bounds the completions per forward (whole groups; a larger group is cut).
    Check `why_not_shared_prefix` first, and call it where the stock call would run (same autocast, same grad
    mode). Other keyword arguments (TRL's for other families) must be None.
    """
    extra = sorted(k for k, v in unused.items() if v is not None)
    if extra:
        raise ValueError(f"the group-shared prefix does not handle {', '.join(extra)}")
    implementation = _text_config(model)._attn_implementation
    if implementation not in EXACT_ATTENTION:
        raise ValueError(f"the group-shared prefix is not exact under {implementation} attention")
    rows, length = input_ids.shape
    prompt_len = length - logits_to_keep
    if prompt_len < 1:
        raise ValueError("the rows hold no prompt column before the completions")
    image_token = getattr(_config(model), "image_token_id", None)
    if image_token is not None and bool((input_ids[:, prompt_len - 1 :] == image_token).any()):
        raise ValueError("image tokens after the shared prefix (in the last prompt column or a completion)")

    images = RowImages(rows, pixel_values, pixel_attention_mask, image_grid_thw, num_images)
    positions = stock_position_ids(model, input_ids, attention_mask, image_grid_thw, mm_token_type_ids)
    next_ids, labels = _next_tokens(input_ids, attention_mask)
    stock = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "positions": positions,
        "next_ids": next_ids,
        "labels": labels,
    }
    groups = prompt_groups(input_ids, attention_mask, prompt_len, images.same if pixel_values is not None else None)
    order: list[int] = []
    logps, entropies = [], []
    for chunk in chunk_groups(groups, batch_size):
        packing = pack(chunk, prompt_len, logits_to_keep, input_ids.device)
        lp, ent = _forward(model, packing, stock, images, temperature, compute_entropy, fused_lm_head)
        order += packing.block_starts()[0]
        logps.append(lp)
        entropies.append(ent)
    # back to the stock row order
    inverse = torch.empty(rows, dtype=torch.long, device=input_ids.device)
    inverse[torch.tensor(order, device=input_ids.device)] = torch.arange(rows, device=input_ids.device)
    logps_out = torch.cat(logps)[inverse]
    entropies_out = torch.cat(entropies)[inverse] if compute_entropy else None
    return logps_out, entropies_out

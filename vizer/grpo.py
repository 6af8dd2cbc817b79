"""The runner's GRPOTrainer: TRL's, with
- the data order made a function of (seed, epoch), so that a resumed run sees the same images at the same steps
  as one that never stopped;
- each logging step's time split into `timing/*` phases (`vizer.watch.step_timing`), logged with TRL's own metrics;
- optionally each distinct picture of a step preprocessed once (`preprocess_once`, `vizer.fast.preprocess_once`);
- the sampled captions' health (`vizer.eval.health`) logged as `health/*` at each logging step;
- optionally each group's prompt and image read once by the language model in the log-prob and training forwards
  (`share_prefix`, `vizer.fast.shared_prefix`), with the training micro-batches cut between whole groups, and
  prefilled once in generation (`vizer.fast.prefill_once`);
- optionally the LoRA adapter merged into its weights while generating (`merge_for_generation`,
  `vizer.fast.merged_generation`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import trl.trainer.grpo_trainer as trl_grpo
from accelerate.utils import gather_object
from torch.utils.data import Sampler
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler, shuffle_sequence_dict

from rewards.common import completion_text
from vizer.eval.health import caption_health
from vizer.fast.merged_generation import merged_adapter
from vizer.fast.prefill_once import prefill_once
from vizer.fast.preprocess_once import PreprocessOnce
from vizer.fast.shared_prefix import grouped_per_token_logps
from vizer.watch.step_timing import PhaseClock


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler draws every epoch's order from one generator that keeps advancing; a run resumed in
    a later epoch starts that generator afresh and gets another order. Reseeding at each epoch fixes that
    (epoch 0 keeps the order TRL gives)."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


@contextlib.contextmanager
def instance_wrapped(obj: Any, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """`obj.name` replaced by `wrap(obj.name)` on this instance for the duration (nothing when obj is None);
    afterwards the instance is as before (the processor is saved with the adapter: no wrapper may stay)."""
    if obj is None:
        yield
        return
    had, before = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        if had:
            setattr(obj, name, before)
        else:
            delattr(obj, name)


def shuffle_whole_groups(group_size: int) -> Callable[[dict], dict]:
    """TRL's shuffle of a generation batch before it is cut into micro-batches, moving blocks of `group_size`
    consecutive rows (one prompt's completions, as TRL orders them) instead of single rows, so that each
    micro-batch holds whole groups for the shared prefix. The gradient of an optimizer step sums over all
    micro-batches either way; only which rows share a forward changes. Row-wise when the batch does not split."""

    def shuffle(seq_dict: dict) -> dict:
        size = len(next(v for v in seq_dict.values() if v is not None))
        if size % group_size:
            return shuffle_sequence_dict(seq_dict)
        # TRL's own draw (the same random numbers, so what is sampled afterwards is unchanged), groups in the
        # order their first row comes in it
        groups = list(dict.fromkeys((torch.randperm(size) // group_size).tolist()))
        order = (torch.tensor(groups)[:, None] * group_size + torch.arange(group_size)).flatten()

        def permute(v: Any) -> Any:
            if v is None or (isinstance(v, torch.Tensor) and v.ndim == 0):
                return v
            return v[order] if isinstance(v, torch.Tensor) else [v[i] for i in order]

        return {key: permute(value) for key, value in seq_dict.items()}

    return shuffle


class _StartClock(TrainerCallback):
    """The first interval starts with training, not with building the trainer."""

    def __init__(self, clock: PhaseClock) -> None:
        self.clock = clock

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock.restart()


class HealthBuffer:
    """The captions sampled since the last logging step, with their group, truncation and rewards."""

    def __init__(self) -> None:
        self.batches = 0  # generation batches seen: an image drawn again in a later batch is another group
        self.texts: list[str | None] = []
        self.groups: list[Any] = []
        self.truncated: list[bool] = []
        self.rewards: list[list[float]] = []

    def add(self, texts: list, groups: list, truncated: list[bool], rewards: list[list[float]]) -> None:
        self.batches += 1
        self.texts += texts
        self.groups += groups
        self.truncated += truncated
        self.rewards += rewards

    def take(self, names: list[str], weights: dict[str, float]) -> dict[str, float]:
        """The `health/*` metrics of the captions kept so far; the buffer starts afresh."""
        rewards = {name: [row[k] for row in self.rewards] for k, name in enumerate(names)}
        out = caption_health(self.texts, self.groups, self.truncated, rewards, weights)
        self.texts, self.groups, self.truncated, self.rewards = [], [], [], []
        return out


class CaptionGRPOTrainer(GRPOTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        on_gpu = self.accelerator.device.type == "cuda"
        self.clock = PhaseClock(sync=torch.cuda.synchronize if on_gpu else lambda: None)
        self.add_callback(_StartClock(self.clock))
        self.preprocess_once: PreprocessOnce | None = None  # set by the runner where it applies
        self.share_prefix = False  # set by the runner where it is exact
        self.merge_for_generation = False  # likewise
        self._health = HealthBuffer()

    # -- timing seams: each wraps one upstream method in its phase (see vizer.watch.step_timing) --------------------

    def training_step(self, *args: Any, **kwargs: Any):
        with self.clock.phase("forward_backward"):  # the loss forward and backward; generation nests inside
            return super().training_step(*args, **kwargs)

    def _generate_and_score_completions(self, *args: Any, **kwargs: Any):
        # padding, advantages, ...: not the training step's own work. The processor runs a second time in here
        # (for the log-prob forwards), where no method of the trainer wraps it: its image processor is timed.
        # With preprocess_once, both of TRL's processor passes over the batch are served from one pass over its
        # distinct pictures, cached for this batch only.
        try:
            with self.clock.phase("other"), instance_wrapped(self._image_processor, "preprocess", self._preprocess):
                return super()._generate_and_score_completions(*args, **kwargs)
        finally:
            if self.preprocess_once is not None:
                self.preprocess_once.clear()

    @property
    def _image_processor(self) -> Any:
        return getattr(self.processing_class, "image_processor", None)

    def _preprocess(self, preprocess: Callable) -> Callable:
        if self.preprocess_once is not None:
            preprocess = self.preprocess_once.wrap(preprocess)

        def timed(*args: Any, **kwargs: Any):
            with self.clock.phase("preprocess"):
                return preprocess(*args, **kwargs)

        return timed

    def _tokenize_prompts(self, *args: Any, **kwargs: Any):
        with self.clock.phase("preprocess"):
            return super()._tokenize_prompts(*args, **kwargs)

    def _generate_single_turn(self, *args: Any, **kwargs: Any):
        # with the shared prefix, generation prefills each group's prompt once too (vizer.fast.prefill_once)
        model = self.accelerator.unwrap_model(self.model_wrapped)
        prefilled = model if self.share_prefix else None
        with (
            self.clock.phase("generation"),
            merged_adapter(model) if self.merge_for_generation else contextlib.nullcontext(),
            instance_wrapped(
                prefilled, "generate", lambda generate: prefill_once(generate, prefilled, self.num_generations)
            ),
        ):
            return super()._generate_single_turn(*args, **kwargs)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        with self.clock.phase("reward"):
            rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.model.training:  # the one place a step's captions and their rewards are both at hand
            self._keep_for_health(inputs, completions, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def _keep_for_health(self, inputs, completions, completion_ids_list, rewards_per_func: torch.Tensor) -> None:
        stop = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        # the rewards come gathered over processes; the captions are gathered here in the same (process) order
        texts = gather_object([completion_text(c) for c in completions])
        batch = self._health.batches
        groups = gather_object(
            [
                (batch, x["image_id"])
                if "image_id" in x
                else (batch, self.accelerator.process_index, i // self.num_generations)
                for i, x in enumerate(inputs)
            ]
        )
        truncated = gather_object([bool(ids) and ids[-1] not in stop for ids in completion_ids_list])
        self._health.add(texts, groups, truncated, rewards_per_func.cpu().tolist())

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any):
        with self.clock.phase("forward_backward"):  # old/reference log-probs and the loss forward
            if self.share_prefix and not kwargs.get("compute_aux_loss"):
                return self._grouped_logps(*args, **kwargs)
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

    def _grouped_logps(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False, **kwargs
    ):
        """TRL's stock forward, chunk loop included, as one call that packs each group into one row."""
        kwargs.pop("compute_aux_loss", None)
        with self.accelerator.autocast():
            logps, entropies = grouped_per_token_logps(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                compute_entropy=compute_entropy,
                fused_lm_head=True,
                batch_size=batch_size,
                **kwargs,
            )
        return logps, entropies, None

    def _prepare_inputs(self, *args: Any, **kwargs: Any):
        if not self.share_prefix:
            return super()._prepare_inputs(*args, **kwargs)
        with instance_wrapped(trl_grpo, "shuffle_sequence_dict", lambda _: shuffle_whole_groups(self.num_generations)):
            return super()._prepare_inputs(*args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training logging step (not eval, not the end-of-training summary)
            logs.update(self.clock.take())
            weights = dict(zip(self.reward_func_names, self.reward_weights.tolist()))
            logs.update(self._health.take(self.reward_func_names, weights))
        super().log(logs, start_time)

    def _get_train_sampler(self, dataset=None) -> Sampler:
        sampler = super()._get_train_sampler(dataset)
        if type(sampler) is not RepeatSampler:
            return sampler
        return EpochSeededRepeatSampler(
            data_source=sampler.data_source,
            mini_repeat_count=sampler.mini_repeat_count,
            batch_size=sampler.batch_size,
            repeat_count=sampler.repeat_count,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
        )

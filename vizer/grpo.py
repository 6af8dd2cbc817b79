"""The runner's GRPOTrainer: TRL's, with
- the data order made a function of (seed, epoch), so that a resumed run sees the same images at the same steps
  as one that never stopped;
- each logging step's time split into `timing/*` phases (`vizer.step_timing`), logged with TRL's own metrics;
- optionally each distinct picture of a step preprocessed once (`preprocess_once`, `vizer.preprocess_once`);
- the sampled captions' health (`vizer.health`) logged as `health/*` at each logging step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import gather_object
from torch.utils.data import Sampler
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler

from rewards.common import completion_text
from vizer.health import caption_health
from vizer.preprocess_once import PreprocessOnce
from vizer.step_timing import PhaseClock


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
        self._health = HealthBuffer()

    # -- timing seams: each wraps one upstream method in its phase (see vizer.step_timing) --------------------

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
        with self.clock.phase("generation"):
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
            return super()._get_per_token_logps_and_entropies(*args, **kwargs)

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

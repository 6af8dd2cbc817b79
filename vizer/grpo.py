"""The runner's GRPOTrainer: TRL's, with the data order made a function of (seed, epoch) so that a resumed
run sees the same images at the same steps as one that never stopped."""

from __future__ import annotations

from torch.utils.data import Sampler
from trl import GRPOTrainer
from trl.trainer.utils import RepeatSampler


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's RepeatSampler draws every epoch's order from one generator that keeps advancing; a run resumed in
    a later epoch starts that generator afresh and gets another order. Reseeding at each epoch fixes that
    (epoch 0 keeps the order TRL gives)."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


class CaptionGRPOTrainer(GRPOTrainer):
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

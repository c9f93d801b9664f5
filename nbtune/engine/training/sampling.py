"""The order a run sees its rows in: grouped by length, and fixed by the seed and the epoch alone.

transformers' `LengthGroupedSampler` has two properties a notebook user trips over:
- it groups over the per-process batch, so N processes would see the data in another order than one
  process with the N-times batch (and follow another loss curve);
- it draws each epoch's permutation from torch's global random state, so the order depends on whatever
  drew random numbers before the epoch began: an evaluation's dataloader (adding `eval_steps` changed the
  training curve), dropout in the epoch before, and, after a resume in the middle of a later epoch, the
  state the new process started from (measured: a run stopped at step 6 of 10, 4 steps per epoch,
  resumed with other rows than the uninterrupted run's, and its losses parted at step 7).
Here grouping spans the global batch, each epoch's permutation comes from its own generator seeded with
`data_seed` and the epoch, and evaluations give back the random state they found. Hand-written because
transformers' sampler takes a generator but no epoch.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    """Length-grouped order drawn from (seed, epoch) only; the Trainer calls `set_epoch` each epoch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class DataOrder:
    """Trainer mixin: the sampler above in place of transformers' length-grouped one, and evaluations that
    leave the random state as they found it (an evaluation's dataloader draws its base seed from torch's
    global generator, which shifted every later dropout mask: `eval_steps` changed the training curve)."""

    def evaluate(self, *args: Any, **kwargs: Any) -> Any:
        with torch.random.fork_rng():
            return super().evaluate(*args, **kwargs)  # type: ignore[misc]

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        sampler = super()._get_train_sampler(*args, **kwargs)  # type: ignore[misc]
        if not isinstance(sampler, LengthGroupedSampler):
            return sampler
        train_args = self.args  # type: ignore[attr-defined]
        seed = train_args.data_seed if train_args.data_seed is not None else train_args.seed
        return EpochSeededLengthGroupedSampler(sampler.batch_size * train_args.world_size, sampler.lengths, seed)


__all__ = ["DataOrder", "EpochSeededLengthGroupedSampler"]

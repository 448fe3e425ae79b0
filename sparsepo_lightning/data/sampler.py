"""The training sampler of ``PreferenceDataModule``: a reshuffle per pass that checkpoints can replay exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


class PassShuffleSampler(RandomSampler):
    """A ``RandomSampler`` whose k-th pass over the data is ``randperm`` seeded with ``seed + k``.

    The number of passes already started (and, mid-pass, the batches done) is part of the DataModule's
    checkpoint state, so resuming from a checkpoint taken at the end of an epoch or in the middle of one replays
    exactly the order of an uninterrupted run, whatever epoch number Lightning assigns to the resumed epoch
    (mid-epoch: the rest of the interrupted pass, then the next passes). (Under DDP Lightning replaces this
    sampler, being a ``RandomSampler``, by its ``DistributedSampler``, which shuffles by ``seed + epoch`` instead.)

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed of the shuffle.
        passes: passes already started, e.g. restored from a checkpoint.
        skip: samples of the first pass to leave out (already trained on before a mid-epoch checkpoint); the
            length stays that of a full pass, so Lightning's restored batch counters line up.
    """

    def __init__(self, data_source: Sized, seed: int, passes: int = 0, skip: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.passes, self.skip = seed, passes, skip
        self.order: list[int] = []
        """The permutation of the current pass."""

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.passes)
        self.passes += 1
        self.order = torch.randperm(len(self.data_source), generator=generator).tolist()
        skip, self.skip = self.skip, 0
        yield from self.order[skip:]

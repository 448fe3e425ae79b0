"""The training sampler of ``PreferenceDataModule``: a reshuffle per pass that checkpoints can replay exactly."""

from __future__ import annotations

from collections.abc import Sized

from sparsepo_lightning.data.batching import BatchOrderSampler


class PassShuffleSampler(BatchOrderSampler):
    """The training pairs' order: the k-th pass over the data is ``randperm`` seeded with ``seed + k``, dealt to the
    ranks as ``DistributedSampler`` deals (padded to a multiple of W by repeating its first pairs; rank r takes every
    W-th from r). It is a ``DistributedSampler``, so Lightning keeps it under DDP/FSDP instead of putting in its own.

    The number of passes already started (and, mid-pass, the batches done) is part of the DataModule's
    checkpoint state, so resuming from a checkpoint taken at the end of an epoch or in the middle of one replays
    exactly the order of an uninterrupted run, in one process and on several, whatever epoch number Lightning
    assigns to the resumed epoch (mid-epoch: the rest of the interrupted pass, then the next passes). Lightning's
    ``DistributedSampler`` instead shuffles by ``seed + epoch`` and restarts an interrupted pass from its beginning.

    Args:
        data_source: the dataset (only its length is used).
        seed: base seed of the shuffle.
        passes: passes already started, e.g. restored from a checkpoint.
        skip: pairs of this rank's first pass to leave out (already trained on before a mid-epoch checkpoint); the
            length stays that of a full pass, so Lightning's restored batch counters line up.
    """

    def __init__(self, data_source: Sized, seed: int, passes: int = 0, skip: int = 0) -> None:
        super().__init__(data_source, seed, shuffle=True, passes=passes, skip=skip)

"""How ``PreferenceDataModule`` turns tokenised pairs into batches: the layout (``padded`` or ``packed``) and the
batch size (a fixed number of pairs, or a token budget per micro-batch, ``data.max_tokens``).

Token-budget batching groups the pairs once, in a seeded random order, greedily into micro-batches whose cost in
the chosen layout stays within ``max_tokens`` (``padded``: 2 × pairs × longest row; ``packed``: the packed rows'
positions), so memory is predictable whatever the length mix. Each pass then visits these micro-batches in the order
``randperm(seed + pass)``, dealt round-robin to the ranks (``BatchOrderSampler``, a ``DistributedSampler`` that
Lightning keeps as it is); the pass count and the micro-batches done are checkpointed like the pair sampler's.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence, Sized
from typing import Literal

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from sparsepo_lightning.data.collate_packed import collate_packed, first_fit, padded_row_lengths, segment_lengths
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.types import PreferenceBatch

Layout = Literal["padded", "packed", "auto"]
Features = Mapping[str, Sequence[int]]
Collate = Callable[[Sequence[Features]], PreferenceBatch]


def check_batching(layout: str, max_tokens: int | None, pack_length: int | None, max_length: int,
                   paired: bool) -> None:
    """``ConfigError`` with the fix for layout / token-budget options that cannot work."""
    if layout not in ("padded", "packed", "auto"):
        raise ConfigError(f"data.layout={layout!r}: must be padded, packed or auto.")
    if layout != "padded" and not paired:
        raise ConfigError(f"data.layout={layout} packs the two responses of a pair behind their shared prompt; "
                          "unpaired examples have nothing to share. Fix: data.layout: padded.")
    if pack_length is not None and (layout == "padded" or pack_length < 1):
        raise ConfigError(f"data.pack_length={pack_length}: needs data.layout: packed (or auto) and a value >= 1 "
                          "(tokens per packed row), or null (packed: all pairs of a micro-batch in one row).")
    if max_tokens is not None and max_tokens < 2 * max_length:
        raise ConfigError(
            f"data.max_tokens={max_tokens} is below 2 × data.max_length ({2 * max_length}), the most a single pair "
            f"can cost; such a pair would fit in no micro-batch. Fix: max_tokens >= {2 * max_length}, or a smaller "
            "max_length.")


def layout_collate(layout: Layout, base: Collate, pad_token_id: int, pack_length: int | None,
                   model: str | None = None) -> Collate:
    """The collate function of a layout: ``base`` (the module's ``collate_fn``) for padded, ``collate_packed``, or
    for ``auto`` the cost model's choice per micro-batch for the model named ``model`` (``layout_cost.py``)."""
    if layout == "auto":
        from sparsepo_lightning.data.layout_cost import auto_collate

        return auto_collate(pad_token_id, pack_length, model)
    if layout == "packed":
        return functools.partial(collate_packed, pad_token_id=pad_token_id, pack_length=pack_length)
    return functools.partial(base, pad_token_id=pad_token_id)


def budget_batches(features: Sequence[Features], max_tokens: int, layout: Layout, pack_length: int | None,
                   order: Sequence[int]) -> list[list[int]]:
    """Greedy micro-batches of the pairs in ``order``: a pair joins the current micro-batch while the cost of the
    micro-batch in ``layout`` stays within ``max_tokens`` (``padded`` and ``auto``, whose choice never exceeds the
    padded positions: 2 × pairs × longest row, as ``packing.padded_cost``; ``packed``: rows × longest packed row,
    as ``packing.packed_cost``), else starts the next one. Each pair's lengths are computed once."""
    batches: list[list[int]] = []
    current: list[int] = []
    fills: list[list[int]] = []  # packed: per packing (the pairs', each variant's) tokens in each of its rows
    longest: list[int] = []  # padded: longest row of the current micro-batch (and of each prompt variant)
    for index in order:
        feature = features[index]
        if layout == "packed":
            size = segment_lengths(feature)  # the pair's segment, then each prompt variant's
            trial = [list(f) for f in fills] or [[] for _ in size]
            for group, n in zip(trial, size, strict=True):
                first_fit(group, n, pack_length)
            cost = sum(len(group) * max(group) for group in trial)
        else:
            size = padded_row_lengths(feature)  # the pair's rows, then each prompt variant's
            longest_rows = [max(a, b) for a, b in zip(longest or size, size, strict=True)]
            cost = 2 * (len(current) + 1) * sum(longest_rows)
        if current and cost > max_tokens:
            batches.append(current)
            current, fills, longest = [], [], []
            trial = [[n] for n in size]
        current.append(index)
        fills, longest = (trial, []) if layout == "packed" else ([], longest_rows if current[1:] else size)
    if current:
        batches.append(current)
    return batches


def seeded_order(n: int, seed: int | None) -> list[int]:
    """``randperm(n)`` seeded with ``seed``; ``range(n)`` for None."""
    if seed is None:
        return list(range(n))
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


class BatchList(Dataset):
    """A dataset whose item ``i`` is micro-batch ``i`` collated (``DataLoader(batch_size=None)`` serves it)."""

    def __init__(self, features: Sequence[Features], batches: list[list[int]], collate: Collate) -> None:
        self.features, self.batches, self.collate = features, batches, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> PreferenceBatch:
        return self.collate([self.features[j] for j in self.batches[i]])


class BatchOrderSampler(DistributedSampler):
    """Order of the micro-batches in each pass, and their share per rank (for the pairs of a fixed batch size, its
    subclass ``sampler.PassShuffleSampler``).

    Pass ``k`` visits the micro-batches in ``randperm(seed + k)`` order (``shuffle``) or in order; with W ranks the
    order is padded to a multiple of W by repeating its first micro-batches (as ``DistributedSampler`` pads) and
    rank r takes every W-th from r. ``skip`` micro-batches of the first pass are left out (resuming mid-pass); the
    length stays that of a full pass.

    Args:
        data_source: the ``BatchList`` (any sized dataset).
        seed: base seed of the per-pass shuffle.
        shuffle: reshuffle each pass (training) or keep the order (validation).
        passes: passes already started (from a checkpoint).
        skip: micro-batches of this rank's first pass already done.
    """

    def __init__(self, data_source: Sized, seed: int, shuffle: bool, passes: int = 0, skip: int = 0) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if initialized else (1, 0)
        super().__init__(data_source, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.passes, self.skip = passes, skip
        self.order: list[int] = []
        """This rank's micro-batch indices of the current pass."""

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        order = seeded_order(len(self.dataset), self.seed + self.passes if self.shuffle else None)
        self.passes += 1
        padded = order + (order * self.num_replicas)[: len(self) * self.num_replicas - len(order)]
        self.order = padded[self.rank :: self.num_replicas]
        skip, self.skip = self.skip, 0
        yield from self.order[skip:]


def budget_loader_parts(features: Sequence[Features], max_tokens: int, layout: Layout, pack_length: int | None,
                        collate: Collate, seed: int | None) -> BatchList:
    """The ``BatchList`` of a split: pairs grouped once in ``seeded_order(len, seed)`` (file order for None)."""
    order = seeded_order(len(features), seed)
    return BatchList(features, budget_batches(features, max_tokens, layout, pack_length, order), collate)


def log_budget_batches(split: str, layout: Layout, max_tokens: int, pack_length: int | None,
                       batches: BatchList) -> str:
    """Log (rank 0) and return how a split was grouped: micro-batches, pairs per micro-batch, budget used."""
    from lightning.pytorch.utilities import rank_zero_info

    from sparsepo_lightning.data.collate_packed import packed_cost, padded_cost

    sizes = [len(b) for b in batches.batches]
    cost = functools.partial(packed_cost, pack_length=pack_length) if layout == "packed" else padded_cost
    used = sum(cost([batches.features[i] for i in b]) for b in batches.batches) / (len(sizes) * max_tokens)
    message = (f"data ({split}): {sum(sizes)} pairs in {len(sizes)} micro-batches of {min(sizes)}-{max(sizes)} "
               f"pairs within max_tokens={max_tokens} ({layout} layout; {used:.0%} of the budget used on average)")
    rank_zero_info(message)
    return message

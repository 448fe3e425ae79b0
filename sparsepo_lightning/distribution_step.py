"""The module's step around full-distribution statistics (``distributions.py``): which statistics the objective and
the masker declare, which extra frozen models they read, and computing them between ``token_stats`` and the masks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sparsepo_lightning.distributions import REFERENCE, DistributionStatistic, Models, distribution_stats
from sparsepo_lightning.logprobs import frozen_outputs, output_head, step_masks
from sparsepo_lightning.types import TokenMasks, TokenStats


def declared(*owners: Any) -> dict[str, DistributionStatistic]:
    """The statistics an objective and a masker declare (``distribution_statistics()``), merged by name.

    Raises:
        ValueError: two owners declare the same name.
    """
    merged: dict[str, DistributionStatistic] = {}
    for owner in owners:
        for name, stat in (owner.distribution_statistics() if owner is not None else {}).items():
            if name in merged:
                raise ValueError(f"two parts of the run declare the distribution statistic {name!r}; rename one.")
            merged[name] = stat
    return merged


def frozen_names_read(*owners: Any) -> tuple[str, ...]:
    """Extra frozen models the statistics of ``owners`` read (each owner's own ``frozen_model_names`` aside)."""
    return tuple(sorted({n for stat in declared(*owners).values() for n in stat.frozen_model_names()}))


def step_masks_and_statistics(module: Any, batch: Any, stats: TokenStats, policy_hidden: Tensor, reference: Any,
                              inference: bool) -> TokenMasks | None:
    """The module's step after ``token_stats``: the full-distribution statistics its objective and masker declare
    into ``stats.distribution`` (the objective's with gradient, the masker's without: maskers get detached
    statistics anyway), then the masker's masks (``logprobs.step_masks``; None without a masker).

    Args:
        module: the ``PreferenceModule`` (its objective, masker, extra frozen models and ``chunk_size``).
        reference: the step's ``ReferenceOutputs`` or None. inference: run the frozen models in inference mode
            (not under FSDP2).
    """
    objective, masker, chunk_size = module.objective, module.masker, module.hparams.chunk_size
    frozen = step_frozen_outputs(objective, masker, module.frozen_models, batch, chunk_size, inference)
    others: Models = {name: (out.last_hidden, out.head) for name, out in (frozen or {}).items()}
    if reference is not None:
        others[REFERENCE] = (reference.last_hidden, reference.head)
    labels, response_mask = batch.shifted_labels()
    head = output_head(module._causal_lm)
    for owner, grad in ((objective, True), (masker, False)):
        statistics = declared(owner)
        if statistics:
            with torch.enable_grad() if grad else torch.no_grad():
                stats.distribution.update(distribution_stats(statistics, policy_hidden, labels, response_mask, head,
                                                             others, chunk_size))
    return None if masker is None else step_masks(masker, module.frozen_models, batch, stats, reference, chunk_size,
                                                  inference, frozen=frozen)


def step_frozen_outputs(objective: Any, masker: Any, frozen_models: Mapping[str, Any] | None, batch: Any,
                        chunk_size: int, inference: bool) -> dict[str, Any] | None:
    """Outputs of the extra frozen models (``logprobs.frozen_outputs``) when full-distribution statistics read
    some, run once and shared with the masker; None otherwise (the masker runs its own, as without statistics)."""
    names = set(frozen_names_read(objective, masker))
    if not names:
        return None
    names |= set(masker.frozen_model_names() if masker is not None else ())
    labels, response_mask = batch.shifted_labels()
    return frozen_outputs({name: frozen_models[name] for name in sorted(names)}, batch.input_ids,
                          batch.attention_mask, labels, response_mask, chunk_size, inference, batch.packed)

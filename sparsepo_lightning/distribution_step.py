"""The module's step around full-distribution statistics (``distributions.py``) and prompt variants
(``prompt_variants.py``): which statistics and variants the objective and the masker declare, which extra frozen
models they read (and which model scores the variants), and computing them between ``token_stats`` and the masks."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from sparsepo_lightning.distributions import REFERENCE, DistributionStatistic, Models, distribution_stats
from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.logprobs import final_hidden_states, frozen_outputs, output_head, step_masks, token_stats
from sparsepo_lightning.prompt_variants import declared_scorers, declared_variants
from sparsepo_lightning.types import PreferenceBatch, TokenMasks, TokenStats, scatter_response


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
    """The module's step after ``token_stats``: the log-probs under the prompt variants the objective and masker
    declare, each scored by the model its owner names (``variant_scorer``), into ``stats.variant_logps``
    (``variant_logps``), the full-distribution statistics they declare into ``stats.distribution`` (the objective's
    with gradient, the masker's without: maskers get detached statistics anyway), then the masker's masks
    (``logprobs.step_masks``; None without a masker).

    Args:
        module: the ``PreferenceModule`` (its objective, masker, extra frozen models and ``chunk_size``).
        reference: the step's ``ReferenceOutputs`` or None. inference: run the frozen models in inference mode
            (not under FSDP2).
    """
    objective, masker, chunk_size = module.objective, module.masker, module.hparams.chunk_size
    variants, scorers = declared_variants(objective, masker), declared_scorers(objective, masker)
    for scorer in sorted(set(scorers.values())):
        model, context = variant_scorer(module, scorer)
        stats.variant_logps.update(variant_logps(model, batch, {n: t for n, t in variants.items()
                                                                if scorers[n] == scorer}, chunk_size, context))
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


def variant_scorer(module: Any, scorer: str) -> tuple[Any, AbstractContextManager | None]:
    """``(causal LM, context to run it in)`` that scores prompt-variant rows for ``scorer``: the policy; or the
    frozen reference (with LoRA and no separate reference: the policy inside ``disable_adapter()``).

    Raises:
        ConfigError: ``scorer`` is ``"reference"`` but the run has no reference (a reference-free objective).
    """
    if scorer == "policy":
        return module._causal_lm, None
    if module.reference is not None:
        return module.reference, None
    if module.uses_adapter_reference:
        return module._causal_lm, module.policy.disable_adapter()
    raise ConfigError(f"the prompt variants are scored by the reference, but {type(module.objective).__name__} "
                      "loads none (reference-free). Fix: scorer: policy, or an objective with needs_reference.")


def variant_logps(model: Any, batch: PreferenceBatch, names: Mapping[str, str], chunk_size: int,
                  context: AbstractContextManager | None = None) -> dict[str, Tensor]:
    """Per prompt variant in ``names``: ``log π(y^t | x_variant, y^<t)`` of the batch's label tokens, computed by
    ``model`` (the scoring model: the policy or the frozen reference, ``variant_scorer``; run inside ``context``)
    on the batch's variant rows without gradient, moved onto the batch's own shifted response positions,
    ``(2B, T-1)``.

    Raises:
        ValueError: the batch carries no rows for a declared variant (e.g. a data module built without them).
    """
    if not names:
        return {}
    missing = sorted(set(names) - set(batch.prompt_variants or {}))
    if missing:
        raise ValueError(f"the method declares the prompt variants {missing}, but the batch carries no rows for them. "
                         "Fix: train through PreferenceDataModule under the trainer (its setup adds the method's "
                         "variants), or pass data.prompt_variants with the method's templates.")
    _, response_mask = batch.shifted_labels()
    out = {}
    with torch.no_grad(), context or nullcontext():
        for name in names:
            rows = batch.prompt_variants[name]
            labels, mask = rows.shifted_labels()
            hidden, _ = final_hidden_states(model, rows.input_ids, rows.attention_mask, packed=rows.packed)
            logps = token_stats(hidden, labels, mask, output_head(model), with_kl=False,
                                chunk_size=chunk_size).policy_logps
            out[name] = scatter_response(logps[mask], response_mask)
    return out

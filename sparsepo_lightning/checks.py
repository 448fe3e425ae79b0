"""Start-up checks of ``PreferenceModule`` options: each names the option and the fix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from sparsepo_lightning.errors import ConfigError
from sparsepo_lightning.masks.base import TokenMasker
from sparsepo_lightning.objectives import Objective


def check_options(lr: float, mask_lr: float | None, warmup_ratio: float, chunk_size: int,
                   max_consecutive_nonfinite: int, mask_collapse_steps: int) -> None:
    """Reject contradictory or out-of-range numeric options at construction, naming the option and the fix."""
    if lr <= 0:
        raise ConfigError(f"model.lr={lr}: must be > 0.")
    if mask_lr is not None and mask_lr <= 0:
        raise ConfigError(f"model.mask_lr={mask_lr}: must be > 0. Fix: a positive value, or null to use model.lr. "
                         "(To freeze the masks use a fixed masker such as UniformMasker.)")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ConfigError(f"model.warmup_ratio={warmup_ratio}: must be in [0, 1) (a fraction of the optimizer steps).")
    if chunk_size < 1:
        raise ConfigError(f"model.chunk_size={chunk_size}: must be >= 1 (response tokens per LM-head call).")
    if max_consecutive_nonfinite < 1:
        raise ConfigError(f"model.max_consecutive_nonfinite={max_consecutive_nonfinite}: must be >= 1.")
    if mask_collapse_steps < 1:
        raise ConfigError(f"model.mask_collapse_steps={mask_collapse_steps}: must be >= 1.")


def check_masker_objective(masker: TokenMasker | None, objective: Objective) -> None:
    """A masker is only meaningful with an objective that uses token masks, and needs the reference it reads."""
    if masker is not None and not objective.uses_masks:
        raise ConfigError(f"masker={type(masker).__name__} has no effect with objective "
                         f"{type(objective).__name__}, which uses no token masks (SparsePO and WeightedDPO do). "
                         "Remove `masker` or choose an objective that uses it.")
    if masker is not None and masker.needs_reference and not objective.needs_reference:
        raise ConfigError(f"masker={type(masker).__name__} reads the reference model, which the reference-free "
                         f"objective {type(objective).__name__} does not load. Fix: a masker that needs no reference, "
                         "or an objective with a reference.")
    if masker is not None:
        masker.use_objective(objective)


def reference_cache(objective: Objective, masker: TokenMasker | None, enabled: bool) -> Any:
    """``model.reference_cache``: the callback that builds and serves the cached reference statistics
    (``reference_cache.CachedReference``, inactive unless ``enabled``); a ``ConfigError`` with the reason when the
    objective or the masker needs the live reference."""
    from sparsepo_lightning.reference_cache import CachedReference

    return CachedReference(objective, masker, enabled)


def check_frozen_models(masker: TokenMasker | None, frozen_models: dict[str, str] | None,
                        objective: Objective | None = None) -> None:
    """Every extra frozen model the masker or the objective's full-distribution statistics read is configured, and
    every configured one is read."""
    from sparsepo_lightning.distribution_step import frozen_names_read

    wanted = set(masker.frozen_model_names()) if masker is not None else set()
    wanted |= set(frozen_names_read(objective, masker))
    given = set(frozen_models or {})
    if wanted - given:
        missing = sorted(wanted - given)
        reader = f"model.masker={type(masker).__name__}" if masker is not None else ""
        reader = reader or f"model.objective={type(objective).__name__}"
        raise ConfigError(
            f"{reader} reads the frozen model(s) {', '.join(missing)}, which "
            f"model.frozen_models does not define (it has: {', '.join(sorted(given)) or 'none'}). Fix: "
            f"model.frozen_models: {{{', '.join(f'{n}: <path or alias>' for n in missing)}}}.")
    if given - wanted:
        unused = sorted(given - wanted)
        raise ConfigError(
            f"model.frozen_models defines {', '.join(unused)}, which no part of the run reads "
            f"(masker: {type(masker).__name__ if masker is not None else 'none'}, objective: "
            f"{type(objective).__name__ if objective is not None else 'none'}). Fix: remove them, or use a masker or "
            "objective that reads them.")


def check_masker_reference(masker: TokenMasker, reference: nn.Module) -> None:
    """A masker reading per-layer states needs a reference that exposes them (a decoder-only HF causal LM)."""
    config = getattr(reference, "config", None)
    if masker.needs_layers and not all(hasattr(config, k) for k in ("num_hidden_layers", "hidden_size")):
        raise ConfigError(
            f"model.masker={type(masker).__name__} reads the reference's per-layer hidden states, but the reference "
            f"{type(reference).__name__} exposes none (its config has no num_hidden_layers/hidden_size). Fix: use a "
            "Hugging Face decoder-only causal LM as model.reference, or an ActivationMasker/UniformMasker."
        )


def check_precision(precision: str, parameters: Iterable[tuple[str, nn.Parameter]], dtype: str) -> None:
    """``16-mixed`` scales fp16 gradients with a GradScaler, which cannot unscale float16 trainable weights."""
    if precision.startswith("16") and precision != "16-true":
        fp16 = [n for n, p in parameters if p.requires_grad and p.dtype == torch.float16]
        if fp16:
            raise ConfigError(
                f"trainer.precision={precision} scales fp16 gradients with a GradScaler, which cannot unscale "
                f"float16 trainable weights (model.dtype={dtype}; e.g. {fp16[0]}). Fix: "
                "model.dtype: float32 with precision 16-mixed, or bf16-mixed, or model.lora (fp32 adapters)."
            )


def check_attention_device(attn_implementation: str | None, device_type: str) -> None:
    """FlexAttention cannot train on CPU: torch has no CPU backward for it (and a second batch shape fails to
    compile). Refused before the first step instead of failing inside it."""
    if attn_implementation == "flex_attention" and device_type == "cpu":
        raise ConfigError(
            "model.attn_implementation=flex_attention cannot train on CPU (torch has no CPU backward for "
            "FlexAttention). Fix: model.attn_implementation: sdpa (the packed layout takes it too), or train on a GPU.")


def check_packed_layout(policy: nn.Module, reference: nn.Module | None, frozen: nn.ModuleDict | None) -> bool:
    """Before the first packed batch (``data.layout: packed``): each model's attention takes the 4D block mask and
    it honours position ids. One tiny pair runs through each model in both layouts; hidden states that differ
    beyond rounding mean the model ignores the mask or the positions (e.g. custom remote code). Every rank runs it
    (under FSDP2 each forward is a collective).

    Returns:
        True (all models passed).

    Raises:
        ConfigError: the model's attention implementation cannot take the mask, or its outputs differ; the message
            names the model and the fix (``data.layout: padded``).
    """
    from sparsepo_lightning.data.collate_packed import collate_packed
    from sparsepo_lightning.logprobs import final_hidden_states
    from sparsepo_lightning.packing import check_attention
    from sparsepo_lightning.reference_release import released

    pair = {"chosen_input_ids": [1, 2, 3, 4, 5], "rejected_input_ids": [1, 2, 3, 6]}
    pair.update(chosen_labels=[-100, -100, -100, 4, 5], rejected_labels=[-100, -100, -100, 6])
    models = {"policy": policy, "reference": reference, **{f"frozen_models.{k}": m for k, m in (frozen or {}).items()}}
    for name, model in ((n, m) for n, m in models.items() if m is not None and not released(m)):  # released: unrun
        check_attention(model.config._attn_implementation, name)
        batch = collate_packed([pair], pad_token_id=0)
        device = model.get_input_embeddings().weight.device
        ids, attention = batch.input_ids.to(device), batch.attention_mask.to(device)
        packed = batch.packed.to(device)
        with torch.no_grad():
            padded_hidden, _ = final_hidden_states(model, ids, attention)
            packed_hidden, _ = final_hidden_states(model, ids, attention, packed=packed)
        scale = padded_hidden.float().abs().amax().clamp(min=1.0)
        tolerance = 1e-3 if padded_hidden.dtype == torch.float32 else 5e-2
        error = ((padded_hidden - packed_hidden).float() * attention[..., None]).abs().amax() / scale
        if not error <= tolerance:
            raise ConfigError(
                f"data.layout=packed: {name} ({type(model).__name__}) gives different hidden states on the packed "
                f"layout (relative error {float(error):.2g}): its attention ignores the 4D block mask or its "
                "position ids. Fix: data.layout: padded for this model.")
    return True
